"""``HasteXMCModule``: a LightningModule mixin that trains an extreme multi-label classifier with a HASTE
output layer; subclass it together with ``LightningModule`` and (optionally) give it an encoder."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np
import scipy.sparse as sp
import torch
from torch import Tensor, nn

from ._checks import check_float_tensor, check_positive_int, check_real
from ._reference import accumulation_dtype
from .grouping import group_labels, label_embeddings_from_features, split_head_tail
from .head_tail import FeatureSlice, HeadTailOutput
from .loss import SparseTargets, check_reduction, dense_part, divisor, sparse_targets
from .metrics import NDCGAtK, PrecisionAtK, PSPrecisionAtK, _check_ks

if TYPE_CHECKING:  # pragma: no cover
    from .sharded import ShardedHeadTailOutput

__all__ = [
    "HasteXMCModule", "CombinedOptimizer", "LR_SCHEDULES", "lr_multiplier", "sparse_bce_with_logits",
    "sparse_squared_hinge",
]

#: The learning-rate schedules after the warm-up (:func:`lr_multiplier`).
LR_SCHEDULES = ("cosine", "linear", "constant")


def _positives(logits: Tensor, targets: SparseTargets) -> tuple[Tensor, Tensor]:
    check_float_tensor("logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [rows, labels], got shape {tuple(logits.shape)}")
    rows, labels = sparse_targets(targets, logits.shape[0], logits.shape[1])
    return torch.from_numpy(rows).to(logits.device), torch.from_numpy(labels).to(logits.device)


def sparse_bce_with_logits(logits: Tensor, targets: SparseTargets, reduction: str = "batchmean") -> Tensor:
    """Binary cross-entropy with logits against sparse targets, summed over labels and averaged over rows:
    ``(softplus(z).sum() - z[positives].sum()) / rows``, with no dense target matrix (``reduction="sum"``: not
    divided by the rows, the sum over all entries).

    ``targets`` as :meth:`HeadTailOutput.loss` takes them (a label listed twice in a row counts once). 16-bit
    logits are summed in float32, float32 and float64 in their own dtype. This needs the full logits: the
    training step uses the fused :meth:`HeadTailOutput.loss`, which gives the same value without them.
    """
    divide = divisor(check_reduction(reduction), logits.shape[0])
    rows, cols = _positives(logits, targets)
    z = logits.to(accumulation_dtype(logits.dtype))
    return (dense_part("bce", z).sum() - z[rows, cols].sum()) / divide


def sparse_squared_hinge(logits: Tensor, targets: SparseTargets, reduction: str = "batchmean") -> Tensor:
    """Squared hinge ``sum max(0, 1 - s z)^2`` with ``s = +1`` on positives and ``-1`` elsewhere, summed over labels
    and averaged over rows; targets, precision and ``reduction`` as for :func:`sparse_bce_with_logits`."""
    divide = divisor(check_reduction(reduction), logits.shape[0])
    rows, cols = _positives(logits, targets)
    z = logits.to(accumulation_dtype(logits.dtype))
    pos = z[rows, cols]
    correction = torch.relu(1 - pos).square().sum() - torch.relu(1 + pos).square().sum()
    total = dense_part("squared_hinge", z).sum() + correction
    return total / divide


def _statistics(label_frequencies: Any, num_train: Any) -> dict[str, Any]:
    """The training statistics the output layer and PSP@k are built from (kept, and saved in checkpoints)."""
    return {"label_frequencies": np.asarray(label_frequencies, dtype=np.int64), "num_train": int(num_train)}


_NO_STATISTICS = (
    "the output layer is built from the training label statistics: give the Trainer a datamodule that has "
    "label_frequencies and num_train (e.g. XMCDataModule), or pass label_frequencies= and num_train= (and "
    "in_features=, optionally label_embeddings=) to configure_haste, or load a trained model with "
    "load_from_checkpoint"
)


def _as_array(name: str, value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{name} must be array-like, got {type(value).__name__} ({error})") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
        raise TypeError(f"{name} must hold numbers, got dtype {array.dtype}")
    return array


def _check_given_statistics(
    label_frequencies: Any, num_train: Any, label_embeddings: Any
) -> tuple[Optional[dict[str, Any]], Optional[np.ndarray]]:
    """``configure_haste``'s training statistics, validated: ``(statistics or None, label embeddings or None)``."""
    statistics = None
    if label_frequencies is None:
        if num_train is not None:
            raise ValueError("num_train is given without label_frequencies; pass both (or neither)")
    else:
        freq = _as_array("label_frequencies", label_frequencies)
        if freq.ndim != 1 or freq.size == 0:
            raise ValueError(f"label_frequencies must be 1-D [num_labels] and not empty, got shape {freq.shape}")
        if np.issubdtype(freq.dtype, np.floating) and not (np.isfinite(freq).all() and (freq == np.round(freq)).all()):
            raise ValueError("label_frequencies must be whole counts (training positives per label)")
        if freq.min() < 0:
            raise ValueError(f"label_frequencies must be >= 0, found {freq.min()}")
        if num_train is None:
            raise ValueError(
                "label_frequencies needs num_train (the number of training instances: the prior biases and the "
                "propensities of PSP@k are built from it)"
            )
        if isinstance(num_train, bool) or not isinstance(num_train, numbers.Integral) or num_train < 1:
            raise ValueError(f"num_train must be an integer >= 1, got {num_train!r}")
        if freq.max() > num_train:
            raise ValueError(
                f"label_frequencies has a label with {int(freq.max())} positives, more than num_train={num_train} "
                "training instances"
            )
        statistics = _statistics(freq, num_train)
    embeddings = None
    if label_embeddings is not None:
        embeddings = _as_array("label_embeddings", label_embeddings)
        if embeddings.ndim != 2 or embeddings.shape[1] == 0:
            raise ValueError(f"label_embeddings must be 2-D [num_labels, dim], got shape {embeddings.shape}")
        if not np.isfinite(embeddings).all():
            raise ValueError("label_embeddings must be finite")
        if statistics is not None and len(embeddings) != len(statistics["label_frequencies"]):
            raise ValueError(
                f"label_embeddings has {len(embeddings)} rows for {len(statistics['label_frequencies'])} labels "
                "(label_frequencies)"
            )
    return statistics, embeddings


def _target_labels(targets: SparseTargets) -> Optional[int]:
    """The label count of a matrix of targets (torch sparse or SciPy), None for lists of ids."""
    shape = getattr(targets, "shape", None)
    return int(shape[1]) if shape is not None and len(shape) == 2 else None


def _select_rows(targets: SparseTargets, keep: Tensor) -> SparseTargets:
    """The rows of ``targets`` (per-row ids, torch sparse CSR or SciPy) where the bool mask ``keep`` is set."""
    if isinstance(targets, Tensor) and targets.layout == torch.sparse_csr:
        from .data import _torch_csr  # noqa: PLC0415 - data imports Lightning; the module needs it here only

        crow, col = targets.crow_indices().cpu().numpy(), targets.col_indices().cpu().numpy()
        values = targets.values().cpu()
        if values.dtype == torch.bfloat16:  # (bf16-true precision casts the targets' values; NumPy has no bfloat16)
            values = values.float()
        kept = sp.csr_matrix((values.numpy(), col, crow), shape=tuple(targets.shape))[keep.numpy()]
        return _torch_csr(kept, kept.data)
    if hasattr(targets, "tocsr"):  # SciPy
        return targets.tocsr()[keep.numpy()]
    return [t for t, k in zip(targets, keep.tolist(), strict=True) if k]


def _num_rows(targets: SparseTargets) -> int:
    return int(targets.shape[0]) if hasattr(targets, "shape") else len(targets)


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one, so that Lightning's automatic optimization (gradient accumulation,
    one global step per optimizer step) drives, e.g., AdamW for the encoder and SGD for the output layer."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        params = [p for opt in self.optimizers for group in opt.param_groups for p in group["params"]]
        super().__init__(params, {})
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]

    @property
    def state(self):  # type: ignore[override] - the union of the parts' per-parameter state
        merged: dict = {}
        for opt in getattr(self, "optimizers", []):
            merged.update(opt.state)
        return merged

    @state.setter
    def state(self, value) -> None:  # the base class assigns an empty state; the parts keep theirs
        pass

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        return {"parts": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        for opt, part in zip(self.optimizers, state_dict["parts"], strict=True):
            opt.load_state_dict(part)
        self.param_groups = [group for opt in self.optimizers for group in opt.param_groups]


class HasteXMCModule:
    """Mixin for ``LightningModule``: ``class MyModel(HasteXMCModule, L.LightningModule)``.

    Call :meth:`configure_haste` in ``__init__``. The output layer (:class:`HeadTailOutput`) is built in
    ``setup`` from the training label statistics: the datamodule's (``label_frequencies``, ``num_train``,
    ``num_features``, and for the grouping its ``label_embeddings`` if it has them, else PIFA embeddings from
    ``train_data``), or, to train from plain dataloaders without a datamodule
    (``Trainer.fit(model, train_dataloaders=...)``), those given to :meth:`configure_haste`
    (``label_frequencies``, ``num_train``, ``in_features``, ``label_embeddings``). Override :meth:`encode` to
    turn a batch into features (default: the batch's ``"features"``, for bag-of-words input). Training uses
    BCE with logits (or squared hinge) on sparse targets, fused with the output layer
    (:meth:`HeadTailOutput.loss`: the ``[B, num_labels]`` logits are never formed; override :meth:`haste_loss`
    for a loss of your own on the full logits, the slow path); validation/test log P@k, nDCG@k and PSP@k;
    ``predict_step`` returns top-k ``(scores, label ids)`` in original label ids; :meth:`configure_optimizers`
    gives AdamW to the encoder and SGD with momentum to the output layer (override it to change that).

    Resume: a fit stopped at any step and resumed from its checkpoint continues as the uninterrupted run would,
    bit for bit on CPU, when the training loader is resumable (:class:`~lightning_haste.data.ResumableDataLoader`,
    which :class:`~lightning_haste.data.XMCDataModule` uses): the checkpoint holds the loader's position, the
    optimizers, the learning-rate schedule and :class:`~lightning_haste.SparseRegrowthCallback`'s state, and the
    layer's random draws are seeded. torch's global random state (``dropout``) is not restored.
    """

    #: the output layer; with ``label_sharding`` under DDP, this rank's ``ShardedHeadTailOutput``
    output: Optional[Union[HeadTailOutput, ShardedHeadTailOutput]]

    def configure_haste(
        self,
        *,
        in_features: Optional[int] = None,
        head_ratio: float = 0.05,
        fan_in: int = 64,
        group_size: int = 16,
        head_features: FeatureSlice = None,
        tail_features: FeatureSlice = None,
        grouping: Optional[str] = "balanced-kmeans",
        label_groups: Optional[Any] = None,
        output_bias: str = "prior",
        loss: str = "bce",
        loss_reduction: str = "sum",
        dropout: float = 0.0,
        k: Sequence[int] = (1, 3, 5),
        psp_a: float = 0.55,
        psp_b: float = 1.5,
        encoder_lr: float = 5e-5,
        output_lr: float = 0.05,
        output_momentum: float = 0.9,
        output_weight_decay: float = 1e-4,
        fused_optimizers: Optional[bool] = None,
        warmup: float = 0.05,
        lr_schedule: str = "cosine",
        seed: int = 0,
        label_frequencies: Optional[Any] = None,
        num_train: Optional[int] = None,
        label_embeddings: Optional[Any] = None,
        label_sharding: bool = False,
    ) -> None:
        """Store the output-layer and training settings; the layer itself is built in ``setup``.

        Args:
            in_features: width of :meth:`encode`'s output (default: the datamodule's ``num_features``; needed
                without a datamodule).
            head_ratio, fan_in, group_size, head_features, tail_features: as for :class:`HeadTailOutput`.
            grouping: how the tail labels are grouped (:func:`~lightning_haste.grouping.group_labels` method:
                ``"faiss-greedy"``, ``"balanced-kmeans"`` or ``"random"``), or ``None`` for frequency order.
            label_groups: precomputed per-label group ids ``[num_labels]`` (as :class:`HeadTailOutput` takes them,
                e.g. a FAISS grouping made once offline and saved); when given, ``setup`` uses them and does not
                group (``grouping`` is ignored).
            output_bias: ``"prior"`` (default): every label's bias starts at the log-odds of its training frequency
                (:meth:`HeadTailOutput.init_bias_from_prior_`), so that the first steps are not spent pushing the
                scores of all the negatives down and untrained labels do not fill the top-k; ``"default"``: the
                layers' own initialisation.
            loss: ``"bce"`` (binary cross-entropy with logits) or ``"squared_hinge"``, on sparse targets, computed
                fused with the output layer.
            loss_reduction: ``"sum"`` (default): the loss summed over all ``batch * num_labels`` entries, the
                reduction of the published HASTE recipe, to which its output-layer learning rate (SGD, 0.05)
                belongs: an output weight's step then does not shrink with the batch size. ``"batchmean"``:
                divided by the rows; with SGD this needs an ``output_lr`` ``batch`` times larger for the same
                steps. (AdamW, the encoder's optimizer, is insensitive to the loss's scale.)
            dropout: dropout probability on the output layer's input during training (0: none).
            k: the cut-offs of the validation/test metrics and of ``predict_step``'s top-k (its largest).
            psp_a, psp_b: the propensity constants A and B of PSP@k.
            encoder_lr: AdamW learning rate of the encoder (every parameter outside the output layer); the default
                suits fine-tuning a pretrained transformer (an encoder trained from scratch wants about 1e-3).
            output_lr, output_momentum, output_weight_decay: SGD settings of the output layer.
            fused_optimizers: step AdamW and SGD with their fused kernels (``fused=True``: a few launches per step
                instead of about a dozen per group of parameters, which counts where the host's launching bounds the
                step, as it does when fine-tuning a transformer encoder). ``None`` (default): when every parameter
                is on CUDA. The update rule is the same; the fused kernels' float32 rounding may differ in the last
                bit from the for-each path's.
            warmup: the fraction of the training steps (``Trainer.estimated_stepping_batches``) over which both
                learning rates rise linearly from 0.
            lr_schedule: after the warm-up, ``"cosine"`` (decay to 0 at the last step), ``"linear"`` (to 0) or
                ``"constant"``.
            seed: seed of the grouping and of the output layer's index and initial weights.
            label_frequencies: training positives per label ``[num_labels]`` (whole counts >= 0). Given, the model
                needs no datamodule: ``setup`` builds the output layer from these (and they win over a datamodule's).
                Without them and without a datamodule that has them, ``setup`` raises.
            num_train: the number of training instances, with ``label_frequencies`` (the prior biases and the
                propensities of PSP@k are built from it); at least every label's count.
            label_embeddings: ``[num_labels, dim]`` label embeddings for the grouping (they win over a datamodule's).
                Without a datamodule there are no PIFA embeddings: a ``grouping`` other than ``"random"`` or
                ``None`` needs them (or ``label_groups``).
            label_sharding: under DDP with N ranks, split the output layer's labels over the ranks
                (:class:`~lightning_haste.sharded.ShardedHeadTailOutput`) instead of replicating it: each rank holds
                and updates ``1/N`` of it, the features of the global batch are all-gathered and their gradients
                reduce-scattered, and the layer's parameters are left out of DDP's all-reduce. A step then equals
                one step of the unsharded model on the global batch (every rank's rows): the output layer's
                gradients are the global batch's, and the encoder's too after DDP's average (the loss's gradient
                reaching the encoder is multiplied by N to undo that average). Needs an encoder with trainable
                parameters (DDP refuses a model with none to synchronise); checkpoints hold the whole layer, so
                they load on any number of ranks, sharded or not.
        """
        # every setting checked here, when the model is made, not at the first use deep inside Trainer.fit
        if in_features is not None:
            check_positive_int("in_features", in_features)
        fan_in = check_positive_int("fan_in", fan_in)
        group_size = check_positive_int("group_size", group_size)
        if in_features is not None and fan_in > in_features:
            raise ValueError(f"fan_in={fan_in} exceeds in_features={in_features}")
        check_real("head_ratio", head_ratio, low=0.0, high=1.0)
        for name, value in (("psp_a", psp_a), ("psp_b", psp_b), ("output_weight_decay", output_weight_decay)):
            check_real(name, value, low=0.0)
        check_real("output_momentum", output_momentum, low=0.0, high=1.0, high_open=True)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
        k = _check_ks(k)
        if output_bias not in ("default", "prior"):
            raise ValueError(f"output_bias must be 'default' or 'prior', got {output_bias!r}")
        if loss not in ("bce", "squared_hinge"):
            raise ValueError(f"loss must be 'bce' or 'squared_hinge', got {loss!r}")
        check_reduction(loss_reduction)
        check_real("dropout", dropout, low=0.0, high=1.0, high_open=True)
        check_real("warmup (a fraction of the training steps)", warmup, low=0.0, high=1.0, high_open=True)
        if not isinstance(label_sharding, bool):  # (bool("false") is True)
            raise TypeError(f"label_sharding must be True or False, got {label_sharding!r}")
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
        for name, value in (("encoder_lr", encoder_lr), ("output_lr", output_lr)):
            check_real(name, value, low=0.0, low_open=True)
        if grouping not in (None, "faiss-greedy", "balanced-kmeans", "random"):
            raise ValueError(f"grouping must be None, 'faiss-greedy', 'balanced-kmeans' or 'random', got {grouping!r}")
        if fused_optimizers is not None and not isinstance(fused_optimizers, bool):
            raise TypeError(f"fused_optimizers must be None, True or False, got {fused_optimizers!r}")
        given_statistics, given_embeddings = _check_given_statistics(label_frequencies, num_train, label_embeddings)
        self.haste = dict(
            in_features=in_features, head_ratio=head_ratio, fan_in=fan_in, group_size=group_size,
            head_features=head_features, tail_features=tail_features, grouping=grouping, label_groups=label_groups,
            output_bias=output_bias, loss=loss, loss_reduction=loss_reduction, dropout=dropout, k=tuple(k),
            psp_a=psp_a, psp_b=psp_b, encoder_lr=encoder_lr, output_lr=output_lr, output_momentum=output_momentum,
            output_weight_decay=output_weight_decay, fused_optimizers=fused_optimizers, warmup=warmup,
            lr_schedule=lr_schedule, seed=seed, label_sharding=label_sharding,
        )
        self.output_dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.output = None
        self.haste_metrics = None
        #: the training statistics the output layer and PSP@k are built from (saved in checkpoints)
        self.haste_statistics: Optional[dict[str, Any]] = given_statistics
        self.haste_statistics_given = given_statistics is not None
        self.haste_label_embeddings: Optional[np.ndarray] = given_embeddings

    # -- building ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        cfg = self.haste
        given = getattr(self, "haste_statistics_given", False)
        if not given and dm is not None and hasattr(dm, "label_frequencies"):
            self.haste_statistics = _statistics(dm.label_frequencies, dm.num_train)
        statistics = getattr(self, "haste_statistics", None)
        if statistics is not None and dm is not None and getattr(dm, "num_labels", None) is not None:
            num_labels = len(statistics["label_frequencies"])
            if int(dm.num_labels) != num_labels:
                raise ValueError(f"the datamodule has {dm.num_labels} labels, the label statistics {num_labels}")
        if self.output is None:
            if statistics is None:
                raise ValueError(_NO_STATISTICS)
            freq = statistics["label_frequencies"]
            self.output = self._build_output(dm, cfg, freq)
            if cfg.get("output_bias") == "prior":
                self.output.init_bias_from_prior_(freq, max(1, statistics["num_train"]))
        if cfg.get("label_sharding") and isinstance(self.output, HeadTailOutput):
            self._shard_output()
        if getattr(self, "haste_metrics", None) is None and statistics is not None:  # also for a hand-set layer
            self._build_metrics(cfg, statistics["label_frequencies"], statistics["num_train"])

    def _shard_output(self) -> None:
        """Replace the whole output layer (the same on every rank) by this rank's shard, and keep the shard out of
        DDP's broadcasts and all-reduce."""
        from lightning.pytorch.strategies import DDPStrategy  # noqa: PLC0415 - Lightning loads lazily
        from torch.nn.parallel import DistributedDataParallel  # noqa: PLC0415

        from .sharded import shard_output  # noqa: PLC0415

        trainer = self.trainer
        if trainer.world_size > 1 and not isinstance(trainer.strategy, DDPStrategy):
            raise ValueError(
                f"label_sharding needs the DDP strategy (strategy='ddp' or 'ddp_spawn'), got "
                f"{type(trainer.strategy).__name__}"
            )
        if trainer.world_size > 1:
            output_ids = {id(p) for p in self.output.parameters()}
            if not any(p.requires_grad and id(p) not in output_ids for p in self.parameters()):
                raise ValueError(
                    "label_sharding needs an encoder with trainable parameters: DDP refuses a model whose every "
                    "parameter is left out of its all-reduce (train a bag-of-words model without label sharding)"
                )
        self.output = shard_output(self.output, rank=trainer.global_rank, world_size=trainer.world_size)
        ignored = set(getattr(self, "_ddp_params_and_buffers_to_ignore", ()))
        ignored.update(self.output.ddp_ignored_names("output."))
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, sorted(ignored))

    # -- checkpoints --------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store what rebuilds the output layer and the metrics without the training data: the layer's
        :meth:`HeadTailOutput.config` and the label frequencies (for PSP@k)."""
        if self.output is not None:
            checkpoint["haste_output"] = self.output.config()
        statistics = getattr(self, "haste_statistics", None)
        if statistics is not None:
            checkpoint["haste_statistics"] = {"label_frequencies": torch.from_numpy(statistics["label_frequencies"]),
                                              "num_train": statistics["num_train"]}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Rebuild the output layer (untrained, the checkpoint's shapes) before its state dict loads, so that
        ``load_from_checkpoint`` needs no datamodule; a layer that exists already (a resumed fit) stays."""
        saved = checkpoint.get("haste_statistics")
        if saved is not None and getattr(self, "haste_statistics", None) is None:
            self.haste_statistics = _statistics(saved["label_frequencies"], saved["num_train"])
        config = checkpoint.get("haste_output")
        if self.output is None and config is not None:
            state = checkpoint.get("state_dict", {})
            weight = state.get("output.head.weight", state.get("output.tail.weight"))
            self.output = HeadTailOutput.from_config(config, dtype=weight.dtype if weight is not None else None)
        if getattr(self, "haste_metrics", None) is None and getattr(self, "haste_statistics", None) is not None:
            stats = self.haste_statistics
            self._build_metrics(self.haste, stats["label_frequencies"], stats["num_train"])

    def _build_output(self, dm: Any, cfg: dict[str, Any], freq: Any) -> HeadTailOutput:
        in_features = cfg["in_features"] or getattr(dm, "num_features", None)
        if in_features is None:
            raise ValueError(
                "the output layer's input width is unknown: pass in_features= to configure_haste (or give the "
                "Trainer a datamodule with num_features)"
            )
        label_groups = cfg.get("label_groups")
        if label_groups is not None:
            if len(label_groups) != len(freq):
                raise ValueError(f"label_groups has {len(label_groups)} entries for {len(freq)} labels")
        elif cfg["grouping"] is not None:
            head, tail = split_head_tail(freq, cfg["head_ratio"], cfg["group_size"])
            if tail.size:
                emb = getattr(self, "haste_label_embeddings", None)
                source = "label_embeddings"
                if emb is None:
                    emb, source = getattr(dm, "label_embeddings", None), "datamodule.label_embeddings"
                if cfg["grouping"] == "random":  # needs no embeddings: skip computing PIFA
                    emb = np.zeros((len(freq), 1), dtype=np.float32)
                elif emb is None:
                    if getattr(dm, "train_data", None) is None:
                        raise ValueError(
                            f"grouping={cfg['grouping']!r} groups the tail labels by their embeddings, and without a "
                            "datamodule's train_data there are no PIFA embeddings: pass label_embeddings= (or "
                            "label_groups=) to configure_haste, or use grouping='random' or None"
                        )
                    emb = label_embeddings_from_features(dm.train_data.features, dm.train_data.labels, seed=cfg["seed"])
                elif len(emb) != len(freq):
                    raise ValueError(f"{source} has {len(emb)} rows for {len(freq)} labels")
                grouping = group_labels(emb[tail], cfg["group_size"], method=cfg["grouping"], seed=cfg["seed"],
                                        progress=False)
                label_groups = grouping.for_labels(tail, len(freq))
        return HeadTailOutput(
            in_features, freq, head_ratio=cfg["head_ratio"], fan_in=cfg["fan_in"], group_size=cfg["group_size"],
            head_features=cfg["head_features"], tail_features=cfg["tail_features"], label_groups=label_groups,
            generator=torch.Generator().manual_seed(cfg["seed"]),
        ).to(self.device)

    def _build_metrics(self, cfg: dict[str, Any], freq: Any, num_train: int) -> None:
        metrics = {}
        for split in ("val", "test"):
            metrics[f"{split}_p"] = PrecisionAtK(cfg["k"])
            metrics[f"{split}_ndcg"] = NDCGAtK(cfg["k"])
            metrics[f"{split}_psp"] = PSPrecisionAtK(cfg["k"], label_counts=freq, num_train=max(2, num_train),
                                                      A=cfg["psp_a"], B=cfg["psp_b"])
        self.haste_metrics = nn.ModuleDict(metrics).to(self.device)

    # -- steps ------------------------------------------------------------------------------------
    def encode(self, batch: dict[str, Any]) -> Tensor:
        """Features ``[B, in_features]`` for a batch; the default passes the batch's features through (integer
        features, which the datamodule keeps as integers for encoders that embed them, as float32)."""
        if "features" not in batch:
            raise KeyError("this batch carries no 'features': XMCDataModule leaves them out where a text_transform "
                           "makes the model's inputs; override encode() to read those, or pass "
                           "XMCDataModule(batch_features=True)")
        features = batch["features"]
        features = features.to_dense() if features.layout != torch.strided else features
        return features if features.is_floating_point() else features.float()

    def haste_loss(self, logits: Tensor, targets: SparseTargets) -> Tensor:
        """A loss on the full ``[B, num_labels]`` logits (original label order) and the batch's sparse targets.

        Not called by default: :meth:`haste_training_loss` computes the configured loss fused, without the
        logits. Override this method to train with a loss of your own; the training step then computes the full
        logits and calls it: the slow path, which holds several ``[B, num_labels]`` tensors. The output layer's
        learning rate belongs to the configured ``loss_reduction`` (default: the sum over all entries); a loss of
        your own should reduce the same way, or come with its own ``output_lr``.
        """
        fn = sparse_bce_with_logits if self.haste["loss"] == "bce" else sparse_squared_hinge
        return fn(logits, targets, reduction=self.haste["loss_reduction"])

    def haste_training_loss(self, features: Tensor, targets: SparseTargets) -> Tensor:
        """The training loss of a batch: :meth:`HeadTailOutput.loss` (fused: no ``[B, num_labels]`` logits), or
        :meth:`haste_loss` on the full logits when a subclass overrides it."""
        if getattr(self, "output_dropout", None) is not None:
            features = self.output_dropout(features)
        if type(self).haste_loss is not HasteXMCModule.haste_loss:
            return self.haste_loss(self.output(features), targets)
        if not isinstance(self.output, HeadTailOutput):  # a label-sharded layer: the loss of the global batch
            return self.output.loss(features, targets, loss=self.haste["loss"], reduction=self.haste["loss_reduction"],
                                    compensate_ddp_average=True)
        return self.output.loss(features, targets, loss=self.haste["loss"], reduction=self.haste["loss_reduction"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        targets = batch["targets"]
        loss = self.haste_training_loss(self.encode(batch), targets)
        # Not on the progress bar: the bar reads its values every step (a device-to-host copy, which waits for the
        # step's work); the loggers read it every `log_every_n_steps` steps.
        self.log("train_loss", loss, batch_size=_num_rows(targets))
        return loss

    def _evaluate(self, batch: dict[str, Any], split: str) -> None:
        labels = _target_labels(batch["targets"])
        if labels is not None and labels != self.output.num_labels:
            # lists of ids are range-checked by PSP@k; a matrix of another width is a split of another data set
            raise ValueError(f"the {split} batch's targets have {labels} labels, the model {self.output.num_labels}")
        _, top = self.output.topk(self.encode(batch), max(self.haste["k"]))
        targets = batch["targets"]
        repeated = batch.get("repeated")
        if repeated is not None:
            # rows a distributed evaluation repeated to even out the processes (XMCDataModule's EvaluationSampler)
            # count once: on the process that holds the original
            keep = ~repeated.cpu()
            top, targets = top[keep.to(top.device)], _select_rows(targets, keep)
        for name in ("p", "ndcg", "psp"):
            self.haste_metrics[f"{split}_{name}"].update(top, targets)

    def _log_metrics(self, split: str) -> None:
        for name in ("p", "ndcg", "psp"):
            metric = self.haste_metrics[f"{split}_{name}"]
            for key, value in metric.compute().items():
                # the metric's states were summed over the processes already: every process holds the same value,
                # whose max is that value exactly (and Lightning then neither averages it again nor warns)
                self.log(f"{split}/{key}", value, prog_bar=key in ("P@1", "P@5"), sync_dist=True, reduce_fx="max")
            metric.reset()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and not trainer.sanity_checking:
            #: the optimizer step at which the last validation ran (``None`` before any)
            self.haste_validated_at_step = self.global_step

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> tuple[Tensor, Tensor]:
        """Top-k ``(scores, label ids)`` in original label ids (no autograd graph, also when called by hand)."""
        with torch.no_grad():
            return self.output.topk(self.encode(batch), max(self.haste["k"]))

    # -- optimisation -----------------------------------------------------------------------------
    def haste_parameter_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """``(encoder parameters, output-layer parameters)``."""
        output_ids = {id(p) for p in self.output.parameters()}
        encoder = [p for p in self.parameters() if p.requires_grad and id(p) not in output_ids]
        return encoder, list(self.output.parameters())

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (``encoder_lr``) for the encoder and SGD with momentum (``output_lr``) for the output layer, stepped
        as one optimizer, under a per-step schedule: linear warm-up over ``warmup`` of the training steps, then
        ``lr_schedule`` (:func:`lr_multiplier`)."""
        cfg = self.haste
        encoder, output = self.haste_parameter_groups()
        fused = cfg.get("fused_optimizers")
        if fused is None:
            fused = all(p.is_cuda for p in (*encoder, *output))
        fused_arg = True if fused else None  # None: torch's default (for-each on CUDA)
        parts: list[torch.optim.Optimizer] = [
            torch.optim.SGD(output, lr=cfg["output_lr"], momentum=cfg["output_momentum"],
                            weight_decay=cfg["output_weight_decay"], fused=fused_arg)
        ]
        if hasattr(self.output, "attach_optimizer"):  # a label-sharded layer: checkpoints hold the whole state
            self.output.attach_optimizer(parts[0])
        if encoder:
            parts.insert(0, torch.optim.AdamW(encoder, lr=cfg["encoder_lr"], fused=fused_arg))
        optimizer = parts[0] if len(parts) == 1 else CombinedOptimizer(parts)
        warmup, schedule = cfg.get("warmup", 0.0), cfg.get("lr_schedule", "constant")
        trainer = getattr(self, "_trainer", None)
        # A fit resumed from a checkpoint learns the step count only once its loops are restored: Lightning answers
        # estimated_stepping_batches under max_epochs by building the training loader, and a loader built here,
        # before the restore, never gets its saved position back (the resumed epoch would start over). The
        # checkpoint restores the scheduler's step and the optimizers' learning rates, so the multiplier of this
        # first call is overwritten anyway; the count is read at the scheduler's next step.
        total: Optional[int] = None if trainer is not None and trainer.ckpt_path is not None else self._training_steps()
        scheduler = _StepScheduler(optimizer, _StepMultiplier(self, total, warmup, schedule))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _training_steps(self) -> int:
        trainer = getattr(self, "_trainer", None)
        if trainer is None:
            return 1
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            if self.haste.get("warmup", 0.0) or self.haste.get("lr_schedule", "constant") != "constant":
                raise ValueError(
                    "the learning-rate schedule needs the number of training steps: give the Trainer max_steps or "
                    "max_epochs, or configure_haste(warmup=0.0, lr_schedule='constant')"
                )
            return 1
        return max(1, int(total))


class _StepMultiplier:
    """The learning-rate multiplier of a step (:func:`lr_multiplier`), with the training's step count read from the
    module's trainer when first needed where it was not known when the scheduler was made (a resumed fit). An object,
    not a closure: ``ddp_spawn`` pickles the trainer's schedulers."""

    def __init__(self, module: HasteXMCModule, total: Optional[int], warmup: float, schedule: str) -> None:
        self.module, self.total, self.warmup, self.schedule = module, total, warmup, schedule

    def __call__(self, step: int) -> float:
        if self.total is None:
            if step == 0:  # the scheduler's construction: the checkpoint's restore overwrites this rate
                return 1.0
            self.total = self.module._training_steps()
        return lr_multiplier(step, total=self.total, warmup=self.warmup, schedule=self.schedule)


class _StepScheduler(torch.optim.lr_scheduler.LambdaLR):
    """``LambdaLR`` whose state leaves its multiplier out (``LambdaLR`` saves a callable object's attributes: here
    the module itself); the multiplier is rebuilt by ``configure_optimizers``."""

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["lr_lambdas"] = [None] * len(self.lr_lambdas)
        return state


def lr_multiplier(step: int, *, total: int, warmup: float, schedule: str) -> float:
    """The factor on the base learning rates at optimizer step ``step`` of ``total``: a linear rise over the first
    ``warmup * total`` steps (the first step already moves: ``(step + 1) / warm-up steps``), then ``schedule``:
    ``"cosine"`` (half a cosine down to 0 at ``total``), ``"linear"`` (down to 0) or ``"constant"`` (1)."""
    warm = int(round(warmup * total))
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))
