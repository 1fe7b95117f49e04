"""Label grouping: PIFA label embeddings, FAISS / balanced k-means / random groups of exactly
``group_size`` labels, cohesion, and the frequency-based head/tail split."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Union

import numpy as np
import scipy.sparse as sp
import torch

from ._checks import check_positive_int

__all__ = [
    "LabelGrouping",
    "group_labels",
    "label_embeddings_from_features",
    "split_head_tail",
    "METHODS",
]

METHODS = ("faiss-greedy", "balanced-kmeans", "random")


# ------------------------------------------------------------------------------------------------
def _check_group_size(group_size: Any) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an integer, got {type(group_size).__name__}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return int(group_size)


def split_head_tail(label_frequencies: Any, head_ratio: float, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Split labels by training frequency: ``(head_ids, tail_ids)``, each sorted by descending frequency
    (ties by label id). The head holds the ``head_ratio`` most frequent fraction, rounded up to a multiple of
    ``group_size`` (and at most all labels)."""
    group_size = _check_group_size(group_size)
    if isinstance(label_frequencies, torch.Tensor):
        label_frequencies = label_frequencies.detach().cpu()
    freq = np.asarray(label_frequencies)
    if freq.ndim != 1 or freq.size == 0:
        raise ValueError(f"label_frequencies must be a non-empty 1-D array, got shape {freq.shape}")
    if not np.issubdtype(freq.dtype, np.number) or np.issubdtype(freq.dtype, np.complexfloating):
        raise TypeError(f"label_frequencies must be real numbers, got dtype {freq.dtype}")
    freq = freq.astype(np.float64)
    if not np.all(np.isfinite(freq)) or np.any(freq < 0):
        raise ValueError("label_frequencies must be finite and non-negative")
    if isinstance(head_ratio, bool) or not isinstance(head_ratio, numbers.Real):
        raise TypeError(f"head_ratio must be a real number, got {type(head_ratio).__name__}")
    if not 0.0 <= float(head_ratio) <= 1.0:
        raise ValueError(f"head_ratio must be in [0, 1], got {head_ratio}")
    num_labels = freq.size
    # (rounded to 9 decimals first, so that float noise such as 0.07 * 100 = 7.000000000000001 does not add a label;
    # a positive ratio keeps at least one label, however small)
    head = math.ceil(round(float(head_ratio) * num_labels, 9))
    if head == 0 and head_ratio > 0:
        head = 1
    head = min(num_labels, math.ceil(head / group_size) * group_size)
    order = np.lexsort((np.arange(num_labels), -freq))
    return order[:head], order[head:]


# ------------------------------------------------------------------------------------------------
def _normalize_rows(x: Union[np.ndarray, sp.spmatrix]) -> Union[np.ndarray, sp.csr_matrix]:
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
        norms[norms == 0] = 1.0
        return sp.csr_matrix(sp.diags(1.0 / norms) @ x, dtype=np.float32)
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return x / norms


def label_embeddings_from_features(
    X: Any, Y: Any, *, seed: int = 0, chunk_labels: int = 65536
) -> Union[np.ndarray, sp.csr_matrix]:
    """PIFA label embeddings: for each label, the L2-normalised sum of the L2-normalised feature rows of its
    positive instances.

    Args:
        X: ``[N, F]`` features, dense (numpy / torch) or ``scipy.sparse``.
        Y: ``[N, L]`` ``scipy.sparse`` label matrix (non-zeros are positives).
        seed: seed of the fallback vectors.
        chunk_labels: labels per chunk of the product (bounds the dense temporaries).

    Returns:
        ``[L, F]`` float32: dense for dense ``X``, CSR for sparse ``X``. Labels without positives get a
        random unit vector (seeded, deterministic), so that they spread over groups instead of all
        colliding at the origin.
    """
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu().numpy()
    elif not sp.issparse(X):
        X = np.asarray(X)
    if not sp.issparse(Y):
        raise TypeError(f"Y must be a scipy.sparse matrix, got {type(Y).__name__}")
    if not sp.issparse(X) and np.ndim(X) != 2:
        raise ValueError(f"X must be 2-D, got shape {np.shape(X)}")
    chunk_labels = check_positive_int("chunk_labels", chunk_labels)
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X has {X.shape[0]} rows but Y has {Y.shape[0]}")
    if X.shape[0] == 0 or Y.shape[1] == 0:
        raise ValueError("X and Y must not be empty")
    values = X.data if sp.issparse(X) else X
    if not (np.issubdtype(values.dtype, np.number) or values.dtype == np.bool_) or np.issubdtype(
            values.dtype, np.complexfloating):
        raise TypeError(f"X must hold real numbers, got dtype {values.dtype}")
    if not np.isfinite(values).all():
        raise ValueError("X holds NaN or infinite values: the label embeddings would be NaN")
    Xn = _normalize_rows(X)
    Yt = sp.csr_matrix(Y.T, dtype=np.float32)
    Yt.eliminate_zeros()  # a stored 0 is no positive
    Yt.data[:] = 1.0
    num_labels = Yt.shape[0]
    parts = [Yt[c : c + chunk_labels] @ Xn for c in range(0, num_labels, chunk_labels)]
    if sp.issparse(Xn):
        emb = _normalize_rows(sp.vstack([sp.csr_matrix(p) for p in parts]).tocsr())
    else:
        emb = _normalize_rows(np.vstack([np.asarray(p) for p in parts]))
    empty = np.flatnonzero(np.diff(Yt.indptr) == 0)
    if empty.size:
        rng = np.random.default_rng(seed)
        fallback = _normalize_rows(rng.standard_normal((empty.size, X.shape[1])).astype(np.float32))
        if sp.issparse(emb):
            emb = sp.lil_matrix(emb)
            emb[empty] = fallback
            emb = sp.csr_matrix(emb, dtype=np.float32)
        else:
            emb[empty] = fallback
    return emb


# ------------------------------------------------------------------------------------------------
@dataclass
class LabelGrouping:
    """A partition of ``num_labels`` labels into groups of exactly ``group_size`` (the last may be short).

    Attributes:
        group_ids: ``[num_labels]`` int64, the group of each label (groups numbered 0..num_groups-1).
        group_size: labels per group.

    ``np.asarray(grouping)`` gives ``group_ids``, so it can be passed as ``HeadTailOutput(label_groups=...)``
    when it was built for all labels (head labels' ids are ignored there); build it on the tail labels with
    :meth:`for_labels` to line groups up with the tail's GSFI groups.
    """

    group_ids: np.ndarray
    group_size: int

    @property
    def num_labels(self) -> int:
        return int(self.group_ids.size)

    @property
    def num_groups(self) -> int:
        return int(self.group_ids.max()) + 1 if self.group_ids.size else 0

    @property
    def order(self) -> np.ndarray:
        """Labels in group order (group 0's labels first, each group's labels by id)."""
        return np.lexsort((np.arange(self.num_labels), self.group_ids))

    def __array__(self, dtype=None, copy=None):  # noqa: D105 - numpy protocol
        return self.group_ids if dtype is None else self.group_ids.astype(dtype)

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, e.g. to store beside a model checkpoint."""
        return {"group_ids": torch.from_numpy(self.group_ids.copy()), "group_size": self.group_size}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> LabelGrouping:
        return cls(np.asarray(state["group_ids"], dtype=np.int64), int(state["group_size"]))

    def for_labels(self, label_ids: np.ndarray, num_labels: int, fill: int = -1) -> np.ndarray:
        """Per-label group ids ``[num_labels]`` for a grouping that was built on the subset ``label_ids``
        (e.g. the tail): label ``label_ids[i]`` gets ``group_ids[i]``, every other label ``fill``. ``label_ids``:
        one distinct id in ``[0, num_labels)`` per label of the grouping."""
        num_labels = int(num_labels)
        ids = np.asarray(label_ids)
        if ids.ndim != 1 or ids.shape[0] != self.num_labels:
            raise ValueError(f"label_ids must be 1-D with one id per label of the grouping ({self.num_labels}), "
                             f"got shape {ids.shape}")
        if ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= num_labels):
            raise ValueError(f"label_ids must be integers in [0, num_labels={num_labels})")
        if np.unique(ids).size != ids.size:
            raise ValueError("label_ids must be distinct (a label in two places would take one group id)")
        out = np.full(num_labels, fill, dtype=np.int64)
        out[ids] = self.group_ids
        return out

    def cohesion(self, embeddings: Any) -> float:
        """Mean over groups (of at least 2 labels) of the mean pairwise cosine similarity of their members."""
        emb = _dense_unit(embeddings)
        if emb.shape[0] != self.num_labels:
            raise ValueError(f"embeddings has {emb.shape[0]} rows, the grouping {self.num_labels} labels")
        return _cohesion(emb, self.group_ids)


def _cohesion(unit: np.ndarray, group_ids: np.ndarray) -> float:
    order = np.argsort(group_ids, kind="stable")
    ids = group_ids[order]
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    sizes = np.diff(np.r_[starts, ids.size])
    sums = np.add.reduceat(unit[order].astype(np.float64), starts, axis=0)
    # Sum of pairwise cosines of unit vectors in a group: (|sum|^2 - size) / 2.
    pair_means = (np.einsum("ij,ij->i", sums, sums) - sizes) / np.maximum(sizes * (sizes - 1), 1)
    keep = sizes >= 2
    return float(pair_means[keep].mean()) if keep.any() else 0.0


def _dense_unit(embeddings: Any, dim: int = 256, seed: int = 0) -> np.ndarray:
    """Row-normalised dense float32 embeddings; sparse input is randomly projected to ``dim`` dimensions
    first (cosines are approximately kept)."""
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    if sp.issparse(embeddings):
        if embeddings.shape[0] == 0:
            raise ValueError("embeddings must not be empty")
        rng = np.random.default_rng(seed)
        projection = rng.standard_normal((embeddings.shape[1], dim)).astype(np.float32) / math.sqrt(dim)
        embeddings = np.asarray(sp.csr_matrix(embeddings, dtype=np.float32) @ projection)
    emb = np.asarray(embeddings, dtype=np.float32)
    if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
        raise ValueError(f"embeddings must be a non-empty 2-D array, got shape {emb.shape}")
    if not np.all(np.isfinite(emb)):
        raise ValueError("embeddings contain NaN or infinite values")
    return np.ascontiguousarray(_normalize_rows(emb))


# ------------------------------------------------------------------------------------------------
def group_labels(
    embeddings: Any,
    group_size: int,
    *,
    method: str = "faiss-greedy",
    seed: int = 0,
    use_gpu: Union[str, bool] = "auto",
    progress: bool = True,
) -> LabelGrouping:
    """Partition labels into groups of exactly ``group_size`` similar labels (the last group may be short).

    Args:
        embeddings: ``[num_labels, d]`` label embeddings (dense, torch, or scipy.sparse: randomly projected
            to 256 dimensions); cosine similarity is used.
        group_size: labels per group.
        method: ``"faiss-greedy"`` (the reference: a random unassigned seed takes its nearest unassigned
            neighbours, FAISS inner-product search on normalised vectors, batched in rounds),
            ``"balanced-kmeans"`` (recursive balanced 2-means, as Parabel/PECOS), or ``"random"``.
        seed: makes the result deterministic.
        use_gpu: ``"auto"`` uses a FAISS GPU index when a GPU build of FAISS sees a GPU; ``True`` requires
            it; ``False`` never.
        progress: show a progress bar.
    """
    group_size = _check_group_size(group_size)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if use_gpu not in ("auto", True, False):
        raise ValueError(f"use_gpu must be 'auto', True or False, got {use_gpu!r}")
    unit = _dense_unit(embeddings, seed=seed)
    num_labels = unit.shape[0]
    rng = np.random.default_rng(seed)
    if method == "random":
        order = rng.permutation(num_labels)
    elif method == "balanced-kmeans":
        order = _balanced_kmeans_order(unit, group_size, rng, progress)
    else:
        order = _faiss_greedy_order(unit, group_size, rng, use_gpu, progress)
    group_ids = np.empty(num_labels, dtype=np.int64)
    group_ids[order] = np.arange(num_labels) // group_size
    return LabelGrouping(group_ids, group_size)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415 - only for long runs

    return tqdm(total=total, desc=desc, unit="labels", disable=not enabled, leave=False)


def _balanced_kmeans_order(unit: np.ndarray, group_size: int, rng: np.random.Generator, progress: bool) -> np.ndarray:
    """Recursive balanced 2-means: split every node in two halves whose sizes are multiples of group_size,
    by the difference of the similarities to the two centroids; stop at group_size labels."""
    out = []
    stack = [np.arange(unit.shape[0])]
    bar = _progress(unit.shape[0], "balanced k-means", progress and unit.shape[0] >= 100_000)
    while stack:
        ids = stack.pop()
        if ids.size <= group_size:
            out.append(ids)
            bar.update(ids.size)
            continue
        left_size = math.ceil(ids.size / group_size / 2) * group_size
        x = unit[ids]
        centroids = x[rng.choice(ids.size, 2, replace=False)]
        for _ in range(5):
            margin = x @ (centroids[0] - centroids[1])
            split = np.argpartition(-margin, left_size - 1)
            left, right = split[:left_size], split[left_size:]
            centroids = np.stack([x[left].mean(0), x[right].mean(0)])
            centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        margin = x @ (centroids[0] - centroids[1])
        split = np.argsort(-margin, kind="stable")
        stack.append(ids[split[left_size:]])
        stack.append(ids[split[:left_size]])
    bar.close()
    out.sort(key=lambda leaf: leaf.size < group_size)  # the one short leaf (if any) goes last
    return np.concatenate(out)


def _faiss_index(unit: np.ndarray, use_gpu: Union[str, bool], rng: np.random.Generator):
    import faiss  # noqa: PLC0415 - a runtime dependency, imported where it is used

    n, d = unit.shape
    if n <= 20_000:
        index = faiss.IndexFlatIP(d)
    else:
        nlist = int(min(4096, max(64, 4 * math.sqrt(n)), n // 40))  # >= 40 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        sample = unit[rng.choice(n, min(n, 40 * nlist), replace=False)]
        index.cp.seed = int(rng.integers(2**31))
        index.train(sample)
        index.nprobe = 16
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if use_gpu is True and gpus == 0:
        raise RuntimeError("use_gpu=True but this FAISS build sees no GPU (install a GPU build of faiss)")
    if use_gpu in ("auto", True) and gpus > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(unit)
    return index


def _faiss_greedy_order(
    unit: np.ndarray, group_size: int, rng: np.random.Generator, use_gpu: Union[str, bool], progress: bool
) -> np.ndarray:
    """Greedy packing: a random unassigned seed takes its nearest unassigned neighbours (itself first).

    Seeds are processed in batches: one FAISS search per batch over the still unassigned labels (the index
    is rebuilt on them between rounds), then the batch is packed in seed order, each seed skipping
    neighbours that earlier seeds took. Seeds left short are filled in the next round.
    """
    n = unit.shape[0]
    assigned = np.zeros(n, dtype=bool)
    groups: list[np.ndarray] = []
    bar = _progress(n, "faiss-greedy grouping", progress and n >= 100_000)
    k = min(n, 4 * group_size)
    while not assigned.all():
        remaining = np.flatnonzero(~assigned)
        if remaining.size <= group_size:
            groups.append(remaining)
            bar.update(remaining.size)
            break
        index = _faiss_index(unit[remaining], use_gpu, rng)
        # A quarter of the remaining groups per round: few seeds compete for the same neighbours.
        num_seeds = max(1, remaining.size // group_size // 4)
        seeds = rng.choice(remaining.size, num_seeds, replace=False)
        _, neighbours = index.search(unit[remaining[seeds]], min(k, remaining.size))
        taken = np.zeros(remaining.size, dtype=bool)
        for seed, row in zip(seeds, neighbours, strict=True):
            if taken[seed]:
                continue
            row = row[row >= 0]
            row = row[~taken[row]]
            members = [seed] + [int(j) for j in row if j != seed][: group_size - 1]
            if len(members) < group_size:
                continue  # too few free neighbours: this seed waits for the next round
            taken[members] = True
            groups.append(remaining[members])
        progressed = int(taken.sum())
        assigned[remaining[taken]] = True
        bar.update(progressed)
        if progressed == 0:  # neighbourhoods exhausted: pack the rest in order of a random seed's similarity
            rest = remaining[np.argsort(-(unit[remaining] @ unit[remaining[seeds[0]]]), kind="stable")]
            groups.extend(rest[i : i + group_size] for i in range(0, rest.size, group_size))
            assigned[rest] = True
            bar.update(rest.size)
    bar.close()
    # Full groups first, the short one (if any) last.
    groups.sort(key=lambda g: g.size < group_size)
    return np.concatenate(groups)
