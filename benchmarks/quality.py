"""Quality of the output layers on real data, same encoder, recipe and budget: one run, several models.

    PYTHONPATH=. python3 benchmarks/quality.py DATA [--encoder DIR] [--variants dense,haste,haste-nodst,random]
        [--label-groups groups.npy] [--epochs 10] [--json PATH] [--history PATH] [--commit HASH]

DATA is a raw-text data set folder (``benchmarks/debian_packages.py`` builds Debian-Packages-45K). Every variant
fine-tunes the same encoder (default all-MiniLM-L6-v2, ``examples/train_text.py``) end to end with the package's
default recipe for the same number of epochs, bf16-mixed, batch 256:

- ``dense``: every label in the dense head (``head_ratio=1``);
- ``dense-old``: the same with the recipe the package had before (BCE averaged over the rows with SGD lr 0.05,
  no warm-up or schedule, the layers' default biases), for the record;
- ``haste``: head 5 %, tail in groups of 32 at fan-in 128, FAISS-grouped (``--label-groups``: per-label group ids
  made offline, e.g. by ``benchmarks/quality.py --make-groups``, where FAISS is installed; else grouped in
  ``setup`` with ``--grouping``), with dynamic sparse training (``SparseRegrowthCallback``);
- ``haste-nodst``: the same without pruning and regrowth;
- ``random``: the same as ``haste-nodst`` with random groups;
- ``haste-k64``, ``haste-nodst-k64``, ``random-k64``: the same three at fan-in 64 (with a 384-wide encoder,
  fan-in 128 alone is a third of the dense layer's parameters);
- ``haste-nodst-k32``, ``random-k32``, ``haste-nodst-k16``, ``random-k16``: FAISS against random groups at fan-in 32
  and 16, where a group sees a twelfth and a twenty-fourth of the encoder's features.

Per variant: test P@1/3/5, PSP@1/3/5, nDCG@3/5, the wall time of ``Trainer.fit`` (validation on 2,000 test rows
twice per epoch included: the learning curve), peak GPU memory, output-layer parameters, and the curve
(P@1 on those rows, a fixed random sample of the test set, against the step). ``--plot PATH`` draws the curves
of a ``--json`` file (matplotlib).
``--make-groups OUT`` writes the FAISS grouping of the data set's labels (PIFA embeddings from the encoder's
mean-pooled outputs, before any training) and exits: run it where FAISS is installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared history file and device description
import train_text  # noqa: E402 - the example's model, datamodule and recipe

C.hide_benchmarks_from_imports()

from lightning_haste.data import XMCData  # noqa: E402

CURVE_ROWS = 2000
VARIANTS = {
    "dense": dict(output="dense"),
    "dense-old": dict(output="dense", loss_reduction="batchmean", warmup=0.0, lr_schedule="constant",
                      output_bias="default"),
    "haste": dict(output="haste", dst=True, grouping="faiss-greedy"),
    "haste-nodst": dict(output="haste", grouping="faiss-greedy"),
    "random": dict(output="haste", grouping="random", label_groups=None),
    "haste-k64": dict(output="haste", dst=True, grouping="faiss-greedy", fan_in=64),
    "haste-nodst-k64": dict(output="haste", grouping="faiss-greedy", fan_in=64),
    "random-k64": dict(output="haste", grouping="random", label_groups=None, fan_in=64),
    "haste-nodst-k32": dict(output="haste", grouping="faiss-greedy", fan_in=32),
    "random-k32": dict(output="haste", grouping="random", label_groups=None, fan_in=32),
    "haste-nodst-k16": dict(output="haste", grouping="faiss-greedy", fan_in=16),
    "random-k16": dict(output="haste", grouping="random", label_groups=None, fan_in=16),
}
METRICS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5", "nDCG@3", "nDCG@5")


class Curve(Callback):
    """P@1 of every validation run against the global step (read after the module has logged it)."""

    def __init__(self) -> None:
        self.points: list[tuple[int, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get("val/P@1")
        if value is not None:
            self.points.append((int(trainer.global_step), float(value)))


def run_variant(name: str, base: argparse.Namespace, train: XMCData, test: XMCData) -> dict:
    settings = dict(VARIANTS[name])
    args = argparse.Namespace(**vars(base))
    # every model trains on the whole training split; the curve's validation rows are test rows (below), which
    # no choice is made from (the last model is the one tested)
    args.val_fraction = 0.0
    for key, value in settings.items():
        setattr(args, key, value)
    if settings.get("grouping") == "random":
        args.label_groups = None
    seed_everything(args.seed)
    model, dm, callbacks = train_text.build(args, train, test)
    # the curve's rows: a fixed random sample of the test set (the files are in package-name order)
    rows = np.sort(np.random.default_rng(0).choice(len(test), size=min(CURVE_ROWS, len(test)), replace=False))
    dm.val_data = XMCData(test.features[rows], test.labels[rows], texts=[test.texts[i] for i in rows])
    curve = Curve()
    trainer = Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, max_epochs=args.epochs,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[*callbacks, curve], val_check_interval=0.5,
                      num_sanity_val_steps=0)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.fit(model, dm)
    fit_seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    results = trainer.test(model, dm, verbose=False)[0]
    row = {
        "variant": name, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()},
        "epochs": args.epochs, "steps": int(trainer.global_step), "fit_seconds": fit_seconds,
        "peak_gpu_bytes": peak, "output_parameters": int(sum(p.numel() for p in model.output.parameters())),
        "curve": curve.points, **{m: float(results[f"test/{m}"]) for m in METRICS if f"test/{m}" in results},
    }
    del model, trainer
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def make_groups(args: argparse.Namespace, out: Path) -> None:
    """FAISS grouping (faiss-greedy) of the tail labels on PIFA embeddings from the untrained encoder."""
    from lightning_haste.grouping import group_labels, label_embeddings_from_features, split_head_tail  # noqa: PLC0415

    train, _ = train_text.read_splits(args)
    features = train_text.pooled_embeddings(train.texts, args.encoder or train_text.default_encoder(), args.max_length)
    freq = train.label_frequencies()
    _, tail = split_head_tail(freq, args.head_ratio, args.group_size)
    emb = label_embeddings_from_features(features, train.labels, seed=args.seed)
    grouping = group_labels(emb[tail], args.group_size, method="faiss-greedy", seed=args.seed)
    np.save(out, grouping.for_labels(tail, len(freq)))
    print(f"wrote {out}: {len(tail)} tail labels in groups of {args.group_size}")


def plot(json_path: Path, out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    rows = [json.loads(line) for line in json_path.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        if row.get("curve"):
            steps, values = zip(*row["curve"], strict=True)
            ax.plot(steps, values, marker="o", markersize=3, label=row["variant"])
    ax.set_xlabel("optimizer step (batch 256)")
    ax.set_ylabel(f"P@1, {CURVE_ROWS} random test rows")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--variants", default="dense,haste,haste-nodst,random")
    parser.add_argument("--json")
    parser.add_argument("--history", default=str(C.HISTORY))
    parser.add_argument("--commit")
    parser.add_argument("--plot", type=Path, help="draw the curves of --json into this file and exit")
    parser.add_argument("--make-groups", type=Path, help="write the FAISS grouping to this .npy and exit")
    own, rest = parser.parse_known_args()
    if own.plot is not None:
        plot(Path(own.json), own.plot)
        return
    args = train_text.arguments(rest)
    if own.make_groups is not None:
        make_groups(args, own.make_groups)
        return
    names = own.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    torch.set_float32_matmul_precision("high")
    train, test = train_text.read_splits(args)
    device = C.device_short_name() if torch.cuda.is_available() else "cpu"
    commit = C.resolve_commit(own.commit)
    rows = []
    for name in names:
        row = run_variant(name, args, train, test)
        rows.append(row)
        C.report_row(row, own.json)
    print("\n| variant | P@1 | P@3 | P@5 | PSP@1 | PSP@3 | PSP@5 | nDCG@5 | fit s | peak GiB | output params |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = "-" if r["peak_gpu_bytes"] is None else f"{r['peak_gpu_bytes'] / 2**30:.2f}"
        print(f"| {r['variant']} | " + " | ".join(f"{r.get(m, float('nan')):.4f}" for m in METRICS if m != "nDCG@3")
              + f" | {r['fit_seconds']:.0f} | {peak} | {r['output_parameters']:,} |")
    # the history's "ms" column holds each metric's value here (fit_seconds in seconds)
    written = C.append_history(own.history, [(r["variant"], m, r[m]) for r in rows for m in (*METRICS, "fit_seconds")
                                             if m in r], script="quality.py", device=device, commit=commit)
    print(f"{written} rows appended to {own.history}" if written else "")


if __name__ == "__main__":
    main()
