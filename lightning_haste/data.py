"""XMC data: Extreme Classification Repository readers, a synthetic long-tailed generator, a DataModule.

Batches are dicts ``{"features": Tensor [B, F] (dense float32 or, with ``features_dtype=torch.float64``, float64;
int64 for integer inputs) or sparse CSR,
"targets": a ``[B, num_labels]`` torch sparse CSR tensor of the positives (on the host), "index": Tensor [B]}``
plus, for raw-text data, ``"texts"`` and what a ``text_transform`` makes of them (e.g. ``"tokens"``; such batches
carry no ``"features"`` unless asked: ``XMCDataModule(batch_features=True)``); targets stay sparse all the way to the
loss and the metrics. An evaluation batch under several processes may carry ``"repeated"``, a bool ``[B]`` mask of
the rows repeated to even out the processes (:class:`EvaluationSampler`), which the metrics leave out.
"""

from __future__ import annotations

import gzip
import itertools
import math
import numbers
import os
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

__all__ = [
    "EvaluationSampler",
    "XMCData",
    "XMCDataModule",
    "XMCFormatError",
    "ResumableDataLoader",
    "SyntheticXMCDataModule",
    "BowXMCDataModule",
    "read_bow",
    "write_bow",
    "read_label_matrix",
    "read_texts",
    "read_filter_labels",
    "read_raw_text_dataset",
    "hashed_bag_of_words",
    "split_train_val",
    "synthetic_xmc",
    "targets_csr",
]


class XMCFormatError(ValueError):
    """A malformed data file; the message names the file and the line."""


@dataclass
class XMCData:
    """Features ``[N, F]`` (scipy CSR or dense float32 array) and labels ``[N, L]`` (scipy CSR of 0/1)."""

    features: Union[sp.csr_matrix, np.ndarray]
    labels: sp.csr_matrix
    texts: Optional[list[str]] = field(default=None)

    def __post_init__(self) -> None:
        if not sp.issparse(self.labels):
            raise TypeError(f"labels must be a SciPy sparse [N, L] matrix of 0/1 (e.g. scipy.sparse.csr_matrix(y)), "
                            f"got {type(self.labels).__name__}")
        if self.labels.ndim != 2 or getattr(self.features, "ndim", None) != 2:
            raise ValueError(f"features and labels must be 2-D, got shapes {getattr(self.features, 'shape', None)} "
                             f"and {self.labels.shape}")
        if self.features.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.features.shape[0]} feature rows but {self.labels.shape[0]} label rows")
        if self.texts is not None and len(self.texts) != self.labels.shape[0]:
            raise ValueError(f"texts must hold one text per row: {len(self.texts)} texts for {self.labels.shape[0]} "
                             "rows (a header line, or a text split over two lines?)")
        labels = self.labels.tocsr()
        if labels.nnz and not np.isin(labels.data, (0, 1)).all():
            raise ValueError("labels must be 0/1: a stored value other than 0 and 1 has no meaning as a positive "
                             f"(found {labels.data[~np.isin(labels.data, (0, 1))][0]!r})")
        if labels.nnz and ((labels.data == 0).any() or not labels.has_canonical_format):
            # a stored 0 is no positive and a label stored twice in a row one (the loss's and the metrics' rule):
            # made canonical once, so that the label counts, the batches' targets and the grouping agree (on a
            # copy: the caller's matrix stays as it was)
            labels = labels.copy()
            labels.sum_duplicates()
            labels.data = (labels.data > 0).astype(labels.data.dtype)
            labels.eliminate_zeros()
        self.labels = labels

    @property
    def num_labels(self) -> int:
        return int(self.labels.shape[1])

    @property
    def num_features(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def label_frequencies(self) -> np.ndarray:
        """Training positives per label ``[L]``."""
        return np.asarray(self.labels.sum(axis=0)).ravel().astype(np.int64)


# -- readers ----------------------------------------------------------------------------------------
# Every reader: plain or gzip-compressed files (recognised by their first bytes), UTF-8 with or without a byte-order
# mark, blank lines after the last row the header announces ignored; a malformed file raises XMCFormatError naming
# the file and the line.
_GZIP_MAGIC = b"\x1f\x8b"


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file, gzip-compressed or not; decoding errors as XMCFormatError."""
    try:
        with open(path, "rb") as raw:
            compressed = raw.read(2) == _GZIP_MAGIC
    except OSError as error:
        raise XMCFormatError(f"{path}: cannot be read ({error.strerror or error})") from None
    opener = gzip.open if compressed else open
    lineno = 0
    try:
        with opener(path, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):  # noqa: B007 - the number is reported on errors
                # decoded line by line, so that an error names its line (a text stream decodes whole blocks)
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as error:
                    raise XMCFormatError(
                        f"{path}:{lineno}: not UTF-8 text ({error.reason} at byte {error.start} of the line)"
                    ) from None
                yield lineno, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise XMCFormatError(f"{path}:{lineno + 1}: broken gzip data ({error})") from None


def _is_id(token: str) -> bool:
    """A non-negative integer written in ASCII digits only (``int`` also takes ``+1``, ``1_0`` and other scripts'
    digits, which these formats do not have)."""
    return token.isascii() and token.isdigit()


def _header(path: Path, line: str, count: int) -> list[int]:
    parts = line.split()
    if len(parts) != count or not all(_is_id(p) for p in parts):
        raise XMCFormatError(f"{path}:1: header must be {count} non-negative integers, got {line.strip()!r}")
    return [int(p) for p in parts]


def _pairs(path: Path, lineno: int, tokens: Sequence[str], limit: int, what: str) -> tuple[list[int], list[float]]:
    ids, values = [], []
    for token in tokens:
        key, sep, value = token.partition(":")
        if not _is_id(key) or "_" in value or not value.isascii():  # int and float take "+1", "1_0", "\u0661"
            raise XMCFormatError(f"{path}:{lineno}: bad token {token!r} (expected id:value)")
        try:
            index, number = int(key), float(value) if sep else None
        except ValueError:
            raise XMCFormatError(f"{path}:{lineno}: bad token {token!r} (expected id:value)") from None
        if number is None:
            raise XMCFormatError(f"{path}:{lineno}: bad token {token!r} (expected id:value)")
        if not 0 <= index < limit:
            raise XMCFormatError(f"{path}:{lineno}: {what} id {index} out of range [0, {limit})")
        if not math.isfinite(number):
            raise XMCFormatError(f"{path}:{lineno}: {what} {index} has a non-finite value {value!r}")
        ids.append(index)
        values.append(number)
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise XMCFormatError(f"{path}:{lineno}: {what} id {repeated[0]} appears more than once in the row")
    return ids, values


def _header_and_rows(path: Path, count: int) -> tuple[list[int], Iterator[tuple[int, str]]]:
    """The header's ``count`` integers (the first one the number of rows) and the data lines after it, in one
    pass over the file: at most that many rows; blank lines after them are ignored, anything else there is an
    error."""
    lines = _lines(path)
    first = next(lines, None)
    if first is None:
        raise XMCFormatError(f"{path}:1: the file is empty (expected a header)")
    header = _header(path, first[1], count)

    def rows() -> Iterator[tuple[int, str]]:
        for lineno, line in lines:
            if lineno - 1 > header[0]:
                if line.strip():
                    raise XMCFormatError(f"{path}:{lineno}: more rows than the header's {header[0]}")
                continue
            yield lineno, line

    return header, rows()


def _float_dtype(dtype: Any) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype must be float32 or float64, got {dtype}")
    return dtype


def read_bow(path: Union[str, os.PathLike], *, dtype: Any = np.float32) -> XMCData:
    """Read the repository's sparse bag-of-words format: header ``N F L``, then per instance
    ``l1,l2,... f:v f:v ...`` (an instance may have no labels: the line then starts with a space).

    Gzip-compressed files are read as they are. Feature values must be finite, a feature id may appear once per
    row (the features come back as canonical CSR: sorted, no duplicates), a label id listed twice counts once.
    ``dtype``: of the feature values (float32, or float64 for files written from float64 data)."""
    path = Path(path)
    dtype = _float_dtype(dtype)
    (num_rows, num_features, num_labels), rows = _header_and_rows(path, 3)
    f_ptr, f_idx, f_val, l_ptr, l_idx = [0], [], [], [0], []
    for lineno, line in rows:
        tokens = line.split()
        # The first token is the comma-separated label list, unless the instance has no labels.
        head, rest = ("", tokens) if not tokens or ":" in tokens[0] else (tokens[0], tokens[1:])
        labels = []
        for token in filter(None, head.split(",")):
            if not _is_id(token):
                raise XMCFormatError(f"{path}:{lineno}: bad label {token!r}")
            if int(token) >= num_labels:
                raise XMCFormatError(f"{path}:{lineno}: label id {token} out of range [0, {num_labels})")
            labels.append(int(token))
        ids, values = _pairs(path, lineno, rest, num_features, "feature")
        order = np.argsort(ids, kind="stable")
        f_idx += [ids[i] for i in order]
        f_val += [values[i] for i in order]
        f_ptr.append(len(f_idx))
        l_idx += sorted(set(labels))
        l_ptr.append(len(l_idx))
    if len(f_ptr) - 1 != num_rows:
        raise XMCFormatError(f"{path}: header says {num_rows} instances, the file has {len(f_ptr) - 1}")
    with np.errstate(over="ignore"):
        values = np.asarray(f_val, dtype=np.float64).astype(dtype)
    if values.size and not np.isfinite(values).all():
        raise XMCFormatError(f"{path}: a feature value exceeds the float32 range (read with dtype=np.float64)")
    features = sp.csr_matrix((values, f_idx, f_ptr), shape=(num_rows, num_features))
    labels = sp.csr_matrix((np.ones(len(l_idx), np.float32), l_idx, l_ptr), shape=(num_rows, num_labels))
    return XMCData(features, labels)


def _shortest(values: np.ndarray) -> list[str]:
    """The shortest decimal strings that read back (as ``float``, then cast to the array's dtype) to ``values``.

    float64: ``repr``. float32: NumPy's shortest unique digits; the reader parses to float64 first and then
    rounds to float32, which in a near-tie could land on a neighbour: such a value is written with 9 significant
    digits instead (always exact through float64)."""
    if values.dtype != np.float32:
        return [repr(float(v)) for v in values]
    out = []
    for v in values:
        text = np.format_float_scientific(v, unique=True, trim="-")
        if np.float32(float(text)) != v:
            text = f"{float(v):.9g}"
        out.append(text)
    return out


def write_bow(path: Union[str, os.PathLike], data: XMCData) -> None:
    """Write ``data`` in the repository's sparse bag-of-words format, the inverse of :func:`read_bow`: every
    feature value as the shortest decimal that reads back to the same float32 (or float64: read it with
    ``dtype=np.float64``), integer features as exact integers (read them with ``dtype=np.float64`` where they
    exceed 2^24, float32's exact integers), only the non-zero labels, features and labels in any SciPy sparse format
    or dense."""
    source = data.features
    if not sp.issparse(source) and np.asarray(source).dtype == np.float16:
        source = np.asarray(source, dtype=np.float32)  # exact in float32; SciPy has no float16 matrices
    # a copy: making it canonical below must not rewrite arrays the caller's matrix shares
    features = sp.csr_matrix(source, copy=True)
    integers = np.issubdtype(features.dtype, np.integer) or features.dtype == np.bool_
    if integers:
        features = features.astype(np.int64) if features.dtype != np.uint64 else features
    elif features.dtype not in (np.float32, np.float64):
        features = features.astype(np.float32)  # float16: exact in float32
    features.sum_duplicates()
    features.eliminate_zeros()
    if not integers and features.nnz and not np.isfinite(features.data).all():
        raise ValueError("write_bow: the features hold non-finite values, which read_bow would reject")
    labels = sp.csr_matrix(data.labels)
    labels.sum_duplicates()
    labels.eliminate_zeros()
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{len(data)} {data.num_features} {data.num_labels}\n")
        for i in range(len(data)):
            row_labels = ",".join(map(str, labels.indices[labels.indptr[i] : labels.indptr[i + 1]]))
            row = slice(features.indptr[i], features.indptr[i + 1])
            texts = [str(v) for v in features.data[row].tolist()] if integers else _shortest(features.data[row])
            feats = " ".join(f"{j}:{v}" for j, v in zip(features.indices[row], texts, strict=True))
            fh.write(f"{row_labels} {feats}\n" if row_labels else f" {feats}\n")


def read_label_matrix(path: Union[str, os.PathLike]) -> sp.csr_matrix:
    """Read a sparse label file (``trn_X_Y.txt`` / ``tst_X_Y.txt``): header ``N L``, then ``l:v`` pairs per row
    (an empty line: a row without labels). A label listed with the value 0 is not a positive; one listed twice is
    an error. Gzip-compressed files are read as they are."""
    path = Path(path)
    (num_rows, num_labels), rows = _header_and_rows(path, 2)
    ptr, idx = [0], []
    for lineno, line in rows:
        ids, values = _pairs(path, lineno, line.split(), num_labels, "label")
        idx += sorted(i for i, v in zip(ids, values, strict=True) if v != 0)
        ptr.append(len(idx))
    if len(ptr) - 1 != num_rows:
        raise XMCFormatError(f"{path}: header says {num_rows} rows, the file has {len(ptr) - 1}")
    return sp.csr_matrix((np.ones(len(idx), np.float32), idx, ptr), shape=(num_rows, num_labels))


def read_texts(path: Union[str, os.PathLike]) -> list[str]:
    """One text per line (raw-text data sets, e.g. ``trn_X.txt``); gzip-compressed files and a UTF-8 byte-order
    mark are handled, line ends (``\\n``, ``\\r\\n``) removed."""
    return [line.rstrip("\r\n") for _, line in _lines(Path(path))]


def read_filter_labels(path: Union[str, os.PathLike], labels: sp.csr_matrix) -> sp.csr_matrix:
    """Remove the ``(instance, label)`` pairs listed in a ``filter_labels`` file (one ``i j`` pair per line)
    from ``labels`` (label-feature data sets drop these reciprocal pairs from evaluation)."""
    path = Path(path)
    pairs = []
    for lineno, line in _lines(path):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not all(_is_id(p) for p in parts):
            raise XMCFormatError(f"{path}:{lineno}: expected 'instance label', got {line.strip()!r}")
        i, j = int(parts[0]), int(parts[1])
        if i >= labels.shape[0] or j >= labels.shape[1]:
            raise XMCFormatError(f"{path}:{lineno}: pair ({i}, {j}) outside the {labels.shape} label matrix")
        pairs.append((i, j))
    out = sp.lil_matrix(labels)
    for i, j in pairs:
        out[i, j] = 0
    out = sp.csr_matrix(out)
    out.eliminate_zeros()
    return out


def hashed_bag_of_words(texts: Sequence[str], num_features: int = 4096) -> sp.csr_matrix:
    """Lower-cased whitespace tokens hashed (stable CRC32) into ``num_features`` count features: a sparse
    view of raw texts, e.g. for PIFA label embeddings when the model itself reads the texts."""
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
        raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
    ptr, idx = [0], []
    for text in texts:
        idx += [zlib.crc32(token.encode("utf-8")) % num_features for token in text.lower().split()]
        ptr.append(len(idx))
    out = sp.csr_matrix((np.ones(len(idx), np.float32), idx, ptr), shape=(len(texts), num_features))
    out.sum_duplicates()
    return out


def read_raw_text_dataset(
    texts_path: Union[str, os.PathLike], labels_path: Union[str, os.PathLike], *, hash_features: int = 4096
) -> XMCData:
    """A raw-text split: one text per line (``trn_X.txt``) and a sparse label file (``trn_X_Y.txt``). The texts
    travel in the batches (``batch["texts"]``); ``features`` is their hashed bag of words (for PIFA)."""
    texts = read_texts(texts_path)
    labels = read_label_matrix(labels_path)
    if len(texts) > labels.shape[0] and not any(texts[labels.shape[0] :]):
        # blank lines after the last text (an editor's or a concatenation's): not instances. Only where they are
        # all that is extra: an empty text within the file is an instance with no words.
        texts = texts[: labels.shape[0]]
    if len(texts) != labels.shape[0]:
        raise XMCFormatError(f"{texts_path} has {len(texts)} texts but {labels_path} has {labels.shape[0]} rows")
    return XMCData(hashed_bag_of_words(texts, hash_features), labels, texts=texts)


# -- synthetic data ---------------------------------------------------------------------------------
def synthetic_xmc(
    num_train: int = 20_000,
    num_test: int = 2_000,
    num_labels: int = 4_000,
    num_features: int = 512,
    *,
    cluster_size: int = 16,
    mean_labels: float = 3.0,
    zipf: float = 1.1,
    seed: int = 0,
) -> tuple[XMCData, XMCData]:
    """A long-tailed multi-label problem with planted label clusters (the embedded default data).

    Labels come in clusters of ``cluster_size`` that share 12 "topic" features; each label adds 4 of its
    own. Popularity is Zipf-like (``zipf``), so most labels have few positives; each instance has
    ``1 + Poisson(mean_labels - 1)`` labels. Features are dense, L2-normalised, with 20 noise features.
    """
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, num_features, size=(num_labels // cluster_size + 1, 12))
    own = rng.integers(0, num_features, size=(num_labels, 4))
    popularity = 1.0 / np.arange(1, num_labels + 1) ** zipf
    popularity = rng.permutation(popularity / popularity.sum())

    def draw(n: int) -> XMCData:
        x = np.zeros((n, num_features), dtype=np.float32)
        ptr, idx = [0], []
        for i in range(n):
            labels = np.unique(rng.choice(num_labels, size=1 + rng.poisson(mean_labels - 1), p=popularity))
            for label in labels:
                x[i, topic[label // cluster_size]] += rng.random(12)
                x[i, own[label]] += 1.0 + rng.random(4)
            x[i, rng.integers(0, num_features, size=20)] += rng.random(20)
            idx += labels.tolist()
            ptr.append(len(idx))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y = sp.csr_matrix((np.ones(len(idx), np.float32), idx, ptr), shape=(n, num_labels))
        return XMCData(x, y)

    return draw(num_train), draw(num_test)


# -- datasets and the DataModule ----------------------------------------------------------------------
class _Rows(Dataset):
    def __init__(self, data: XMCData):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> int:
        return i


class EvaluationSampler(DistributedSampler):
    """The distributed sampler of an evaluation split (validation, test): process ``r`` of ``W`` takes rows ``r,
    r + W, ...`` in order, and, as ``DistributedSampler`` does, every process gets the same number of rows (so each
    runs the same steps), the last ones repeating the split's first rows. Unlike it, a repeat is drawn as
    ``len(dataset) + row``: the split's collate function marks such rows (the batch's ``"repeated"`` mask, the row
    index itself in ``"index"``), and :class:`~lightning_haste.module.HasteXMCModule` leaves them out of its
    metrics, so that every row of the split counts once and a metric under DDP equals the one of a single process.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        padding = self.total_size - n
        repeats = [n + row for row in itertools.islice(itertools.cycle(range(n)), padding)] if n else []
        indices = list(range(n)) + repeats
        return iter(indices[self.rank : self.total_size : self.num_replicas])


class _ResumingIndexSampler:
    """A loader's batch (or index) sampler that draws each iteration in its loader's epoch and starts at the batch
    its loader says: the batches an interrupted epoch delivered are skipped by their indices, so nothing is read or
    collated for them."""

    def __init__(self, loader: ResumableDataLoader, inner: Any) -> None:
        self.loader = loader
        self.inner = inner

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.loader._epoch, self.loader._start_batch

        def batches() -> Iterator[Any]:
            # Runs at the first draw, after any set_epoch of Lightning's (which counts a fit stopped by
            # trainer.should_stop as a finished epoch): the loader's own count decides the order.
            self.loader._set_sampler_epoch(epoch)
            yield from itertools.islice(self.inner, start, None)

        return batches()

    def __len__(self) -> int:
        return len(self.inner)


class _CountingIterator:
    """A loader's iterator that counts the batches it handed out (not those its workers prefetched)."""

    def __init__(self, iterator: Iterator[Any], start: int) -> None:
        self.iterator = iterator
        self.delivered = start

    def __iter__(self) -> _CountingIterator:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        self.delivered += 1
        return batch

    def __len__(self) -> int:
        return len(self.iterator)  # type: ignore[arg-type]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position is saved in Lightning checkpoints, so that a fit resumed from a checkpoint
    taken at any step continues with the batches the uninterrupted run would have drawn.

    The loader counts its own epochs, the first numbered ``first_epoch``, and draws epoch ``e`` with its sampler's
    ``set_epoch(e)``. An epoch ends when its last batch has been delivered: an iteration left before that (an epoch
    cut short by ``limit_train_batches``, a ``break``) is continued by the next one. Lightning stores the loader's
    ``state_dict()`` (the epoch and the batches delivered in it) in every checkpoint and hands it to
    ``load_state_dict`` on resume; the next iteration then draws that epoch again and skips the batches already
    trained on, by their indices (nothing is read or collated for them). So the batches follow the loader's count,
    not Lightning's epoch counter, which counts a fit ended by ``trainer.should_stop`` as a finished epoch.

    The continuation is exact when the sampler's order of an epoch is a function of the epoch: a
    ``torch.utils.data.DistributedSampler`` (seeded; what :class:`XMCDataModule` uses), a ``SequentialSampler``, or
    a sampler of your own with ``set_epoch``; a ``RandomSampler`` without a seeded generator draws another order
    after a resume. The dataset must be map-style (an ``IterableDataset`` raises ``TypeError``). A new loader
    starts counting at ``first_epoch``: made anew every epoch (``reload_dataloaders_every_n_epochs``), give it the
    trainer's ``current_epoch``. Other arguments as for ``DataLoader``.
    """

    def __init__(self, dataset: Any, *args: Any, first_epoch: int = 0, **kwargs: Any) -> None:
        if isinstance(dataset, IterableDataset):
            raise TypeError("ResumableDataLoader needs a map-style dataset (it skips batches by their indices), "
                            "got an IterableDataset")
        if isinstance(first_epoch, bool) or not isinstance(first_epoch, numbers.Integral) or first_epoch < 0:
            raise ValueError(f"first_epoch must be an integer >= 0, got {first_epoch!r}")
        super().__init__(dataset, *args, **kwargs)
        self.first_epoch = int(first_epoch)
        self._epoch = self.first_epoch - 1  # the epoch of the current iteration (none yet)
        self._start_batch = 0  # the batch the current iteration started at
        self._resume: Optional[tuple[int, int]] = None  # (epoch, batch) the next iteration starts at
        self._current: Optional[_CountingIterator] = None

    @property
    def _index_sampler(self) -> Any:  # type: ignore[override]
        # Read once per iterator; persistent workers keep theirs and call iter() on it every epoch.
        return _ResumingIndexSampler(self, super()._index_sampler)

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self._resume is not None:
            (self._epoch, self._start_batch), self._resume = self._resume, None
        elif self._current is not None and self._current.delivered < len(self):
            self._start_batch = self._current.delivered  # the epoch is not over: continue it
        else:
            self._epoch, self._start_batch = self._epoch + 1, 0
        self._current = _CountingIterator(super().__iter__(), self._start_batch)
        return self._current

    def __getstate__(self) -> dict[str, Any]:
        # A live iterator does not pickle (DDP spawn pickles what the trainer holds): a copy resumes where this
        # loader is.
        state = self.__dict__.copy()
        position = self.state_dict()
        state["_resume"] = self._start_of(position["epoch"], position["batches"])
        state["_current"] = None
        return state

    def _start_of(self, epoch: int, batches: int) -> tuple[int, int]:
        """Where an iteration continues after ``batches`` of epoch ``epoch``: after the epoch's last batch, the
        next epoch from its beginning."""
        return (epoch + 1, 0) if batches >= len(self) else (epoch, batches)

    def _set_sampler_epoch(self, epoch: int) -> None:
        found = {id(self.sampler): self.sampler}
        inner = getattr(self.batch_sampler, "sampler", None)
        if inner is not None:
            found[id(inner)] = inner
        for sampler in found.values():
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        """``{"epoch": the current epoch, "batches": the batches delivered in it}`` (before the first iteration:
        where it will start)."""
        if self._resume is not None:
            epoch, batches = self._resume
        elif self._current is None:
            epoch, batches = self._epoch + 1, 0
        else:
            epoch, batches = self._epoch, self._current.delivered
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue from ``state_dict`` (of :meth:`state_dict`) at the next iteration."""
        try:
            epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a ResumableDataLoader state: {state_dict!r} ({error!r})") from None
        if epoch < 0 or batches < 0:
            raise ValueError(f"a ResumableDataLoader state has epoch={epoch}, batches={batches} (expected >= 0)")
        self._resume = self._start_of(epoch, batches)


def split_train_val(data: XMCData, val_fraction: float, seed: int = 0) -> tuple[XMCData, XMCData]:
    """``(train, val)``: a seeded random ``val_fraction`` of the rows (at least one, and at least one row left for
    training) held out, each part in the original row order."""
    n = len(data)
    if n < 2:
        raise ValueError(f"cannot hold out a validation split from {n} training row(s); pass val= or val_fraction=0")
    size = min(n - 1, max(1, int(round(val_fraction * n))))
    held = np.zeros(n, dtype=bool)
    held[np.random.default_rng(seed).choice(n, size=size, replace=False)] = True

    def rows(mask: np.ndarray) -> XMCData:
        index = np.flatnonzero(mask)
        texts = [data.texts[i] for i in index] if data.texts is not None else None
        return XMCData(data.features[index], data.labels[index], texts=texts)

    return rows(~held), rows(held)


def _torch_csr(matrix: sp.csr_matrix, values: np.ndarray) -> torch.Tensor:
    """A SciPy CSR matrix's structure with ``values`` as a torch sparse CSR tensor (int64 indices)."""
    return _csr_tensor(torch.from_numpy(matrix.indptr.astype(np.int64)),
                       torch.from_numpy(matrix.indices.astype(np.int64)), torch.from_numpy(values), matrix.shape)


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple) -> torch.Tensor:
    """A torch sparse CSR tensor of these parts, built without torch's notices (invariant checks off explicitly:
    the parts come from a valid CSR matrix; the one-time notice that sparse CSR support is in beta)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size=shape, check_invariants=False)


def targets_csr(labels: sp.csr_matrix) -> torch.Tensor:
    """A SciPy CSR label matrix as a torch sparse CSR tensor (int64 indices, float32 ones): the batches' targets."""
    labels = labels.tocsr()
    return _torch_csr(labels, np.ones(labels.nnz, dtype=np.float32))


class _Batch(dict):
    """A batch as the loader's collate makes it. From a worker process, its sparse CSR tensors (the targets, sparse
    features) travel as their dense parts and are rebuilt by the receiving process: torch's own rebuild of a sparse
    tensor warns there that invariant checks are off and that sparse CSR support is in beta (two warnings a
    process for every user of a text data set, whose batches are made in workers)."""

    def __reduce__(self) -> tuple:
        parts = {}
        for key, value in self.items():
            if isinstance(value, torch.Tensor) and value.layout == torch.sparse_csr:
                parts[key] = _CSRParts(value.crow_indices(), value.col_indices(), value.values(), tuple(value.shape))
            else:
                parts[key] = value
        return _rebuild_batch, (parts,)


class _CSRParts(NamedTuple):
    """A sparse CSR tensor's parts, as a :class:`_Batch` sends it."""

    crow: torch.Tensor
    col: torch.Tensor
    values: torch.Tensor
    shape: tuple


def _rebuild_batch(parts: dict) -> _Batch:
    """The :class:`_Batch` whose parts a worker sent (its sparse CSR tensors as :class:`_CSRParts`)."""
    batch = _Batch()
    for key, value in parts.items():
        batch[key] = _csr_tensor(*value) if isinstance(value, _CSRParts) else value
    return batch


class _Collate:
    def __init__(self, data: XMCData, sparse_features: bool, text_transform: Optional[Callable] = None,
                 features: bool = True, float_dtype: Any = np.float32):
        self.data = data
        self.sparse = sparse_features
        self.text_transform = text_transform
        self.features = features
        self.float_dtype = float_dtype

    def __call__(self, rows: list[int]) -> dict[str, Any]:
        rows_np = np.asarray(rows, dtype=np.int64)
        # EvaluationSampler draws the rows it repeats to even out the processes as len + row
        repeated = rows_np >= len(self.data)
        any_repeated = bool(repeated.any())
        if any_repeated:
            rows_np = np.where(repeated, rows_np - len(self.data), rows_np)
            rows = rows_np.tolist()
        # One CSR for the batch's positives (not a tensor per row): the loss reads it on the host in one piece
        targets = targets_csr(self.data.labels[rows_np])
        batch = _Batch(targets=targets, index=torch.from_numpy(rows_np))
        if any_repeated:
            batch["repeated"] = torch.from_numpy(repeated)
        if self.features:
            batch["features"] = self._features(rows_np)
        if self.data.texts is not None:
            batch["texts"] = [self.data.texts[i] for i in rows]
            if self.text_transform is not None:  # e.g. tokenising, here in the loader's workers, not in the step
                batch.update(self.text_transform(batch["texts"]))
        return batch

    def _features(self, rows_np: np.ndarray) -> torch.Tensor:
        feats = self.data.features[rows_np]
        # Integer inputs (token ids, say) stay integers (int64): a float32 copy would lose ids above 2^24, and
        # a bfloat16 one above 256. Everything else becomes the module's features_dtype (float32 by default).
        dtype = np.int64 if np.issubdtype(feats.dtype, np.integer) else self.float_dtype
        if sp.issparse(feats):
            feats = feats.tocsr()
            if self.sparse:
                features = _torch_csr(feats, feats.data.astype(dtype))
            else:
                features = torch.from_numpy(feats.toarray().astype(dtype))
        else:
            features = torch.from_numpy(np.ascontiguousarray(feats, dtype=dtype))
        return features


#: Batch entries that stay on the host when a batch moves to the device.
_HOST_KEYS = ("targets", "texts", "repeated")


class XMCDataModule(LightningDataModule):
    """Train / validation / test :class:`XMCData` as dataloaders of sparse-target batches.

    Args:
        train, val, test: the splits. Without ``val``, a seeded ``val_fraction`` of ``train`` is held out for
            validation (and left out of training and of the label statistics), so that model selection never
            sees the test labels; ``val_fraction=0`` trains on all of ``train`` and validates nothing.
        val_fraction, val_seed: the held-out fraction of ``train`` and the seed of its draw.
        label_embeddings: optional ``[num_labels, d]`` label embeddings for the grouping (default: PIFA).
        batch_size: instances per batch.
        sparse_features: yield sparse CSR feature batches (else dense).
        text_transform: for raw-text data, a function of a batch's texts returning a dict of tensors to add to the
            batch (e.g. a tokenizer's ``input_ids`` and ``attention_mask`` under ``"tokens"``); it runs in the
            loader's worker processes, off the training step's path.
        num_workers: loader worker processes; ``None`` (default): with a ``text_transform``, ``min(4, CPUs - 1)``
            (tokenising is slow), else 0 (in-memory collation is cheap).
        batch_features: whether batches carry the input features (``"features"``); ``None`` (default): not with a
            ``text_transform``, whose output is then the model's input and the features (e.g. a raw-text data set's
            hashed bag of words) serve the label grouping only: a dense batch of them would be made, pinned and
            copied to the GPU at every step for nothing.
        shuffle: whether the training loader shuffles.
        shuffle_seed: seed of the training order: epoch ``e`` is the permutation that
            ``torch.utils.data.DistributedSampler`` draws for ``seed + e`` (the same on every DDP process, each of
            which takes its share); ``None`` (default): the seed given to ``lightning.seed_everything``, else 0.
        pin_memory: page-locked batches (their copy to the GPU is asynchronous); ``None`` (default): when CUDA is
            available.
        features_dtype: the dtype of floating-point features in batches: ``torch.float32`` (default; float64 data
            is rounded to it, as a float32 model takes it) or ``torch.float64`` (float64 data kept exact, for a
            float64 model). Integer features (token ids, say) stay int64 either way.

    Exact resume: the training loader is a :class:`ResumableDataLoader` over a seeded sampler, so a fit stopped at
    any step and resumed from a checkpoint (``Trainer.fit(..., ckpt_path=...)``, a checkpoint of
    ``ModelCheckpoint`` or ``trainer.save_checkpoint``) draws the same batches as the uninterrupted run, mid-epoch
    included; with :class:`~lightning_haste.SparseRegrowthCallback` and the module's optimizers and schedule (all in
    the checkpoint) it ends with the same weights, bit for bit on CPU. Not restored: torch's global random state
    (dropout, random augmentations of your own draw from it).
    """

    def __init__(
        self,
        train: XMCData,
        val: Optional[XMCData] = None,
        test: Optional[XMCData] = None,
        *,
        batch_size: int = 256,
        sparse_features: bool = False,
        num_workers: Optional[int] = None,
        shuffle: bool = True,
        label_embeddings: Optional[Any] = None,
        text_transform: Optional[Callable[[list[str]], dict[str, Any]]] = None,
        pin_memory: Optional[bool] = None,
        val_fraction: float = 0.1,
        val_seed: int = 0,
        shuffle_seed: Optional[int] = None,
        batch_features: Optional[bool] = None,
        features_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if features_dtype not in (torch.float32, torch.float64):
            raise TypeError(f"features_dtype must be torch.float32 or torch.float64, got {features_dtype!r}")
        if batch_features is not None and not isinstance(batch_features, bool):
            raise TypeError(f"batch_features must be a bool or None, got {batch_features!r}")
        if isinstance(shuffle_seed, bool) or not isinstance(shuffle_seed, (numbers.Integral, type(None))):
            raise TypeError(f"shuffle_seed must be an integer or None, got {shuffle_seed!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if text_transform is not None and train.texts is None:
            raise ValueError("text_transform needs raw-text data (XMCData with texts)")
        #: optional ``[num_labels, d]`` label embeddings (e.g. from label texts) used for grouping instead of PIFA
        self.label_embeddings = label_embeddings
        for name, split in (("val", val), ("test", test)):
            if split is not None and split.num_labels != train.num_labels:
                raise ValueError(f"{name} has {split.num_labels} labels, train {train.num_labels}")
            if split is not None and split.num_features != train.num_features:
                raise ValueError(f"{name} has {split.num_features} features, train {train.num_features}")
        if val is None and val_fraction > 0:
            train, val = split_train_val(train, val_fraction, val_seed)
        self.train_data, self.val_data, self.test_data = train, val, test
        self.batch_size = batch_size
        self.sparse_features = sparse_features
        self.text_transform = text_transform
        if num_workers is None:
            num_workers = min(4, max(0, (os.cpu_count() or 1) - 1)) if text_transform is not None else 0
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.shuffle_seed = shuffle_seed
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.batch_features = text_transform is None if batch_features is None else batch_features
        #: the dtype of floating-point features in batches (integer features stay int64)
        self.features_dtype = features_dtype

    @classmethod
    def synthetic(
        cls, *, seed: int = 0, batch_size: int = 256, shuffle: bool = True, val_fraction: float = 0.1, **kwargs: Any
    ) -> XMCDataModule:
        """The embedded default data: :func:`synthetic_xmc` with ``kwargs``."""
        train, test = synthetic_xmc(seed=seed, **kwargs)
        return cls(train, test=test, batch_size=batch_size, shuffle=shuffle, val_fraction=val_fraction)

    @classmethod
    def from_bow_directory(cls, directory: Union[str, os.PathLike], **kwargs: Any) -> XMCDataModule:
        """A repository data set folder with ``train.txt`` and ``test.txt`` in the bag-of-words format (and
        optionally ``filter_labels_test.txt``); ``kwargs`` are :class:`XMCDataModule`'s (the files are read in
        float64 for ``features_dtype=torch.float64``)."""
        train, test = _read_bow_directory(Path(directory), kwargs.get("features_dtype", torch.float32))
        return cls(train, test=test, **kwargs)

    # properties the model reads in setup
    @property
    def num_labels(self) -> int:
        return self.train_data.num_labels

    @property
    def num_features(self) -> int:
        return self.train_data.num_features

    @property
    def num_train(self) -> int:
        return len(self.train_data)

    @property
    def label_frequencies(self) -> np.ndarray:
        return self.train_data.label_frequencies()

    def _loader(self, data: Optional[XMCData], shuffle: bool, replicas: int = 1, rank: int = 0) -> DataLoader:
        """A split's loader; with ``replicas > 1``, this process's share through :class:`EvaluationSampler`."""
        if data is None:
            raise ValueError("this split was not given to the XMCDataModule")
        rows = _Rows(data)
        sampler = EvaluationSampler(rows, num_replicas=replicas, rank=rank) if replicas > 1 else None
        return DataLoader(rows, batch_size=self.batch_size, shuffle=shuffle, sampler=sampler,
                          num_workers=self.num_workers, collate_fn=self._collate(data), pin_memory=self.pin_memory,
                          persistent_workers=self.num_workers > 0)

    def _collate(self, data: XMCData) -> _Collate:
        return _Collate(data, self.sparse_features, self.text_transform, self.batch_features,
                        np.float64 if self.features_dtype == torch.float64 else np.float32)

    def train_dataloader(self) -> ResumableDataLoader:
        """Batches of the training split in a seeded order (``shuffle_seed``), resumable mid-epoch."""
        data = self.train_data
        trainer = self.trainer
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed = self.shuffle_seed if self.shuffle_seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        rows = _Rows(data)
        # A DistributedSampler (also for one process): seeded per epoch through set_epoch, which Lightning calls,
        # and one that Lightning does not wrap under DDP.
        sampler = DistributedSampler(rows, num_replicas=replicas, rank=rank, shuffle=self.shuffle, seed=seed)
        return ResumableDataLoader(rows, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                                   collate_fn=self._collate(data), pin_memory=self.pin_memory,
                                   persistent_workers=self.num_workers > 0,
                                   first_epoch=trainer.current_epoch if trainer is not None else 0)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        """Lightning's hook, with a batch's ``"targets"`` and ``"texts"`` left on the host. The fused loss and the
        metrics read the positives there (mapping them to the layer's label order, O(positives)) and copy what the
        device needs from pinned memory themselves; targets moved to the GPU would have to come back, a
        synchronisation per step. The texts cannot move, and Lightning's walk over the batch would visit each of
        them every step."""
        if isinstance(batch, dict) and any(key in batch for key in _HOST_KEYS):
            rest = {key: value for key, value in batch.items() if key not in _HOST_KEYS}
            moved = super().transfer_batch_to_device(rest, device, dataloader_idx)
            moved.update({key: batch[key] for key in _HOST_KEYS if key in batch})
            return moved
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _evaluation_loader(self, data: Optional[XMCData]) -> DataLoader:
        """A validation or test split's loader: under several processes with :class:`EvaluationSampler` (the rows
        repeated to even out the processes marked, for the metrics to count each row once), else in order."""
        trainer = self.trainer
        if trainer is None:
            return self._loader(data, False)
        return self._loader(data, False, trainer.world_size, trainer.global_rank)

    def val_dataloader(self) -> Union[DataLoader, list]:
        if self.val_data is None:  # val_fraction=0 and no val split: nothing to validate
            return []
        return self._evaluation_loader(self.val_data)

    def test_dataloader(self) -> DataLoader:
        return self._evaluation_loader(self.test_data)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_data, False)


class SyntheticXMCDataModule(XMCDataModule):
    """:func:`synthetic_xmc` as a DataModule with plain arguments (for the CLI and its config files)."""

    def __init__(
        self,
        num_train: int = 20_000,
        num_test: int = 2_000,
        num_labels: int = 4_000,
        num_features: int = 512,
        batch_size: int = 256,
        seed: int = 0,
        shuffle: bool = True,
        num_workers: int = 0,
        val_fraction: float = 0.1,
    ) -> None:
        train, test = synthetic_xmc(num_train, num_test, num_labels, num_features, seed=seed)
        super().__init__(train, test=test, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                         val_fraction=val_fraction)


class BowXMCDataModule(XMCDataModule):
    """A repository data set folder (``train.txt``, ``test.txt``, optional ``filter_labels_test.txt``) as a
    DataModule with plain arguments (for the CLI)."""

    def __init__(self, directory: str, batch_size: int = 256, sparse_features: bool = False, num_workers: int = 0,
                 val_fraction: float = 0.1, val_seed: int = 0, shuffle: bool = True, shuffle_seed: Optional[int] = None,
                 features_dtype: str = "float32"):
        dtypes = {"float32": torch.float32, "float64": torch.float64}
        if features_dtype not in dtypes:
            raise ValueError(f"features_dtype must be 'float32' or 'float64', got {features_dtype!r}")
        train, test = _read_bow_directory(Path(directory), dtypes[features_dtype])
        super().__init__(train, test=test, batch_size=batch_size, sparse_features=sparse_features,
                         num_workers=num_workers, val_fraction=val_fraction, val_seed=val_seed, shuffle=shuffle,
                         shuffle_seed=shuffle_seed, features_dtype=dtypes[features_dtype])


def _read_bow_directory(directory: Path, features_dtype: torch.dtype) -> tuple[XMCData, XMCData]:
    """``(train, test)`` of a repository data set folder, the test labels filtered by ``filter_labels_test.txt``
    where it exists."""
    if not directory.is_dir():
        raise FileNotFoundError(f"data directory {str(directory)!r} does not exist (expected train.txt and test.txt "
                                "in it)")
    dtype = np.float64 if features_dtype == torch.float64 else np.float32
    train, test = read_bow(directory / "train.txt", dtype=dtype), read_bow(directory / "test.txt", dtype=dtype)
    if (directory / "filter_labels_test.txt").exists():
        test = XMCData(test.features, read_filter_labels(directory / "filter_labels_test.txt", test.labels))
    return train, test
