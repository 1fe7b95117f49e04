"""The fused loss of the output layer: BCE with logits or squared hinge on sparse targets, without ever holding
the ``[batch, labels]`` logits.

The loss of a row is the sum over all labels of the per-label loss; the loss of a batch averages it over the
rows (``reduction="batchmean"``) or sums it (``"sum"``: the sum over all ``rows * labels`` entries). The
per-label loss splits into a dense part that depends on the logit ``z`` alone, as if every label were a negative,
and a correction at the positives:

==================  ====================  ====================================  =========================
loss                dense part            correction at a positive              its gradient, in all
==================  ====================  ====================================  =========================
``"bce"``           ``softplus(z)``       ``-z``                                ``sigmoid(z) - 1``
``"squared_hinge"`` ``relu(1 + z)^2``     ``relu(1 - z)^2 - relu(1 + z)^2``     ``-2 relu(1 - z)``
==================  ====================  ====================================  =========================

The labels are walked in chunks (the dense head in label chunks, the sparse tail in chunks of groups); the
positives' logits are computed on the side, ``O(positives * fan_in)``. In a training step
(:func:`loss_and_gradients`) each chunk's logits are formed once (on CUDA inside the fused kernels of
``lightning_haste.kernels.loss``, straight from the tensor-core tiles), reduced to the chunk's loss and turned
into their gradient; the positives' entries are overwritten with their full gradient and the chunk goes to the
gradient computations. The backward then scales the gradients by its incoming gradient. Without gradients
(:func:`loss_forward`) the CUDA tail is one kernel that sums the loss. No temporary grows with the number of
labels beyond a chunk (:func:`workspace_bytes`).

16-bit inputs accumulate in float32 (the loss is float32, sums of chunks in float64); float32 and float64 stay
in their dtype. The dense head's logits are ``nn.Linear``'s, rounded to the input dtype as ``nn.Linear``
rounds them; the tail's are never rounded before the loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ._reference import accumulation_dtype, chunk_backward, chunk_logits

__all__ = [
    "LOSSES",
    "REDUCTIONS",
    "LossChunks",
    "SparseTargets",
    "dense_part",
    "loss_chunks",
    "sparse_targets",
    "workspace_bytes",
]

#: The losses the fused path computes.
LOSSES = ("bce", "squared_hinge")

#: Targets as the package takes them: one 1-D tensor (or array, or list) of positive label ids per row, or a
#: ``[rows, labels]`` torch sparse CSR tensor or SciPy sparse matrix whose stored non-zeros are the positives.
SparseTargets = Union[Sequence[Any], Tensor, Any]


#: How the per-entry losses are reduced: ``"batchmean"`` sums over the labels and averages over the rows (the
#: loss of a row, averaged); ``"sum"`` sums over all ``rows * labels`` entries (the loss of the published HASTE
#: recipe, whose output-layer learning rate belongs to it).
REDUCTIONS = ("batchmean", "sum")


def check_reduction(reduction: str) -> str:
    """``reduction`` if it is one of :data:`REDUCTIONS`, else a ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def divisor(reduction: str, rows: int) -> int:
    """What the sum over all entries is divided by: the rows for ``"batchmean"``, 1 for ``"sum"``."""
    return max(1, rows) if reduction == "batchmean" else 1


def check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    return loss


# ------------------------------------------------------------------------------------------------
# Targets.
def _as_label_array(row: int, values: Any) -> np.ndarray:
    # An empty row has no positives whatever its dtype (``torch.tensor([])`` is float32, ``np.asarray([])`` float64).
    if isinstance(values, Tensor):
        if values.numel() == 0:
            return np.zeros(0, dtype=np.int64)
        if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
            raise TypeError(f"targets[{row}] must hold integer label ids, got dtype {values.dtype}")
        values = values.detach().cpu().numpy()
    array = np.asarray(values)
    if array.size == 0:
        return np.zeros(0, dtype=np.int64)
    if array.ndim != 1:
        raise ValueError(f"targets[{row}] must be 1-D, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"targets[{row}] must hold integer label ids, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


_INTEGER_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))


def _all_cpu_label_tensors(targets: Sequence[Any]) -> bool:
    """Whether every row is a 1-D CPU integer tensor (the format the collate functions give)."""
    return all(isinstance(t, Tensor) and t.is_cpu and t.dtype in _INTEGER_DTYPES and t.dim() == 1 for t in targets)


def _check_sparse_shape(shape: tuple, num_rows: int, num_labels: Optional[int]) -> None:
    if len(shape) != 2 or shape[0] != num_rows or (num_labels is not None and shape[1] != num_labels):
        wanted = f"({num_rows}, {num_labels if num_labels is not None else 'labels'})"
        raise ValueError(f"sparse targets must have shape {wanted}, got {tuple(shape)}")


def sparse_targets(
    targets: SparseTargets, num_rows: int, num_labels: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    """The positives of ``targets`` as ``(rows, labels)`` int64 arrays, sorted by row then label.

    A label listed twice in a row is one positive (the loss treats targets as a set); a stored zero of a sparse
    matrix is none; an empty row is a row without positives whatever its dtype (``torch.tensor([])``). Raises for
    a row count other than ``num_rows``, ids outside ``[0, num_labels)`` (with ``num_labels=None``: negative ids)
    and non-integer ids. Reading a CUDA tensor synchronises with the device;
    the collate functions of the package give CPU tensors.
    """
    if isinstance(targets, Tensor) and targets.layout == torch.sparse_csr:
        _check_sparse_shape(tuple(targets.shape), num_rows, num_labels)
        indptr = targets.crow_indices().cpu().numpy().astype(np.int64)
        labels = targets.col_indices().cpu().numpy().astype(np.int64)
        # (Lightning's bf16-true precision casts a batch's floating tensors, the targets' values too: NumPy has no
        # bfloat16, so the test for stored zeros runs in torch)
        keep = (targets.values() != 0).cpu().numpy()
        rows = np.repeat(np.arange(num_rows, dtype=np.int64), np.diff(indptr))[keep]
        labels = labels[keep]
    elif hasattr(targets, "tocsr") and hasattr(targets, "shape"):  # scipy.sparse
        _check_sparse_shape(tuple(targets.shape), num_rows, num_labels)
        csr = targets.tocsr()
        keep = np.asarray(csr.data) != 0
        rows = np.repeat(np.arange(num_rows, dtype=np.int64), np.diff(csr.indptr))[keep]
        labels = np.asarray(csr.indices, dtype=np.int64)[keep]
    elif isinstance(targets, (Tensor, np.ndarray, str)) or not isinstance(targets, Sequence):
        raise TypeError(
            "targets must be a sequence of 1-D label-id tensors (one per row), a torch sparse CSR tensor or a "
            f"SciPy sparse matrix, got {type(targets).__name__}"
        )
    elif len(targets) != num_rows:
        raise ValueError(f"targets has {len(targets)} rows but the input has {num_rows}")
    elif num_rows and _all_cpu_label_tensors(targets):
        # the collate functions' format: one concatenation instead of a NumPy conversion per row (host time)
        counts = np.fromiter((t.numel() for t in targets), dtype=np.int64, count=num_rows)
        rows = np.repeat(np.arange(num_rows, dtype=np.int64), counts)
        labels = torch.cat(list(targets)).numpy().astype(np.int64, copy=False)
    else:
        parts = [_as_label_array(r, t) for r, t in enumerate(targets)]
        counts = np.fromiter((p.size for p in parts), dtype=np.int64, count=len(parts))
        rows = np.repeat(np.arange(num_rows, dtype=np.int64), counts)
        labels = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if labels.size and (labels.min() < 0 or (num_labels is not None and labels.max() >= num_labels)):
        bound = f"[0, {num_labels}) (num_labels)" if num_labels is not None else "[0, infinity)"
        raise ValueError(
            f"target label ids must lie in {bound}, found values in [{int(labels.min())}, {int(labels.max())}]"
        )
    stride = num_labels if num_labels is not None else (int(labels.max()) + 1 if labels.size else 1)
    keys = np.unique(rows * stride + labels)  # sorted, each (row, label) once
    return keys // stride, keys % stride


# ------------------------------------------------------------------------------------------------
# The per-label loss.
def _softplus(z: Tensor) -> Tensor:
    # softplus(z) = z + log1p(e^-z) is z within rounding once e^-z < eps * z: from 20 in float32 (torch's default
    # threshold), from 40 in float64.
    return F.softplus(z, threshold=40.0 if z.dtype == torch.float64 else 20.0)


def dense_part(loss: str, z: Tensor) -> Tensor:
    """The per-label loss of ``z`` as a negative label: ``softplus(z)`` or ``relu(1 + z)^2``."""
    return _softplus(z) if loss == "bce" else torch.relu(1 + z).square()


def _dense_grad(loss: str, z: Tensor) -> Tensor:
    return torch.sigmoid(z) if loss == "bce" else 2 * torch.relu(1 + z)


def _positive_correction(loss: str, z: Tensor) -> Tensor:
    if loss == "bce":
        return -z
    return torch.relu(1 - z).square() - torch.relu(1 + z).square()


def _positive_grad(loss: str, z: Tensor) -> Tensor:
    """The whole gradient of a positive's loss: dense part plus correction."""
    return -torch.sigmoid(-z) if loss == "bce" else -2 * torch.relu(1 - z)


# ------------------------------------------------------------------------------------------------
# Chunks.
def workspace_bytes(batch: int, num_labels: int, memory_budget: int) -> int:
    """Bytes the fused loss's per-chunk temporaries may take: a sixteenth of a 16-bit ``[batch, labels]`` tensor (the
    logits it never holds), at least 4 MiB, at most ``memory_budget``. The step also holds temporaries of the
    input's size beside a chunk (the input's float32 gradient, its transposed copy, one chunk's float32 product),
    which at ``B = 512, L = 131,072`` take about as much again: with a sixteenth the whole step stays below an
    eighth of the logits there; fewer, larger chunks cost less host time per step."""
    return max(1, min(memory_budget, max(batch * num_labels * 2 // 16, 4 * 2**20)))


@dataclasses.dataclass(frozen=True)
class LossChunks:
    """How the fused loss walks over the labels: ``head`` label ranges ``[l0, l1)`` of the dense head and
    ``tail`` group ranges ``[g0, g1)`` of the tail, and the internal label position where each chunk starts
    (``starts``, head chunks then tail chunks, then the label count)."""

    head: tuple[tuple[int, int], ...]
    tail: tuple[tuple[int, int], ...]
    starts: tuple[int, ...]


def loss_chunks(
    batch: int, num_head: int, num_tail: int, group_size: int, fan_in: int, dtype: torch.dtype, kernels: bool,
    workspace: int,
) -> LossChunks:
    """The chunks for one problem shape whose temporaries stay within ``workspace`` bytes (a pure function of its
    arguments: the forward, the backward and the caller that sorts the positives agree)."""
    item = torch.empty((), dtype=dtype).element_size()
    acc = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    head: list[tuple[int, int]] = []
    if num_head:
        # CUDA kernels: float32 logits and their gradient in the input dtype, and as much again for what cuBLAS
        # allocates beside its products (split-K buffers); PyTorch: the logits and their gradient in the input
        # dtype and three accumulation-dtype temporaries of the loss
        per_label = batch * (2 * (4 + item) if kernels else 2 * item + 3 * acc)
        step = max(1, workspace // per_label)
        head = [(l0, min(num_head, l0 + step)) for l0 in range(0, num_head, step)]
    tail: list[tuple[int, int]] = []
    if num_tail:
        num_groups = -(-num_tail // group_size)
        if kernels:  # the chunk of dZ the fused kernel writes, in the input dtype
            step = max(1, workspace // (batch * group_size * item))
        else:  # gathered inputs and their gradient, logits and their gradient, weights and their gradient
            step = max(1, workspace // (acc * (3 * batch * fan_in + 3 * batch * group_size + 2 * group_size * fan_in)))
        tail = [(g0, min(num_groups, g0 + step)) for g0 in range(0, num_groups, step)]
    starts = tuple(l0 for l0, _ in head) + tuple(num_head + g0 * group_size for g0, _ in tail)
    return LossChunks(tuple(head), tuple(tail), starts + (num_head + num_tail,))


# ------------------------------------------------------------------------------------------------
# Forward and backward (what the op and the autograd function run).
@dataclasses.dataclass(frozen=True)
class LossLayout:
    """The static description of one output layer for the fused loss."""

    loss: str
    reduction: str
    head_slice: tuple[int, int]
    tail_slice: tuple[int, int]
    num_head: int
    num_tail: int
    kernels: bool
    workspace: int


_MM_FLOAT32 = {"ok": True}


def _head_product(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``: float32 for 16-bit CUDA inputs (float32 accumulation, never rounded to 16 bits) where torch's
    ``mm(..., out_dtype=)`` exists, else in the input dtype as ``torch.mm`` gives it."""
    if _MM_FLOAT32["ok"] and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_FLOAT32["ok"] = False
    return torch.mm(a, b)


def _head_logits(xh: Tensor, weight: Tensor) -> Tensor:
    """``xh @ weight.T`` without bias (see :func:`_head_product`)."""
    return _head_product(xh, weight.t())


def _positive_logits(x: Tensor, params: tuple, rows: Tensor, positions: Tensor, split: int, layout: LossLayout,
                     acc: torch.dtype) -> Tensor:
    """Accumulation-dtype logits of the positives (``positions`` sorted, the first ``split`` in the head)."""
    head_weight, head_bias, tail_weight, tail_bias, tail_index = params
    z = torch.empty(rows.shape[0], dtype=acc, device=x.device)
    if split:
        xh = x[:, layout.head_slice[0] : layout.head_slice[1]]
        r, p = rows[:split], positions[:split]
        zh = (xh.index_select(0, r).to(acc) * head_weight.index_select(0, p).to(acc)).sum(1)
        z[:split] = zh + head_bias.index_select(0, p).to(acc) if head_bias is not None else zh
    if split < rows.shape[0]:
        xt = x[:, layout.tail_slice[0] : layout.tail_slice[1]]
        group_size = tail_weight.shape[0] // tail_index.shape[0]
        r, t = rows[split:], positions[split:] - layout.num_head
        features = tail_index.index_select(0, t // group_size).long()  # [P, K]
        zt = (xt[r.unsqueeze(1), features].to(acc) * tail_weight.index_select(0, t).to(acc)).sum(1)
        z[split:] = zt + tail_bias.index_select(0, t).to(acc) if tail_bias is not None else zt
    return z


def loss_forward(x: Tensor, params: tuple, rows: Tensor, positions: Tensor, bounds: Sequence[int],
                 layout: LossLayout) -> tuple[Tensor, Tensor]:
    """``(loss, logits of the positives)``; ``bounds`` are the positives' offsets at each chunk start."""
    head_weight, head_bias, tail_weight, tail_bias, tail_index = params
    batch = x.shape[0]
    acc = accumulation_dtype(x.dtype)
    chunks = _chunks(x, layout, tail_weight, tail_index)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    if head_weight is not None:
        xh = x[:, layout.head_slice[0] : layout.head_slice[1]]
        for l0, l1 in chunks.head:
            if layout.kernels:
                from .kernels.loss import gsfi_loss_dense  # noqa: PLC0415 - the CUDA path only

                bias = head_bias[l0:l1] if head_bias is not None else None
                partial = gsfi_loss_dense(_head_logits(xh, head_weight[l0:l1]), bias, layout.loss, None, None, True,
                                          x.dtype)
                total += partial.sum(dtype=torch.float64)
                continue
            z = F.linear(xh, head_weight[l0:l1], head_bias[l0:l1] if head_bias is not None else None)
            total += dense_part(layout.loss, z.to(acc)).sum(dtype=torch.float64)
    if tail_weight is not None:
        x_tail = x[:, layout.tail_slice[0] : layout.tail_slice[1]]
        if layout.kernels:
            from .kernels import layout as kernel_layout  # noqa: PLC0415 - the CUDA path only
            from .kernels.loss import gsfi_loss_sum  # noqa: PLC0415

            xt = kernel_layout.transpose_input(x_tail)
            partial = gsfi_loss_sum(xt, batch, tail_weight, tail_index, tail_bias, layout.num_tail, layout.loss,
                                    checked=False)
            total += partial.sum(dtype=torch.float64)
        else:
            for g0, g1 in chunks.tail:
                z = chunk_logits(x_tail, tail_weight, tail_index, tail_bias, g0, g1, layout.num_tail, acc)
                total += dense_part(layout.loss, z).sum(dtype=torch.float64)
    split = bounds[len(chunks.head)]
    z_pos = _positive_logits(x, params, rows, positions, split, layout, acc)
    total += _positive_correction(layout.loss, z_pos).sum(dtype=torch.float64)
    return (total / divisor(layout.reduction, batch)).to(acc), z_pos


def _chunks(x: Tensor, layout: LossLayout, tail_weight: Optional[Tensor], tail_index: Optional[Tensor]) -> LossChunks:
    group_size = tail_weight.shape[0] // tail_index.shape[0] if tail_weight is not None else 1
    fan_in = tail_index.shape[1] if tail_index is not None else 1
    return loss_chunks(x.shape[0], layout.num_head, layout.num_tail, group_size, fan_in, x.dtype, layout.kernels,
                       layout.workspace)


def loss_backward(
    grad: Tensor, x: Tensor, params: tuple, rows: Tensor, positions: Tensor, z_pos: Tensor, bounds: Sequence[int],
    layout: LossLayout, needs: Sequence[bool],
) -> tuple[Optional[Tensor], ...]:
    """``(dx, d head weight, d head bias, d tail weight, d tail bias)`` for the loss's incoming gradient ``grad``,
    ``None`` where ``needs`` (flags for those five) says not needed. Recomputes the logits chunk by chunk."""
    # on the device: no host synchronisation
    scale = grad.detach().to(accumulation_dtype(x.dtype)) / divisor(layout.reduction, x.shape[0])
    chunks = _chunks(x, layout, params[2], params[4])
    return _gradient_pass(x, params, rows, positions, z_pos, bounds, chunks, layout, needs, scale, None)


def loss_and_gradients(
    x: Tensor, params: tuple, rows: Tensor, positions: Tensor, bounds: Sequence[int], layout: LossLayout,
    needs: Sequence[bool],
) -> tuple[Tensor, Tensor, tuple[Optional[Tensor], ...]]:
    """``(loss, logits of the positives, gradients)``: the loss and, in the same pass over the labels, its
    gradients for an incoming gradient of 1 (as :func:`loss_backward` gives them), so that a training step walks
    the labels once; the backward then only scales them by its incoming gradient."""
    chunks = _chunks(x, layout, params[2], params[4])
    acc = accumulation_dtype(x.dtype)
    z_pos = _positive_logits(x, params, rows, positions, bounds[len(chunks.head)], layout, acc)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    scale = torch.full((), 1.0 / divisor(layout.reduction, x.shape[0]), dtype=acc, device=x.device)
    grads = _gradient_pass(x, params, rows, positions, z_pos, bounds, chunks, layout, needs, scale, total)
    total += _positive_correction(layout.loss, z_pos).sum(dtype=torch.float64)
    return (total / divisor(layout.reduction, x.shape[0])).to(acc), z_pos, grads


def _gradient_pass(
    x: Tensor, params: tuple, rows: Tensor, positions: Tensor, z_pos: Tensor, bounds: Sequence[int],
    chunks: LossChunks, layout: LossLayout, needs: Sequence[bool], scale: Tensor, total: Optional[Tensor],
) -> tuple[Optional[Tensor], ...]:
    """The gradients for the loss scaled by ``scale`` (the incoming gradient over the batch, on the device);
    with ``total``, the dense part of the loss is added to it from the same logits."""
    head_weight, head_bias, tail_weight, tail_bias, tail_index = params
    need_x, need_hw, need_hb, need_tw, need_tb = needs[:5]
    acc = accumulation_dtype(x.dtype)
    grad_pos = (scale * _positive_grad(layout.loss, z_pos)).to(x.dtype)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if need_x else None
    grads: dict[str, Optional[Tensor]] = {"hw": None, "hb": None, "tw": None, "tb": None}

    def overwrite_positives(dz: Tensor, chunk: int, first_label: int) -> None:
        # one indexed write (positives are distinct: the order of writes does not matter), through dz's own strides:
        # a chunk's logits need not be row-major (the pure-PyTorch tail's are column-major for groups of one label)
        a, b = bounds[chunk], bounds[chunk + 1]
        if b > a:
            dz.index_put_((rows[a:b], positions[a:b] - first_label), grad_pos[a:b])

    if head_weight is not None and (need_x or need_hw or need_hb or total is not None):
        h0, h1 = layout.head_slice
        xh = x[:, h0:h1]
        grads["hw"] = torch.empty_like(head_weight) if need_hw else None
        grads["hb"] = torch.empty_like(head_bias) if need_hb else None
        for c, (l0, l1) in enumerate(chunks.head):
            if layout.kernels:  # one kernel: the chunk's loss and logit gradient from float32 logits
                from .kernels.loss import gsfi_loss_dense  # noqa: PLC0415 - the CUDA path only

                dz = torch.empty(x.shape[0], l1 - l0, dtype=x.dtype, device=x.device)
                partial = gsfi_loss_dense(_head_logits(xh, head_weight[l0:l1]),
                                          head_bias[l0:l1] if head_bias is not None else None, layout.loss,
                                          scale.to(torch.float32).reshape(1), dz, total is not None, x.dtype)
                if total is not None:
                    total += partial.sum(dtype=torch.float64)
            else:
                z = F.linear(xh, head_weight[l0:l1], head_bias[l0:l1] if head_bias is not None else None).to(acc)
                if total is not None:
                    total += dense_part(layout.loss, z).sum(dtype=torch.float64)
                dz = (scale * _dense_grad(layout.loss, z)).to(x.dtype)
            overwrite_positives(dz, c, l0)
            if grad_x is not None:  # float32 products on CUDA: each chunk's sum is never rounded to 16 bits
                grad_x[:, h0:h1] += _head_product(dz, head_weight[l0:l1]).to(acc)
            if grads["hw"] is not None:
                torch.mm(dz.t(), xh, out=grads["hw"][l0:l1])
            if grads["hb"] is not None:
                grads["hb"][l0:l1] = dz.sum(0, dtype=acc)
    if tail_weight is not None and (need_x or need_tw or need_tb or total is not None):
        t0, t1 = layout.tail_slice
        x_tail = x[:, t0:t1]
        grads["tw"] = torch.empty_like(tail_weight) if need_tw else None
        grads["tb"] = torch.empty_like(tail_bias) if need_tb else None
        first = len(chunks.head)
        if layout.kernels:
            _tail_backward_kernels(x_tail, tail_weight, tail_bias, tail_index, chunks, scale, layout,
                                   lambda dz, c, p0: overwrite_positives(dz, first + c, layout.num_head + p0),
                                   grad_x[:, t0:t1] if grad_x is not None else None, grads["tw"], grads["tb"], total)
        else:
            _tail_backward_torch(x_tail, tail_weight, tail_bias, tail_index, chunks, scale, layout, acc,
                                 lambda dz, c, p0: overwrite_positives(dz, first + c, layout.num_head + p0),
                                 grad_x[:, t0:t1] if grad_x is not None else None, grads["tw"], grads["tb"], total)
    return (
        grad_x.to(x.dtype) if grad_x is not None else None,
        grads["hw"], grads["hb"], grads["tw"], grads["tb"],
    )


def _tail_backward_torch(x_tail, weight, bias, index, chunks, scale, layout, acc, overwrite, grad_x, grad_w, grad_b,
                         total):
    group_size = weight.shape[0] // index.shape[0]
    for c, (g0, g1) in enumerate(chunks.tail):
        p0, p1 = g0 * group_size, min(layout.num_tail, g1 * group_size)
        z = chunk_logits(x_tail, weight, index, bias, g0, g1, layout.num_tail, acc)
        if total is not None:
            total += dense_part(layout.loss, z).sum(dtype=torch.float64)
        if grad_x is None and grad_w is None and grad_b is None:
            continue
        dz = (scale * _dense_grad(layout.loss, z)).to(x_tail.dtype)
        overwrite(dz, c, p0)
        if grad_b is not None:
            grad_b[p0:p1] = dz.sum(0, dtype=acc)
        chunk_backward(dz.to(acc), x_tail, weight, index, g0, g1, grad_x, grad_w)


def _tail_backward_kernels(x_tail, weight, bias, index, chunks, scale, layout, overwrite, grad_x, grad_w, grad_b,
                           total):
    from .kernels import layout as kernel_layout  # noqa: PLC0415 - the CUDA path only
    from .kernels.grad_input import gsfi_grad_input  # noqa: PLC0415
    from .kernels.grad_weight import gsfi_grad_weight  # noqa: PLC0415
    from .kernels.loss import gsfi_loss_grad  # noqa: PLC0415

    group_size = weight.shape[0] // index.shape[0]
    batch, in_features = x_tail.shape
    xt = kernel_layout.transpose_input(x_tail)
    scale32 = scale.to(torch.float32).reshape(1)
    widest = max(g1 - g0 for g0, g1 in chunks.tail) * group_size
    storage = torch.empty(batch, (widest + 7) // 8 * 8, dtype=x_tail.dtype, device=x_tail.device)
    for c, (g0, g1) in enumerate(chunks.tail):
        p0, p1 = g0 * group_size, min(layout.num_tail, g1 * group_size)
        labels = p1 - p0
        w, idx = weight[p0 : g1 * group_size], index[g0:g1]
        dz = storage[:, :labels]
        if labels % 8:
            # the gradient kernels read whole 8-label pieces; gsfi_loss_grad writes zeros into the padding
            # columns of aligned rows (these), so they can take the view as it is
            setattr(dz, kernel_layout._ZERO_PADDED, True)
        partial = gsfi_loss_grad(xt, batch, w, idx, bias[p0:p1] if bias is not None else None, labels, layout.loss,
                                 scale32, dz, checked=False, with_sum=total is not None)
        if total is not None:
            total += partial.sum(dtype=torch.float64)
        overwrite(dz, c, p0)
        if grad_x is not None:
            grad_x += gsfi_grad_input(dz, w, idx, in_features, checked=False, float32=True)
        if grad_w is not None or grad_b is not None:
            out = grad_w[p0 : g1 * group_size] if grad_w is not None else torch.empty_like(w)
            gsfi_grad_weight(dz, xt, idx, w, out=out, grad_bias=grad_b[p0:p1] if grad_b is not None else None,
                             checked=False)


def scale_gradients_(grads: Sequence[Optional[Tensor]], grad: Tensor, layout: LossLayout) -> None:
    """Multiply the gradients that :func:`loss_and_gradients` gave by the loss's incoming gradient ``grad``, in
    place: a bandwidth-bound kernel per 16-bit CUDA tensor on the kernel path (a float32 product rounded once; for
    the usual incoming gradients, 1 or a power of two, exact), ``torch._foreach_mul_`` otherwise."""
    present = [g for g in grads if g is not None]
    if layout.kernels:
        from .kernels.loss import gsfi_scale_  # noqa: PLC0415 - the CUDA path only

        scale = grad.detach().to(torch.float32).reshape(1)
        rest = []
        for g in present:
            if g.is_contiguous() and g.data_ptr() % 16 == 0 and g.dtype in (torch.bfloat16, torch.float16):
                gsfi_scale_(g, scale)
            else:
                rest.append(g)
        present = rest
    if present:
        torch._foreach_mul_(present, grad.detach())
