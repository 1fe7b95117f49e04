"""The pure-PyTorch group-shared fixed fan-in layer: the CPU path, and the reference the kernels are tested on.

It walks over the groups in chunks so that its temporaries stay under ``memory_budget`` bytes however many
labels there are, and it has an explicit backward (gather -> batched matmul -> ``index_add_``) instead of
autograd through one giant gather. Half-precision inputs are accumulated in float32 and float64 stays
float64; the result is cast back to the input dtype once, at the end.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["accumulation_dtype", "chunk_backward", "chunk_logits", "reference_backward", "reference_forward"]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are carried in: float32 for 16-bit inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def groups_per_chunk(batch: int, fan_in: int, group_size: int, dtype: torch.dtype, budget: int) -> int:
    """Groups per chunk so that the backward's temporaries stay under ``budget`` bytes."""
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


def chunk_logits(
    x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], g0: int, g1: int, out_features: int,
    acc: torch.dtype,
) -> Tensor:
    """Logits ``[B, p1 - p0]`` of groups ``[g0, g1)`` (labels ``p0 = g0 * G`` to ``p1 = min(out_features, g1 * G)``)
    in the accumulation dtype ``acc``, not rounded to the input dtype."""
    batch = x.shape[0]
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    p0, p1 = g0 * group_size, min(out_features, g1 * group_size)
    xg = _gather_groups(x, group_index[g0:g1], acc)
    w = weight[p0 : g1 * group_size].to(acc).view(g1 - g0, group_size, fan_in)
    z = torch.bmm(xg, w.transpose(1, 2)).transpose(0, 1).reshape(batch, -1)[:, : p1 - p0]
    if bias is not None:
        z = z + bias[p0:p1].to(acc)
    return z


def chunk_backward(
    dz: Tensor, x: Tensor, weight: Tensor, group_index: Tensor, g0: int, g1: int, grad_x: Optional[Tensor],
    grad_w: Optional[Tensor],
) -> None:
    """For ``dz [B, p1 - p0]`` (accumulation dtype), the gradient of groups ``[g0, g1)``: their weight rows are
    written into ``grad_w`` (padding labels exactly zero), their input gradient added into ``grad_x``."""
    batch = x.shape[0]
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    groups, p0 = g1 - g0, g0 * group_size
    if dz.shape[1] < groups * group_size:
        dz = torch.nn.functional.pad(dz, (0, groups * group_size - dz.shape[1]))
    dz = dz.reshape(batch, groups, group_size).transpose(0, 1)  # [c, N, G]
    idx = group_index[g0:g1]
    if grad_w is not None:
        xg = _gather_groups(x, idx, dz.dtype)
        dw = torch.bmm(dz.transpose(1, 2), xg)  # [c, G, K]
        grad_w[p0 : g1 * group_size] = dw.reshape(-1, fan_in)
    if grad_x is not None:
        w = weight[p0 : g1 * group_size].to(dz.dtype).view(groups, group_size, fan_in)
        dxg = torch.bmm(dz, w).transpose(0, 1).reshape(batch, groups * fan_in)
        grad_x.index_add_(1, idx.reshape(-1), dxg)


def reference_forward(
    x: Tensor, weight: Tensor, group_index: Tensor, bias: Optional[Tensor], out_features: int, memory_budget: int
) -> Tensor:
    """``Z [B, out_features]`` of the 2-D input ``x``, in the dtype of ``x``."""
    batch = x.shape[0]
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    acc = accumulation_dtype(x.dtype)
    chunk = groups_per_chunk(batch, fan_in, group_size, x.dtype, memory_budget)
    out = x.new_empty(batch, out_features)
    for g0 in range(0, num_groups, chunk):
        g1 = min(num_groups, g0 + chunk)
        p0, p1 = g0 * group_size, min(out_features, g1 * group_size)
        out[:, p0:p1] = chunk_logits(x, weight, group_index, bias, g0, g1, out_features, acc)
    return out


def reference_backward(
    grad_out: Tensor,
    x: Tensor,
    weight: Tensor,
    group_index: Tensor,
    memory_budget: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dX, dW, dB)`` for ``grad_out [B, out_features]``, ``None`` where not needed. Padding labels get
    an exactly-zero weight gradient, so their weights never move."""
    batch, out_features = grad_out.shape
    num_groups, fan_in = group_index.shape
    group_size = weight.shape[0] // num_groups
    acc = accumulation_dtype(x.dtype)
    chunk = groups_per_chunk(batch, fan_in, group_size, x.dtype, memory_budget)

    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    grad_w = torch.zeros_like(weight) if need_w else None
    if need_x or need_w:
        for g0 in range(0, num_groups, chunk):
            g1 = min(num_groups, g0 + chunk)
            p0, p1 = g0 * group_size, min(out_features, g1 * group_size)
            chunk_backward(grad_out[:, p0:p1].to(acc), x, weight, group_index, g0, g1, grad_x, grad_w)
    grad_b = grad_out.sum(0, dtype=acc).to(weight.dtype) if need_b else None
    if grad_x is not None:
        grad_x = grad_x.to(x.dtype)
    return grad_x, grad_w, grad_b
