"""Lightning callback that drives dynamic sparse training of every group-shared fixed fan-in layer."""

from __future__ import annotations

import math
import numbers
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from . import dst
from .gsfi import GroupSharedFanIn

__all__ = ["SparseRegrowthCallback", "prune_fraction_at"]

SCHEDULES = ("cosine", "linear", "constant")


def prune_fraction_at(step: int, end_step: float, initial: float, schedule: str) -> float:
    """The pruning fraction at optimizer step ``step``: ``initial`` decayed to 0 at ``end_step``.

    ``cosine``: ``initial * (1 + cos(pi * step / end_step)) / 2``; ``linear``: ``initial * (1 - step /
    end_step)``; ``constant``: ``initial``. 0 from ``end_step`` on.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if end_step <= 0 or step >= end_step:
        return 0.0
    progress = step / end_step
    if schedule == "cosine":
        return initial * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return initial * (1.0 - progress)
    return initial


class SparseRegrowthCallback(Callback):
    """Prune and regrow every :class:`~lightning_haste.GroupSharedFanIn` of the module during training.

    Every ``interval`` optimizer steps (gradient accumulation counts optimizer steps, not batches),
    until ``end`` x the total number of steps, each layer's slots are rewired with the fraction given by
    ``schedule`` (see :func:`prune_fraction_at`), and the optimizer state of the regrown weights is reset
    to zero in every optimizer. The random draws are keyed (:func:`lightning_haste.dst.rewire_` with ``seed=``):
    each group's depend only on ``(seed, global step, layer, global group id)``, so every DDP rank makes the same
    decisions (their weights are equal after each step), the shards of a label-sharded output layer rewire
    exactly as the whole layer does on one rank (the topology does not depend on the number of ranks), and a run
    resumed from a checkpoint continues exactly like an uninterrupted one.

    Settings are checked when the callback is made, and against every layer when the fit starts (the pruned slots
    must fit outside each group); at a rewire step every layer's index is validated before any layer changes.

    Args:
        interval: optimizer steps between rewires.
        prune_fraction: fraction of each group's slots pruned at step 0 (usually 0.15-0.25).
        end: fraction of the total steps after which the topology is frozen (usually 0.66-0.7).
        schedule: ``"cosine"``, ``"linear"`` or ``"constant"`` decay of the fraction.
        score, init, init_scale: as for :func:`lightning_haste.dst.rewire_`.
        seed: base seed of the rewiring draws.
        log: log per-layer statistics (pruned slots, mean score, fraction of indices changed).
    """

    def __init__(
        self,
        interval: int = 100,
        prune_fraction: float = 0.2,
        end: float = 0.66,
        schedule: str = "cosine",
        score: str = "mean",
        init: str = "zero",
        init_scale: float = 1e-3,
        seed: int = 0,
        log: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(interval, bool) or not isinstance(interval, numbers.Integral) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
        for name, value in (("prune_fraction", prune_fraction), ("end", end)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        dst.check_init_scale(init_scale)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if score not in dst.SCORES:
            raise ValueError(f"score must be one of {dst.SCORES}, got {score!r}")
        if init not in dst.INITS:
            raise ValueError(f"init must be one of {dst.INITS}, got {init!r}")
        self.interval = int(interval)
        self.prune_fraction = float(prune_fraction)
        self.end = float(end)
        self.schedule = schedule
        self.score = score
        self.init = init
        self.init_scale = float(init_scale)
        self.seed = int(seed)
        self.log_stats = log
        self.last_rewire_step = -1
        self.rewires = 0
        self._layers: list[tuple[str, GroupSharedFanIn]] = []

    # -- hooks, named for when they run -------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._layers = [(name, m) for name, m in pl_module.named_modules() if isinstance(m, GroupSharedFanIn)]
        if not self._layers:
            rank_zero_warn("SparseRegrowthCallback: the module has no GroupSharedFanIn layer; it will do nothing")
        for name, layer in self._layers:  # the largest fraction (the first rewire's) must fit every layer
            count = dst.pruned_slot_count(self.prune_fraction, layer.fan_in)
            free = layer.in_features - layer.fan_in
            if count > free:
                raise ValueError(
                    f"SparseRegrowthCallback: prune_fraction={self.prune_fraction} prunes {count} slots per group of "
                    f"layer {name or 'layer'!r}, but only {free} features lie outside a group (in_features="
                    f"{layer.in_features}, fan_in={layer.fan_in}); lower prune_fraction"
                )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps taken so far
        if not self._layers or step == 0 or step % self.interval or step == self.last_rewire_step:
            return
        end_step = self.end * trainer.estimated_stepping_batches
        fraction = prune_fraction_at(step, end_step, self.prune_fraction, self.schedule)
        self.last_rewire_step = step
        if fraction <= 0.0:
            return
        # Every layer's index is read in full before any layer changes: a bad one (e.g. edited through .data)
        # raises with all the layers as they were.
        for _, layer in self._layers:
            layer.check_group_index(force=True)
        self.rewires += 1
        for position, (name, layer) in enumerate(self._layers):
            stats = layer.rewire(
                fraction, score=self.score, init=self.init, init_scale=self.init_scale,
                seed=self._draw_seed(step, position),
            )
            mask = dst.regrown_weight_mask(layer, stats.regrown)
            for optimizer in trainer.optimizers:
                dst.reset_optimizer_state_(optimizer, layer.weight, mask)
            if self.log_stats:
                prefix = f"dst/{name or 'layer'}"
                pl_module.log(f"{prefix}/pruned_slots", float(stats.pruned_slots), on_step=True, on_epoch=False)
                pl_module.log(f"{prefix}/mean_score", stats.mean_score, on_step=True, on_epoch=False)
                pl_module.log(f"{prefix}/changed_fraction", stats.changed_fraction, on_step=True, on_epoch=False)
                pl_module.log(f"{prefix}/prune_fraction", fraction, on_step=True, on_epoch=False)

    def _draw_seed(self, step: int, position: int) -> int:
        return (self.seed * 1_000_003 + step * 9_176 + position * 7_919) % (2**63 - 1)

    # -- checkpointing ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"last_rewire_step": self.last_rewire_step, "rewires": self.rewires, "seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_rewire_step = int(state_dict["last_rewire_step"])
        self.rewires = int(state_dict["rewires"])
        self.seed = int(state_dict.get("seed", self.seed))
