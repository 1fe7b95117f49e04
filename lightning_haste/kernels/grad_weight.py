"""The grad-weight kernels: ``dW[g*G + j, k] = sum_b dZ[b, g*G + j] * X[b, idx[g, k]]``, with the bias
gradient ``dB = sum_b dZ[b, :]`` from the same dZ tiles (``cuda/gsfi_grad_weight.cu``).

``gsfi_grad_weight_warp`` (a warp per group, the input resident in shared memory) runs where a group's whole
gradient fits in a warp's registers and the input fits in shared memory; ``gsfi_grad_weight`` (a CTA per
[64 x 128] gradient tile) everywhere else. This module holds their shared-memory sizes, variant choice,
plan and launcher.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Optional

from torch import Tensor

from . import runtime
from .layout import KERNEL_DTYPES, check_out, dz_rows, kernel_sizes, pad16, ptr
from .tuning import GradWeightTuning, current

__all__ = ["gsfi_grad_weight", "plan", "tile_shared_bytes", "warp_shared_bytes"]

#: Both kernels' parameters: dZ, ldz, XT, ldxt, idx, dW, dB, B, H, L, K, num_groups, groups per CTA
#: (the tile kernel ignores H and the groups per CTA).
PARAMS = struct.Struct("@QqQiQQQiiiiii")


def tile_shared_bytes(group_size: int, k_pad: int, stages: int) -> int:
    """Dynamic shared memory of ``gsfi_grad_weight``: ``stages`` stages of a [64-row x GT] dZ tile and the
    64-row slices of the KT gathered input rows, then the tile's KT indices."""
    gt = pad16(group_size) if group_size < 64 else 64
    kt = min(k_pad, 128)
    return stages * (64 * (gt * 2 + 16) + kt * 144) + kt * 4


def warp_shared_bytes(group_size: int, in_features: int, batch: int, stages: int, warps: int) -> int:
    """Dynamic shared memory of ``gsfi_grad_weight_warp``: the resident input ``XT [H + 1][ceil32(B)]``
    and per warp a ``stages``-deep ring of 32-row dZ tiles (one raw 16-byte piece more per row)."""
    resident = (in_features + 1) * ((batch + 31) // 32 * 64 + 16)
    return resident + warps * stages * 32 * (pad16(group_size) * 2 + 16)


#: (warps, stages) of the warp grad-weight, in order of preference: a third stage before the last two warps
#: (the ring hides the dZ loads; the extra warps only add more of them in flight).
WARP_SHAPES = ((8, 3), (6, 3), (8, 2), (4, 3), (4, 2), (2, 2))


def warp_variant(
    group_size: int, in_features: int, batch: int, max_shared: int, settings: GradWeightTuning = GradWeightTuning()
) -> Optional[tuple[int, int, int]]:
    """(warps, stages, shared bytes) of the warp grad-weight: the first of :data:`WARP_SHAPES` that fits
    beside the resident input, or None. Forced warps or stages (defaults 8 and 2) are used as given and
    raise if they do not fit."""
    shapes = WARP_SHAPES
    forced = settings.warp_warps is not None or settings.warp_stages is not None
    if forced:
        shapes = ((settings.warp_warps or 8, settings.warp_stages or 2),)
    for warps, stages in shapes:
        shared = warp_shared_bytes(group_size, in_features, batch, stages, warps)
        if shared <= max_shared:
            return warps, stages, shared
    if forced:
        raise ValueError(f"the warp grad-weight with {shapes[0][0]} warps and {shapes[0][1]} stages needs "
                         f"{shared} bytes of shared memory, the device allows {max_shared}")
    return None


def uses_warp_kernel(group_size: int, k_pad: int, settings: GradWeightTuning = GradWeightTuning()) -> bool:
    """Whether the warp kernel applies: a group's whole [G x K] gradient fits in a warp's registers
    (at most 2048 values, 64 floats a lane) and the kernel is not forced to the tile kernel."""
    return pad16(group_size) * k_pad <= 2048 and settings.kernel != "tile"


@functools.lru_cache(maxsize=256)
def plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, aligned_dz: bool,
    index: int, settings: GradWeightTuning = GradWeightTuning(),
) -> runtime.Plan:
    """Kernel and grid of grad-weight for one problem shape on device ``index``."""
    k_pad = pad16(fan_in)
    _, max_shared, _ = runtime.device_limits(index)
    # Small groups and a batch whose XT fits in shared memory: one warp per group, the gathers read
    # the resident XT (no L2 traffic for them), the group's gradient in the warp's registers.
    if uses_warp_kernel(group_size, k_pad, settings):
        variant = warp_variant(group_size, in_features, batch, max_shared, settings)
        if variant is not None:
            warps, stages, shared = variant
            template = (dtype, group_size, k_pad, stages, warps, aligned_dz)
            fn = runtime.compile_kernel("gsfi_grad_weight", "gsfi_grad_weight_warp", template, index)
            per_cta = math.ceil(runtime.groups_per_cta(num_groups, 1, shared, index) / warps) * warps
            grid = (math.ceil(num_groups / per_cta), 1)
            return runtime.make_plan(fn, grid, 32 * warps, shared, per_cta, index, PARAMS, "gsfi_grad_weight_warp")
    # A 2-stage ring by default: the smaller CTAs fit twice as many per multiprocessor, which hides more
    # latency than a third stage does.
    stages = settings.tile_stages or 2
    shared = tile_shared_bytes(group_size, k_pad, stages)
    template = (dtype, group_size, k_pad, stages, aligned_dz)
    fn = runtime.compile_kernel("gsfi_grad_weight", "gsfi_grad_weight", template, index)
    tiles = num_groups * math.ceil(group_size / 64) * math.ceil(k_pad / min(k_pad, 128))
    return runtime.make_plan(fn, (tiles, 1), 128, shared, 0, index, PARAMS, "gsfi_grad_weight")


def gsfi_grad_weight(
    grad_out: Tensor,
    xt: Tensor,
    group_index: Tensor,
    weight: Tensor,
    out: Optional[Tensor] = None,
    grad_bias: Optional[Tensor] = None,
    *,
    checked: bool = True,
) -> Tensor:
    """``dW`` shaped like ``weight``; padding labels get exact zeros (``checked=False`` skips the argument
    checks, for callers that made them).

    When ``grad_bias`` (``[out_features]``, the weight dtype) is given, the same launch also writes the
    bias gradient ``grad_out.sum(0)`` into it (float32 sums, rounded once), saving a pass over ``grad_out``.
    """
    num_groups, fan_in, group_size = kernel_sizes(grad_out, weight, group_index, checked)
    grad_out, aligned_dz = dz_rows(grad_out)
    batch, out_features = grad_out.shape
    index = grad_out.device.index
    in_features = xt.shape[0]
    p = plan(
        KERNEL_DTYPES[grad_out.dtype], group_size, fan_in, in_features, batch, num_groups, aligned_dz, index,
        current().grad_weight,
    )
    grad_w = check_out(out, tuple(weight.shape), weight)
    if grad_bias is not None:
        grad_bias = check_out(grad_bias, (out_features,), weight)
    args = (
        ptr(grad_out), grad_out.stride(0), ptr(xt), xt.shape[1], ptr(group_index), ptr(grad_w),
        ptr(grad_bias), batch, in_features, out_features, fan_in, num_groups, p.per_cta,
    )
    runtime.launch(p, args, index)
    return grad_w
