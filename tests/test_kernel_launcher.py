"""The kernels' CPU-side logic: plans, variant choices, layouts, tuning (CI has neither CuPy nor a GPU)."""

import dataclasses
import re
import sys

import pytest
import torch

import lightning_haste as lh
from lightning_haste import functional as LF
from lightning_haste.kernels import forward, grad_input, grad_weight, layout, runtime, tuning
from lightning_haste.kernels import loss as loss_kernels
from lightning_haste.kernels import topk as topk_kernels

H100_SHARED = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on H100 / H200


def test_missing_cupy_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    runtime.cupy.cache_clear()
    try:
        with pytest.raises(runtime.KernelUnavailableError, match="pip install"):
            runtime.cupy()
    finally:
        runtime.cupy.cache_clear()


def test_sources_found_and_header_inlined():
    for name in ("gsfi_forward", "gsfi_forward_sm90", "gsfi_grad_input", "gsfi_grad_weight", "gsfi_loss"):
        text = runtime.source(name)
        assert "#include" not in text  # every header of cuda/ inlined (NVRTC gets no include path)
        assert text.count("struct bf16_t {") == 1  # the common header once, though two files include it
        assert "struct bf16_t" in text and "void __launch_bounds__" in text
    assert "forward_tiles(" in runtime.source("gsfi_loss")


@pytest.mark.parametrize("group_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("fan_in", [8, 64, 128, 512])
@pytest.mark.parametrize("in_features", [384, 768, 4096, 65536])
def test_every_supported_shape_has_a_kernel_variant_that_fits(group_size, fan_in, in_features):
    k_pad = layout.pad16(fan_in)
    resident, warps, stages, shared = forward.mma_variant(group_size, k_pad, in_features, H100_SHARED)
    assert shared <= H100_SHARED and warps >= 1 and stages >= 2
    if in_features <= 768 and group_size <= 32:
        assert resident and warps >= 8  # the official shapes keep the input in shared memory
    for rows in (32, 64, 128):
        smem_acc = grad_input.shared_bytes(group_size, fan_in, in_features, True, 2, rows) <= H100_SHARED
        stages, shared = grad_input._deepest_stages(
            lambda n, smem_acc=smem_acc, rows=rows: grad_input.shared_bytes(
                group_size, fan_in, in_features, smem_acc, n, rows
            ),
            H100_SHARED,
            None,
        )
        assert shared <= H100_SHARED
    assert grad_weight.tile_shared_bytes(group_size, k_pad, 3) <= H100_SHARED


@pytest.mark.parametrize("group_size", [8, 16, 32, 64, 128])
@pytest.mark.parametrize("in_features", [384, 768, 1000])
def test_hopper_forward_fits_where_the_input_is_resident(group_size, in_features):
    variant = forward.wgmma_variant(group_size, in_features, H100_SHARED)
    assert variant is not None
    warpgroups, stages, shared = variant
    assert shared <= H100_SHARED and stages >= 2
    if in_features <= 384 and group_size <= 32:
        assert (warpgroups, stages) == (3, 4)  # LF-Paper2Keywords-8.6M: the measured choice
    if in_features == 768 and group_size == 64:
        assert (warpgroups, stages) == (3, 3)  # Amazon-3M
    assert forward.wgmma_variant(group_size, 65536, H100_SHARED) is None  # too large: mma.sync kernel


def test_hopper_forward_chosen_by_capability_and_shape():
    use = forward.uses_wgmma
    assert use((9, 0), 128, 64) and use((9, 0), 128, 32) and use((9, 0), 1, 128)  # Amazon-3M, P2K
    assert not use((9, 0), 129, 64) and not use((9, 0), 64, 16)  # B = 512, groups of 16: mma.sync

    assert not use((8, 0), 64, 32) and not use((10, 0), 64, 32) and not use((8, 9), 64, 32)
    wgmma = tuning.ForwardTuning(kernel="wgmma")
    assert use((9, 0), 512, 16, wgmma) and not use((8, 0), 512, 16, wgmma)  # wgmma exists on sm_90 only
    assert not use((9, 0), 128, 64, tuning.ForwardTuning(kernel="mma"))
    with pytest.raises(ValueError, match="kernel"):
        tuning.ForwardTuning(kernel="tensor")
    with pytest.raises(ValueError, match="wgmma_warpgroups"):
        tuning.ForwardTuning(wgmma_warpgroups=7)
    forced = tuning.ForwardTuning(wgmma_warpgroups=2)
    assert forward.wgmma_variant(32, 768, H100_SHARED, forced)[:2] == (2, 3)  # stages default to 3


@pytest.mark.parametrize(
    "group_size,fan_in,in_features,labels,expected",
    [
        (32, 128, 768, 131072, (12, 3)),
        (32, 64, 768, 670208, (12, 3)),
        (16, 64, 384, 670091, (12, 3)),
        (32, 64, 384, 8623847, (12, 3)),
        (64, 128, 768, 2812281, (8, 2)),
    ],
    ids=["B512-L131K-K128", "B512-L670K-K64", "Amazon-670K", "LF-Paper2Keywords-8.6M", "Amazon-3M"],
)
def test_forward_variant_choice(group_size, fan_in, in_features, labels, expected):
    # The variants measured fastest on H100 (benchmarks/RESULTS.md): 12 warps with a 3-stage weight ring
    # where they fit, at any label count (`labels` only names the shape); the large groups only fit 8 warps
    # with 2 stages; the input always resident.
    resident, warps, stages, _ = forward.mma_variant(group_size, fan_in, in_features, H100_SHARED, 233472)
    assert resident and (warps, stages) == expected


@pytest.mark.parametrize(
    "group_size,fan_in,in_features,batch",
    [(16, 64, 384, 64), (16, 128, 384, 256), (32, 64, 384, 128)],
    ids=["Amazon-670K", "AmazonTitles-670K", "LF-Paper2Keywords-8.6M"],
)
def test_official_small_group_shapes_get_the_resident_grad_weight(group_size, fan_in, in_features, batch):
    warps, stages, shared = grad_weight.warp_variant(group_size, in_features, batch, H100_SHARED)
    assert shared <= H100_SHARED and warps >= 6 and stages == 3
    # AmazonTitles-670K: 8 warps with 3 stages do not fit beside its XT; 6 with 3 stages are taken.
    assert (warps, stages) == ((6, 3) if batch == 256 else (8, 3))


def test_grad_weight_warp_tuning():
    assert grad_weight.warp_variant(16, 4096, 256, H100_SHARED) is None  # XT too large: tile kernel
    forced = tuning.GradWeightTuning(warp_warps=4, warp_stages=4)
    assert grad_weight.warp_variant(16, 384, 256, H100_SHARED, forced)[:2] == (4, 4)
    with pytest.raises(ValueError, match="8 warps and 4 stages"):
        grad_weight.warp_variant(16, 384, 256, H100_SHARED, tuning.GradWeightTuning(warp_warps=8, warp_stages=4))
    # the tile kernel's ring depth is its own field: it does not force the warp kernel
    assert grad_weight.warp_variant(16, 384, 64, H100_SHARED, tuning.GradWeightTuning(tile_stages=3))[:2] == (8, 3)
    assert not grad_weight.uses_warp_kernel(16, 64, tuning.GradWeightTuning(kernel="tile"))
    assert grad_weight.uses_warp_kernel(16, 64) and not grad_weight.uses_warp_kernel(32, 128)


@pytest.mark.parametrize(
    "file,kernel,params",
    [
        ("gsfi_forward", "gsfi_forward", forward.PARAMS),
        ("gsfi_forward_sm90", "gsfi_forward_sm90", forward.PARAMS),
        ("gsfi_grad_input", "gsfi_grad_input", grad_input.PARAMS),
        ("gsfi_grad_weight", "gsfi_grad_weight", grad_weight.PARAMS),
        ("gsfi_grad_weight", "gsfi_grad_weight_warp", grad_weight.PARAMS),
        ("gsfi_loss", "gsfi_loss_sum", loss_kernels.SUM_PARAMS),
        ("gsfi_loss", "gsfi_loss_grad", loss_kernels.GRAD_PARAMS),
        ("gsfi_loss", "gsfi_loss_dense", loss_kernels.DENSE_PARAMS),
        ("gsfi_loss", "gsfi_scale", loss_kernels.SCALE_PARAMS),
        ("gsfi_topk", "gsfi_topk_candidates", topk_kernels.PARAMS),
        ("gsfi_topk", "gsfi_topk_candidates_sm90", topk_kernels.PARAMS),
        ("gsfi_topk", "gsfi_topk_dense_candidates", topk_kernels.DENSE_PARAMS),
        ("gsfi_topk", "gsfi_topk_bound", topk_kernels.BOUND_PARAMS),
        ("gsfi_topk", "gsfi_topk_merge", topk_kernels.MERGE_PARAMS),
    ],
)
def test_packed_parameters_match_the_kernel_signatures(file, kernel, params):
    # The launcher packs arguments into one buffer in C layout: the codes must follow the declaration.
    source = runtime.source(file)
    signature = re.search(rf"\b{kernel}\(([^)]*)\)", source).group(1)
    codes = ""
    for declaration in signature.split(","):
        declaration = declaration.strip()
        codes += "Q" if "*" in declaration else ("q" if declaration.startswith("long long") else "i")
        assert "*" in declaration or declaration.split()[0] in ("int", "long"), declaration
    assert params.format == "@" + codes


def test_padded_rows_pads_with_zeros():
    t = torch.randn(3, 13)
    padded = layout.padded_rows(t)
    assert torch.equal(padded, t) and padded.stride(0) == 16
    assert torch.count_nonzero(padded.as_strided((3, 16), (16, 1))[:, 13:]) == 0
    aligned = torch.randn(3, 16)
    assert layout.padded_rows(aligned) is aligned
    # the padded view goes on to the next kernel as it is: one copy per backward, not one per kernel
    assert layout.padded_rows(padded) is padded
    # a view of someone else's padded storage is copied (its padding may hold anything)
    foreign = torch.randn(3, 16)[:, :13]
    again = layout.padded_rows(foreign)
    assert again is not foreign and torch.equal(again, foreign)
    assert torch.count_nonzero(again.as_strided((3, 16), (16, 1))[:, 13:]) == 0


def test_backend_argument():
    layer = lh.GroupSharedFanIn(16, 20, 8, 8)
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA"):
        LF.group_shared_fanin(x, layer.weight, layer.group_index, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        LF.group_shared_fanin(x, layer.weight, layer.group_index, backend="triton")
    with pytest.raises(ValueError, match="backend must be"):
        lh.GroupSharedFanIn(16, 20, 8, 8, backend="fast")
    torch.testing.assert_close(
        LF.group_shared_fanin(x, layer.weight, layer.group_index, backend="torch"),
        LF.group_shared_fanin(x, layer.weight, layer.group_index),
    )


def test_cpu_autocast_runs_in_autocast_dtype():
    layer = lh.GroupSharedFanIn(32, 40, 8, 8)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert torch.count_nonzero(layer.weight.grad[40:]) == 0


def test_grad_input_tuning_is_checked_before_anything_compiles():
    # The grad-input layouts exist for 32, 64 and 128 batch rows only; groups per step are a power of two.
    with pytest.raises(ValueError, match="rows"):
        tuning.GradInputTuning(rows=48)
    with pytest.raises(ValueError, match="groups"):
        tuning.GradInputTuning(groups=3)
    two = tuning.GradInputTuning(groups=2)
    assert grad_input.groups_per_step(16, 64, True, two) == (2, True)
    assert grad_input.groups_per_step(16, 32, True, two) == (1, True)  # 32-row tiles: one group per step
    assert grad_input.groups_per_step(8, 64, True, two)[0] == 1  # G = 8: one group (16-label tiles) per step
    assert grad_input.groups_per_step(16, 64, True) == (4, True)
    assert grad_input.groups_per_step(32, 64, True) == (1, False)


class _FakeKernel:
    num_regs = 200
    max_dynamic_shared_size_bytes = 0


def test_grad_input_under_deterministic_algorithms_writes_partial_sums(monkeypatch):
    # Several CTAs share each batch row at AmazonTitles-670K (2 x 66 CTAs): normally they add into dX with
    # float32 atomics; under torch.use_deterministic_algorithms each column writes a slice of its own.
    monkeypatch.setattr(runtime, "device_limits", lambda index: (132, H100_SHARED, H100_SHARED + 1024))
    compiled = []
    monkeypatch.setattr(
        runtime, "compile_kernel", lambda file, kernel, template, index, *a: compiled.append(template) or _FakeKernel()
    )
    shape = ("bf16_t", 16, 128, 384, 256, 41881, False, 0, tuning.GradInputTuning())
    fast = grad_input.plan.__wrapped__(*shape)
    exact = grad_input.plan.__wrapped__(*shape, True)
    assert fast.grid[1] > 1 and not fast.partials and not fast.deterministic
    assert exact.partials and exact.deterministic and exact.grid == fast.grid and compiled[-1][-1] is True
    # The slices hold no more than one wave of CTAs' accumulators.
    assert exact.grid[0] * exact.grid[1] * 128 * 384 * 4 <= 132 * H100_SHARED
    # One CTA column: plain stores, deterministic without slices. No shared-memory accumulator: atomics.
    one = grad_input.plan.__wrapped__("bf16_t", 16, 64, 384, 20000, 40, False, 0, tuning.GradInputTuning(), True)
    assert one.grid[1] == 1 and one.deterministic and not one.partials
    wide = grad_input.plan.__wrapped__("bf16_t", 16, 64, 65536, 64, 41881, False, 0, tuning.GradInputTuning(), True)
    assert not wide.deterministic and not wide.partials


def test_alert_not_deterministic_follows_torch(monkeypatch):
    monkeypatch.setattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: False)
    with pytest.raises(RuntimeError, match="deterministic implementation"):
        runtime.alert_not_deterministic("The CUDA grad-input kernel")
    monkeypatch.setattr(torch, "is_deterministic_algorithms_warn_only_enabled", lambda: True)
    with pytest.warns(UserWarning, match="deterministic implementation"):
        runtime.alert_not_deterministic("The CUDA grad-input kernel")


def test_tuning_settings_are_typed_and_validated():
    with pytest.raises(TypeError):
        tuning.ForwardTuning(stages=3)  # unknown field
    with pytest.raises(TypeError, match="mma_warps"):
        tuning.ForwardTuning(mma_warps=8.0)
    with pytest.raises(TypeError, match="row_owned"):
        tuning.GradInputTuning(row_owned=1)
    with pytest.raises(ValueError, match="tile_stages"):
        tuning.GradWeightTuning(tile_stages=1)
    with pytest.raises(TypeError, match="grad_input"):
        tuning.Tuning(grad_input=tuning.ForwardTuning())
    with pytest.raises(ValueError, match="min_ctas"):
        tuning.TopkTuning(min_ctas=0)
    with pytest.raises(TypeError, match="topk"):
        tuning.Tuning(topk=tuning.ForwardTuning())
    settings = tuning.ForwardTuning(kernel="mma", mma_warps=8)
    assert hash(settings) == hash(tuning.ForwardTuning(kernel="mma", mma_warps=8))  # usable as a cache key
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.mma_warps = 4  # type: ignore[misc]


def test_tuning_context_manager_nests_and_restores():
    default = tuning.current()
    assert default == tuning.Tuning()
    with tuning.use(tuning.GradInputTuning(rows=64)) as outer:
        assert tuning.current().grad_input.rows == 64 and outer is tuning.current()
        with tuning.use(tuning.ForwardTuning(kernel="mma")):
            assert tuning.current().forward.kernel == "mma" and tuning.current().grad_input.rows == 64
        assert tuning.current().forward.kernel == "auto"
        with pytest.raises(RuntimeError):
            with tuning.use(tuning.GradWeightTuning(kernel="tile")):
                raise RuntimeError("boom")
        assert tuning.current().grad_weight.kernel == "auto"
    assert tuning.current() == default
    with pytest.raises(ValueError, match="two GradInputTuning"):
        with tuning.use(tuning.GradInputTuning(rows=64), tuning.GradInputTuning(rows=32)):
            pass
    with pytest.raises(TypeError):
        with tuning.use({"grad_input_rows": 64}):  # type: ignore[arg-type]
            pass


def test_tuning_parse():
    parsed = tuning.parse("forward.kernel=mma forward.mma_resident=false grad_input.rows=64,grad_weight.warp_warps=6")
    assert parsed.forward == tuning.ForwardTuning(kernel="mma", mma_resident=False)
    assert parsed.grad_input == tuning.GradInputTuning(rows=64)
    assert parsed.grad_weight == tuning.GradWeightTuning(warp_warps=6)
    assert tuning.parse("topk.min_ctas=2").topk == tuning.TopkTuning(min_ctas=2)
    assert tuning.parse([]) == tuning.Tuning()
    with pytest.raises(ValueError, match="unknown field"):
        tuning.parse("forward.stages=3")
    with pytest.raises(ValueError, match="unknown kernel"):
        tuning.parse("backward.rows=3")
    with pytest.raises(ValueError, match="kernel.field=value"):
        tuning.parse("rows=64")
    with pytest.raises(ValueError, match="rows"):
        tuning.parse("grad_input.rows=48")


def test_tuning_is_part_of_the_plan_cache_key(monkeypatch):
    # A plan built under one setting is never reused under another: the settings are an argument of the
    # cached plan functions, read from tuning.current() by each launcher.
    monkeypatch.setattr(runtime, "device_limits", lambda index: (132, H100_SHARED, H100_SHARED + 1024))
    monkeypatch.setattr(runtime, "capability", lambda index: (9, 0))
    monkeypatch.setattr(runtime, "compile_kernel", lambda file, kernel, template, index, *a: _FakeKernel())
    args = ("bf16_t", 32, 64, 384, 128, 1000, True, 0)
    auto = forward.plan.__wrapped__(*args)
    mma = forward.plan.__wrapped__(*args, tuning.ForwardTuning(kernel="mma"))
    assert auto.kernel == "gsfi_forward_sm90" and mma.kernel == "gsfi_forward"


@pytest.mark.parametrize(("batch", "group_size", "kernel"), [
    (128, 32, "auto"), (64, 128, "auto"), (129, 32, "auto"), (128, 16, "auto"), (128, 32, "mma"), (512, 16, "wgmma"),
])
def test_topk_candidates_run_the_main_loop_the_forward_runs(monkeypatch, batch, group_size, kernel):
    # a candidate's value is the forward's logit bit for bit only if both run the same main loop and variant
    monkeypatch.setattr(runtime, "device_limits", lambda index: (132, H100_SHARED, H100_SHARED + 1024))
    monkeypatch.setattr(runtime, "capability", lambda index: (9, 0))
    compiled = []
    monkeypatch.setattr(runtime, "compile_kernel",
                        lambda file, kernel, template, index, *a: compiled.append((kernel, template)) or _FakeKernel())
    settings = tuning.ForwardTuning(kernel=kernel)
    fwd = forward.plan.__wrapped__("bf16_t", group_size, 64, 384, batch, 1000, True, 0, settings)
    cand = topk_kernels.plan.__wrapped__("bf16_t", group_size, 64, 384, batch, 1000, 0, settings)
    assert cand.kernel == fwd.kernel.replace("gsfi_forward", "gsfi_topk_candidates")
    (_, fwd_template), (_, cand_template), *tighter = compiled
    # the forward's output-alignment flag is the candidates' MINB (CTAs per multiprocessor the registers allow)
    aligned = 3 if fwd.kernel == "gsfi_forward_sm90" else 4
    assert cand_template == fwd_template[:aligned] + (1,) + fwd_template[aligned + 1:]
    # the fake kernel's 200 registers leave one CTA of the forward's per multiprocessor: where the shared memory
    # allows more, the kernel is compiled again for them
    ctas = min(8, (H100_SHARED + 1024) // (fwd.shared + 1024), 65536 // (64 * fwd.block))
    assert [t[1] for t in tighter] == ([cand_template[:aligned] + (ctas,) + cand_template[aligned + 1:]]
                                       if ctas > 1 else [])
    assert (cand.grid, cand.block, cand.shared) == (fwd.grid, fwd.block, fwd.shared)
    # the minimum can be forced
    compiled.clear()
    forced = topk_kernels.plan.__wrapped__("bf16_t", group_size, 64, 384, batch, 1000, 0, settings,
                                           tuning.TopkTuning(min_ctas=1))
    assert [t[aligned] for _, t in compiled] == [1] and forced.shared == fwd.shared


def test_topk_candidates_keep_one_cta_where_ptxas_cannot_meet_the_register_target(monkeypatch):
    # A register target the main loop cannot fit in is a compile error (ptxas C7602), not spills: the plan keeps
    # the kernel compiled for one CTA per multiprocessor.
    monkeypatch.setattr(runtime, "device_limits", lambda index: (132, H100_SHARED, H100_SHARED + 1024))
    monkeypatch.setattr(runtime, "capability", lambda index: (9, 0))

    def compile_kernel(file, kernel, template, index, *a):
        if 2 in template[3:5]:
            raise RuntimeError("ptxas fatal: (C7602) Insufficient registers")
        return _FakeKernel()

    monkeypatch.setattr(runtime, "compile_kernel", compile_kernel)
    cand = topk_kernels.plan.__wrapped__("bf16_t", 16, 64, 384, 512, 1000, 0, tuning.ForwardTuning(kernel="mma"))
    assert cand.kernel == "gsfi_topk_candidates" and cand.block == 384  # the first compile's plan

    def broken(file, kernel, template, index, *a):
        if 2 in template[3:5]:
            raise RuntimeError("something else went wrong")
        return _FakeKernel()

    monkeypatch.setattr(runtime, "compile_kernel", broken)
    with pytest.raises(RuntimeError, match="something else"):  # other errors are not taken for a register limit
        topk_kernels.plan.__wrapped__("bf16_t", 16, 64, 384, 512, 1000, 0, tuning.ForwardTuning(kernel="mma"))
