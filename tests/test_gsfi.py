import math

import pytest
import torch

import lightning_haste as lh
from lightning_haste import _reference
from lightning_haste import functional as LF

from reference import masked_dense_weight, reference_forward_backward

# (batch shape, in_features, out_features, fan_in, group_size, bias, memory_budget)
CASES = [
    ((5,), 30, 37, 7, 8, True, None),  # L not a multiple of G
    ((3,), 16, 10, 4, 1, True, None),  # G = 1: per-label fixed fan-in
    ((4,), 12, 20, 12, 4, True, None),  # fan_in = in_features
    ((1,), 24, 50, 6, 16, True, None),  # batch of 1
    ((2, 3), 20, 45, 5, 8, True, None),  # 3-D input
    ((6,), 40, 33, 9, 32, False, None),  # no bias, padded last group
    ((5,), 18, 3, 2, 32, True, None),  # a single, mostly padded group
    ((7,), 25, 61, 8, 4, True, 1024),  # tiny budget: one group per chunk
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-L{c[2]}-K{c[3]}-G{c[4]}")
def test_forward_and_gradients_match_float64_masked_dense(case):
    batch_shape, in_features, out_features, fan_in, group_size, bias, budget = case
    seed = hash(case) % 2**31
    gen = torch.Generator().manual_seed(seed)
    kwargs = {} if budget is None else {"memory_budget": budget}
    layer = lh.GroupSharedFanIn(
        in_features, out_features, fan_in, group_size, bias=bias, dtype=torch.float64, generator=gen, **kwargs
    )
    x = torch.randn(*batch_shape, in_features, dtype=torch.float64, generator=gen, requires_grad=True)
    grad_out = torch.randn(*batch_shape, out_features, dtype=torch.float64, generator=gen)

    out = layer(x)
    assert out.shape == (*batch_shape, out_features)
    out.backward(grad_out)

    ref_out, ref_gx, ref_gw, ref_gb = reference_forward_backward(
        x.reshape(-1, in_features), layer.weight, layer.group_index, layer.bias, out_features,
        grad_out.reshape(-1, out_features),
    )
    torch.testing.assert_close(out.detach().reshape(-1, out_features), ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad.reshape(-1, in_features), ref_gx, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, ref_gw, rtol=0, atol=1e-10)
    assert torch.equal(layer.weight.grad[out_features:], torch.zeros_like(layer.weight.grad[out_features:]))
    if bias:
        torch.testing.assert_close(layer.bias.grad, ref_gb, rtol=0, atol=1e-10)


def test_functional_matches_module_and_defaults_out_features():
    gen = torch.Generator().manual_seed(1)
    layer = lh.GroupSharedFanIn(10, 16, 3, 4, dtype=torch.float64, generator=gen)
    x = torch.randn(3, 10, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(
        LF.group_shared_fanin(x, layer.weight, layer.group_index, layer.bias, 16), layer(x), rtol=0, atol=0
    )
    assert LF.group_shared_fanin(x, layer.weight, layer.group_index).shape == (3, 16)


@pytest.mark.parametrize("group_size,bias", [(1, True), (3, False), (4, True)])
def test_gradcheck(group_size, bias):
    gen = torch.Generator().manual_seed(7 + group_size)
    weight = torch.randn(2 * group_size, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight_mask = torch.ones_like(weight)
    out_features = 2 * group_size - (1 if group_size > 1 else 0)
    group_index = lh.sample_group_index(2, 6, 3, generator=gen)
    b = torch.randn(out_features, dtype=torch.float64, generator=gen, requires_grad=True) if bias else None
    x = torch.randn(4, 6, dtype=torch.float64, generator=gen, requires_grad=True)

    def fn(x, weight, *maybe_bias):
        bias = maybe_bias[0] if maybe_bias else None
        return LF.group_shared_fanin(x, weight * weight_mask, group_index, bias, out_features)

    inputs = (x, weight, b) if bias else (x, weight)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
def test_low_precision_dtypes_accumulate_in_float32(dtype, tol):
    gen = torch.Generator().manual_seed(3)
    layer = lh.GroupSharedFanIn(64, 100, 32, 8, dtype=dtype, generator=gen)
    x = torch.randn(9, 64, generator=gen).to(dtype).requires_grad_(True)
    grad_out = torch.randn(9, 100, generator=gen).to(dtype)
    out = layer(x)
    assert out.dtype == dtype
    out.backward(grad_out)
    ref_out, ref_gx, ref_gw, ref_gb = reference_forward_backward(
        x, layer.weight, layer.group_index, layer.bias, 100, grad_out
    )
    for got, ref in [(out, ref_out), (x.grad, ref_gx), (layer.weight.grad, ref_gw), (layer.bias.grad, ref_gb)]:
        assert got.dtype == dtype
        got = got.detach().double()
        rel = (got - ref).norm() / ref.norm()
        assert rel <= tol, rel
        # Rounding the float64 reference to the dtype bounds the error element by element.
        torch.testing.assert_close(got, ref.to(dtype).double(), rtol=4 * tol, atol=4 * tol * ref.abs().max().item())


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9, weight_decay=1e-2),
        lambda p: torch.optim.Adam(p, lr=0.1),
        lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adam", "adamw"],
)
def test_padding_weights_stay_zero_after_optimizer_steps(make_optimizer):
    gen = torch.Generator().manual_seed(11)
    layer = lh.GroupSharedFanIn(20, 27, 5, 8, generator=gen)
    assert layer.padded_out_features == 32
    optimizer = make_optimizer(layer.parameters())
    for _ in range(5):
        x = torch.randn(6, 20, generator=gen)
        loss = layer(x).square().mean() + layer(x).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.count_nonzero(layer.weight[27:]) == 0
    assert torch.count_nonzero(layer.weight[:27]) == 27 * 5


def test_state_dict_round_trip_restores_identical_outputs():
    a = lh.GroupSharedFanIn(30, 50, 6, 8, generator=torch.Generator().manual_seed(0))
    b = lh.GroupSharedFanIn(30, 50, 6, 8, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 30)
    assert not torch.equal(a(x), b(x))
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert b.group_index.dtype == torch.int32


def test_to_dense_matches_independent_masked_weight():
    layer = lh.GroupSharedFanIn(15, 22, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    dense = layer.to_dense()
    assert dense.shape == (22, 15)
    torch.testing.assert_close(dense, masked_dense_weight(layer.weight, layer.group_index, 22, 15), rtol=0, atol=0)
    assert torch.equal((dense != 0).sum(dim=1), torch.full((22,), 4))


def _interleaved_reference(row):
    """Residue classes mod 8, each ascending, dealt out in turn (written independently, slowly)."""
    classes = [sorted(f for f in row if f % 8 == r) for r in range(8)]
    out = []
    for q in range(max(len(c) for c in classes)):
        out += [c[q] for c in classes if q < len(c)]
    return out


def test_sample_group_index_rows_distinct_interleaved_and_reproducible():
    idx = lh.sample_group_index(500, 40, 17, generator=torch.Generator().manual_seed(2))
    assert idx.dtype == torch.int32 and idx.shape == (500, 17)
    assert int(idx.min()) >= 0 and int(idx.max()) < 40
    assert all(len(set(row)) == 17 for row in idx.tolist())
    assert all(row == _interleaved_reference(row) for row in idx.tolist())
    again = lh.sample_group_index(500, 40, 17, generator=torch.Generator().manual_seed(2))
    assert torch.equal(idx, again)
    full = lh.sample_group_index(3, 9, 9)
    assert torch.equal(full, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8], dtype=torch.int32).expand(3, 9))
    # every feature is reachable
    assert torch.unique(idx).numel() == 40
    # with balanced residues every aligned block of 8 slots has 8 distinct residues
    balanced = lh.sample_group_index(50, 64, 64)
    assert torch.equal((balanced % 8), torch.arange(64, dtype=torch.int32).remainder(8).expand(50, 64))


@pytest.mark.parametrize("in_features,fan_in", [(768, 128), (300, 24), (13, 8), (64, 64), (100, 96)])
def test_balanced_index_takes_equal_shares_of_every_residue_class(in_features, fan_in):
    gen = torch.Generator().manual_seed(in_features)
    idx = lh.sample_group_index(400, in_features, fan_in, generator=gen)
    assert all(len(set(row)) == fan_in for row in idx.tolist())
    assert int(idx.min()) >= 0 and int(idx.max()) < in_features
    # fan_in / 8 features of each residue, dealt out in turn: every aligned block of 8 slots is distinct
    assert torch.equal(idx % 8, torch.arange(fan_in, dtype=torch.int32).remainder(8).expand(400, fan_in))
    # within a class the draw is uniform: every feature turns up, at about the same rate
    counts = torch.bincount(idx.flatten().long(), minlength=in_features).double()
    assert int((counts == 0).sum()) == 0
    if in_features == 768:
        assert (counts / 400 - fan_in / in_features).abs().max() < 0.07


def test_uniform_index_draws_unbalanced_rows():
    gen = torch.Generator().manual_seed(3)
    idx = lh.sample_group_index(400, 768, 128, balanced=False, generator=gen)
    assert all(len(set(row)) == 128 for row in idx.tolist())
    per_class = torch.stack([(idx % 8 == r).sum(1) for r in range(8)], 1)
    assert (per_class != 16).any()  # a uniform draw is almost never balanced in all 400 rows
    assert all(row == _interleaved_reference(row) for row in idx[:20].tolist())


def test_interleave_group_index_keeps_the_function():
    layer = lh.GroupSharedFanIn(30, 45, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        layer.group_index.copy_(layer.group_index.sort(dim=1).values)  # an index from elsewhere
    x = torch.randn(5, 30, dtype=torch.float64)
    before, dense = layer(x), layer.to_dense()
    layer.interleave_group_index_()
    assert all(row == _interleaved_reference(row) for row in layer.group_index.tolist())
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.to_dense(), dense, rtol=0, atol=0)


def test_no_grad_and_inputs_without_grad():
    layer = lh.GroupSharedFanIn(12, 9, 3, 4, dtype=torch.float64)
    x = torch.randn(2, 12, dtype=torch.float64)
    with torch.no_grad():
        y = layer(x)
    assert not y.requires_grad
    layer(x).sum().backward()  # x needs no grad: only the parameters get gradients
    assert layer.weight.grad is not None and x.grad is None


def test_non_contiguous_input():
    layer = lh.GroupSharedFanIn(12, 9, 3, 4, dtype=torch.float64)
    x = torch.randn(12, 5, dtype=torch.float64).T
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()), rtol=0, atol=0)


def test_memory_budget_bounds_chunk_size():
    # 1 MiB budget with 2 M labels: the forward works group-chunk by group-chunk.
    groups = _reference.groups_per_chunk(batch=64, fan_in=32, group_size=32, dtype=torch.float32, budget=2**20)
    per_group = 4 * (3 * 64 * 32 + 2 * 64 * 32 + 2 * 32 * 32)
    assert groups == 2**20 // per_group
    assert math.isclose(groups * per_group, 2**20, rel_tol=0.1)
