"""The order of top-k results: by score, descending, ties broken by the smaller original label id.

One total order on (score, label id) makes a top-k unique and lets it be computed piecewise: the top-k of a union
is the top-k of the pieces' top-k, whatever the pieces (chunks of labels, the head and the tail, the candidates of
a kernel in any order, the shards of a label-sharded layer). Every top-k of the package goes through
:func:`ranked_topk`, on CPU and GPU alike. NaN scores rank above ``+inf`` (all NaNs tie, whatever their sign
and payload); ``-0.0`` ties with ``0.0``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rank_keys", "ranked_topk", "ranked_merge"]

#: Scores whose order and label id pack into one int64 key (32 bits of order, 32 of id).
PACKED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _order(scores: Tensor) -> Tensor:
    """int64 integers in the order of ``scores`` (float16/bfloat16/float32 through their float32 bits, float64
    through its own): the bits as a signed integer with negative numbers' magnitude bits flipped, after mapping
    every NaN to the canonical +NaN (whose bits lie above +inf's) and -0.0 to 0.0."""
    wide = scores.dtype == torch.float64
    values = scores if wide else scores.float()
    values = torch.where(torch.isnan(values), torch.nan, values) + 0.0  # adding +0.0 turns -0.0 into 0.0
    bits = values.view(torch.int64) if wide else values.view(torch.int32).to(torch.int64)
    flip = 0x7FFFFFFFFFFFFFFF if wide else 0x7FFFFFFF
    return torch.where(bits < 0, bits ^ flip, bits)


def rank_keys(scores: Tensor, ids: Tensor) -> Tensor:
    """int64 keys whose descending order is the ranking order of ``(scores, ids)``: float16/bfloat16/float32
    ``scores`` (exact in float32) and non-negative ``ids < 2**32`` (broadcast against each other).

    The score's order (a 32-bit integer, see the module docstring) fills the high 32 bits, ``2**32 - 1 - id`` the
    low ones. The CUDA kernels build the same keys."""
    if scores.dtype not in PACKED_DTYPES:
        raise TypeError(f"rank_keys takes float16/bfloat16/float32 scores, got {scores.dtype}")
    return _order(scores) * 2**32 + (2**32 - 1 - ids.to(torch.int64))


def ranked_topk(scores: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``min(k, n)`` best of each row of ``scores [B, n]`` in the ranking order: ``(scores, ids)``, both
    ``[B, min(k, n)]``, sorted. ``ids``: the label id of each column, ``[n]`` or ``[B, n]`` (non-negative,
    distinct within a row for a well-defined order).

    float16/bfloat16/float32 scores rank by one int64 key per entry (:func:`rank_keys`); float64 scores by the
    top-k of their order, the ties at the boundary resolved by id, then a sort of the ``k`` kept."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [rows, n], got shape {tuple(scores.shape)}")
    ids = ids.expand_as(scores)
    kept = min(k, scores.shape[1])
    if scores.dtype in PACKED_DTYPES:
        if kept < scores.shape[1] and scores.shape[0]:
            return _ranked_topk_by_value(scores, ids, kept)
        return _ranked_topk_by_keys(scores, ids, kept)
    order = _order(scores)
    boundary = order.topk(kept, dim=1).values[:, -1:]
    # The entries above the k-th (fewer than k) all stay; of those equal to it, the smallest ids.
    fill = torch.where(order == boundary, ids, torch.iinfo(torch.int64).max)
    index = torch.where(order > boundary, -1, fill).topk(kept, dim=1, largest=False).indices
    by_id = ids.gather(1, index).argsort(dim=1, stable=True)
    index = index.gather(1, by_id)
    by_score = order.gather(1, index).argsort(dim=1, descending=True, stable=True)
    index = index.gather(1, by_score)
    return scores.gather(1, index), ids.gather(1, index)


def _ranked_topk_by_keys(scores: Tensor, ids: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """:func:`ranked_topk` of packed-dtype scores by one int64 key per entry."""
    index = rank_keys(scores, ids).topk(kept, dim=1).indices
    return scores.gather(1, index), ids.gather(1, index)


def _ranked_topk_by_value(scores: Tensor, ids: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """:func:`ranked_topk` of packed-dtype scores from ``torch.topk`` of the values, keys built for the ``kept``
    entries only: a row's ``kept`` entries are its top set in the ranking order exactly when no other entry of
    the row ranks at or above their lowest (which also holds the result to the ranking order's NaN and ``-0.0``
    rules, whatever ``torch.topk`` does with them); the rows where one does (ties at the boundary, where the
    ranking wants the smallest ids) are redone by the keys of all their entries."""
    values, index = scores.topk(kept, dim=1)
    lowest = values[:, -1:]
    nan_scores = torch.isnan(scores)
    at_or_above = torch.where(torch.isnan(lowest), nan_scores, (scores >= lowest) | nan_scores).sum(dim=1)
    top_ids = ids.gather(1, index)
    order = rank_keys(values, top_ids).argsort(dim=1, descending=True)
    values, top_ids = values.gather(1, order), top_ids.gather(1, order)
    redo = (at_or_above != kept).nonzero().flatten()
    if redo.numel():
        redo_scores, redo_ids = _ranked_topk_by_keys(scores.index_select(0, redo), ids.index_select(0, redo), kept)
        values, top_ids = values.index_copy(0, redo, redo_scores), top_ids.index_copy(0, redo, redo_ids)
    return values, top_ids


def ranked_merge(
    best: tuple[Tensor, Tensor] | None, scores: Tensor, ids: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """The running top-k ``best`` (or None) merged with a new piece ``scores [B, n]`` / ``ids`` (``[n]`` or
    ``[B, n]``): the piece's own top-k first, so that the merge sorts at most ``2k`` entries per row."""
    top_scores, top_ids = ranked_topk(scores, ids, k)
    if best is None:
        return top_scores, top_ids
    return ranked_topk(torch.cat([best[0], top_scores], dim=1), torch.cat([best[1], top_ids], dim=1), k)
