"""The forward kernel: ``Z[b, g*G + j] = bias[g*G + j] + sum_k X[b, idx[g, k]] * W[g*G + j, k]``.

Two kernels compute it: ``gsfi_forward`` (mma.sync, every GPU from sm_80; ``cuda/gsfi_forward.cu``) and
``gsfi_forward_sm90`` (wgmma, Hopper only; ``cuda/gsfi_forward_sm90.cu``). This module holds their
shared-memory sizes (the same formulas as the kernels' layout structs, checked against them by a test),
the variant choice, the plan and the launcher.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Optional

from torch import Tensor

from . import runtime
from .layout import (
    KERNEL_DTYPES,
    check_out,
    kernel_sizes,
    pad16,
    padded_output,
    ptr,
    rows_aligned,
    transpose_input,
)
from .tuning import ForwardTuning, current

__all__ = ["gsfi_forward", "main_loop_plan", "mma_shared_bytes", "plan", "wgmma_shared_bytes"]

#: gsfi_forward / gsfi_forward_sm90 parameters: XT, ldxt, W, idx, bias, Z, ldz, B, H, L, K, num_groups.
PARAMS = struct.Struct("@QiQQQQqiiiii")


def mma_shared_bytes(group_size: int, k_pad: int, in_features: int, resident: bool, warps: int, stages: int) -> int:
    """Dynamic shared memory of ``gsfi_forward``: the resident input (``RESIDENT``), then per warp a
    ``stages``-deep ring of weight chunks (32 columns of K, their indices and, when not resident, the
    gathered input rows) and a 16-row output tile."""
    gp = pad16(group_size)
    kcw = min(k_pad, 32)
    stage = gp * (kcw * 2 + 16) + kcw * 4 + (0 if resident else kcw * 144)
    per_warp = stages * stage + 16 * (gp * 2 + 16)
    return ((in_features + 1) * 144 if resident else 0) + warps * per_warp


#: (warps, stages) of the mma.sync forward, the candidates of :func:`mma_variant`.
MMA_SHAPES = ((12, 3), (8, 4), (8, 3), (8, 2), (4, 4), (4, 3), (4, 2), (2, 3), (2, 2), (1, 2))


def mma_variant(
    group_size: int, k_pad: int, in_features: int, max_shared: int, per_sm: Optional[int] = None,
    settings: ForwardTuning = ForwardTuning(),
) -> tuple[bool, int, int, int]:
    """(resident, warps, stages, shared bytes) of the mma.sync forward. Keep the input in shared memory
    when it fits (it is then read from L2 once per CTA instead of once per group); then the most warps per
    multiprocessor (warps per CTA times the CTAs that fit beside each other), weighted by the ring's depth
    up to 3 stages (deeper rings hide no more latency); on a tie the smaller CTA, then the shorter ring."""
    per_sm = max_shared + 1024 if per_sm is None else per_sm
    residents = (settings.mma_resident,) if settings.mma_resident is not None else (True, False)
    for resident in residents:
        best = None
        for warps, stages in MMA_SHAPES:
            if settings.mma_warps not in (None, warps) or settings.mma_stages not in (None, stages):
                continue
            shared = mma_shared_bytes(group_size, k_pad, in_features, resident, warps, stages)
            if shared > max_shared:
                continue
            ctas = max(1, min(8, per_sm // (shared + 1024)))
            key = (warps * ctas * min(stages, 3), ctas, -stages)
            if best is None or key > best[0]:
                best = (key, (resident, warps, stages, shared))
        if best is not None:
            return best[1]
    raise ValueError(f"no forward kernel variant fits in {max_shared} bytes of shared memory")


def wgmma_shared_bytes(group_size: int, in_features: int, warpgroups: int, stages: int) -> int:
    """Dynamic shared memory of ``gsfi_forward_sm90``: per warpgroup a ring of 64-column weight chunks
    (128-byte swizzled) with their indices, a 16-row output tile per warp, the resident input, and 1 KB
    of slack for the kernel's own 1024-byte alignment of the swizzled stages."""
    stage = group_size * 128 + 64 * 4
    out_tiles = warpgroups * 4 * 16 * (group_size * 2 + 16)
    slack = 1024
    return warpgroups * stages * stage + out_tiles + (in_features + 1) * 144 + slack


#: (warpgroups, stages) of the Hopper forward, in order of preference.
WGMMA_SHAPES = ((3, 4), (3, 3), (2, 3), (1, 3))


def wgmma_variant(
    group_size: int, in_features: int, max_shared: int, settings: ForwardTuning = ForwardTuning()
) -> Optional[tuple[int, int, int]]:
    """(warpgroups, stages, shared bytes) of the Hopper forward, or None where the input does not fit in
    shared memory (that forward keeps it resident): three warpgroups with the deepest ring that fits
    (4 stages, else 3). Forced warpgroups or stages (the other defaulting to 3) are used as given."""
    shapes = WGMMA_SHAPES
    if settings.wgmma_warpgroups is not None or settings.wgmma_stages is not None:
        shapes = ((settings.wgmma_warpgroups or 3, settings.wgmma_stages or 3),)
    for warpgroups, stages in shapes:
        shared = wgmma_shared_bytes(group_size, in_features, warpgroups, stages)
        if shared <= max_shared:
            return warpgroups, stages, shared
    return None


def uses_wgmma(
    capability: tuple[int, int], batch: int, group_size: int, settings: ForwardTuning = ForwardTuning()
) -> bool:
    """Whether the forward runs the Hopper (wgmma) kernel: on sm_90 for batches of at most 128 rows and
    groups of 32 or more labels, where it measured faster than the mma.sync kernel (benchmarks/RESULTS.md).
    With more rows or smaller groups the per-group work that a warpgroup spreads over four warps (copies,
    barrier, bias, output addressing) outweighs the fewer MMA instructions."""
    if capability != (9, 0) or settings.kernel == "mma":
        return False
    return settings.kernel == "wgmma" or (batch <= 128 and group_size >= 32)


def main_loop_plan(
    mma: tuple[str, str], wgmma: tuple[str, str], dtype: str, group_size: int, fan_in: int, in_features: int,
    batch: int, num_groups: int, index: int, settings: ForwardTuning, params: struct.Struct,
    flags: tuple = (),
) -> runtime.Plan:
    """The plan of a kernel built on the forward's main loop: ``wgmma`` (``(file, kernel)`` of its Hopper form)
    where :func:`uses_wgmma` and the input fits, else ``mma`` (its mma.sync form), with the variant and the
    one-wave grid the forward takes for the shape. The template is ``(dtype, group_size, k_pad[, resident],
    *flags, warps or warpgroups, stages)``, ``flags`` being the kernel's own (its epilogue's)."""
    k_pad = pad16(fan_in)
    _, max_shared, per_sm = runtime.device_limits(index)
    row_tiles = math.ceil(batch / 64)
    sm90 = None
    if uses_wgmma(runtime.capability(index), batch, group_size, settings):
        sm90 = wgmma_variant(group_size, in_features, max_shared, settings)
    if sm90 is not None:
        warpgroups, stages, shared = sm90
        template = (dtype, group_size, k_pad, *flags, warpgroups, stages)
        fn = runtime.compile_kernel(*wgmma, template, index, True)
        per_cta = runtime.groups_per_cta(num_groups, row_tiles, shared, index, fn, 128 * warpgroups)
        per_cta = math.ceil(per_cta / warpgroups) * warpgroups
        grid = (row_tiles, math.ceil(num_groups / per_cta))
        return runtime.make_plan(fn, grid, 128 * warpgroups, shared, 0, index, params, wgmma[1])
    resident, warps, stages, shared = mma_variant(group_size, k_pad, in_features, max_shared, per_sm, settings)
    template = (dtype, group_size, k_pad, resident, *flags, warps, stages)
    fn = runtime.compile_kernel(*mma, template, index)
    # One wave of CTAs, each with at least one group per warp; the kernel deals the groups out to its
    # CTAs by itself (strided), so it takes no range per CTA.
    per_cta = runtime.groups_per_cta(num_groups, row_tiles, shared, index)
    per_cta = math.ceil(per_cta / warps) * warps
    grid = (row_tiles, math.ceil(num_groups / per_cta))
    return runtime.make_plan(fn, grid, 32 * warps, shared, 0, index, params, mma[1])


@functools.lru_cache(maxsize=256)
def plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, aligned: bool,
    index: int, settings: ForwardTuning = ForwardTuning(),
) -> runtime.Plan:
    """Kernel, grid and shared memory of the forward for one problem shape on device ``index``."""
    return main_loop_plan(("gsfi_forward", "gsfi_forward"), ("gsfi_forward_sm90", "gsfi_forward_sm90"), dtype,
                          group_size, fan_in, in_features, batch, num_groups, index, settings, PARAMS, (aligned,))


def gsfi_forward(
    x2d: Tensor,
    weight: Tensor,
    group_index: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    out: Optional[Tensor] = None,
    *,
    checked: bool = True,
) -> tuple[Tensor, Tensor]:
    """Forward on CUDA. Returns ``(Z [B, out_features], XT)``; XT is reused by the weight gradient.

    ``checked=False`` skips the argument checks, for callers that made them (the layer, once per call)."""
    num_groups, fan_in, group_size = kernel_sizes(x2d, weight, group_index, checked)
    if bias is not None and (bias.dtype != x2d.dtype or not bias.is_contiguous()):
        raise TypeError("bias must be contiguous and of the input dtype for the CUDA kernels")
    batch, in_features = x2d.shape
    index = x2d.device.index
    xt = transpose_input(x2d)
    out = padded_output(batch, out_features, x2d) if out is None else check_out(out, (batch, out_features), x2d)
    # 16-byte stores need aligned rows with room up to the next multiple of 8 labels.
    aligned = rows_aligned(out) and out.stride(0) >= (out_features + 7) // 8 * 8
    p = plan(
        KERNEL_DTYPES[x2d.dtype], group_size, fan_in, in_features, batch, num_groups, aligned, index,
        current().forward,
    )
    args = (
        ptr(xt), xt.shape[1], ptr(weight), ptr(group_index), ptr(bias), ptr(out), out.stride(0), batch,
        in_features, out_features, fan_in, num_groups,
    )
    runtime.launch(p, args, index)
    return out, xt
