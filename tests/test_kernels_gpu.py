"""CUDA kernels against the float64 reference (run on a GPU: PYTHONPATH=. python3 -m pytest -m gpu)."""

import pytest
import torch

import lightning_haste as lh
from lightning_haste import functional as LF
from lightning_haste import kernels
from lightning_haste.kernels import tuning

pytestmark = pytest.mark.gpu

# (batch, in_features, out_features, group_size, fan_in, dtype)
CASES = [
    (1, 64, 100, 8, 8, torch.bfloat16),  # B = 1, K = 8 (padded to 16), L not a multiple of G
    (37, 768, 1000, 16, 64, torch.bfloat16),  # L a multiple of 8: aligned dZ path
    (130, 768, 999, 32, 128, torch.bfloat16),  # odd L: unaligned output and dZ paths
    (64, 384, 2050, 64, 128, torch.float16),
    (70, 600, 777, 128, 512, torch.bfloat16),  # largest G and K
    (9, 4096, 500, 32, 24, torch.bfloat16),  # H too large for shared memory: streaming gathers
    (200, 96, 4096, 16, 16, torch.float16),
    (33, 1000, 515, 8, 512, torch.float16),
    (513, 2000, 1536, 64, 136, torch.bfloat16),  # K = 136: two K tiles in grad-weight
    (66, 65536, 300, 128, 64, torch.bfloat16),  # H = 65536
    (150, 96, 3000, 32, 64, torch.bfloat16),  # B over 128
]
RTOL = {torch.bfloat16: 2**-7, torch.float16: 2**-10}
NORM_TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _inputs(case, seed):
    batch, in_features, out_features, group_size, fan_in, dtype = case
    gen = torch.Generator(device="cuda").manual_seed(seed)
    layer = lh.GroupSharedFanIn(
        in_features, out_features, fan_in, group_size, device="cuda", dtype=dtype, generator=gen
    )
    with torch.no_grad():
        if seed % 2:  # also indices as they come from elsewhere: some residue classes short
            layer.group_index.copy_(
                lh.sample_group_index(layer.num_groups, in_features, fan_in, balanced=False, generator=gen)
            )
        layer.weight.normal_(generator=gen)
        layer.bias.normal_(generator=gen)
        layer.zero_padding_()
    x = torch.randn(batch, in_features, device="cuda", generator=gen).to(dtype)
    grad_out = torch.randn(batch, out_features, device="cuda", generator=gen).to(dtype)
    return layer, x, grad_out


def _reference(layer, x, grad_out):
    w = layer.weight.detach().double().requires_grad_(True)
    b = layer.bias.detach().double().requires_grad_(True)
    x64 = x.double().requires_grad_(True)
    out = LF.group_shared_fanin(x64, w, layer.group_index, b, layer.out_features, backend="torch")
    out.backward(grad_out.double())
    return out.detach(), x64.grad, w.grad, b.grad


def _assert_close(name, got, ref, dtype):
    assert got.dtype == dtype, name
    assert not torch.isnan(got).any(), f"{name}: NaN (an element was not written)"
    got = got.double()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel <= NORM_TOL[dtype], f"{name}: relative error {rel}"
    bound = RTOL[dtype] * ref.abs() + 1e-3 * ref.abs().max()
    bad = (got - ref).abs() > bound
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, first at {bad.nonzero()[0].tolist()}"


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-H{c[1]}-L{c[2]}-G{c[3]}-K{c[4]}-{str(c[5])[6:]}")
def test_kernels_match_float64_reference(case):
    layer, x, grad_out = _inputs(case, seed=hash(case) % 2**31)
    ref_out, ref_gx, ref_gw, ref_gb = _reference(layer, x, grad_out)
    index, labels = layer.group_index, layer.out_features
    # Rows padded to a multiple of 8 labels (the layout the kernels allocate): 16-byte stores.
    storage = torch.full((x.shape[0], (labels + 7) // 8 * 8), float("nan"), device="cuda", dtype=x.dtype)
    bias = layer.bias.detach()
    out, xt = kernels.gsfi_forward(x, layer.weight.detach(), index, bias, labels, out=storage[:, :labels])
    _assert_close("forward", out, ref_out, x.dtype)
    if labels % 8:
        # Packed rows of odd length: the 2-byte store path.
        packed = torch.full((x.shape[0], labels), float("nan"), device="cuda", dtype=x.dtype)
        kernels.gsfi_forward(x, layer.weight.detach(), index, layer.bias.detach(), labels, out=packed)
        _assert_close("forward (packed rows)", packed, ref_out, x.dtype)
    grad_w = torch.full_like(layer.weight, float("nan"))
    grad_b = torch.full_like(layer.bias, float("nan"))
    grad_w = kernels.gsfi_grad_weight(grad_out, xt, index, layer.weight.detach(), out=grad_w, grad_bias=grad_b)
    _assert_close("grad_weight", grad_w, ref_gw, x.dtype)
    assert torch.count_nonzero(grad_w[layer.out_features :]) == 0
    _assert_close("grad_bias", grad_b, ref_gb, x.dtype)
    grad_x = kernels.gsfi_grad_input(grad_out, layer.weight.detach(), index, x.shape[1])
    _assert_close("grad_input", grad_x, ref_gx, x.dtype)
    if labels % 8:
        # grad_out above has rows off 16-byte boundaries (read raw: grad-input realigns them in registers,
        # grad-weight in shared memory);
        # the same dZ in padded, aligned rows, as a backward hands on a layout the kernels cannot read
        padded = kernels.padded_rows(grad_out)
        assert kernels.grad_out_for_kernels(padded) is padded
        grad_w = kernels.gsfi_grad_weight(padded, xt, index, layer.weight.detach(), out=grad_w.fill_(float("nan")))
        _assert_close("grad_weight (padded dZ)", grad_w, ref_gw, x.dtype)
        grad_x = kernels.gsfi_grad_input(padded, layer.weight.detach(), index, x.shape[1])
        _assert_close("grad_input (padded dZ)", grad_x, ref_gx, x.dtype)


@pytest.mark.parametrize(
    "group_size,rows,groups,row_owned",
    [(16, 64, 4, True), (16, 128, 2, True), (16, 128, 4, True), (32, 64, 2, True), (32, 128, 1, True),
     (16, 32, 1, True), (16, 64, 1, False), (32, 128, 1, False), (64, 64, 1, False), (16, 64, 2, True)],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("labels", [1000, 999], ids=["aligned-dZ", "raw-dZ"])
def test_grad_input_tilings(group_size, rows, groups, row_owned, labels):
    # Every grad-input tiling on one shape: batch tiles of 32 rows (two warps per tile), 64 and 128 rows
    # with warps owning whole batch tiles (one to four groups per step; the groups of a step share
    # features: H is small) or taking one feature tile each, the last step's groups partly past L, padded
    # feature slots (K = 72), a partial last batch tile.
    case = (150, 200, labels, group_size, 72, torch.bfloat16)
    layer, x, grad_out = _inputs(case, seed=rows * 7 + groups + labels)
    _, ref_gx, _, _ = _reference(layer, x, grad_out)
    with tuning.use(tuning.GradInputTuning(rows=rows, groups=groups, row_owned=row_owned)):
        grad_x = kernels.gsfi_grad_input(grad_out, layer.weight.detach(), layer.group_index, x.shape[1])
    _assert_close("grad_input", grad_x, ref_gx, x.dtype)


@pytest.mark.parametrize("labels", [30000, 29999, 30], ids=["aligned-dZ", "raw-dZ", "one-column"])
def test_grad_input_under_deterministic_algorithms(labels):
    # Several CTAs share each batch row here; they add into dX with float32 atomics, whose order varies
    # from run to run. Under torch.use_deterministic_algorithms each column of CTAs writes a slice of its
    # own, summed in a fixed order: every run gives the same bits, and the float64 reference within tolerance.
    case = (150, 200, labels, 32, 72, torch.bfloat16)
    layer, x, grad_out = _inputs(case, seed=labels)
    _, ref_gx, _, _ = _reference(layer, x, grad_out)
    torch.use_deterministic_algorithms(True)
    try:
        plan = kernels.grad_input.plan(
            "bf16_t", 32, 72, 200, 150, layer.num_groups, labels % 8 == 0, x.device.index, tuning.GradInputTuning(),
            True,
        )
        # 30 labels: one group, one column of CTAs, which writes dX itself (no slices)
        assert plan.deterministic and plan.partials == (plan.grid[1] > 1) and (plan.grid[1] > 1) == (labels > 30)
        runs = [kernels.gsfi_grad_input(grad_out, layer.weight.detach(), layer.group_index, 200) for _ in range(3)]
        xg = x.detach().clone().requires_grad_(True)
        layer(xg).backward(grad_out)  # through the layer's autograd op too
    finally:
        torch.use_deterministic_algorithms(False)
    assert all(torch.equal(runs[0], r) for r in runs[1:]) and torch.equal(xg.grad, runs[0])
    _assert_close("grad_input (deterministic)", runs[0], ref_gx, x.dtype)


def test_grad_input_without_a_deterministic_kernel_raises_or_warns():
    # in_features too large for the shared-memory accumulator: the kernel adds with float32 atomics.
    layer, x, grad_out = _inputs((9, 65536, 300, 32, 24, torch.bfloat16), seed=1)
    args = (grad_out, layer.weight.detach(), layer.group_index, 65536)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            kernels.gsfi_grad_input(*args)
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="deterministic"):
            kernels.gsfi_grad_input(*args)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("warps,stages", [(6, 3), (8, 2), (4, 4), (2, 2)], ids=lambda v: str(v))
@pytest.mark.parametrize("group_size,fan_in", [(16, 128), (32, 56)])
@pytest.mark.parametrize("labels", [1000, 999], ids=["aligned-dZ", "raw-dZ"])
def test_grad_weight_warp_rings(warps, stages, group_size, fan_in, labels):
    # The warp-per-group grad-weight with the rings the launcher picks (6 warps: a CTA's groups dealt out
    # to a number of warps that is not a power of two), the last CTA's groups partly past L, a batch that
    # is not a multiple of the 32-row steps; the fused bias gradient too.
    case = (150, 200, labels, group_size, fan_in, torch.bfloat16)
    layer, x, grad_out = _inputs(case, seed=warps * 100 + stages * 10 + group_size + labels)
    _, _, ref_gw, ref_gb = _reference(layer, x, grad_out)
    settings = tuning.GradWeightTuning(warp_warps=warps, warp_stages=stages)
    with tuning.use(settings):
        grad_w = torch.full_like(layer.weight, float("nan"))
        grad_b = torch.full_like(layer.bias, float("nan"))
        xt = kernels.layout.transpose_input(x)
        kernels.gsfi_grad_weight(grad_out, xt, layer.group_index, layer.weight.detach(), out=grad_w, grad_bias=grad_b)
    plan = kernels.grad_weight.plan(
        "bf16_t", group_size, fan_in, 200, 150, layer.num_groups, labels % 8 == 0, x.device.index, settings
    )
    assert plan.kernel == "gsfi_grad_weight_warp" and plan.block == 32 * warps
    _assert_close("grad_weight", grad_w, ref_gw, x.dtype)
    _assert_close("grad_bias", grad_b, ref_gb, x.dtype)
    assert torch.count_nonzero(grad_w[layer.out_features :]) == 0


@pytest.mark.parametrize("forward_kernel", ["wgmma", "mma"])
@pytest.mark.parametrize("group_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize(
    "batch,fan_in,labels,dtype",
    [(1, 8, 100, torch.bfloat16), (70, 72, 999, torch.float16), (130, 200, 1000, torch.bfloat16),
     (64, 512, 520, torch.bfloat16)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_forward_kernels(forward_kernel, group_size, batch, fan_in, labels, dtype):
    # Both forward kernels on every group size: the Hopper one (wgmma, chunks of 64 columns of K: K = 8,
    # 72 and 200 end in a partial chunk) where the device has it, and the mma.sync one; B = 1, a partial
    # last batch tile, L not a multiple of G, odd L (2-byte stores).
    if forward_kernel == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma forward needs a Hopper GPU (sm_90)")
    layer, x, grad_out = _inputs((batch, 600, labels, group_size, fan_in, dtype), seed=group_size * 1000 + fan_in)
    ref_out, _, _, _ = _reference(layer, x, grad_out)
    settings = tuning.ForwardTuning(kernel=forward_kernel)
    with tuning.use(settings):
        out = torch.full((batch, (labels + 7) // 8 * 8), float("nan"), device="cuda", dtype=dtype)[:, :labels]
        out, _ = kernels.gsfi_forward(x, layer.weight.detach(), layer.group_index, layer.bias.detach(), labels, out=out)
        _assert_close("forward", out, ref_out, dtype)
        packed = torch.full((batch, labels), float("nan"), device="cuda", dtype=dtype)
        kernels.gsfi_forward(x, layer.weight.detach(), layer.group_index, None, labels, out=packed)
        _assert_close("forward (packed rows, no bias)", packed, ref_out - layer.bias.detach().double(), dtype)
    plan = kernels.forward.plan(
        kernels.layout.KERNEL_DTYPES[dtype], group_size, fan_in, 600, batch, layer.num_groups, False,
        x.device.index, settings,
    )
    assert (plan.kernel == "gsfi_forward_sm90") == (forward_kernel == "wgmma")


@pytest.mark.parametrize("forward_kernel", ["wgmma", "mma"])
def test_forward_keeps_float32_subnormals(forward_kernel):
    # CuPy compiles the kernels with -ftz=true, under which a C++ float addition flushes subnormals; the
    # kernels add with explicit IEEE instructions. With zero weights every output is its bias exactly,
    # here bfloat16 subnormals (|b| < 2**-126).
    if forward_kernel == "wgmma" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the wgmma forward needs a Hopper GPU (sm_90)")
    layer = lh.GroupSharedFanIn(300, 1000, 64, 32, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.linspace(-1.0, 1.0, 1000, device="cuda") * 2.0**-127)
    bias = layer.bias.detach()
    assert int((bias != 0).sum()) > 900 and bool((bias.float().abs() < 2.0**-126).all())
    x = torch.randn(100, 300, device="cuda", dtype=torch.bfloat16)
    with tuning.use(tuning.ForwardTuning(kernel=forward_kernel)):
        out, _ = kernels.gsfi_forward(x, layer.weight.detach(), layer.group_index, bias, 1000)
    assert torch.equal(out, bias.expand(100, -1))


@pytest.mark.parametrize("group_size,fan_in", [(32, 160), (16, 144), (128, 96)])
def test_grad_input_partial_last_chunk_of_fan_in(group_size, fan_in):
    # fan_in a multiple of 16 whose last chunk of K is partial (chunks of 128, or 64 for G = 128): the
    # slots past fan_in go to trash rows, which must exist although fan_in % 16 == 0.
    case = (150, 200, 999, group_size, fan_in, torch.bfloat16)
    layer, x, grad_out = _inputs(case, seed=fan_in)
    _, ref_gx, _, _ = _reference(layer, x, grad_out)
    grad_x = kernels.gsfi_grad_input(grad_out, layer.weight.detach(), layer.group_index, x.shape[1])
    _assert_close("grad_input", grad_x, ref_gx, x.dtype)


def test_gradients_of_a_transposed_grad_out():
    # A column-major dZ cannot be read as rows: the backward copies it once into padded rows.
    case = (40, 256, 333, 32, 64, torch.bfloat16)
    layer, x, grad_out = _inputs(case, seed=12)
    _, ref_gx, ref_gw, ref_gb = _reference(layer, x, grad_out)
    column_major = grad_out.t().contiguous().t()
    assert column_major.stride(1) != 1 and kernels.grad_out_for_kernels(column_major).stride(1) == 1
    x.requires_grad_(True)
    layer(x).backward(column_major)
    _assert_close("x.grad", x.grad, ref_gx, x.dtype)
    _assert_close("weight.grad", layer.weight.grad, ref_gw, x.dtype)
    _assert_close("bias.grad", layer.bias.grad, ref_gb, x.dtype)


def test_bias_gradient_without_weight_gradient():
    # A frozen weight skips the grad-weight kernel, which otherwise sums the bias gradient.
    case = (33, 256, 1000, 16, 64, torch.bfloat16)
    layer, x, grad_out = _inputs(case, seed=11)
    _, _, _, ref_gb = _reference(layer, x, grad_out)
    layer.weight.requires_grad_(False)
    layer(x).backward(grad_out)
    assert layer.weight.grad is None
    _assert_close("bias.grad", layer.bias.grad, ref_gb, x.dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_autograd_on_cuda_uses_kernels(dtype):
    case = (45, 512, 1234, 32, 64, dtype)
    layer, x, grad_out = _inputs(case, seed=5)
    x.requires_grad_(True)
    ref_out, ref_gx, ref_gw, ref_gb = _reference(layer, x.detach(), grad_out)
    out = layer(x)
    assert out.grad_fn is not None and "CUDA" in type(out.grad_fn).__name__
    out.backward(grad_out)
    _assert_close("out", out.detach(), ref_out, dtype)
    _assert_close("x.grad", x.grad, ref_gx, dtype)
    _assert_close("weight.grad", layer.weight.grad, ref_gw, dtype)
    _assert_close("bias.grad", layer.bias.grad, ref_gb, dtype)


def test_float32_on_cuda_is_true_float32():
    torch.backends.cuda.matmul.allow_tf32 = False
    layer = lh.GroupSharedFanIn(256, 500, 64, 32, device="cuda")
    x = torch.randn(40, 256, device="cuda", requires_grad=True)
    out = layer(x)
    out.backward(torch.ones_like(out))
    w = layer.weight.detach().double().requires_grad_(True)
    x64 = x.detach().double().requires_grad_(True)
    ref = LF.group_shared_fanin(x64, w, layer.group_index, layer.bias.detach().double(), 500, backend="torch")
    ref.backward(torch.ones_like(ref))
    for got, want in [(out.detach(), ref.detach()), (x.grad, x64.grad), (layer.weight.grad, w.grad)]:
        assert got.dtype == torch.float32
        assert ((got.double() - want).norm() / want.norm()).item() <= 1e-5


def test_autocast_no_grad_non_contiguous_and_frozen_input():
    layer = lh.GroupSharedFanIn(128, 300, 32, 16, device="cuda")  # float32 parameters
    x = torch.randn(128, 24, device="cuda").t()  # non-contiguous [24, 128]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16 and "CUDA" in type(out.grad_fn).__name__
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32 and layer.weight.grad.abs().sum() > 0
    assert torch.count_nonzero(layer.weight.grad[300:]) == 0
    with torch.no_grad():
        assert not layer.half()(x.half()).requires_grad


def test_training_step_captures_in_cuda_graph():
    layer = lh.GroupSharedFanIn(256, 1000, 64, 32, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        layer.weight.grad = None
        x.grad = None
        layer(x).float().square().mean().backward()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels, validates the index
    torch.cuda.current_stream().wait_stream(side)
    expected = layer.weight.grad.clone()
    graph = torch.cuda.CUDAGraph()
    layer.weight.grad = None
    with torch.cuda.graph(graph):
        layer(x).float().square().mean().backward()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(layer.weight.grad, expected, rtol=0, atol=0)


def test_tuning_in_force_at_the_forward_applies_to_its_backward(monkeypatch):
    # Autograd runs the CUDA backward on its own device thread: the forward's thread-local settings must travel.
    grad_input_module = kernels.grad_input
    seen = []
    real = grad_input_module.current
    monkeypatch.setattr(grad_input_module, "current", lambda: seen.append(real().grad_input) or real())
    layer = lh.GroupSharedFanIn(384, 1000, 64, 16, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with tuning.use(tuning.GradInputTuning(rows=32)):
        layer(x).sum().backward()
    assert seen and all(s.rows == 32 for s in seen), seen
