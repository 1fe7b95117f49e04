"""Functional form of the group-shared fixed fan-in (GSFI) layer and its pure-PyTorch path.

Label ``p = g * group_size + j`` of group ``g`` computes

    Z[b, p] = bias[p] + sum_k X[b, group_index[g, k]] * weight[p, k]

The pure-PyTorch path below is the reference the CUDA kernels are tested against. It walks over the
groups in chunks so that its temporaries stay under ``memory_budget`` bytes however many labels there
are, and it has an explicit backward (gather -> batched matmul -> ``index_add_``) instead of autograd
through one giant gather. Half-precision inputs are accumulated in float32; the result is cast back to
the input dtype once, at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._checks import (
    check_float_tensor,
    check_group_index,
    check_memory_budget,
    check_positive_int,
    check_same_device_dtype,
)

__all__ = ["DEFAULT_MEMORY_BUDGET", "group_shared_fanin", "group_shared_fanin_columns"]

#: Default bound, in bytes, on the temporaries of the pure-PyTorch path (256 MiB).
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are carried in: float32 for 16-bit inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _groups_per_chunk(batch: int, fan_in: int, group_size: int, dtype: torch.dtype, budget: int) -> int:
    # Backward is the hungrier pass: gathered inputs, their gradient and its transposed copy
    # (3 x [batch, fan_in]), the output-gradient slice and its padded copy (2 x [batch, group_size])
    # and the weight slice with its gradient (2 x [group_size, fan_in]), all per group.
    itemsize = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    per_group = itemsize * (3 * batch * fan_in + 2 * batch * group_size + 2 * group_size * fan_in)
    return max(1, budget // per_group)


def _gather_groups(x: Tensor, group_index: Tensor, acc: torch.dtype) -> Tensor:
    """``[N, H]`` inputs -> ``[c, N, K]`` inputs read by the ``c`` groups of ``group_index``."""
    groups, fan_in = group_index.shape
    gathered = x.index_select(1, group_index.reshape(-1)).to(acc)
    return gathered.view(x.shape[0], groups, fan_in).transpose(0, 1)


class _GroupSharedFanInReference(torch.autograd.Function):
    """Pure-PyTorch GSFI on a 2-D input, chunked over groups, with an explicit backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        x: Tensor,
        weight: Tensor,
        group_index: Tensor,
        bias: Optional[Tensor],
        out_features: int,
        memory_budget: int,
    ) -> Tensor:
        batch = x.shape[0]
        num_groups, fan_in = group_index.shape
        group_size = weight.shape[0] // num_groups
        acc = accumulation_dtype(x.dtype)
        chunk = _groups_per_chunk(batch, fan_in, group_size, x.dtype, memory_budget)
        out = x.new_empty(batch, out_features)
        for g0 in range(0, num_groups, chunk):
            g1 = min(num_groups, g0 + chunk)
            p0, p1 = g0 * group_size, min(out_features, g1 * group_size)
            xg = _gather_groups(x, group_index[g0:g1], acc)
            w = weight[g0 * group_size : g1 * group_size].to(acc).view(g1 - g0, group_size, fan_in)
            z = torch.bmm(xg, w.transpose(1, 2)).transpose(0, 1).reshape(batch, -1)[:, : p1 - p0]
            if bias is not None:
                z = z + bias[p0:p1].to(acc)
            out[:, p0:p1] = z
        ctx.save_for_backward(x, weight, group_index)
        ctx.has_bias = bias is not None
        ctx.memory_budget = memory_budget
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        x, weight, group_index = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        batch, out_features = grad_out.shape
        num_groups, fan_in = group_index.shape
        group_size = weight.shape[0] // num_groups
        acc = accumulation_dtype(x.dtype)
        chunk = _groups_per_chunk(batch, fan_in, group_size, x.dtype, ctx.memory_budget)

        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
        # Padding labels get an exactly-zero gradient, so their weights never move.
        grad_w = torch.zeros_like(weight) if need_w else None
        if need_x or need_w:
            for g0 in range(0, num_groups, chunk):
                g1 = min(num_groups, g0 + chunk)
                groups = g1 - g0
                p0, p1 = g0 * group_size, min(out_features, g1 * group_size)
                dz = grad_out[:, p0:p1].to(acc)
                if p1 - p0 < groups * group_size:
                    dz = torch.nn.functional.pad(dz, (0, groups * group_size - (p1 - p0)))
                dz = dz.reshape(batch, groups, group_size).transpose(0, 1)  # [c, N, G]
                idx = group_index[g0:g1]
                if need_w:
                    xg = _gather_groups(x, idx, acc)
                    dw = torch.bmm(dz.transpose(1, 2), xg)  # [c, G, K]
                    grad_w[g0 * group_size : g1 * group_size] = dw.reshape(-1, fan_in)
                if need_x:
                    w = weight[g0 * group_size : g1 * group_size].to(acc).view(groups, group_size, fan_in)
                    dxg = torch.bmm(dz, w).transpose(0, 1).reshape(batch, groups * fan_in)
                    grad_x.index_add_(1, idx.reshape(-1), dxg)
        grad_b = None
        if ctx.has_bias and need_b:
            grad_b = grad_out.sum(0, dtype=acc).to(weight.dtype)
        if grad_x is not None:
            grad_x = grad_x.to(x.dtype)
        return grad_x, grad_w, None, grad_b, None, None


class _GroupSharedFanInCUDA(torch.autograd.Function):
    """GSFI on CUDA bf16/fp16 tensors through the kernels in ``cuda/`` (see ``lightning_haste.kernels``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int
    ) -> Tensor:
        from . import kernels  # noqa: PLC0415 - the only way in to CuPy, imported on first CUDA use

        index = group_index if group_index.dtype == torch.int32 else group_index.to(torch.int32)
        index = index.contiguous()
        weight = weight.contiguous()
        if bias is not None:
            bias = bias.contiguous()
        out, xt = kernels.gsfi_forward(x, weight, index, bias, out_features)
        ctx.save_for_backward(xt, weight, index)
        ctx.in_features = x.shape[1]
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        from . import kernels  # noqa: PLC0415

        xt, weight, index = ctx.saved_tensors
        need_x, need_w, _, need_b = ctx.needs_input_grad[:4]
        # dZ as both gradient kernels read it: itself (odd label counts are realigned in shared memory),
        # or one copy for layouts they cannot read (broadcast or transposed gradients).
        grad_out = kernels.grad_out_for_kernels(grad_out) if (need_x or need_w) else grad_out
        grad_x = kernels.gsfi_grad_input(grad_out, weight, index, ctx.in_features) if need_x else None
        need_b = ctx.has_bias and need_b
        grad_w = grad_b = None
        if need_w:
            # The grad-weight kernel sums the bias gradient from the dZ tiles it reads anyway.
            grad_b = grad_out.new_empty(grad_out.shape[1]) if need_b else None
            grad_w = kernels.gsfi_grad_weight(grad_out, xt, index, weight, grad_bias=grad_b)
        elif need_b:
            grad_b = grad_out.sum(0, dtype=torch.float32).to(grad_out.dtype)
        return grad_x, grad_w, None, grad_b, None


def _uses_kernels(x: Tensor, weight: Tensor, group_index: Tensor, backend: str) -> bool:
    if backend == "torch":
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


def _autocast_arguments(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """Under ``torch.autocast``, run in the autocast dtype like ``F.linear`` does."""
    device_type = x.device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    cast = lambda t: t if t is None or not t.is_floating_point() else t.to(dtype)  # noqa: E731
    return cast(x), cast(weight), cast(bias)


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
    if check_index:
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
            synchronises with a GPU; pass ``False`` when the index was validated before.
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
    lead = x.shape[:-1]
    x2d = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if _uses_kernels(x, weight, group_index, backend):
        if torch.is_autocast_enabled(x.device.type):  # entering the context costs host time: only if on
            with torch.autocast(x.device.type, enabled=False):
                out = _GroupSharedFanInCUDA.apply(x2d, weight, group_index, bias, out_features)
        else:
            out = _GroupSharedFanInCUDA.apply(x2d, weight, group_index, bias, out_features)
    else:
        out = _GroupSharedFanInReference.apply(x2d, weight, group_index, bias, out_features, memory_budget)
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

    ``positions`` is a 1-D integer tensor of label positions (rows of ``weight``). Differentiable
    through autograd; temporaries are chunked over the selected labels. Arguments are assumed to
    have been validated by the caller (the layers do so).
    """
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
