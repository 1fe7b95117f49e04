"""Train HASTE on an Extreme Classification Repository bag-of-words data set folder.

    python examples/train_bow.py PATH/TO/Eurlex-4K [--steps 2000] [--fan-in 128] [--group-size 32]

The folder holds ``train.txt`` and ``test.txt`` in the repository's sparse format (header ``N F L``, lines
``l1,l2 f:v f:v``) and optionally ``filter_labels_test.txt``. Same code path as the main job; prints the
test P@k, nDCG@k and PSP@k.
"""

from __future__ import annotations

import argparse

import lightning as L

from lightning_haste import SparseRegrowthCallback
from lightning_haste.cli import HasteXMC
from lightning_haste.data import BowXMCDataModule, XMCFormatError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=0, help="encoder width (0: features straight to the output)")
    parser.add_argument("--head-ratio", type=float, default=0.05)
    parser.add_argument("--fan-in", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--grouping", default="faiss-greedy")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    L.seed_everything(args.seed, verbose=False)
    try:
        dm = BowXMCDataModule(args.directory, batch_size=args.batch_size)
    except (OSError, XMCFormatError) as error:  # a missing folder or file, a malformed file: one line, no traceback
        parser.error(str(error))
    model = HasteXMC(hidden=args.hidden or None, head_ratio=args.head_ratio, fan_in=args.fan_in,
                     group_size=args.group_size, grouping=args.grouping, seed=args.seed)
    trainer = L.Trainer(accelerator=args.accelerator, max_steps=args.steps, logger=False, enable_checkpointing=False,
                        callbacks=[SparseRegrowthCallback(interval=max(1, args.steps // 20), seed=args.seed)])
    trainer.fit(model, dm)
    results = trainer.test(model, dm, verbose=False)[0]
    print(" ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in sorted(results.items())))


if __name__ == "__main__":
    main()
