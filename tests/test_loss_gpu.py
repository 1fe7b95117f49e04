"""The fused loss on CUDA (kernels of lightning_haste.kernels.loss) against float64 references; run on a GPU:
PYTHONPATH=. python3 -m pytest -m gpu tests/test_loss_gpu.py"""

import copy

import numpy as np
import pytest
import torch

from lightning_haste import HeadTailOutput, kernels
from lightning_haste import functional as LF
from lightning_haste.kernels import layout
from lightning_haste.loss import dense_part, loss_chunks, workspace_bytes
from lightning_haste.module import sparse_bce_with_logits, sparse_squared_hinge

pytestmark = pytest.mark.gpu
LOSSES = ("bce", "squared_hinge")
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
NORM_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _assert_close(name, got, ref, dtype_tol):
    assert not torch.isnan(got).any(), f"{name}: NaN (an element was not written)"
    got = got.double().cpu()
    ref = ref.double().cpu()
    rel = ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()
    assert rel <= NORM_TOL[dtype_tol], f"{name}: relative error {rel}"
    bound = RTOL[dtype_tol] * ref.abs() + 1e-3 * ref.abs().max()
    bad = (got - ref).abs() > bound
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, first at {bad.nonzero()[0].tolist()}"


def _poison_allocator(nbytes=512 * 2**20):
    """Fill the caching allocator's free memory with NaN, so that an output element a kernel never writes shows."""
    block = torch.full((nbytes // 2,), float("nan"), dtype=torch.float16, device="cuda")
    del block


# (batch, in_features, labels, group_size, fan_in, dtype)
KERNEL_CASES = [
    (37, 384, 1001, 16, 64, torch.bfloat16),  # odd label count, short last group
    (130, 768, 4096, 32, 128, torch.bfloat16),  # more than two 64-row tiles
    (64, 384, 2050, 64, 128, torch.float16),
    (9, 4096, 500, 32, 24, torch.bfloat16),  # input too wide for shared memory: streaming gathers
    (200, 96, 777, 8, 16, torch.float16),
]


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-L{c[2]}-G{c[3]}-K{c[4]}-{str(c[5])[6:]}")
def test_loss_kernels_match_float64_reference(case, loss):
    batch, in_features, labels, group_size, fan_in, dtype = case
    gen = torch.Generator(device="cuda").manual_seed(labels + batch)
    num_groups = -(-labels // group_size)
    weight = (torch.randn(num_groups * group_size, fan_in, device="cuda", generator=gen) * 0.3).to(dtype)
    weight[labels:] = 0
    index = torch.stack([torch.randperm(in_features, device="cuda", generator=gen)[:fan_in] for _ in range(num_groups)])
    index = index.int().contiguous()
    bias = torch.randn(labels, device="cuda", generator=gen).to(dtype)
    x = (torch.randn(batch, in_features, device="cuda", generator=gen) * 2).to(dtype)
    z = LF.group_shared_fanin(x.double(), weight.double(), index, bias.double(), labels, backend="torch")
    xt = layout.transpose_input(x)
    partial = kernels.loss.gsfi_loss_sum(xt, batch, weight, index, bias, labels, loss)
    expected = dense_part(loss, z).sum()
    got = partial.double().sum()
    assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item()) + 1e-3, (got.item(), expected.item())
    scale = torch.tensor([0.37], device="cuda")
    grad = (torch.sigmoid(z) if loss == "bce" else 2 * torch.relu(1 + z)) * 0.37
    storage = torch.full((batch, (labels + 7) // 8 * 8), float("nan"), dtype=dtype, device="cuda")
    out = storage[:, :labels]
    assert kernels.loss.gsfi_loss_grad(xt, batch, weight, index, bias, labels, loss, scale, out) is None
    _assert_close("dZ (aligned rows)", out, grad, dtype)
    # the padding columns of aligned rows hold zeros: the gradient kernels read them as dZ
    assert torch.count_nonzero(storage[:, labels:]) == 0
    out.fill_(float("nan"))
    partial = kernels.loss.gsfi_loss_grad(xt, batch, weight, index, bias, labels, loss, scale, out, with_sum=True)
    _assert_close("dZ (aligned rows, with the loss sum)", out, grad, dtype)
    got = partial.double().sum()
    assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item()) + 1e-3, (got.item(), expected.item())
    if labels % 8:
        packed = torch.full((batch, labels), float("nan"), dtype=dtype, device="cuda")
        kernels.loss.gsfi_loss_grad(xt, batch, weight, index, bias, labels, loss, scale, packed)
        _assert_close("dZ (packed rows)", packed, grad, dtype)


def _layer(num_labels, in_features, group_size, fan_in, dtype, seed, **kw):
    freq = np.random.default_rng(seed).integers(0, 100, num_labels)
    layer = HeadTailOutput(in_features, freq, head_ratio=kw.pop("head_ratio", 0.1), fan_in=fan_in,
                           group_size=group_size, device="cuda", dtype=dtype,
                           generator=torch.Generator(device="cuda").manual_seed(seed), **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(3.0)
        layer.tail.zero_padding_()
    return layer


def _float64_loss_and_grads(layer, x, targets, loss):
    """The unfused float64 path (the full logits, a float64 copy of the layer): reference value and gradients."""
    ref = copy.deepcopy(layer).double()
    ref.tail.backend = "torch"
    x64 = x.detach().double().requires_grad_(True)
    fn = sparse_bce_with_logits if loss == "bce" else sparse_squared_hinge
    logits = ref(x64)
    logits.retain_grad()
    value = fn(logits, targets)
    value.backward()
    params = [ref.head.weight.grad, ref.head.bias.grad, ref.tail.weight.grad, ref.tail.bias.grad]
    return value.detach(), x64.grad, params, logits.grad


def _assert_close_rounded_dz(name, got, ref, magnitude):
    """The head's gradients from a dZ rounded to 16 bits and a result rounded once: |error| <= u * (sum_b |dz_b|
    |x_b| + |result|), u = 2^-9 the unit roundoff of bfloat16 (float16's is smaller); checked with a factor 2."""
    assert not torch.isnan(got).any(), f"{name}: NaN (an element was not written)"
    got, ref, magnitude = got.double().cpu(), ref.double().cpu(), magnitude.double().cpu()
    bad = (got - ref).abs() > 2 * 2.0**-9 * (magnitude + ref.abs()) + 1e-12
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, first at {bad.nonzero()[0].tolist()}"


def _tail_weight_magnitude(layer, x, ref_dz):
    """``sum_b |dZ[b, l]| |x[b, idx[g(l), k]]|`` per tail weight ``[padded tail labels, fan_in]`` (float64, CPU): the
    scale of the rounding error of the tail's weight gradient."""
    tail, group_size = layer.tail, layer.tail.group_size
    t0, t1 = layer.tail_slice
    x_abs = x.detach().double().cpu()[:, t0:t1].abs()
    dz = ref_dz.cpu()[:, layer.label_permutation[layer.num_head_labels :].cpu()].abs()
    num_groups = tail.group_index.shape[0]
    dz = torch.nn.functional.pad(dz, (0, num_groups * group_size - dz.shape[1])).reshape(-1, num_groups, group_size)
    gathered = x_abs[:, tail.group_index.long().cpu()]  # [B, groups, fan_in]
    return torch.einsum("bgj,bgk->gjk", dz, gathered).reshape(num_groups * group_size, -1)


def _random_targets(batch, num_labels, gen, layer):
    targets = []
    for _ in range(batch):
        n = int(torch.randint(0, 8, (1,), generator=gen))
        targets.append(torch.randperm(num_labels, generator=gen)[:n])
    targets[0] = torch.tensor([], dtype=torch.long)
    targets[1] = torch.randperm(num_labels, generator=gen)[: num_labels // 3]  # many positives
    targets[2] = layer.label_permutation[: layer.num_head_labels][:5].cpu()  # head only
    targets[3] = layer.label_permutation[layer.num_head_labels :][-7:].cpu()  # tail only, in the last group
    return targets


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize(
    "case",
    [(70, 384, 3001, 16, 64, torch.bfloat16, 2**28), (70, 384, 3001, 16, 64, torch.bfloat16, 20_000),
     (129, 768, 2050, 32, 128, torch.float16, 50_000), (33, 512, 1003, 64, 128, torch.bfloat16, 2**28)],
    ids=lambda c: f"B{c[0]}-H{c[1]}-L{c[2]}-G{c[3]}-K{c[4]}-{str(c[5])[6:]}-budget{c[6]}",
)
def test_fused_loss_value_and_gradients_match_float64(case, loss):
    batch, in_features, num_labels, group_size, fan_in, dtype, budget = case
    layer = _layer(num_labels, in_features, group_size, fan_in, dtype, seed=num_labels, memory_budget=budget,
                   tail_features=(0, in_features // 2) if group_size == 16 else None)
    gen = torch.Generator().manual_seed(batch)
    targets = _random_targets(batch, num_labels, gen, layer)
    x = torch.randn(batch, in_features, generator=gen).to("cuda", dtype).requires_grad_(True)
    chunks = loss_chunks(batch, layer.num_head_labels, layer.num_tail_labels, group_size, fan_in, dtype, True,
                         workspace_bytes(batch, num_labels, budget))
    assert (len(chunks.tail) > 1) == (budget < 2**28)
    _poison_allocator()
    value = layer.loss(x, targets, loss=loss)
    value.backward()
    ref_value, ref_gx, ref_params, ref_dz = _float64_loss_and_grads(layer, x, targets, loss)
    assert value.dtype == torch.float32
    assert abs(value.item() - ref_value.item()) <= 1e-3 * abs(ref_value.item()), (value.item(), ref_value.item())
    _assert_close("dx", x.grad, ref_gx, dtype)
    got = [layer.head.weight.grad, layer.head.bias.grad, layer.tail.weight.grad, layer.tail.bias.grad]
    assert all(g.dtype == dtype for g in got)
    # the dense head: a few hundred large logits, whose gradient sums cancel more than the tail's do
    dz_head = ref_dz.cpu()[:, layer.label_permutation[: layer.num_head_labels].cpu()].abs()
    h0, h1 = layer.head_slice
    x_head = x.detach().double().cpu()[:, h0:h1].abs()
    _assert_close_rounded_dz("head weight", got[0], ref_params[0], dz_head.t() @ x_head)
    _assert_close_rounded_dz("head bias", got[1], ref_params[1], dz_head.sum(0))
    # the tail's weight gradient from the same 16-bit dZ: sums over the rows that cancel as the head's do
    _assert_close_rounded_dz("tail weight", got[2], ref_params[2], _tail_weight_magnitude(layer, x, ref_dz))
    if dtype == torch.float16:  # a 3-bit-wider mantissa: the plain elementwise tolerance holds as well
        _assert_close("tail weight", got[2], ref_params[2], dtype)
    _assert_close("tail bias", got[3], ref_params[3], dtype)
    assert torch.count_nonzero(layer.tail.weight.grad[layer.num_tail_labels :]) == 0


def test_fused_loss_is_deterministic_and_compiles():
    layer = _layer(5000, 384, 32, 64, torch.bfloat16, seed=1)
    gen = torch.Generator().manual_seed(2)
    targets = _random_targets(64, 5000, gen, layer)
    x = torch.randn(64, 384, generator=gen).to("cuda", torch.bfloat16)

    def step(inputs):
        value = layer.loss(inputs, targets)
        return (value,) + torch.autograd.grad(value, [layer.tail.weight, layer.tail.bias, layer.head.weight])

    first = step(x)
    second = step(x)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=False)(x)
    # compiled: the loss op, then its backward op recomputing the logits (eager computes the gradients with the
    # loss): the same gradient kernels on the same dZ, the loss summed in another order
    torch.testing.assert_close(compiled[0], first[0], rtol=1e-6, atol=0)
    for a, b in zip(compiled[1:], first[1:], strict=True):
        assert torch.equal(a, b)


def test_autocast_with_float32_parameters_runs_the_kernels():
    layer = _layer(3000, 384, 16, 64, torch.float32, seed=3)
    gen = torch.Generator().manual_seed(4)
    targets = _random_targets(32, 3000, gen, layer)
    x = torch.randn(32, 384, generator=gen).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        value = layer.loss(x, targets)
    value.backward()
    assert value.dtype == torch.float32 and layer.tail.weight.grad.dtype == torch.float32
    ref_value = _float64_loss_and_grads(layer, x.bfloat16().float(), targets, "bce")[0]
    assert abs(value.item() - ref_value.item()) <= 2e-2 * abs(ref_value.item())


def test_peak_memory_of_the_step_stays_below_an_eighth_of_the_logits():
    """B * L >= 10^9: the step's memory above parameters and gradients < 1/8 of one bf16 [B, L] tensor."""
    batch, num_labels = 256, 4_000_000
    layer = _layer(num_labels, 768, 32, 64, torch.bfloat16, seed=5, head_ratio=0.05, tail_features=(0, 384),
                   head_features=(384, 768))
    gen = torch.Generator().manual_seed(6)
    targets = [torch.randint(0, num_labels, (5,), generator=gen) for _ in range(batch)]
    x = torch.randn(batch, 768, generator=gen).to("cuda", torch.bfloat16)
    layer.loss(x, targets).backward()  # compiles the kernels
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    layer.loss(x, targets).backward()
    torch.cuda.synchronize()
    gradients = sum(p.grad.numel() * p.grad.element_size() for p in layer.parameters())
    growth = torch.cuda.max_memory_allocated() - before - gradients
    logits_bytes = batch * num_labels * 2
    assert growth < logits_bytes / 8, (growth, logits_bytes / 8)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logits_dtype", ["float32", "input"])
def test_dense_loss_kernel_matches_float64_reference(loss, dtype, logits_dtype):
    gen = torch.Generator(device="cuda").manual_seed(7)
    batch, cols = 37, 3001
    storage = torch.randn(batch, cols + 5, device="cuda", generator=gen) * 6
    logits = storage[:, :cols] if logits_dtype == "float32" else storage.to(dtype)[:, :cols]
    bias = torch.randn(cols, device="cuda", generator=gen).to(dtype)
    z = logits.double() + bias.double()
    scale = torch.tensor([0.25], device="cuda")
    out = torch.full((batch, cols), float("nan"), dtype=dtype, device="cuda")
    partial = kernels.loss.gsfi_loss_dense(logits, bias, loss, scale, out, True, dtype)
    expected = dense_part(loss, z).sum()
    assert abs(partial.double().sum().item() - expected.item()) <= 1e-5 * expected.item()
    grad = 0.25 * (torch.sigmoid(z) if loss == "bce" else 2 * torch.relu(1 + z))
    _assert_close("dZ", out, grad, dtype)
    only_sum = kernels.loss.gsfi_loss_dense(logits, bias, loss, None, None, True, dtype)
    assert abs(only_sum.double().sum().item() - expected.item()) <= 1e-5 * expected.item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [1, 7, 8, 1000, 100_003])
def test_scale_kernel_multiplies_every_element_once(dtype, numel):
    gen = torch.Generator(device="cuda").manual_seed(numel)
    t = torch.randn(numel, device="cuda", generator=gen).to(dtype)
    scale = torch.tensor([0.3], device="cuda")
    expected = (t.float() * 0.3).to(dtype)
    kernels.loss.gsfi_scale_(t, scale)
    assert torch.equal(t, expected)
