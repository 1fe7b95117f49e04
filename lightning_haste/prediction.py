"""``TopKPredictionWriter``: ``trainer.predict``'s top-k, streamed to disk as a sparse score matrix.

Each process appends its batches' ``(row index, label ids, scores)`` to its own part files while it predicts;
at the end of the epoch the first process merges the parts in row order (rows a distributed sampler repeated to
even out the ranks are written once) and writes, chunk by chunk, a SciPy ``.npz`` CSR matrix and/or the Extreme
Classification Repository's sparse text format. No process holds more than a chunk of predictions at a time
(plus one integer per row for the order).
"""

from __future__ import annotations

import os
import shutil
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from ._checks import check_id_rows

__all__ = ["TopKPredictionWriter", "FORMATS", "read_predictions"]

#: The output formats: ``"npz"`` (``scipy.sparse.load_npz`` reads it: a ``[rows, num_labels]`` CSR matrix of
#: float32 scores, float64 where the model predicts float64, each row's k labels in descending score order) and
#: ``"txt"`` (header ``rows num_labels``, then ``label:score`` pairs per row, the format of
#: ``lightning_haste.data.read_label_matrix``, each score with the digits that read it back exactly).
FORMATS = ("npz", "txt")
_CHUNK_ROWS = 65536


class TopKPredictionWriter(BasePredictionWriter):
    """Write ``trainer.predict``'s top-k ``(scores, label ids)`` (what ``HasteXMCModule.predict_step`` returns, in
    original label ids) to ``path`` without holding all rows in memory.

    Args:
        path: output file without or with a suffix; ``<path>.npz`` and/or ``<path>.txt`` are written.
        formats: ``"npz"``, ``"txt"`` or both.

    Row ``i`` of the output is the ``i``-th smallest row index predicted (a batch's ``"index"`` entry, as
    ``XMCDataModule`` batches carry it, else Lightning's batch indices): for a whole split, its row order. Under
    DDP every process writes its part; the first merges them (rows repeated by the distributed sampler once).
    Each batch's prediction is checked before anything of it is written: ``(scores, ids)`` of one shape ``[B, k]``
    with ``k >= 1`` and the same ``k`` and score dtype in every batch, integer ids in ``[0, num_labels)`` (the
    module's ``output.num_labels``) and distinct within a row.
    """

    def __init__(self, path: Union[str, os.PathLike], formats: Sequence[str] = FORMATS) -> None:
        super().__init__("batch")
        formats = (formats,) if isinstance(formats, str) else tuple(formats)
        if not formats or any(f not in FORMATS for f in formats):
            raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {formats!r}")
        path = Path(path)
        self.stem = path.with_suffix("") if path.suffix in (".npz", ".txt") else path
        self.formats = formats
        self._files: dict[str, Any] = {}
        self._k: Optional[int] = None
        self._score_dtype: Optional[np.dtype] = None
        self.written: list[Path] = []

    # -- per process --------------------------------------------------------------------------------
    def _parts(self, rank: int) -> Path:
        return self.stem.parent / f".{self.stem.name}.parts" / f"rank{rank}"

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        # checked before any batch runs: the label count checks every batch's ids and sizes the merged matrix
        if not isinstance(getattr(getattr(pl_module, "output", None), "num_labels", None), int):
            raise TypeError("TopKPredictionWriter needs the module's output layer (`output.num_labels`, as "
                            f"HasteXMCModule has it); {type(pl_module).__name__} has none")
        parts = self._parts(trainer.global_rank)
        if parts.exists():
            shutil.rmtree(parts)
        parts.mkdir(parents=True)
        self._files = {name: open(parts / f"{name}.bin", "wb") for name in ("rows", "ids", "scores")}
        self._k = None
        self._score_dtype = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if dataloader_idx:
            # each loader numbers its rows from 0: merged into one matrix, a second loader's rows would overwrite the
            # first's
            raise ValueError("TopKPredictionWriter writes the rows of one predict dataloader; got a batch of "
                             f"dataloader {dataloader_idx}: predict each with its own trainer.predict and writer")
        scores, ids = _checked_prediction(prediction, int(pl_module.output.num_labels))
        # every check before anything is written: a bad batch leaves the part files as they were
        if self._k is None:
            self._k = int(ids.shape[1])
        elif ids.shape[1] != self._k:
            raise ValueError(f"every batch must predict the same k, got {ids.shape[1]} after {self._k}")
        if self._score_dtype is None:
            self._score_dtype = scores.dtype
        elif scores.dtype != self._score_dtype:
            raise ValueError(f"every batch must predict scores of one dtype, got {scores.dtype} after "
                             f"{self._score_dtype}")
        index = batch.get("index") if isinstance(batch, dict) else None
        rows = index.cpu().numpy() if index is not None else np.asarray(batch_indices)
        if rows.shape != (ids.shape[0],):
            raise ValueError(f"the batch has {ids.shape[0]} predicted rows but {rows.size} row indices")
        self._files["rows"].write(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
        self._files["ids"].write(ids.tobytes())
        self._files["scores"].write(scores.tobytes())

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        for fh in self._files.values():
            fh.close()
        dtype = np.dtype(self._score_dtype or np.float32)
        (self._parts(trainer.global_rank) / "k").write_text(f"{self._k or 0} {dtype.name}")
        trainer.strategy.barrier("TopKPredictionWriter")
        if trainer.is_global_zero:
            num_labels = int(pl_module.output.num_labels)
            self.written = self._merge(trainer.world_size, num_labels)
            shutil.rmtree(self.stem.parent / f".{self.stem.name}.parts", ignore_errors=True)
        trainer.strategy.barrier("TopKPredictionWriter done")

    # -- the merge (first process) ------------------------------------------------------------------
    def _merge(self, world_size: int, num_labels: int) -> list[Path]:
        described = [(self._parts(r) / "k").read_text().split() for r in range(world_size)]
        ks = {int(k) for k, _ in described} - {0}
        if len(ks) > 1:
            raise ValueError(f"the processes predicted different k: {sorted(ks)}")
        k = ks.pop() if ks else 0
        dtypes = {np.dtype(name) for count, name in described if int(count)}
        if len(dtypes) > 1:
            raise ValueError(f"the processes predicted scores of different dtypes: {sorted(d.name for d in dtypes)}")
        score_dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        rows, ids, scores = [], [], []
        for r in range(world_size):
            parts = self._parts(r)
            rows.append(np.fromfile(parts / "rows.bin", dtype=np.int64))
            n = rows[-1].size
            ids.append(np.memmap(parts / "ids.bin", dtype=np.int64, mode="r", shape=(n, k)) if n else None)
            scores.append(np.memmap(parts / "scores.bin", dtype=score_dtype, mode="r", shape=(n, k)) if n else None)
        all_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        source = np.concatenate([np.full(r.size, i) for i, r in enumerate(rows)]) if rows else all_rows
        offset = np.concatenate([np.arange(r.size) for r in rows]) if rows else all_rows
        _, first = np.unique(all_rows, return_index=True)  # sorted row order, each row once
        order = (source[first], offset[first])
        n = first.size

        def chunks():
            for c0 in range(0, n, _CHUNK_ROWS):
                src, off = order[0][c0 : c0 + _CHUNK_ROWS], order[1][c0 : c0 + _CHUNK_ROWS]
                chunk_ids = np.empty((src.size, k), np.int64)
                chunk_scores = np.empty((src.size, k), score_dtype)
                for r in np.unique(src):
                    pick = src == r
                    chunk_ids[pick] = ids[r][off[pick]]
                    chunk_scores[pick] = scores[r][off[pick]]
                yield chunk_ids, chunk_scores

        self.stem.parent.mkdir(parents=True, exist_ok=True)
        written = []
        if "npz" in self.formats:
            npz = self.stem.with_name(self.stem.name + ".npz")  # appended: "model.best" gives "model.best.npz"
            written.append(_write_npz(npz, n, k, num_labels, score_dtype, chunks))
        if "txt" in self.formats:
            txt = self.stem.with_name(self.stem.name + ".txt")
            written.append(_write_txt(txt, n, num_labels, score_dtype, chunks))
        return written


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, pieces) -> None:
    """One ``.npy`` member of an ``.npz``, written piece by piece."""
    with zf.open(name + ".npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        for piece in pieces:
            fh.write(np.ascontiguousarray(piece, dtype=dtype).tobytes())


def _write_npz(path: Path, n: int, k: int, num_labels: int, score_dtype: np.dtype, chunks) -> Path:
    """A CSR matrix as ``scipy.sparse.save_npz`` lays it out (members format, shape, data, indices, indptr)."""
    index_dtype = np.int32 if max(num_labels, n * k) < 2**31 else np.int64
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_member(zf, "format", (), np.dtype("S3"), [np.array(b"csr", dtype="S3")])
        _write_member(zf, "shape", (2,), np.int64, [np.array([n, num_labels])])
        _write_member(zf, "data", (n * k,), score_dtype, (s.ravel() for _, s in chunks()))
        _write_member(zf, "indices", (n * k,), index_dtype, (i.ravel() for i, _ in chunks()))
        _write_member(zf, "indptr", (n + 1,), index_dtype, [np.arange(n + 1, dtype=np.int64) * k])
    return path


def _write_txt(path: Path, n: int, num_labels: int, score_dtype: np.dtype, chunks) -> Path:
    # as many significant digits as read the score back exactly: 9 for float32, 17 for float64
    spec = ".17g" if score_dtype == np.float64 else ".9g"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{n} {num_labels}\n")
        for chunk_ids, chunk_scores in chunks():
            for row_ids, row_scores in zip(chunk_ids, chunk_scores, strict=True):
                fh.write(" ".join(f"{i}:{s:{spec}}" for i, s in zip(row_ids, row_scores.tolist(), strict=True)) + "\n")
    return path


def _checked_prediction(prediction: Any, num_labels: Optional[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of one batch as the part files store them (ids int64; scores float64 where predicted in
    float64, else float32, which holds a 16-bit or float32 score exactly), after checking them: a pair of
    ``[B, k]`` tensors, ``k >= 1``, integer ids in ``[0, num_labels)`` and distinct within a row."""
    if not isinstance(prediction, (tuple, list)) or len(prediction) != 2 or not all(
            isinstance(t, torch.Tensor) for t in prediction):
        raise TypeError("predict_step must return a pair of tensors (scores, ids) for TopKPredictionWriter, got "
                        f"{type(prediction).__name__}")
    scores, ids = prediction
    if ids.dim() != 2 or scores.shape != ids.shape:
        raise ValueError(f"predict_step must return (scores, ids) of one shape [B, k], got {tuple(scores.shape)} "
                         f"and {tuple(ids.shape)}")
    if ids.shape[1] == 0:
        raise ValueError("predict_step returned k = 0 labels per row; the writer needs k >= 1")
    if not scores.is_floating_point():
        raise TypeError(f"the predicted scores must be floating point, got {scores.dtype}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"the predicted label ids must be integers, got {ids.dtype}")
    ids = ids.detach().cpu().long()
    check_id_rows(ids, "predicted label ids", num_labels)
    scores = scores.detach().to(torch.float64 if scores.dtype == torch.float64 else torch.float32).cpu()
    return np.ascontiguousarray(scores.numpy()), np.ascontiguousarray(ids.numpy())


def read_predictions(path: Union[str, os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [rows, k], ids [rows, k])`` of a :class:`TopKPredictionWriter`'s output, each row in descending score
    order, in the order of :meth:`HeadTailOutput.topk`'s ``(scores, ids)``.

    ``path``: the ``.npz`` or the ``.txt`` file, or the path given to the writer without a suffix (its ``.npz`` where
    that exists, else its ``.txt``). Scores come back in the dtype written (float32, or float64 where predicted so;
    from text as float64)."""
    import scipy.sparse as sp  # noqa: PLC0415

    path = Path(path)
    if path.suffix not in (".npz", ".txt"):
        candidates = [path.with_name(path.name + suffix) for suffix in (".npz", ".txt")]
        found = [c for c in candidates if c.exists()]
        if not found:
            raise FileNotFoundError(f"neither {candidates[0]} nor {candidates[1]} exists")
        path = found[0]
    if path.suffix == ".txt":
        return _read_text_predictions(path)
    matrix = sp.load_npz(path)
    counts = np.diff(matrix.indptr)
    k = int(counts.max()) if matrix.shape[0] else 0
    if matrix.shape[0] and int(counts.min()) != k:
        raise ValueError(f"{path}: rows hold {int(counts.min())} to {k} labels; a writer's file holds k in every row")
    return matrix.data.reshape(-1, k), matrix.indices.reshape(-1, k).astype(np.int64)


def _read_text_predictions(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # the header and the rows as the label-file reader takes them (gzip, a byte-order mark, trailing blank lines);
    # the pairs here, where a score may be NaN or infinite
    from .data import _header_and_rows  # noqa: PLC0415 - the data module loads on first use of the reader

    (rows, _), lines = _header_and_rows(path, 2)
    ids: list[list[int]] = []
    scores: list[list[float]] = []
    for lineno, line in lines:
        try:
            pairs = [pair.split(":") for pair in line.split()]
            ids.append([int(i) for i, _ in pairs])
            scores.append([float(v) for _, v in pairs])
        except ValueError as error:
            raise ValueError(f"{path}:{lineno}: expected 'label:score' pairs ({error})") from None
    if len(ids) != rows:
        raise ValueError(f"{path}: the header says {rows} rows, the file has {len(ids)}")
    if len({len(r) for r in ids}) > 1:
        raise ValueError(f"{path}: the rows hold different numbers of labels; a writer's file holds k in every row")
    k = len(ids[0]) if ids else 0
    return np.array(scores, dtype=np.float64).reshape(rows, k), np.array(ids, dtype=np.int64).reshape(rows, k)
