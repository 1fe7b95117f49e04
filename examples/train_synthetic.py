"""The main job: train HASTE and a dense output layer the same way on the synthetic default data (CPU).

    python examples/train_synthetic.py [--steps 600] [--plot p_at_k.png]

Both models share the encoder (Linear + ReLU), loss (BCE on sparse targets), optimizers and data; HASTE's
output layer is a dense head over the 5 % most frequent labels plus a group-shared fixed fan-in tail with
dynamic sparse training (SparseRegrowthCallback); the baseline is one dense layer over all labels.
Prints P@k, nDCG@k and PSP@k on the test split for both and saves a plot of P@k over training.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
from lightning.pytorch import Callback

from lightning_haste import SparseRegrowthCallback
from lightning_haste.cli import HasteXMC
from lightning_haste.data import SyntheticXMCDataModule


class History(Callback):
    """Validation metrics after every validation run, with the optimizer step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        row = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        row["step"] = trainer.global_step
        self.rows.append(row)


def train(name: str, model: HasteXMC, dm, steps: int, callbacks: list) -> tuple[dict, History, float, int]:
    history = History()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, val_check_interval=max(1, steps // 6),
        check_val_every_n_epoch=None, logger=False, enable_checkpointing=False, enable_model_summary=False,
        callbacks=[*callbacks, history],
    )
    print(f"training {name} ...", flush=True)
    start = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    results = trainer.test(model, dm, verbose=False)[0]
    return results, history, seconds, sum(p.numel() for p in model.output.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--plot", default="p_at_k.png")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    L.seed_everything(args.seed, verbose=False)
    dm = SyntheticXMCDataModule(seed=args.seed)
    print(f"data: {len(dm.train_data)} train / {len(dm.test_data)} test rows, {dm.num_features} features, "
          f"{dm.num_labels} labels, {int((dm.label_frequencies <= 5).sum())} labels with <= 5 positives")
    runs = {}
    L.seed_everything(args.seed, verbose=False)
    runs["HASTE"] = train(
        "HASTE (head 5 %, fan-in 64, groups of 16, DST)",
        HasteXMC(hidden=256, head_ratio=0.05, fan_in=64, group_size=16, grouping="balanced-kmeans", seed=args.seed),
        dm, args.steps, [SparseRegrowthCallback(interval=50, prune_fraction=0.2, end=0.66, seed=args.seed)],
    )
    L.seed_everything(args.seed, verbose=False)
    runs["dense"] = train("dense output layer", HasteXMC(hidden=256, head_ratio=1.0, grouping=None, seed=args.seed),
                          dm, args.steps, [])

    keys = ["P@1", "P@3", "P@5", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5"]
    print()
    print(f"{'output layer':<14}" + "".join(f"{k:>8}" for k in keys) + f"{'output params':>15}{'train s':>9}")
    for name, (results, _, seconds, params) in runs.items():
        print(f"{name:<14}" + "".join(f"{results['test/' + k]:8.3f}" for k in keys) + f"{params:>15,}{seconds:9.1f}")

    try:
        import matplotlib  # noqa: PLC0415 - optional: the results print without it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, k in zip(axes, ("P@1", "P@3", "P@5"), strict=True):
        for name, (_, history, _, _) in runs.items():
            ax.plot([r["step"] for r in history.rows], [r[f"val/{k}"] for r in history.rows], marker="o", label=name)
        ax.set_title(k)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
