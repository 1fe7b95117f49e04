"""The order of top-k results: by score, descending, ties broken by the smaller original label id.

One total order on (score, label id) makes a top-k unique and lets it be computed piecewise: the top-k of a union
is the top-k of the pieces' top-k, whatever the pieces (chunks of labels, the head and the tail, the candidates of
a kernel in any order, the shards of a label-sharded layer). Every top-k of the package goes through
:func:`ranked_topk`, on CPU and GPU alike. NaN scores rank above ``+inf`` (all NaNs tie, whatever their sign
and payload); ``-0.0`` ties with ``0.0``.
"""

from __future__ import annotations

from typing import Optional

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
        # on CPU torch.topk of the values and keys for a few entries beat keys for all entries (the CUDA path
        # keeps the keys: measured there, the ties of 16-bit scores at large k made the by-value path slower)
        if scores.device.type == "cpu" and kept < scores.shape[1] and scores.shape[0]:
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


def _ranks_above(values: Tensor, bound: Tensor, nan_values: Optional[Tensor] = None) -> Tensor:
    """Which ``values`` rank strictly above ``bound`` (broadcast) in the ranking order: NaN above every number,
    nothing above NaN. ``nan_values``: ``torch.isnan(values)`` where the caller has it."""
    nan_values = torch.isnan(values) if nan_values is None else nan_values
    return ~torch.isnan(bound) & ((values > bound) | nan_values)


def _ranked_topk_by_value(scores: Tensor, ids: Tensor, kept: int) -> tuple[Tensor, Tensor]:
    """:func:`ranked_topk` of packed-dtype scores from ``torch.topk`` of the values, keys built for a few entries
    a row only. With ``b`` the lowest of a row's ``kept`` values: the row's top set is every entry ranking above
    ``b`` and, of the entries tied with ``b`` (equal, or NaN with NaN), the smallest ids. ``torch.topk`` gives
    the entries above ``b`` (checked: as many as the row has, else the row is redone by the keys of all its
    entries, which also holds the result to the ranking's NaN and ``-0.0`` rules whatever ``torch.topk`` does with
    them); where more entries tie with ``b`` than it kept, the tied ones with the smallest ids are taken instead."""
    values, index = scores.topk(kept, dim=1)
    lowest = values[:, -1:]
    nan_scores = torch.isnan(scores)
    # tied with b in the ranking order: equal, or NaN with NaN
    tied = torch.where(torch.isnan(lowest), nan_scores, scores == lowest)
    kept_above = _ranks_above(values, lowest).sum(dim=1)
    row_above, row_tied = _ranks_above(scores, lowest, nan_scores).sum(dim=1), tied.sum(dim=1)
    top_ids = ids.gather(1, index)
    order = rank_keys(values, top_ids).argsort(dim=1, descending=True)
    values, top_ids = values.gather(1, order), top_ids.gather(1, order)
    ties = ((row_above == kept_above) & (row_above + row_tied > kept)).nonzero().flatten()
    if ties.numel():
        # torch's entries above b, and the row's tied entries with the smallest ids; of their union (more than
        # kept entries) the best kept by their keys
        t_scores, t_ids, t_values, t_top_ids = (scores.index_select(0, ties), ids.index_select(0, ties),
                                                values.index_select(0, ties), top_ids.index_select(0, ties))
        t_above = _ranks_above(t_values, lowest.index_select(0, ties))
        largest_id = torch.iinfo(torch.int64).max
        smallest = torch.where(tied.index_select(0, ties), t_ids, largest_id).topk(kept, dim=1, largest=False)
        tie_valid = smallest.values != largest_id
        union_scores = torch.cat([t_values, t_scores.gather(1, smallest.indices)], dim=1)
        union_ids = torch.cat([t_top_ids, t_ids.gather(1, smallest.indices)], dim=1)
        keys = torch.where(torch.cat([t_above, tie_valid], dim=1), rank_keys(union_scores, union_ids),
                           torch.iinfo(torch.int64).min)
        best = keys.topk(kept, dim=1).indices
        values = values.index_copy(0, ties, union_scores.gather(1, best))
        top_ids = top_ids.index_copy(0, ties, union_ids.gather(1, best))
    # torch's kept set is not the row's entries above b plus ties (a NaN order of its own): the keys decide
    redo = ((row_above != kept_above) | (row_above + row_tied < kept)).nonzero().flatten()
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
