"""Tensor layouts the kernels read and write, and the argument checks every launcher shares.

- ``XT [H, ceil8(B)]``: the input transposed, batch contiguous, padding columns zero (the gather layout).
- ``Z, dZ [B, L]``: rows on 16-byte boundaries where possible. An output is a ``[B, L]`` view of
  ``[B, ceil8(L)]`` storage, so every row starts aligned and 16-byte stores may run into the padding.
  A gradient is read as it comes when its labels are contiguous and its first row is aligned (odd ``L``
  is realigned inside the kernels), and copied into zero-padded aligned rows otherwise.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "KERNEL_DTYPES",
    "MAX_FAN_IN",
    "SUPPORTED_GROUP_SIZES",
    "check_kernel_arguments",
    "check_out",
    "dz_rows",
    "grad_out_for_kernels",
    "pad16",
    "padded_output",
    "padded_rows",
    "ptr",
    "rows_aligned",
    "supports",
    "transpose_input",
]

SUPPORTED_GROUP_SIZES = (8, 16, 32, 64, 128)
MAX_FAN_IN = 512
#: torch dtype -> the kernels' 16-bit element type (a template argument).
KERNEL_DTYPES = {torch.bfloat16: "bf16_t", torch.float16: "f16_t"}


def pad16(v: int) -> int:
    """``v`` rounded up to a multiple of 16 (the tensor-core tile edge)."""
    return (v + 15) // 16 * 16


def ptr(t: Optional[Tensor]) -> int:
    """Device address of ``t`` (0 for ``None``: the kernels read that as "absent")."""
    return 0 if t is None else t.data_ptr()


def supports(x: Tensor, weight: Tensor, group_index: Tensor) -> bool:
    """Whether the kernels handle these arguments (else the pure-PyTorch path runs)."""
    if not (x.is_cuda and x.dtype in KERNEL_DTYPES and weight.dtype == x.dtype):
        return False
    # Compiled code reads no data pointers: there the op's launcher checks the alignment when it runs.
    if not torch.compiler.is_compiling() and weight.data_ptr() % 16:
        return False
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    return group_size in SUPPORTED_GROUP_SIZES and fan_in % 8 == 0 and fan_in <= MAX_FAN_IN


def kernel_sizes(x: Tensor, weight: Tensor, group_index: Tensor, checked: bool = True) -> tuple[int, int, int]:
    """``(num_groups, fan_in, group_size)``; with ``checked`` after :func:`check_kernel_arguments`, without
    for arguments checked before (the layer checks once per call)."""
    if checked:
        return check_kernel_arguments(x, weight, group_index)
    num_groups, fan_in = group_index.shape
    return num_groups, fan_in, weight.shape[0] // num_groups


def check_kernel_arguments(x: Tensor, weight: Tensor, group_index: Tensor) -> tuple[int, int, int]:
    """Raise unless the kernels can take these tensors; return ``(num_groups, fan_in, group_size)``."""
    if not x.is_cuda:
        raise ValueError("the CUDA kernels need CUDA tensors")
    if x.dtype not in KERNEL_DTYPES or weight.dtype != x.dtype:
        raise TypeError(f"the CUDA kernels take bfloat16 or float16 inputs of one dtype, got {x.dtype}, {weight.dtype}")
    if group_index.dtype != torch.int32 or not group_index.is_contiguous():
        raise TypeError("group_index must be a contiguous int32 tensor for the CUDA kernels")
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        raise ValueError("weight must be contiguous and 16-byte aligned for the CUDA kernels")
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    if group_size not in SUPPORTED_GROUP_SIZES or fan_in % 8 or fan_in > MAX_FAN_IN:
        raise ValueError(
            f"the CUDA kernels need group_size in {SUPPORTED_GROUP_SIZES} and fan_in a multiple of 8 "
            f"<= {MAX_FAN_IN}, got group_size={group_size}, fan_in={fan_in}"
        )
    return num_groups, fan_in, group_size


def transpose_input(x2d: Tensor) -> Tensor:
    """``[B, H]`` -> ``XT [H, ceil8(B)]``, padding columns zero (the kernels' gather layout)."""
    batch, in_features = x2d.shape
    padded = (batch + 7) // 8 * 8
    if padded == batch:
        return x2d.t().contiguous()  # one call instead of three (host time)
    xt = torch.empty(in_features, padded, dtype=x2d.dtype, device=x2d.device)
    if padded != batch:
        xt[:, batch:].zero_()
    xt[:, :batch].copy_(x2d.t())
    return xt


def check_out(out: Optional[Tensor], shape: tuple, like: Tensor) -> Tensor:
    """``out`` after checking it can receive a result of ``shape`` (a fresh tensor when ``None``)."""
    if out is None:
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or out.device != like.device:
        raise ValueError(f"out must be a {like.dtype} tensor of shape {tuple(shape)} on {like.device}")
    if out.stride(-1) != 1 or (out.dim() == 2 and out.stride(0) < out.shape[1]):
        raise ValueError("out must have contiguous rows")
    return out


def rows_aligned(t: Tensor) -> bool:
    """Whether every row of the 2-D ``t`` starts on a 16-byte boundary, elements contiguous."""
    return t.stride(1) == 1 and t.stride(0) % 8 == 0 and t.data_ptr() % 16 == 0


# Marks the [B, L] views that padded_rows returns (odd L): their storage rows are aligned and padded
# with zeros, so a backward that pads dZ once can hand the view to both gradient kernels.
_ZERO_PADDED = "_haste_zero_padded_rows"


def padded_rows(t: Tensor) -> Tensor:
    """``t [B, L]`` with rows on 16-byte boundaries, as the kernels read them.

    Returns ``t`` itself when it already is so and ``L`` is a multiple of 8; otherwise a copy into
    ``[B, ceil8(L)]`` storage whose padding columns are zero, as a ``[B, L]`` view. The kernels read
    whole 8-label pieces, so the padding must hold zeros (not the next row's values).
    """
    batch, labels = t.shape
    if _whole_pieces(t):
        return t
    storage = torch.empty(batch, (labels + 7) // 8 * 8, dtype=t.dtype, device=t.device)
    storage[:, labels:].zero_()
    storage[:, :labels].copy_(t)
    view = storage[:, :labels]
    setattr(view, _ZERO_PADDED, True)  # its padding columns cannot be written through the view
    return view


def _whole_pieces(t: Tensor) -> bool:
    """Whether the kernels can read ``t``'s rows as aligned 8-label pieces: ``L`` a multiple of 8 and
    aligned rows, or a view that :func:`padded_rows` made (passed on: no second copy)."""
    return (t.shape[1] % 8 == 0 and rows_aligned(t)) or getattr(t, _ZERO_PADDED, False)


def dz_rows(t: Tensor) -> tuple[Tensor, bool]:
    """``(dZ as the gradient kernels read it, whether its rows are whole aligned 8-label pieces)``.

    Rows that are not (an odd number of labels, say) are read raw and realigned (grad-input: in registers
    on their way into shared memory; grad-weight: in shared memory), with no copy of dZ, as long as the
    labels are contiguous and the first row starts on a 16-byte boundary;
    other layouts (broadcast or transposed gradients) are copied by :func:`padded_rows`.
    """
    if _whole_pieces(t):
        return t, True
    if t.stride(1) == 1 and t.stride(0) >= t.shape[1] and t.data_ptr() % 16 == 0:
        return t, False
    return padded_rows(t), True


def grad_out_for_kernels(t: Tensor) -> Tensor:
    """``t`` when the gradient kernels read it as it is (see :func:`dz_rows`), else one padded copy
    that both of them then read: a backward calls this once before launching them."""
    return dz_rows(t)[0]


def padded_output(batch: int, labels: int, like: Tensor) -> Tensor:
    """Fresh ``[B, L]`` output whose rows start on 16-byte boundaries (a view of padded storage)."""
    padded = (labels + 7) // 8 * 8
    storage = torch.empty(batch, padded, dtype=like.dtype, device=like.device)
    return storage if padded == labels else storage[:, :labels]
