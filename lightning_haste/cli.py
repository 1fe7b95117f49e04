"""``haste-xmc``: LightningCLI for HASTE extreme multi-label training (fit / validate / test / predict).

    haste-xmc fit --config examples/configs/synthetic.yaml
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from lightning.pytorch import LightningModule
from torch import nn

from .module import HasteXMCModule

__all__ = ["HasteXMC", "main"]


class HasteXMC(HasteXMCModule, LightningModule):
    """A ready model: an optional one-layer encoder (``hidden`` units, ReLU) on the data's features, then the
    HASTE output layer. ``hidden=None`` feeds the features (e.g. bag-of-words) straight to the output layer;
    ``head_ratio=1.0`` makes the whole output layer dense (the baseline). The other settings are
    :meth:`HasteXMCModule.configure_haste`'s; ``encoder_lr`` defaults to 2e-3, for the small encoder trained from
    scratch. ``num_features``: the width of the data's features (default: the datamodule's ``num_features``;
    needed to train from plain dataloaders, with ``label_frequencies`` and ``num_train``)."""

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
        num_features: Optional[int] = None,
        label_frequencies: Optional[Any] = None,
        num_train: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["label_frequencies"])
        if num_features is not None and (isinstance(num_features, bool) or not isinstance(num_features, int)
                                         or num_features < 1):
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        self.hidden = hidden
        self.num_features = num_features
        self.encoder: Optional[nn.Module] = None
        self.configure_haste(
            in_features=hidden if hidden is not None else num_features, head_ratio=head_ratio, fan_in=fan_in,
            group_size=group_size, grouping=grouping,
            loss=loss, loss_reduction=loss_reduction, dropout=dropout, output_bias=output_bias, k=k, psp_a=psp_a,
            psp_b=psp_b, encoder_lr=encoder_lr, output_lr=output_lr, output_momentum=output_momentum,
            output_weight_decay=output_weight_decay, warmup=warmup, lr_schedule=lr_schedule, seed=seed,
            label_frequencies=label_frequencies, num_train=num_train,
        )

    def setup(self, stage: str) -> None:
        if self.hidden is not None and self.encoder is None:
            trainer = getattr(self, "_trainer", None)
            datamodule = trainer.datamodule if trainer is not None else None
            num_features = self.num_features or getattr(datamodule, "num_features", None)
            if num_features is None:
                raise ValueError("HasteXMC builds its encoder from the width of the data's features: give the Trainer "
                                 "a datamodule with num_features (e.g. XMCDataModule) or pass num_features=")
            self.encoder = nn.Sequential(nn.Linear(num_features, self.hidden), nn.ReLU())
        super().setup(stage)

    def on_load_checkpoint(self, checkpoint) -> None:
        # the encoder is built in setup from the data's feature count: rebuild it from the saved weights' shape
        weight = checkpoint.get("state_dict", {}).get("encoder.0.weight")
        if self.hidden is not None and self.encoder is None and weight is not None:
            self.encoder = nn.Sequential(nn.Linear(weight.shape[1], self.hidden), nn.ReLU())
        super().on_load_checkpoint(checkpoint)

    def encode(self, batch):
        features = super().encode(batch)
        return features if self.encoder is None else self.encoder(features)


def _metrics_table(metrics: dict[str, Any], prefix: str) -> str:
    rows = sorted((k[len(prefix):], float(v)) for k, v in metrics.items() if k.startswith(prefix))
    if not rows:
        return ""
    width = max(len(name) for name, _ in rows)
    return "\n".join([f"{'metric':<{width}}  value"] + [f"{name:<{width}}  {value:.4f}" for name, value in rows])


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the ``haste-xmc`` console script. ``fit`` ends with a table of the final validation metrics;
    ``predict`` writes the top-k of every row to ``--predictions`` (``.npz`` and ``.txt``, original label ids,
    :class:`~lightning_haste.prediction.TopKPredictionWriter`)."""
    from lightning.pytorch.cli import LightningCLI  # noqa: PLC0415 - needs jsonargparse, only for the CLI

    from .data import XMCDataModule  # noqa: PLC0415
    from .prediction import TopKPredictionWriter  # noqa: PLC0415

    class HasteCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.add_argument("--predictions", default="predictions",
                                help="predict: where the top-k go (<path>.npz and <path>.txt)")

        def before_predict(self) -> None:
            path = self.config[self.subcommand].get("predictions", "predictions")
            self.prediction_writer = TopKPredictionWriter(path)
            self.trainer.callbacks.append(self.prediction_writer)
            # the writer streams the top-k to disk: Lightning's own list of every batch's predictions (kept by
            # default in one process) would hold them all in memory besides
            self.config_init[self.subcommand]["return_predictions"] = False

        def after_predict(self) -> None:
            for written in self.prediction_writer.written:
                print(f"wrote {written}")

        def after_fit(self) -> None:
            if self.trainer.is_global_zero:
                table = _metrics_table(self.trainer.callback_metrics, "val/")
                step, last = getattr(self.model, "haste_validated_at_step", None), self.trainer.global_step
                when = f" (step {step})" if step == last else f" (validated at step {step}; training ended at {last})"
                print(f"final validation metrics{when}:\n" + table if table and step is not None
                      else "no validation ran")

    from .data import XMCFormatError  # noqa: PLC0415

    try:
        HasteCLI(HasteXMC, XMCDataModule, subclass_mode_data=True, args=args, save_config_kwargs={"overwrite": True})
    except Exception as error:  # noqa: BLE001 - re-raised unless it is about the user's data files
        # the user's data, not a bug: one line, no traceback (the argument parser wraps the datamodule's error)
        cause: Optional[BaseException] = error
        while cause is not None and not isinstance(cause, (FileNotFoundError, XMCFormatError)):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise SystemExit(f"haste-xmc: {cause}") from None


if __name__ == "__main__":
    main()
