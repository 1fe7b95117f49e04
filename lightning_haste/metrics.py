"""Extreme multi-label ranking metrics as torchmetrics: P@k, nDCG@k, PSP@k.

Each metric takes the top-k predicted label ids ``[N, >= max k]`` (or a ``[N, L]`` score tensor, from which
the top-k is taken in the package's ranking order: score descending, ties broken by the smaller label id, NaN above
``+inf``) and the targets as a list of 1-D tensors of positive label ids (or a ``torch.sparse_csr``
/ ``scipy.sparse`` matrix). Hits are found by matching ``(row, label)`` keys, never through a dense
``[N, L]`` target matrix. States are sums (``dist_reduce_fx="sum"``), so the values are exact under DDP.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, Union

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric

from ._checks import check_id_rows
from .loss import sparse_targets
from .ranking import ranked_topk

__all__ = ["PrecisionAtK", "NDCGAtK", "PSPrecisionAtK", "inverse_propensities"]

Targets = Union[Sequence[Tensor], Tensor, Any]


def _check_ks(k: Any) -> tuple[int, ...]:
    if isinstance(k, numbers.Integral) and not isinstance(k, bool):
        ks: tuple = (k,)
    elif isinstance(k, (list, tuple, range)):
        ks = tuple(k)
    else:
        raise TypeError(f"k must be a positive integer or a non-empty sequence of them, got {k!r}")
    if not ks or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in ks):
        raise ValueError(f"k must be a positive integer or a non-empty sequence of them, got {k!r}")
    return tuple(sorted(set(int(v) for v in ks)))


def _targets_csr(targets: Targets, rows: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``(row_offsets [rows + 1], labels)`` of the positives, int64, on ``device``.

    The rule for every format is the loss's (:func:`lightning_haste.loss.sparse_targets`): a label listed twice in a
    row is one positive, a stored zero of a sparse matrix none; a dense ``[N, L]`` tensor or array is rejected (it
    would read as lists of ids)."""
    if isinstance(targets, np.ndarray) or (isinstance(targets, Tensor) and targets.layout != torch.sparse_csr):
        raise TypeError(
            "targets must be a sequence of 1-D label-id tensors (one per row) or a sparse matrix (torch sparse CSR, "
            "SciPy); a dense [N, L] 0/1 matrix is not taken: convert it, e.g. with .to_sparse_csr()"
        )
    described = targets.shape[0] if hasattr(targets, "shape") else len(targets)
    if described != rows:
        raise ValueError(f"targets describe {described} instances but the predictions have {rows}")
    row_of, labels = sparse_targets(targets, rows, None)
    crow = np.concatenate([[0], np.cumsum(np.bincount(row_of, minlength=rows))])
    return torch.from_numpy(crow).to(device, torch.long), torch.from_numpy(labels).to(device, torch.long)


def _topk_ids(preds: Tensor, k: int) -> Tensor:
    if not isinstance(preds, Tensor) or preds.dim() != 2:
        raise ValueError("preds must be a 2-D tensor: top-k label ids [N, >= k] or scores [N, L]")
    if preds.is_floating_point():
        if preds.shape[1] < k:
            raise ValueError(f"scores have {preds.shape[1]} labels, fewer than k={k}")
        # the package's one ranking order (score descending, ties to the smaller label id, NaN first), as the
        # layers' top-k ranks: a metric over scores then agrees with one over those top-k ids
        return ranked_topk(preds, torch.arange(preds.shape[1], device=preds.device), k)[1]
    if preds.shape[1] < k:
        raise ValueError(f"preds has {preds.shape[1]} ids per row, fewer than the largest k={k}")
    if preds.dtype.is_complex or preds.dtype == torch.bool:
        raise TypeError(f"preds must be integer label ids or floating scores, got dtype {preds.dtype}")
    top = preds[:, :k].long()
    check_id_rows(top, "predicted label ids")
    return top


def _hits(top: Tensor, crow: Tensor, col: Tensor) -> Tensor:
    """``[N, k]`` bool: whether each predicted id is a positive of its row (keys row * stride + label)."""
    rows = top.shape[0]
    stride = int(max(int(top.max()) if top.numel() else 0, int(col.max()) if col.numel() else 0)) + 1
    row_of_positive = torch.repeat_interleave(torch.arange(rows, device=top.device), crow[1:] - crow[:-1])
    positive_keys = row_of_positive * stride + col
    predicted_keys = torch.arange(rows, device=top.device).unsqueeze(1) * stride + top
    return torch.isin(predicted_keys, positive_keys)


class _AtK(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, k: Union[int, Sequence[int]] = (1, 3, 5), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ks = _check_ks(k)
        self.add_state("total", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _prepare(self, preds: Tensor, targets: Targets) -> tuple[Tensor, Tensor, Tensor]:
        top = _topk_ids(preds, max(self.ks))
        crow, col = _targets_csr(targets, top.shape[0], top.device)
        return top, crow, col


class PrecisionAtK(_AtK):
    """P@k = |top-k ∩ positives| / k, averaged over instances (no positives: 0). ``compute()`` returns
    ``{"P@1": ..., "P@3": ..., ...}``."""

    def update(self, preds: Tensor, targets: Targets) -> None:
        top, crow, col = self._prepare(preds, targets)
        hits = _hits(top, crow, col).double().cumsum(dim=1)
        # whole hit counts (exact in float64 up to 2^53): their sum does not depend on the order of the batches or
        # on how the rows were split over processes, so P@k under DDP equals P@k of one process to the last bit
        self.total += torch.stack([hits[:, k - 1].sum() for k in self.ks]).to(self.total)
        self.count += top.shape[0]

    def compute(self) -> dict[str, Tensor]:
        return {f"P@{k}": self.total[i] / (k * self.count.clamp(min=1)) for i, k in enumerate(self.ks)}


class NDCGAtK(_AtK):
    """nDCG@k = DCG@k / IDCG@min(k, |positives|), DCG@k = sum_r y_r / log2(r + 1), averaged over instances
    (no positives: 0). ``compute()`` returns ``{"nDCG@1": ..., ...}``."""

    def update(self, preds: Tensor, targets: Targets) -> None:
        top, crow, col = self._prepare(preds, targets)
        hits = _hits(top, crow, col).double()
        kmax = max(self.ks)
        discount = 1.0 / torch.log2(torch.arange(2, kmax + 2, device=top.device, dtype=torch.float64))
        dcg = (hits * discount).cumsum(dim=1)
        ideal = discount.cumsum(0)
        positives = (crow[1:] - crow[:-1]).to(top.device)
        for i, k in enumerate(self.ks):
            depth = positives.clamp(max=k)
            idcg = torch.where(depth > 0, ideal[(depth - 1).clamp(min=0)], torch.ones_like(ideal[:1]))
            self.total[i] += torch.where(depth > 0, dcg[:, k - 1] / idcg, torch.zeros_like(idcg)).sum()
        self.count += top.shape[0]

    def compute(self) -> dict[str, Tensor]:
        return {f"nDCG@{k}": self.total[i] / self.count.clamp(min=1) for i, k in enumerate(self.ks)}


def inverse_propensities(label_counts: Any, num_train: int, A: float = 0.55, B: float = 1.5) -> Tensor:
    """``1 / p_l`` with ``p_l = 1 / (1 + C (N_l + B)^-A)``, ``C = (ln N - 1)(B + 1)^A`` (Jain et al. 2016)."""
    counts = torch.as_tensor(np.asarray(label_counts), dtype=torch.float64)
    if counts.dim() != 1 or counts.numel() == 0 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError("label_counts must be a non-empty 1-D array of finite, non-negative counts")
    if isinstance(num_train, bool) or not isinstance(num_train, numbers.Integral) or num_train < 2:
        raise ValueError(f"num_train must be an integer >= 2, got {num_train!r}")
    for name, value in (("A", A), ("B", B)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if B == 0 and bool((counts == 0).any()) and A > 0:
        raise ValueError("B = 0 gives labels without training positives an infinite propensity weight")
    c = (math.log(num_train) - 1.0) * (B + 1.0) ** A
    return 1.0 + c * (counts + B) ** (-A)


class PSPrecisionAtK(_AtK):
    """Propensity-scored precision: PSP@k = sum_i num_i / sum_i den_i with num_i = sum over the top-k hits
    of 1/p_l and den_i the same for the best ranking (the instance's positives by decreasing 1/p_l, at most
    k) — the pyxclib ratio of means. ``compute()`` returns ``{"PSP@1": ..., ...}``.

    Args:
        label_counts: ``[L]`` training positives per label; num_train: training instances;
        A, B: data-set constants (0.55, 1.5 default; Amazon 0.6, 2.6; Wikipedia 0.5, 0.4).
    """

    def __init__(
        self,
        k: Union[int, Sequence[int]] = (1, 3, 5),
        *,
        label_counts: Any,
        num_train: int,
        A: float = 0.55,
        B: float = 1.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(k, **kwargs)
        self.register_buffer("inv_propensity", inverse_propensities(label_counts, num_train, A, B), persistent=False)
        self.add_state("ideal", default=torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, targets: Targets) -> None:
        top, crow, col = self._prepare(preds, targets)
        num_labels = self.inv_propensity.numel()
        if (top.numel() and int(top.max()) >= num_labels) or (col.numel() and int(col.max()) >= num_labels):
            raise ValueError(f"label ids must be < {num_labels} (the length of label_counts)")
        inv = self.inv_propensity.to(top.device)
        gains = (_hits(top, crow, col).double() * inv[top]).cumsum(dim=1)
        # Best ranking per instance: its positives' 1/p sorted descending, prefix sums at depth k.
        rows = top.shape[0]
        positive_rows = torch.repeat_interleave(torch.arange(rows, device=top.device), crow[1:] - crow[:-1])
        order = torch.argsort(positive_rows.double() * 4.0 - inv[col] / (inv.max() + 1.0), stable=True)
        sorted_gain = inv[col][order]
        rank = torch.arange(col.numel(), device=top.device) - crow[:-1][positive_rows]
        for i, k in enumerate(self.ks):
            self.total[i] += gains[:, k - 1].sum()
            self.ideal[i] += sorted_gain[rank < k].sum()
        self.count += rows

    def compute(self) -> dict[str, Tensor]:
        return {f"PSP@{k}": self.total[i] / self.ideal[i].clamp(min=1e-300) for i, k in enumerate(self.ks)}
