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
  worth, with nothing to compensate for it;
- ``haste-informed-k32``, ``random-informed-k32`` (and ``-k16``): the same, but each group's fan-in features are
  chosen from its labels instead of at random: the features with the largest mean squared z-score
  ``((mean of the label's positive rows - mean of all rows) / std)^2`` over the group's labels, ``fan_in / 8`` from
  each residue class mod 8 (as the kernels' balanced draw). Grouping can only matter through what a group reads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared result reporting
import train_text  # noqa: E402 - the example's data reading and pooling

C.hide_benchmarks_from_imports()

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
    **{f"{kind}{'-informed' if informed else ''}-k{k}": dict(
        head_ratio=0.05, fan_in=k, group_size=32, grouping="random" if kind == "random" else None,
        label_groups=kind == "haste", informed=informed)
       for k, informed in ((128, False), (32, False), (16, False), (32, True), (16, True))
       for kind in ("haste", "random")},
}
METRICS = ("P@1", "P@3", "P@5", "PSP@1", "PSP@3", "PSP@5")


class OutputOnly(HasteXMCModule, LightningModule):
    def __init__(self, in_features: int, **kw) -> None:
        super().__init__()
        self.configure_haste(in_features=in_features, **{"head_ratio": 1.0, "grouping": None, **kw})


def informed_group_index(x: np.ndarray, labels, tail_ids: np.ndarray, group_size: int, fan_in: int) -> torch.Tensor:
    """Each group's ``fan_in`` features: the largest mean squared z-score of its labels' mean rows, ``fan_in / 8``
    per residue class mod 8, in the kernels' bank-interleaved order. ``tail_ids``: the label id at each tail
    position (-1 for padding)."""
    from lightning_haste.gsfi import bank_interleaved_order  # noqa: PLC0415

    mu, sd = x.mean(0), x.std(0) + 1e-6
    csc = labels.tocsc()
    counts = np.diff(csc.indptr)
    means = np.asarray(csc.T @ x) / np.maximum(counts, 1)[:, None]
    z2 = ((means - mu) / sd) ** 2 * (counts[:, None] > 0)
    width = x.shape[1]
    groups = len(tail_ids) // group_size
    index = np.empty((groups, fan_in), np.int64)
    for g in range(groups):
        ids = tail_ids[g * group_size : (g + 1) * group_size]
        score = z2[ids[ids >= 0]].mean(0)
        chosen = [cls[np.argsort(-score[cls], kind="stable")[: fan_in // 8]]
                  for cls in (np.arange(r, width, 8) for r in range(8))]
        index[g] = np.sort(np.concatenate(chosen))
    t = torch.from_numpy(index)
    return t.gather(1, bank_interleaved_order(t)).to(torch.int32)


class InformedIndex(Callback):
    """Sets the tail's ``group_index`` from :func:`informed_group_index` on the datamodule's training rows when
    the fit starts."""

    def on_fit_start(self, trainer, pl_module) -> None:
        out, data = pl_module.output, trainer.datamodule.train_data
        tail, perm = out.tail, out.label_permutation.cpu().numpy()
        tail_ids = np.full(tail.num_groups * tail.group_size, -1)
        tail_ids[: out.num_tail_labels] = perm[out.num_head_labels :]
        index = informed_group_index(np.asarray(data.features, np.float32), data.labels, tail_ids, tail.group_size,
                                     tail.fan_in)
        with torch.no_grad():
            tail.group_index.copy_(index)
        tail.check_group_index(force=True)


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
        callbacks = [InformedIndex()] if settings.pop("informed", False) else []
        model = OutputOnly(xtr.shape[1], **settings)
        start = time.perf_counter()
        trainer = Trainer(accelerator=args.accelerator, max_epochs=epochs, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          callbacks=callbacks)
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
