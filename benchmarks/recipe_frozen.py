"""Training recipes compared on a frozen encoder: the output layer alone, on the encoder's pooled outputs (CPU).

    python3 benchmarks/recipe_frozen.py DATA [--encoder DIR] [--cache DIR] [--epochs 3] [--recipes old,sum,...]

DATA is a raw-text data set folder (``benchmarks/debian_packages.py``). The untrained encoder (default
all-MiniLM-L6-v2, mean-pooled, 32 tokens) embeds every text once (cached as ``.npy`` in ``--cache``); then a dense
output layer (``head_ratio=1``) is trained on those fixed embeddings with each recipe, batch 256, and tested:
a fast way to see how the loss reduction, the learning rate, the schedule and the bias initialisation act on the
output layer, which the encoder's optimizer (AdamW, insensitive to the loss's scale) does not see. Recipes:

- ``old``: BCE averaged over the rows, SGD lr 0.05, constant, default biases (the package's earlier default);
- ``sum``: BCE summed over all entries, otherwise as ``old``;
- ``sum-cosine``: ``sum`` with a 5 % warm-up and a cosine schedule;
- ``default``: ``sum-cosine`` with biases from the label prior (the package's default);
- ``default-lr0.02``, ``default-lr0.15``: the default at another output-layer learning rate;
- ``haste-k128``, ``haste-k32``, ``haste-k16``: the default recipe on a HASTE layer (head 5 %, groups of 32, no
  DST) at that fan-in, grouped by ``--label-groups`` (e.g. ``benchmarks/quality.py --make-groups``: FAISS on PIFA
  embeddings of the same untrained encoder); ``random-k128``, ``random-k32``, ``random-k16``: the same with random
  groups. On a frozen encoder the groups' input features cannot adapt to the groups: how much the grouping is
  worth, with nothing to compensate for it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared result reporting
import train_text  # noqa: E402 - the example's data reading and pooling

from lightning_haste import HasteXMCModule  # noqa: E402
from lightning_haste.data import XMCData, XMCDataModule  # noqa: E402

OLD = dict(loss_reduction="batchmean", warmup=0.0, lr_schedule="constant", output_bias="default")
RECIPES = {
    "old": OLD,
    "sum": dict(OLD, loss_reduction="sum"),
    "sum-cosine": dict(output_bias="default"),
    "default": {},
    "default-lr0.02": dict(output_lr=0.02),
    "default-lr0.15": dict(output_lr=0.15),
    **{f"{kind}-k{k}": dict(head_ratio=0.05, fan_in=k, group_size=32, grouping="random" if kind == "random" else None,
                            label_groups=kind == "haste")
       for k in (128, 32, 16) for kind in ("haste", "random")},
}
METRICS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")


class OutputOnly(HasteXMCModule, LightningModule):
    def __init__(self, in_features: int, **kw) -> None:
        super().__init__()
        self.configure_haste(in_features=in_features, **{"head_ratio": 1.0, "grouping": None, **kw})


def embeddings(args: argparse.Namespace, cache: str, split: str, data: XMCData) -> np.ndarray:
    path = Path(cache) / f"{split}_{args.max_length}.npy"
    if path.exists():
        return np.load(path)
    start = time.perf_counter()
    x = train_text.pooled_embeddings(data.texts, args.encoder or train_text.default_encoder(), args.max_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, x)
    print(f"embedded {len(x)} {split} texts in {time.perf_counter() - start:.0f} s -> {path}", flush=True)
    return x


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--cache", default="embeddings")
    parser.add_argument("--json")
    own, rest = parser.parse_known_args()
    args = train_text.arguments(rest)
    epochs = args.epochs if "--epochs" in rest else 3
    train, test = train_text.read_splits(args)
    xtr, xte = embeddings(args, own.cache, "trn", train), embeddings(args, own.cache, "tst", test)
    for name in own.recipes.split(","):
        seed_everything(args.seed)
        dm = XMCDataModule(XMCData(xtr, train.labels), test=XMCData(xte, test.labels), batch_size=args.batch_size)
        settings = dict(RECIPES[name])
        if settings.get("label_groups"):
            if args.label_groups is None:
                raise SystemExit(f"{name} needs --label-groups")
            settings["label_groups"] = np.load(args.label_groups)
        else:
            settings.pop("label_groups", None)
        model = OutputOnly(xtr.shape[1], **settings)
        start = time.perf_counter()
        trainer = Trainer(accelerator=args.accelerator, max_epochs=epochs, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, dm)
        results = trainer.test(model, dm, verbose=False)[0]
        params = sum(p.numel() for p in model.output.parameters())
        row = {"recipe": name, "settings": RECIPES[name], "epochs": epochs, "output_parameters": params,
               "seconds": time.perf_counter() - start,
               **{m: float(results[f"test/{m}"]) for m in METRICS}}
        C.report_row(row, own.json)


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
