"""Functional form of the group-shared fixed fan-in (GSFI) layer.

Label ``p = g * group_size + j`` of group ``g`` computes

    Z[b, p] = bias[p] + sum_k X[b, group_index[g, k]] * weight[p, k]

This module checks the arguments and picks the path: the CUDA kernels for bfloat16/float16 CUDA tensors
of supported shapes, else the pure-PyTorch path (chunked over groups so that its temporaries stay under
``memory_budget`` bytes; 16-bit inputs accumulate in float32, float64 stays float64). Both run through
:mod:`lightning_haste.ops`, which makes them visible to ``torch.compile``.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import ops
from ._checks import (
    check_float_tensor,
    check_group_index,
    check_label_ids,
    check_memory_budget,
    check_positive_int,
    check_same_device_dtype,
)
from ._reference import accumulation_dtype

__all__ = ["DEFAULT_MEMORY_BUDGET", "accumulation_dtype", "group_shared_fanin", "group_shared_fanin_columns"]

#: Default bound, in bytes, on the temporaries of the pure-PyTorch path (256 MiB).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def _uses_kernels(x: Tensor, weight: Tensor, group_index: Tensor, backend: str) -> bool:
    if not x.is_cuda:
        if backend == "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {x.device}")
        return False
    from . import kernels  # noqa: PLC0415 - imports no CuPy; kept off the CPU import path all the same

    # float32/float64 stay on the pure-PyTorch path, whose cuBLAS batched matmuls honour
    # torch.backends.cuda.matmul.allow_tf32: precision is never lowered silently.
    supported = kernels.supports(x, weight, group_index)
    if backend == "cuda" and not supported:
        raise ValueError(
            f"backend='cuda' needs CUDA bfloat16/float16 tensors, group_size in {kernels.SUPPORTED_GROUP_SIZES} "
            f"and fan_in a multiple of 8 up to {kernels.MAX_FAN_IN}; got {x.device} {x.dtype}, "
            f"group_size={weight.shape[0] // group_index.shape[0]}, fan_in={group_index.shape[1]}"
        )
    return supported


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs the layers in for the input ``x``, or None where it leaves them alone:
    autocast off on ``x``'s device type, or ``x`` in float64, which autocast never casts (as for
    ``F.linear``: a float64 model stays float64 under a bf16-mixed trainer)."""
    device_type = x.device.type
    if x.dtype == torch.float64:
        return None
    try:
        enabled = torch.is_autocast_enabled(device_type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(device_type) if enabled else None


def _autocast_arguments(x: Tensor, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """``(x, *tensors)``, under ``torch.autocast`` cast to the autocast dtype (None stays None), so that the layer
    runs in it as ``F.linear`` does: each floating-point tensor but a float64 one, which autocast leaves as it is
    (a float64 tensor beside 16-bit ones then fails the caller's dtype check, as it fails ``F.linear``)."""
    dtype = autocast_dtype(x)
    if dtype is None:
        return (x, *tensors)
    cast = lambda t: t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)  # noqa: E731
    return tuple(cast(t) for t in (x, *tensors))


def kernel_arguments(
    weight: Tensor, group_index: Tensor, bias: Optional[Tensor]
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(weight, group_index, bias)`` as the CUDA kernels take them: contiguous, the index int32."""
    index = group_index if group_index.dtype == torch.int32 else group_index.to(torch.int32)
    return weight.contiguous(), index.contiguous(), bias.contiguous() if bias is not None else None


def _check_layer_arguments(
    x: Tensor,
    weight: Tensor,
    group_index: Tensor,
    bias: Optional[Tensor],
    out_features: Optional[int],
    check_index: bool,
) -> int:
    """Validate the functional arguments; return the resolved ``out_features``."""
    check_float_tensor("x", x)
    check_float_tensor("weight", weight)
    if bias is not None:
        check_float_tensor("bias", bias)
    if not isinstance(group_index, torch.Tensor):
        raise TypeError(f"group_index must be a torch.Tensor, got {type(group_index).__name__}")
    check_same_device_dtype("x", x, weight=weight, bias=bias)
    if group_index.device != x.device:
        raise ValueError(f"group_index is on {group_index.device} but x is on {x.device}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., in_features]")
    if x.numel() == 0:
        raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); need at least one row")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [num_groups * group_size, fan_in], got {tuple(weight.shape)}")
    if group_index.dim() != 2:
        raise ValueError(f"group_index must be 2-D [num_groups, fan_in], got {tuple(group_index.shape)}")
    num_groups, fan_in = group_index.shape
    if num_groups == 0 or weight.shape[0] % num_groups != 0:
        raise ValueError(
            f"weight has {weight.shape[0]} rows, which is not a multiple of the {num_groups} rows "
            "of group_index"
        )
    if weight.shape[1] != fan_in:
        raise ValueError(f"weight has {weight.shape[1]} columns but group_index has fan_in {fan_in}")
    group_size = weight.shape[0] // num_groups
    padded = num_groups * group_size
    if out_features is None:
        out_features = padded
    out_features = check_positive_int("out_features", out_features)
    if not padded - group_size < out_features <= padded:
        raise ValueError(
            f"out_features={out_features} does not fit {num_groups} groups of {group_size} labels "
            f"(must be in ({padded - group_size}, {padded}])"
        )
    if bias is not None and tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    if check_index and not torch.compiler.is_compiling():  # reading the values is not traceable
        check_group_index(group_index, x.shape[-1])
    elif fan_in > x.shape[-1]:
        raise ValueError(f"group_index has fan_in {fan_in} > in_features {x.shape[-1]}")
    return out_features


def group_shared_fanin(
    x: Tensor,
    weight: Tensor,
    group_index: Tensor,
    bias: Optional[Tensor] = None,
    out_features: Optional[int] = None,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    check_index: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Apply a group-shared fixed fan-in layer.

    Args:
        x: inputs ``[..., in_features]``.
        weight: ``[num_groups * group_size, fan_in]``; row ``p`` belongs to group ``p // group_size``.
        group_index: int32/int64 ``[num_groups, fan_in]``; the input features that every label of a
            group reads; entries distinct within a row and in ``[0, in_features)``.
        bias: optional ``[out_features]``.
        out_features: number of labels returned (the trailing padding labels of the last group are
            dropped); defaults to ``num_groups * group_size``.
        memory_budget: bound in bytes on the temporaries of the pure-PyTorch path.
        check_index: validate ``group_index`` values (range, duplicates). This reads the index, which
            synchronises with a GPU; pass ``False`` when the index was validated before. Under
            ``torch.compile`` the values are not read (validate the index before compiling).
        backend: ``"auto"`` runs the CUDA kernels for bfloat16/float16 CUDA tensors of supported
            shapes (group_size in 8..128, fan_in a multiple of 8 up to 512) and the pure-PyTorch path
            otherwise; ``"cuda"`` requires the kernels; ``"torch"`` forces the pure-PyTorch path.
            The kernels need CuPy (``pip install 'lightning-haste[gpu]'``).

    Returns:
        ``[..., out_features]`` logits in the dtype of ``x``.
    """
    if backend not in ("auto", "cuda", "torch"):
        raise ValueError(f"backend must be 'auto', 'cuda' or 'torch', got {backend!r}")
    if isinstance(x, Tensor) and isinstance(weight, Tensor):
        x, weight, bias = _autocast_arguments(x, weight, bias)
    out_features = _check_layer_arguments(x, weight, group_index, bias, out_features, check_index)
    memory_budget = check_memory_budget(memory_budget)
    return apply_checked(x, weight, group_index, bias, out_features, memory_budget, backend)


def apply_checked(
    x: Tensor,
    weight: Tensor,
    group_index: Tensor,
    bias: Optional[Tensor],
    out_features: int,
    memory_budget: int,
    backend: str,
) -> Tensor:
    """:func:`group_shared_fanin` on arguments that were validated (by it, or by a layer that owns them):
    picks the path and runs it, with no checks of its own."""
    lead = x.shape[:-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if backend != "torch" and _uses_kernels(x, weight, group_index, backend):
        weight, index, bias = kernel_arguments(weight, group_index, bias)
        if torch.is_autocast_enabled(x.device.type):  # entering the context costs host time: only if on
            with torch.autocast(x.device.type, enabled=False):
                out = ops.group_shared_fanin_2d(x2d, weight, index, bias, out_features, memory_budget, True)
        else:
            out = ops.group_shared_fanin_2d(x2d, weight, index, bias, out_features, memory_budget, True)
    else:
        out = ops.group_shared_fanin_2d(x2d, weight, group_index, bias, out_features, memory_budget, False)
    return out if x.dim() == 2 else out.reshape(*lead, out_features)


def group_shared_fanin_columns(
    x: Tensor,
    weight: Tensor,
    group_index: Tensor,
    positions: Tensor,
    bias: Optional[Tensor] = None,
    *,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> Tensor:
    """Logits of selected labels only: ``group_shared_fanin(x, ...)[..., positions]`` without the rest.

    ``positions`` is a 1-D integer tensor of label positions (rows of ``weight``; with a ``bias``, below its length,
    so that no padding label of the last group is selected). Differentiable through autograd; temporaries are
    chunked over the selected labels. The arguments are checked as :func:`group_shared_fanin` checks them.
    """
    if isinstance(x, Tensor) and isinstance(weight, Tensor):
        x, weight, bias = _autocast_arguments(x, weight, bias)
    out_features = _check_layer_arguments(x, weight, group_index, bias, None if bias is None else bias.shape[0], True)
    if not isinstance(positions, Tensor):
        raise ValueError("positions must be a 1-D tensor of label positions")
    positions = check_label_ids(positions, out_features, name="positions", what="label positions",
                                bound_name="out_features")
    return _columns_checked(x, weight, group_index, positions, bias, check_memory_budget(memory_budget))


def _columns_checked(
    x: Tensor, weight: Tensor, group_index: Tensor, positions: Tensor, bias: Optional[Tensor], memory_budget: int
) -> Tensor:
    """:func:`group_shared_fanin_columns` on validated arguments (the layers validate theirs once)."""
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    batch = x2d.shape[0]
    acc = accumulation_dtype(x.dtype)
    itemsize = torch.empty((), dtype=acc).element_size()
    chunk = max(1, memory_budget // (itemsize * (2 * batch * fan_in + fan_in)))
    positions = positions.to(device=x.device, dtype=torch.long)
    parts = []
    for s in range(0, positions.numel(), chunk):
        pos = positions[s : s + chunk]
        idx = group_index.index_select(0, pos // group_size)  # [n, K]
        xg = x2d.index_select(1, idx.reshape(-1)).to(acc).view(batch, pos.numel(), fan_in)
        z = torch.einsum("bnk,nk->bn", xg, weight.index_select(0, pos).to(acc))
        if bias is not None:
            z = z + bias.index_select(0, pos).to(acc)
        parts.append(z.to(x.dtype))
    out = torch.cat(parts, dim=1) if parts else x2d.new_empty(batch, 0)
    return out.reshape(*lead, positions.numel())
