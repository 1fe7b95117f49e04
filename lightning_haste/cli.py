"""``haste-xmc``: LightningCLI for HASTE extreme multi-label training (fit / validate / test / predict).

    haste-xmc fit --config examples/configs/synthetic.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from lightning.pytorch import LightningModule
from torch import nn

from .module import HasteXMCModule

__all__ = ["HasteXMC", "main"]


class HasteXMC(HasteXMCModule, LightningModule):
    """A ready model: an optional one-layer encoder (``hidden`` units, ReLU) on the data's features, then the
    HASTE output layer. ``hidden=None`` feeds the features (e.g. bag-of-words) straight to the output layer;
    ``head_ratio=1.0`` makes the whole output layer dense (the baseline). The other settings are
    :meth:`HasteXMCModule.configure_haste`'s; ``encoder_lr`` defaults to 2e-3, for the small encoder trained from
    scratch."""

    def __init__(
        self,
        hidden: Optional[int] = 256,
        head_ratio: float = 0.05,
        fan_in: int = 64,
        group_size: int = 16,
        grouping: Optional[str] = "balanced-kmeans",
        loss: str = "bce",
        loss_reduction: str = "sum",
        dropout: float = 0.0,
        output_bias: str = "prior",
        k: Sequence[int] = (1, 3, 5),
        psp_a: float = 0.55,
        psp_b: float = 1.5,
        encoder_lr: float = 2e-3,
        output_lr: float = 0.05,
        output_momentum: float = 0.9,
        output_weight_decay: float = 1e-4,
        warmup: float = 0.05,
        lr_schedule: str = "cosine",
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hidden = hidden
        self.encoder: Optional[nn.Module] = None
        self.configure_haste(
            in_features=hidden, head_ratio=head_ratio, fan_in=fan_in, group_size=group_size, grouping=grouping,
            loss=loss, loss_reduction=loss_reduction, dropout=dropout, output_bias=output_bias, k=k, psp_a=psp_a,
            psp_b=psp_b, encoder_lr=encoder_lr, output_lr=output_lr, output_momentum=output_momentum,
            output_weight_decay=output_weight_decay, warmup=warmup, lr_schedule=lr_schedule, seed=seed,
        )

    def setup(self, stage: str) -> None:
        if self.hidden is not None and self.encoder is None:
            self.encoder = nn.Sequential(nn.Linear(self.trainer.datamodule.num_features, self.hidden), nn.ReLU())
        super().setup(stage)

    def encode(self, batch):
        features = super().encode(batch)
        return features if self.encoder is None else self.encoder(features)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``haste-xmc`` console script."""
    from lightning.pytorch.cli import LightningCLI  # noqa: PLC0415 - needs jsonargparse, only for the CLI

    from .data import XMCDataModule  # noqa: PLC0415

    LightningCLI(HasteXMC, XMCDataModule, subclass_mode_data=True, args=args,
                 save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
