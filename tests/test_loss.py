"""The fused output-layer loss (HeadTailOutput.loss) against a float64 dense reference, on the CPU path."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lightning_haste import HeadTailOutput, ops
from lightning_haste.data import XMCDataModule
from lightning_haste.loss import loss_chunks, sparse_targets, workspace_bytes
from lightning_haste.module import HasteXMCModule, sparse_bce_with_logits, sparse_squared_hinge

from reference import masked_dense_weight

LOSSES = ("bce", "squared_hinge")


def _layer(num_labels=203, in_features=40, head_ratio=0.1, group_size=8, fan_in=8, dtype=torch.float64, seed=0,
           **kw):
    rng = np.random.default_rng(seed)
    freq = rng.integers(0, 50, num_labels)
    return HeadTailOutput(in_features, freq, head_ratio=head_ratio, fan_in=fan_in, group_size=group_size,
                          dtype=dtype, generator=torch.Generator().manual_seed(seed), **kw)


def _dense_logits(layer, x64):
    """Float64 logits [B, L] in original label order, from independent dense weights."""
    parts = []
    x64 = x64.to(torch.float64)
    perm = layer.label_permutation
    head_w = head_b = tail_w = tail_b = None
    if layer.head is not None:
        h0, h1 = layer.head_slice
        head_w = layer.head.weight.detach().double().requires_grad_(True)
        head_b = layer.head.bias.detach().double().requires_grad_(True)
        parts.append((perm[: layer.num_head_labels], x64[:, h0:h1] @ head_w.T + head_b))
    if layer.tail is not None:
        t0, t1 = layer.tail_slice
        tail = layer.tail
        tail_w = tail.weight.detach().double().requires_grad_(True)
        tail_b = tail.bias.detach().double().requires_grad_(True)
        # masked dense weight as a differentiable function of the per-label weights
        idx = tail.group_index.long()
        rows = torch.arange(layer.num_tail_labels)
        dense = torch.zeros(layer.num_tail_labels, t1 - t0, dtype=torch.float64)
        dense = dense.index_put((rows.unsqueeze(1), idx[rows // tail.group_size]), tail_w[: layer.num_tail_labels])
        expected = masked_dense_weight(tail.weight, tail.group_index, layer.num_tail_labels, t1 - t0)
        torch.testing.assert_close(dense.detach(), expected, rtol=0, atol=0)
        parts.append((perm[layer.num_head_labels :], x64[:, t0:t1] @ dense.T + tail_b))
    logits = torch.zeros(x64.shape[0], layer.num_labels, dtype=torch.float64)
    for columns, z in parts:
        logits = logits.index_copy(1, columns, z)
    return logits, (head_w, head_b, tail_w, tail_b)


def _reference(layer, x, targets, loss, reduction="batchmean"):
    """Loss and gradients (x, head weight, head bias, tail weight, tail bias) in float64 with dense targets."""
    x64 = x.detach().double().requires_grad_(True)
    logits, params = _dense_logits(layer, x64)
    y = torch.zeros_like(logits)
    for i, t in enumerate(targets):
        y[i, torch.as_tensor(t, dtype=torch.long)] = 1
    if loss == "bce":
        value = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
    else:
        value = torch.relu(1 - (2 * y - 1) * logits).square().sum()
    if reduction == "batchmean":
        value = value / x.shape[0]
    wanted = [x64] + [p for p in params if p is not None]
    grads = torch.autograd.grad(value, wanted)
    return value.detach(), grads


def _targets(batch, num_labels, gen, max_positives=6):
    out = []
    for _ in range(batch):
        n = int(torch.randint(0, max_positives + 1, (1,), generator=gen))
        out.append(torch.randperm(num_labels, generator=gen)[:n])
    return out


def _check(layer, x, targets, loss, rtol=1e-10, atol=1e-10, reduction="batchmean"):
    x = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    value = layer.loss(x, targets, loss=loss, reduction=reduction)
    value.backward()
    ref_value, ref_grads = _reference(layer, x, targets, loss, reduction)
    torch.testing.assert_close(value.double(), ref_value, rtol=rtol, atol=atol)
    grads = [x.grad] + [p.grad for p in (*(layer.head.parameters() if layer.head is not None else ()),
                                          *((layer.tail.weight, layer.tail.bias) if layer.tail is not None else ()))]
    ref_iter = iter(ref_grads)
    torch.testing.assert_close(grads[0].double(), next(ref_iter), rtol=rtol, atol=atol)
    if layer.head is not None:
        torch.testing.assert_close(layer.head.weight.grad.double(), next(ref_iter), rtol=rtol, atol=atol)
        torch.testing.assert_close(layer.head.bias.grad.double(), next(ref_iter), rtol=rtol, atol=atol)
    if layer.tail is not None:
        num = layer.num_tail_labels
        ref_w, ref_b = next(ref_iter), next(ref_iter)
        torch.testing.assert_close(layer.tail.weight.grad[:num].double(), ref_w[:num], rtol=rtol, atol=atol)
        assert torch.count_nonzero(layer.tail.weight.grad[num:]) == 0  # padding labels never move
        torch.testing.assert_close(layer.tail.bias.grad.double(), ref_b, rtol=rtol, atol=atol)
    return value


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("budget", [2**28, 1, 5000])
@pytest.mark.parametrize("slices", [{}, {"tail_features": (0, 24), "head_features": (10, 40)}])
def test_value_and_every_gradient_match_the_float64_reference(loss, budget, slices):
    """Odd label count (203, short last group), rows without positives and with many, chunked or not."""
    layer = _layer(memory_budget=budget, **slices)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(9, 40, dtype=torch.float64, generator=gen)
    targets = _targets(9, layer.num_labels, gen)
    targets[0] = torch.tensor([], dtype=torch.long)
    targets[1] = torch.randperm(layer.num_labels, generator=gen)[:150]  # many positives
    _check(layer, x, targets, loss)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("group_size", [1, 2, 3])
@pytest.mark.parametrize("budget", [2**28, 2000])
def test_every_group_size_matches_the_float64_reference(loss, group_size, budget):
    """Small groups, groups of one label included (their chunk logits are not row-major on the pure-PyTorch
    path), several rows, positives in every chunk."""
    layer = _layer(group_size=group_size, memory_budget=budget, seed=group_size)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(7, 40, dtype=torch.float64, generator=gen)
    targets = _targets(7, layer.num_labels, gen, max_positives=20)
    _check(layer, x, targets, loss)
    _check(layer, x, targets, loss, reduction="sum")


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("budget", [2**28, 3000])
def test_sum_reduction_matches_the_float64_reference(loss, budget):
    """``reduction="sum"``: the sum over all rows * labels entries, and its gradients."""
    layer = _layer(memory_budget=budget)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(7, 40, dtype=torch.float64, generator=gen)
    value = _check(layer, x, _targets(7, layer.num_labels, gen), loss, reduction="sum")
    fn = sparse_bce_with_logits if loss == "bce" else sparse_squared_hinge
    targets = _targets(7, layer.num_labels, torch.Generator().manual_seed(12))
    with torch.no_grad():
        unfused = fn(layer(x), targets, reduction="sum")
        torch.testing.assert_close(layer.loss(x, targets, loss=loss, reduction="sum"), unfused, rtol=1e-12, atol=0)
        torch.testing.assert_close(unfused / 7, fn(layer(x), targets), rtol=1e-12, atol=0)
    assert value.dtype == torch.float64


@pytest.mark.parametrize("loss", LOSSES)
def test_positives_only_in_the_head_or_only_in_the_tail(loss):
    layer = _layer(memory_budget=3000)
    head_ids = layer.label_permutation[: layer.num_head_labels]
    tail_ids = layer.label_permutation[layer.num_head_labels :]
    x = torch.randn(5, 40, dtype=torch.float64)
    _check(layer, x, [head_ids[i : i + 3] for i in range(5)], loss)
    _check(layer, x, [tail_ids[i * 7 : i * 7 + 4] for i in range(5)], loss)
    _check(layer, x, [torch.tensor([], dtype=torch.long)] * 5, loss)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("head_ratio", [0.0, 1.0])
def test_layer_with_only_a_head_or_only_a_tail(loss, head_ratio):
    layer = _layer(num_labels=61, head_ratio=head_ratio, memory_budget=2000)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 40, dtype=torch.float64, generator=gen)
    _check(layer, x, _targets(6, 61, gen), loss)


@pytest.mark.parametrize("loss", LOSSES)
def test_equals_the_unfused_losses_on_the_full_logits(loss):
    fn = sparse_bce_with_logits if loss == "bce" else sparse_squared_hinge
    layer = _layer(dtype=torch.float32, memory_budget=4000)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(8, 40, generator=gen)
    targets = _targets(8, layer.num_labels, gen)
    fused = layer.loss(x, targets, loss=loss)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, fn(layer(x), targets), rtol=1e-5, atol=1e-5)


def test_float64_stays_float64_in_the_unfused_losses_too():
    logits = torch.tensor([[40.0, -3.0, 1e-9]], dtype=torch.float64)
    targets = [torch.tensor([2])]
    exact = np.log1p(np.exp(-40.0)) + 40.0 + np.log1p(np.exp(-3.0)) + np.log1p(np.exp(1e-9)) - 1e-9
    value = sparse_bce_with_logits(logits, targets)
    assert value.dtype == torch.float64
    assert abs(value.item() - exact) <= 1e-14 * exact


def test_duplicate_positives_count_once_and_all_target_formats_agree():
    layer = _layer(memory_budget=4000)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 40, dtype=torch.float64, generator=gen)
    targets = [torch.tensor([3, 7]), torch.tensor([], dtype=torch.long), torch.tensor([200, 0, 5]), torch.tensor([9])]
    with_duplicates = [torch.tensor([3, 7, 3, 3]), torch.tensor([], dtype=torch.long), torch.tensor([200, 0, 5, 0]),
                       torch.tensor([9, 9])]
    expected = layer.loss(x, targets)
    assert layer.loss(x, with_duplicates).item() == expected.item()
    dense = np.zeros((4, layer.num_labels))
    for i, t in enumerate(targets):
        dense[i, t.numpy()] = 1
    assert layer.loss(x, sp.csr_matrix(dense)).item() == expected.item()
    assert layer.loss(x, torch.from_numpy(dense).to_sparse_csr()).item() == expected.item()
    assert layer.loss(x, [t.tolist() for t in targets]).item() == expected.item()
    assert layer.loss(x, [t.numpy().astype(np.int32) for t in targets]).item() == expected.item()


@pytest.mark.parametrize(
    "targets, error, match",
    [
        ([torch.tensor([1])] * 3, ValueError, "targets has 3 rows"),
        ([torch.tensor([1]), torch.tensor([203]), torch.tensor([0]), torch.tensor([0])], ValueError, r"\[0, 203\)"),
        ([torch.tensor([1]), torch.tensor([-1]), torch.tensor([0]), torch.tensor([0])], ValueError, r"\[0, 203\)"),
        ([torch.tensor([1.0])] * 4, TypeError, "integer"),
        ([torch.tensor([[1]])] * 4, ValueError, "1-D"),
        (torch.tensor([1, 2, 3, 4]), TypeError, "sequence"),
        (sp.csr_matrix((4, 10)), ValueError, "shape"),
    ],
)
def test_bad_targets_raise_before_anything_runs(targets, error, match):
    layer = _layer()
    before = [p.detach().clone() for p in layer.parameters()]
    with pytest.raises(error, match=match):
        layer.loss(torch.randn(4, 40, dtype=torch.float64), targets)
    assert all(torch.equal(a, b) for a, b in zip(before, layer.parameters(), strict=True))


def test_bad_loss_name_and_input_raise():
    layer = _layer()
    with pytest.raises(ValueError, match="loss must be one of"):
        layer.loss(torch.randn(2, 40, dtype=torch.float64), [[1], [2]], loss="mse")
    with pytest.raises(ValueError, match="in_features"):
        layer.loss(torch.randn(2, 41, dtype=torch.float64), [[1], [2]])
    with pytest.raises(TypeError, match="dtype"):
        layer.loss(torch.randn(2, 40, dtype=torch.float32), [[1], [2]])


@given(st.lists(st.lists(st.integers(0, 29), max_size=8), min_size=1, max_size=6))
@settings(max_examples=60, deadline=None)
def test_sparse_targets_parser_property(rows):
    parsed_rows, parsed_labels = sparse_targets(rows, len(rows), 30)
    expected = sorted({(i, label) for i, row in enumerate(rows) for label in row})
    assert list(zip(parsed_rows.tolist(), parsed_labels.tolist(), strict=True)) == expected
    dense = np.zeros((len(rows), 30))
    for i, label in expected:
        dense[i, label] = 1
    csr_rows, csr_labels = sparse_targets(sp.csr_matrix(dense), len(rows), 30)
    assert np.array_equal(csr_rows, parsed_rows) and np.array_equal(csr_labels, parsed_labels)


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any operation returns, except parameter-shaped ones
    (gradients and their slices are the size of what they belong to)."""

    def __init__(self, parameter_shapes):
        super().__init__()
        self.parameter_shapes = {tuple(s) for s in parameter_shapes}
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and tuple(t.shape) not in self.parameter_shapes:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("loss", LOSSES)
def test_no_tensor_of_batch_times_labels_elements_is_allocated(loss):
    batch, num_labels = 64, 20_000
    budget = batch * num_labels * 4 // 16  # a sixteenth of float32 logits
    layer = _layer(num_labels=num_labels, in_features=64, group_size=16, fan_in=16, dtype=torch.float32,
                   head_ratio=0.05, memory_budget=budget)
    x = torch.randn(batch, 64, requires_grad=True)
    targets = _targets(batch, num_labels, torch.Generator().manual_seed(6))
    chunks = loss_chunks(batch, layer.num_head_labels, layer.num_tail_labels, 16, 16, torch.float32, False,
                         workspace_bytes(batch, num_labels, budget))
    assert len(chunks.tail) > 1
    with _LargestTensor(p.shape for p in layer.parameters()) as probe:
        layer.loss(x, targets, loss=loss).backward()
    assert probe.largest * 8 < batch * num_labels, probe.largest
    # without a budget: a sixteenth of the 16-bit logits, at least 4 MiB
    assert workspace_bytes(batch, num_labels, 2**40) == 4 * 2**20
    assert workspace_bytes(128, 8_623_847, 2**40) == 128 * 8_623_847 * 2 // 16


def test_gradient_accumulation_adds_up():
    layer = _layer(memory_budget=4000)
    gen = torch.Generator().manual_seed(7)
    x1 = torch.randn(3, 40, dtype=torch.float64, generator=gen)
    x2 = torch.randn(5, 40, dtype=torch.float64, generator=gen)
    t1, t2 = _targets(3, layer.num_labels, gen), _targets(5, layer.num_labels, gen)
    (layer.loss(x1, t1) / 2).backward()
    (layer.loss(x2, t2) / 2).backward()
    accumulated = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    (layer.loss(x1, t1) / 2 + layer.loss(x2, t2) / 2).backward()
    for a, b in zip(accumulated, layer.parameters(), strict=True):
        torch.testing.assert_close(a, b.grad, rtol=1e-12, atol=1e-12)


def test_autocast_runs_in_the_autocast_dtype_with_float32_parameters():
    layer = _layer(dtype=torch.float32, memory_budget=4000)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(6, 40, generator=gen)
    targets = _targets(6, layer.num_labels, gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = layer.loss(x, targets)
    assert value.dtype == torch.float32
    value.backward()
    assert layer.tail.weight.grad.dtype == torch.float32
    exact, _ = _reference(layer, x, targets, "bce")
    torch.testing.assert_close(value.double(), exact, rtol=2e-2, atol=0)


@pytest.mark.parametrize("loss", LOSSES)
def test_bfloat16_on_the_cpu_accumulates_in_float32(loss):
    layer = _layer(dtype=torch.bfloat16, memory_budget=4000)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(6, 40, generator=gen).bfloat16()
    targets = _targets(6, layer.num_labels, gen)
    value = layer.loss(x, targets, loss=loss)
    assert value.dtype == torch.float32
    exact, _ = _reference(layer, x, targets, loss)
    torch.testing.assert_close(value.double(), exact, rtol=1e-2, atol=0)


def test_compiled_loss_matches_eager():
    layer = _layer(dtype=torch.float32, memory_budget=4000)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn(6, 40, generator=gen)
    targets = _targets(6, layer.num_labels, gen)

    def step(inputs):
        value = layer.loss(inputs, targets)
        return value, torch.autograd.grad(value, [inputs, layer.tail.weight, layer.head.weight])

    eager = step(x.clone().requires_grad_(True))
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager")(x.clone().requires_grad_(True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=0, atol=0)
    for a, b in zip(compiled[1], eager[1], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loss_ops_pass_opcheck():
    layer = _layer(dtype=torch.float32, memory_budget=4000)
    x = torch.randn(4, 40, requires_grad=True)
    rows = torch.tensor([0, 1, 3])
    positions = torch.tensor([2, 30, 100])
    chunks = loss_chunks(4, layer.num_head_labels, layer.num_tail_labels, 8, 8, torch.float32, False, 4000)
    bounds = torch.from_numpy(np.searchsorted(positions.numpy(), np.asarray(chunks.starts)).astype(np.int64))
    params = (layer.head.weight, layer.head.bias, layer.tail.weight, layer.tail.bias, layer.tail.group_index)
    args = (x, *params, rows, positions, bounds, "bce", "sum", [0, 40, 0, 40], layer.num_head_labels,
            layer.num_tail_labels, False, 4000)
    torch.library.opcheck(ops.head_tail_loss, args, test_utils=("test_schema", "test_faketensor"))


class _Model(HasteXMCModule, LightningModule):
    def __init__(self, **kw):
        super().__init__()
        self.configure_haste(**kw)


class _UnfusedModel(_Model):
    def haste_loss(self, logits, targets):  # the documented slow path: a loss on the full logits
        return sparse_bce_with_logits(logits, targets, reduction=self.haste["loss_reduction"])


def test_module_trains_the_same_fused_and_unfused():
    results = []
    for cls in (_Model, _UnfusedModel):
        torch.manual_seed(0)
        dm = XMCDataModule.synthetic(seed=0, num_train=600, num_test=150, num_labels=300, num_features=64,
                                     batch_size=64)
        model = cls(fan_in=16, group_size=8, head_ratio=0.1, grouping=None)
        trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, max_steps=40)
        trainer.fit(model, dm)
        results.append(trainer.validate(model, dm, verbose=False)[0])
    fused, unfused = results
    assert fused["val/P@1"] > 0.05
    for key in ("val/P@1", "val/P@5"):
        assert abs(fused[key] - unfused[key]) < 0.03, (key, fused[key], unfused[key])


def test_second_backward_through_a_retained_graph_recomputes_the_same_gradients():
    # The first backward scales the gradients computed with the loss; a second one recomputes them.
    layer = _layer(memory_budget=3000)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, 40, dtype=torch.float64, generator=gen, requires_grad=True)
    targets = _targets(5, layer.num_labels, gen)
    value = layer.loss(x, targets, loss="squared_hinge") * 3
    first = torch.autograd.grad(value, [x, *layer.parameters()], retain_graph=True)
    second = torch.autograd.grad(value, [x, *layer.parameters()])
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    with torch.no_grad():
        assert layer.loss(x, targets, loss="squared_hinge").item() * 3 == pytest.approx(value.item(), rel=1e-14)
