"""The grad-input kernel: ``dX[b, idx[g, k]] += sum_j dZ[b, g*G + j] * W[g*G + j, k]``
(``cuda/gsfi_grad_input.cu``): shared-memory size, variant choice, plan and launcher."""

from __future__ import annotations

import functools
import math
import struct

import torch
from torch import Tensor

from . import runtime
from .layout import KERNEL_DTYPES, dz_rows, kernel_sizes, pad16, ptr
from .tuning import GradInputTuning, current

__all__ = ["gsfi_grad_input", "k_chunk", "plan", "shared_bytes"]

#: gsfi_grad_input parameters: dZ, ldz, W, idx, dX, B, H, L, K, num_groups, groups per CTA.
PARAMS = struct.Struct("@QqQQQiiiiii")


def k_chunk(labels: int, k_pad: int) -> int:
    """Columns of K per pipeline stage: a [labels x chunk] weight tile of at most 16 KB, 16 to 128 wide."""
    cap = min(128, max(16, 8192 // labels)) // 16 * 16
    return min(k_pad, cap)


def shared_bytes(
    group_size: int, fan_in: int, in_features: int, smem_acc: bool, stages: int, rows: int = 32, groups: int = 1
) -> int:
    """Dynamic shared memory of ``gsfi_grad_input``: ``stages`` pipeline stages (a step's dZ rows swizzled,
    its weight chunk and indices) and, with ``smem_acc``, the float32 accumulator ``[H + trash][rows]``,
    where the trash rows (16 per warp) take the adds of padded feature slots (K not a multiple of 16, or a
    partial last chunk of K)."""
    gp, k_pad = pad16(group_size), pad16(fan_in)
    labels = groups * gp
    kc = k_chunk(labels, k_pad)
    stage = rows * labels * 2 + labels * (kc * 2 + 16) + groups * kc * 4
    trash = 8 * 16 if math.ceil(k_pad / kc) * kc > fan_in else 0
    return stages * stage + ((in_features + trash) * rows * 4 if smem_acc else 0)


def groups_per_step(
    group_size: int, rows: int, smem_acc: bool, settings: GradInputTuning = GradInputTuning()
) -> tuple[int, bool]:
    """(groups per step, whether each warp owns whole batch tiles) for one tiling.

    Groups of 16 labels run with warps that own batch tiles (each warp reads all of a group's weights, but
    its dZ fragments serve every feature tile) and four groups per step where a warp owns whole tiles of 64
    or 128 rows, which spreads the barrier, copies and loop over more products; larger groups run one group
    per step and a feature tile per warp. Several groups per step need warps that own whole tiles and
    unpadded groups; their count is a power of two (the dZ tile's swizzle needs one).
    """
    small = pad16(group_size) == 16
    whole_tiles = rows >= 64 and smem_acc and pad16(group_size) == group_size
    groups = (settings.groups if settings.groups is not None else (4 if small else 1)) if whole_tiles else 1
    groups = 1 << (max(1, groups).bit_length() - 1)
    row_owned = (settings.row_owned if settings.row_owned is not None else small) or groups > 1
    return groups, row_owned


def _deepest_stages(shared_for, max_shared: int, forced: int | None, most: int = 8) -> tuple[int, int]:
    """(stages, shared bytes) for the deepest pipeline (2..most) that fits, or the forced depth."""
    for stages in ((forced,) if forced is not None else range(most, 1, -1)):
        shared = shared_for(stages)
        if shared <= max_shared:
            return stages, shared
    raise ValueError(f"no grad_input kernel variant fits in {max_shared} bytes of shared memory")


@functools.lru_cache(maxsize=256)
def plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, aligned_dz: bool,
    index: int, settings: GradInputTuning = GradInputTuning(), deterministic: bool = False,
) -> runtime.Plan:
    """Kernel and grid for grad-input. Where several CTAs share batch rows they add their sums into dX with
    float32 atomics, in an order that varies from run to run; ``deterministic`` (torch's
    ``use_deterministic_algorithms``) has each column of CTAs write its own slice instead (``partials``),
    summed in a fixed order by the launcher. The grid is one wave, so the slices hold no more than the
    wave's shared-memory accumulators."""
    k_pad = pad16(fan_in)
    _, max_shared, _ = runtime.device_limits(index)
    # More batch rows per CTA spread the per-group overhead over more rows; they need a larger
    # accumulator: the most rows (up to 128, not more than the batch needs) whose accumulator fits.
    rows = settings.rows
    if rows is None:
        rows = 32
        for candidate in (128, 64):
            fits = shared_bytes(group_size, fan_in, in_features, True, 2, candidate) <= max_shared
            if fits and batch > candidate // 2:
                rows = candidate
                break
    smem_acc = shared_bytes(group_size, fan_in, in_features, True, 2, rows) <= max_shared
    groups, row_owned = groups_per_step(group_size, rows, smem_acc, settings)
    while groups > 1 and shared_bytes(group_size, fan_in, in_features, smem_acc, 2, rows, groups) > max_shared:
        groups //= 2
    stages, shared = _deepest_stages(
        lambda n: shared_bytes(group_size, fan_in, in_features, smem_acc, n, rows, groups), max_shared, settings.stages
    )
    # Deterministic: the kernel that writes per-column slices; with a single column of CTAs it writes dX itself
    # (slice 0, plain stores), so the launcher allocates slices only for several columns.
    slices = deterministic and smem_acc
    template = (dtype, group_size, k_pad, smem_acc, stages, rows, aligned_dz, groups, row_owned, slices)
    fn = runtime.compile_kernel("gsfi_grad_input", "gsfi_grad_input", template, index)
    row_tiles = math.ceil(batch / rows)
    per_cta = runtime.groups_per_cta(num_groups, row_tiles, shared, index, fn)
    per_cta = math.ceil(per_cta / groups) * groups  # whole steps per CTA
    columns = math.ceil(num_groups / per_cta)
    partials = slices and columns > 1
    exact = smem_acc and (columns == 1 or partials)
    return runtime.make_plan(
        fn, (row_tiles, columns), 256, shared, per_cta, index, PARAMS, "gsfi_grad_input", partials=partials,
        deterministic=exact,
    )


def gsfi_grad_input(
    grad_out: Tensor, weight: Tensor, group_index: Tensor, in_features: int, *, checked: bool = True,
    float32: bool = False,
) -> Tensor:
    """``dX [B, in_features]`` (float32 accumulation, returned in the weight dtype, or as the float32 sums with
    ``float32``, for callers that add several of them); ``checked=False`` skips the argument checks, for
    callers that made them."""
    num_groups, fan_in, group_size = kernel_sizes(grad_out, weight, group_index, checked)
    grad_out, aligned_dz = dz_rows(grad_out)
    batch, out_features = grad_out.shape
    device = grad_out.device
    deterministic = torch.are_deterministic_algorithms_enabled()
    p = plan(
        KERNEL_DTYPES[grad_out.dtype], group_size, fan_in, in_features, batch, num_groups, aligned_dz, device.index,
        current().grad_input, deterministic,
    )
    if deterministic and not p.deterministic:
        runtime.alert_not_deterministic(
            f"The CUDA grad-input kernel with in_features={in_features} (too many for its shared-memory "
            "accumulator: float32 atomics)"
        )
    if p.partials:  # one [B, H] slice per column of CTAs, every element written; summed in a fixed order
        grad_x = torch.empty(p.grid[1], batch, in_features, dtype=torch.float32, device=device)
    else:
        grad_x = runtime.zero_(torch.empty(batch, in_features, dtype=torch.float32, device=device))
    args = (
        ptr(grad_out), grad_out.stride(0), ptr(weight), ptr(group_index), ptr(grad_x), batch, in_features,
        out_features, fan_in, num_groups, p.per_cta,
    )
    runtime.launch(p, args, device.index)
    if p.partials:
        grad_x = grad_x.sum(0)
    return grad_x if float32 else grad_x.to(weight.dtype)
