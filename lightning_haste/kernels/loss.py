"""The fused loss kernels of the tail (``cuda/gsfi_loss.cu``): the loss of the logits and the logits' gradient
straight from the forward's tensor-core tiles, with no logits tensor in between.

The per-label loss splits into a dense part that depends on the logit alone (every label scored as a
negative: ``softplus(z)`` for binary cross-entropy, ``relu(1 + z)^2`` for the squared hinge) and a correction
at the positives, which the caller computes on the side. ``gsfi_loss_sum`` reduces the dense part to one
float32 partial sum per warp; ``gsfi_loss_grad`` writes ``scale * d(dense part)/dz`` for a range of groups, the
chunk of dZ that the gradient kernels then read (and can sum the loss in the same pass). Both run the forward's
main loop (the mma.sync kernel's variants and tuning: :func:`lightning_haste.kernels.forward.mma_variant`).
``gsfi_loss_dense`` does the same for a chunk of the dense head's logits, which cuBLAS computes.
"""

from __future__ import annotations

import functools
import math
import struct
from typing import Optional

import torch
from torch import Tensor

from . import runtime
from .forward import mma_variant
from .layout import KERNEL_DTYPES, check_out, kernel_sizes, pad16, ptr, rows_aligned
from .tuning import ForwardTuning, current

__all__ = [
    "LOSS_KINDS", "dense_plan", "gsfi_loss_dense", "gsfi_loss_grad", "gsfi_loss_sum", "gsfi_scale_", "plan",
    "scale_plan",
]

#: The loss names and the kernels' LOSS template argument.
LOSS_KINDS = {"bce": 0, "squared_hinge": 1}

#: gsfi_loss_sum parameters: XT, ldxt, W, idx, bias, partial, B, H, L, K, num_groups.
SUM_PARAMS = struct.Struct("@QiQQQQiiiii")
#: gsfi_loss_grad parameters: XT, ldxt, W, idx, bias, scale, partial, dZ, ldz, B, H, L, K, num_groups.
GRAD_PARAMS = struct.Struct("@QiQQQQQQqiiiii")


@functools.lru_cache(maxsize=256)
def plan(
    dtype: str, group_size: int, fan_in: int, in_features: int, batch: int, num_groups: int, loss: str, grad: bool,
    aligned: bool, index: int, settings: ForwardTuning = ForwardTuning(),
) -> runtime.Plan:
    """Kernel and grid of ``gsfi_loss_grad`` (``grad``) or ``gsfi_loss_sum`` for one problem shape: the
    forward's mma.sync variant for it (the same main loop and shared memory) and its one-wave grid."""
    k_pad = pad16(fan_in)
    _, max_shared, per_sm = runtime.device_limits(index)
    resident, warps, stages, shared = mma_variant(group_size, k_pad, in_features, max_shared, per_sm, settings)
    if grad:
        template = (dtype, group_size, k_pad, resident, aligned, warps, stages, LOSS_KINDS[loss])
        name, params = "gsfi_loss_grad", GRAD_PARAMS
    else:
        template = (dtype, group_size, k_pad, resident, warps, stages, LOSS_KINDS[loss])
        name, params = "gsfi_loss_sum", SUM_PARAMS
    fn = runtime.compile_kernel("gsfi_loss", name, template, index)
    row_tiles = math.ceil(batch / 64)
    per_cta = runtime.groups_per_cta(num_groups, row_tiles, shared, index)
    per_cta = math.ceil(per_cta / warps) * warps
    grid = (row_tiles, math.ceil(num_groups / per_cta))
    return runtime.make_plan(fn, grid, 32 * warps, shared, per_cta, index, params, name)


def _check_loss(loss: str) -> None:
    if loss not in LOSS_KINDS:
        raise ValueError(f"loss must be one of {sorted(LOSS_KINDS)}, got {loss!r}")


def gsfi_loss_sum(
    xt: Tensor, batch: int, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int,
    loss: str, *, checked: bool = True,
) -> Tensor:
    """float32 partial sums (one per warp of the grid; their sum is the total) of the dense part of the loss over
    the ``[batch, out_features]`` logits of the layer. ``xt`` is the transposed input
    (:func:`~lightning_haste.kernels.layout.transpose_input`, ``[in_features, ldxt]``)."""
    _check_loss(loss)
    num_groups, fan_in, group_size = kernel_sizes(xt.t()[:batch], weight, group_index, checked)
    in_features = xt.shape[0]
    index = xt.device.index
    p = plan(
        KERNEL_DTYPES[xt.dtype], group_size, fan_in, in_features, batch, num_groups, loss, False, True, index,
        current().forward,
    )
    warps = p.block // 32
    partial = torch.empty(p.grid[0] * p.grid[1] * warps, dtype=torch.float32, device=xt.device)
    args = (
        ptr(xt), xt.shape[1], ptr(weight), ptr(group_index), ptr(bias), ptr(partial), batch, in_features,
        out_features, fan_in, num_groups,
    )
    runtime.launch(p, args, index)
    return partial


def gsfi_loss_grad(
    xt: Tensor, batch: int, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int,
    loss: str, scale: Tensor, out: Tensor, *, checked: bool = True, with_sum: bool = False,
) -> Optional[Tensor]:
    """Write ``scale * d(dense part of the loss)/dz`` of the ``[batch, out_features]`` logits into ``out``
    (rows contiguous, in the input dtype). ``scale`` is a one-element float32 tensor on the device (read by the
    kernel: no host synchronisation). With ``with_sum``, returns the float32 partial sums of the dense part of
    the loss (as :func:`gsfi_loss_sum`), else None."""
    _check_loss(loss)
    num_groups, fan_in, group_size = kernel_sizes(xt.t()[:batch], weight, group_index, checked)
    if scale.dtype != torch.float32 or scale.numel() != 1 or scale.device != xt.device:
        raise ValueError("scale must be a one-element float32 tensor on the input's device")
    in_features = xt.shape[0]
    index = xt.device.index
    out = check_out(out, (batch, out_features), xt)
    aligned = rows_aligned(out) and out.stride(0) >= (out_features + 7) // 8 * 8
    p = plan(
        KERNEL_DTYPES[xt.dtype], group_size, fan_in, in_features, batch, num_groups, loss, True, aligned, index,
        current().forward,
    )
    partial = None
    if with_sum:
        partial = torch.empty(p.grid[0] * p.grid[1] * (p.block // 32), dtype=torch.float32, device=xt.device)
    args = (
        ptr(xt), xt.shape[1], ptr(weight), ptr(group_index), ptr(bias), ptr(scale), ptr(partial), ptr(out),
        out.stride(0), batch, in_features, out_features, fan_in, num_groups,
    )
    runtime.launch(p, args, index)
    return partial


#: gsfi_loss_dense parameters: logits, ldz_in, bias, scale, partial, dZ, ldz, cols.
DENSE_PARAMS = struct.Struct("@QqQQQQqi")


@functools.lru_cache(maxsize=256)
def dense_plan(dtype: str, logits_dtype: str, loss: str, batch: int, cols: int, index: int) -> runtime.Plan:
    """Kernel and grid of ``gsfi_loss_dense``: a row of CTAs per batch row, each CTA 256 columns at a time, about
    sixteen CTAs per multiprocessor in all (enough to hide the memory latency of a streaming pass)."""
    fn = runtime.compile_kernel("gsfi_loss", "gsfi_loss_dense", (dtype, logits_dtype, LOSS_KINDS[loss]), index)
    sms, _, _ = runtime.device_limits(index)
    across = max(1, min(math.ceil(cols / 256), math.ceil(16 * sms / batch)))
    return runtime.make_plan(fn, (across, batch), 256, 0, 0, index, DENSE_PARAMS, "gsfi_loss_dense")


def gsfi_loss_dense(
    logits: Tensor, bias: Optional[Tensor], loss: str, scale: Optional[Tensor], out: Optional[Tensor],
    with_sum: bool, dtype: torch.dtype,
) -> Optional[Tensor]:
    """For dense logits ``[B, cols]`` (float32 or ``dtype``, rows contiguous) plus ``bias``: write ``scale *
    d(dense part of the loss)/dz`` into ``out`` (``dtype``) when given, and return the float32 partial sums of the
    dense part of the loss when ``with_sum`` (else None). ``scale``: a one-element float32 tensor on the device."""
    _check_loss(loss)
    batch, cols = logits.shape
    if logits.stride(1) != 1 or (out is not None and out.stride(1) != 1):
        raise ValueError("logits and out must have contiguous rows")
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous() or bias.shape != (cols,)):
        raise ValueError(f"bias must be a contiguous ({cols},) tensor of {dtype}")
    if out is not None and (out.dtype != dtype or tuple(out.shape) != (batch, cols)):
        raise ValueError(f"out must be a {dtype} tensor of shape ({batch}, {cols})")
    if out is not None and (scale is None or scale.dtype != torch.float32 or scale.numel() != 1):
        raise ValueError("scale must be a one-element float32 tensor when out is given")
    index = logits.device.index
    logits_dtype = "float" if logits.dtype == torch.float32 else KERNEL_DTYPES[logits.dtype]
    p = dense_plan(KERNEL_DTYPES[dtype], logits_dtype, loss, batch, cols, index)
    partial = torch.empty(p.grid[0] * p.grid[1], dtype=torch.float32, device=logits.device) if with_sum else None
    args = (
        ptr(logits), logits.stride(0), ptr(bias), ptr(scale), ptr(partial), ptr(out),
        out.stride(0) if out is not None else 0, cols,
    )
    runtime.launch(p, args, index)
    return partial


#: gsfi_scale parameters: data, n, scale.
SCALE_PARAMS = struct.Struct("@QqQ")


@functools.lru_cache(maxsize=16)
def scale_plan(dtype: str, index: int) -> runtime.Plan:
    """``gsfi_scale``: eight CTAs of 256 threads per multiprocessor, striding over the whole tensor."""
    fn = runtime.compile_kernel("gsfi_loss", "gsfi_scale", (dtype,), index)
    sms, _, _ = runtime.device_limits(index)
    return runtime.make_plan(fn, (8 * sms, 1), 256, 0, 0, index, SCALE_PARAMS, "gsfi_scale")


def gsfi_scale_(t: Tensor, scale: Tensor) -> Tensor:
    """``t *= scale`` in place for a contiguous, 16-byte aligned bfloat16/float16 CUDA tensor (float32 product,
    rounded once; ``scale`` a one-element float32 tensor on the device: no host synchronisation)."""
    if t.dtype not in KERNEL_DTYPES or not t.is_contiguous() or t.data_ptr() % 16:
        raise ValueError("gsfi_scale_ takes a contiguous, 16-byte aligned bfloat16 or float16 CUDA tensor")
    if scale.dtype != torch.float32 or scale.numel() != 1 or scale.device != t.device:
        raise ValueError("scale must be a one-element float32 tensor on the tensor's device")
    if t.numel():
        index = t.device.index
        runtime.launch(scale_plan(KERNEL_DTYPES[t.dtype], index), (ptr(t), t.numel(), ptr(scale)), index)
    return t
