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
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["TopKPredictionWriter", "FORMATS", "read_predictions"]

#: The output formats: ``"npz"`` (``scipy.sparse.load_npz`` reads it: a ``[rows, num_labels]`` CSR matrix of
#: float32 scores, each row's k labels in descending score order) and ``"txt"`` (header ``rows num_labels``, then
#: ``label:score`` pairs per row, the format of ``lightning_haste.data.read_label_matrix``).
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
        self.written: list[Path] = []

    # -- per process --------------------------------------------------------------------------------
    def _parts(self, rank: int) -> Path:
        return self.stem.parent / f".{self.stem.name}.parts" / f"rank{rank}"

    def on_predict_epoch_start(self, trainer, pl_module) -> None:
        parts = self._parts(trainer.global_rank)
        if parts.exists():
            shutil.rmtree(parts)
        parts.mkdir(parents=True)
        self._files = {name: open(parts / f"{name}.bin", "wb") for name in ("rows", "ids", "scores")}
        self._k = None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        scores, ids = prediction
        if ids.dim() != 2 or scores.shape != ids.shape:
            raise ValueError(f"predict_step must return (scores, ids) of one shape [B, k], got {tuple(scores.shape)} "
                             f"and {tuple(ids.shape)}")
        if self._k is None:
            self._k = int(ids.shape[1])
        elif ids.shape[1] != self._k:
            raise ValueError(f"every batch must predict the same k, got {ids.shape[1]} after {self._k}")
        index = batch.get("index") if isinstance(batch, dict) else None
        rows = index.cpu().numpy() if index is not None else np.asarray(batch_indices)
        self._files["rows"].write(np.ascontiguousarray(rows, dtype=np.int64).tobytes())
        self._files["ids"].write(ids.detach().cpu().numpy().astype(np.int64).tobytes())
        self._files["scores"].write(scores.detach().float().cpu().numpy().astype(np.float32).tobytes())

    def on_predict_epoch_end(self, trainer, pl_module) -> None:
        for fh in self._files.values():
            fh.close()
        (self._parts(trainer.global_rank) / "k").write_text(str(self._k or 0))
        trainer.strategy.barrier("TopKPredictionWriter")
        if trainer.is_global_zero:
            num_labels = int(pl_module.output.num_labels)
            self.written = self._merge(trainer.world_size, num_labels)
            shutil.rmtree(self.stem.parent / f".{self.stem.name}.parts", ignore_errors=True)
        trainer.strategy.barrier("TopKPredictionWriter done")

    # -- the merge (first process) ------------------------------------------------------------------
    def _merge(self, world_size: int, num_labels: int) -> list[Path]:
        ks = {int((self._parts(r) / "k").read_text()) for r in range(world_size)} - {0}
        if len(ks) > 1:
            raise ValueError(f"the processes predicted different k: {sorted(ks)}")
        k = ks.pop() if ks else 0
        rows, ids, scores = [], [], []
        for r in range(world_size):
            parts = self._parts(r)
            rows.append(np.fromfile(parts / "rows.bin", dtype=np.int64))
            n = rows[-1].size
            ids.append(np.memmap(parts / "ids.bin", dtype=np.int64, mode="r", shape=(n, k)) if n else None)
            scores.append(np.memmap(parts / "scores.bin", dtype=np.float32, mode="r", shape=(n, k)) if n else None)
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
                chunk_scores = np.empty((src.size, k), np.float32)
                for r in np.unique(src):
                    pick = src == r
                    chunk_ids[pick] = ids[r][off[pick]]
                    chunk_scores[pick] = scores[r][off[pick]]
                yield chunk_ids, chunk_scores

        self.stem.parent.mkdir(parents=True, exist_ok=True)
        written = []
        if "npz" in self.formats:
            written.append(_write_npz(self.stem.with_suffix(".npz"), n, k, num_labels, chunks))
        if "txt" in self.formats:
            written.append(_write_txt(self.stem.with_suffix(".txt"), n, num_labels, chunks))
        return written


def _write_member(zf: zipfile.ZipFile, name: str, shape: tuple[int, ...], dtype: np.dtype, pieces) -> None:
    """One ``.npy`` member of an ``.npz``, written piece by piece."""
    with zf.open(name + ".npy", "w", force_zip64=True) as fh:
        np.lib.format.write_array_header_2_0(fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                                                 "fortran_order": False, "shape": shape})
        for piece in pieces:
            fh.write(np.ascontiguousarray(piece, dtype=dtype).tobytes())


def _write_npz(path: Path, n: int, k: int, num_labels: int, chunks) -> Path:
    """A CSR matrix as ``scipy.sparse.save_npz`` lays it out (members format, shape, data, indices, indptr)."""
    index_dtype = np.int32 if max(num_labels, n * k) < 2**31 else np.int64
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        _write_member(zf, "format", (), np.dtype("S3"), [np.array(b"csr", dtype="S3")])
        _write_member(zf, "shape", (2,), np.int64, [np.array([n, num_labels])])
        _write_member(zf, "data", (n * k,), np.float32, (s.ravel() for _, s in chunks()))
        _write_member(zf, "indices", (n * k,), index_dtype, (i.ravel() for i, _ in chunks()))
        _write_member(zf, "indptr", (n + 1,), index_dtype, [np.arange(n + 1, dtype=np.int64) * k])
    return path


def _write_txt(path: Path, n: int, num_labels: int, chunks) -> Path:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{n} {num_labels}\n")
        for chunk_ids, chunk_scores in chunks():
            for row_ids, row_scores in zip(chunk_ids, chunk_scores, strict=True):
                fh.write(" ".join(f"{i}:{s:.6g}" for i, s in zip(row_ids, row_scores, strict=True)) + "\n")
    return path


def read_predictions(path: Union[str, os.PathLike]) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [rows, k], scores [rows, k])`` from a writer's ``.npz`` (each row in descending score order)."""
    import scipy.sparse as sp  # noqa: PLC0415

    matrix = sp.load_npz(path)
    k = int(np.diff(matrix.indptr).max()) if matrix.shape[0] else 0
    return matrix.indices.reshape(-1, k).astype(np.int64), matrix.data.reshape(-1, k)

