"""Dense head + group-shared sparse tail output layer."""

from __future__ import annotations

import contextlib
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as nnf

from . import functional as F
from . import loss as fused_loss
from . import ops
from . import topk as topk_rounds
from ._checks import (
    FLOAT_DTYPES,
    check_backend,
    check_float_tensor,
    check_label_ids,
    check_memory_budget,
    check_positive_int,
    check_real,
    check_same_device_dtype,
    check_when_changed,
)
from .grouping import split_head_tail
from .gsfi import GroupSharedFanIn, _uniform_
from .ranking import ranked_merge
from .topk import CastCache, RoundGraphs

__all__ = ["HeadTailOutput", "FeatureSlice"]

FeatureSlice = Union[slice, tuple[int, int], None]


def _as_numpy_1d(name: str, values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        values = values.detach().cpu().numpy()
    try:
        array = np.asarray(values)
    except Exception as exc:  # pragma: no cover - numpy's own message is kept
        raise TypeError(f"{name} must be array-like, got {type(values).__name__}") from exc
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty")
    return array


def _resolve_slice(name: str, features: FeatureSlice, in_features: int) -> tuple[int, int]:
    if features is None:
        return 0, in_features
    if isinstance(features, slice):
        if features.step not in (None, 1):
            raise ValueError(f"{name} must be a contiguous slice (step 1), got {features}")
        start, stop, _ = features.indices(in_features)
    elif isinstance(features, (tuple, list)) and len(features) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in features
    ):
        start, stop = int(features[0]), int(features[1])
    else:
        raise TypeError(f"{name} must be None, a slice or a (start, stop) pair, got {features!r}")
    if not 0 <= start < stop <= in_features:
        raise ValueError(f"{name}={features!r} must select a non-empty range inside [0, {in_features})")
    return start, stop


def _check_label_order(permutation: Tensor, position: Tensor, num_labels: int) -> None:
    """``permutation`` and ``position`` must be inverse permutations of ``0 .. num_labels - 1``."""
    if permutation.shape != (num_labels,) or position.shape != (num_labels,):
        raise ValueError(
            f"label_permutation and label_position must have shape ({num_labels},), got "
            f"{tuple(permutation.shape)} and {tuple(position.shape)}"
        )
    if permutation.dtype != torch.long or position.dtype != torch.long:
        raise TypeError("label_permutation and label_position must be int64")
    perm, pos = permutation.detach().cpu(), position.detach().cpu()
    if not torch.equal(torch.sort(perm).values, torch.arange(num_labels)):
        raise ValueError("label_permutation must hold every label id 0 .. num_labels - 1 exactly once")
    if not torch.equal(pos[perm], torch.arange(num_labels)):
        raise ValueError("label_position must be the inverse of label_permutation")


class HeadTailOutput(nn.Module):
    """Extreme multi-label output layer: dense head over frequent labels, GSFI tail over the rest.

    Labels are sorted by training frequency (descending, ties by label id). The most frequent
    ``head_ratio`` fraction, rounded up to a multiple of ``group_size``, is scored by a dense
    ``nn.Linear``; the remaining labels by a :class:`GroupSharedFanIn`. Inside the layer labels live
    in an internal order (head first, then tail; tail labels in group order when ``label_groups`` is
    given, else in frequency order). Everything that comes out (logits, top-k ids) and goes in
    (label ids) uses the ORIGINAL label ids.

    Args:
        in_features: encoder output width.
        label_frequencies: ``[num_labels]`` non-negative training counts (array-like).
        head_ratio: fraction of labels in the dense head, ``0 <= head_ratio <= 1``.
        fan_in: inputs per tail label.
        group_size: labels per tail group.
        head_features, tail_features: optional input slices (``slice`` or ``(start, stop)``) read by
            the head and the tail, e.g. the official "private features" split of a 768-wide encoder:
            ``tail_features=(0, 384), head_features=(384, 768)``. Default: all features.
        label_groups: optional per-label group ids ``[num_labels]`` (integers). Tail labels with the
            same id are placed next to each other, groups in increasing id order, so that each GSFI
            group holds labels of one semantic group; entries of head labels are ignored. Compute the
            groups on the tail labels, in sizes of ``group_size``, so that they line up.
        bias: learn biases.
        device, dtype, generator: as for :class:`GroupSharedFanIn`.
        memory_budget: bound in bytes on temporaries of the pure-PyTorch path and of :meth:`topk`.
        backend: kernel choice of the tail, see :class:`GroupSharedFanIn`.
        topk_graphs: CUDA graphs of :meth:`topk`'s kernels kept for replay, one per input shape, ``k`` and
            autocast setting (:class:`~lightning_haste.topk.RoundGraphs`, the attribute ``topk_graphs``;
            ``layer.topk_graphs.clear()`` frees them and their memory); 0 launches the kernels one by one on every
            call and keeps no memory between calls. Under autocast the top-k of float32 parameters also keeps
            their copies in the autocast dtype between calls (refreshed when the parameters change; the attribute
            ``topk_casts``, a :class:`~lightning_haste.topk.CastCache`): ``train()``, moving or casting the
            layer (``.to()``, ``.half()``, ...) and :meth:`clear_topk_cache` free them and the graphs.
    """

    label_permutation: Tensor
    label_position: Tensor

    def __init__(
        self,
        in_features: int,
        label_frequencies: Union[Tensor, np.ndarray, Sequence[float]],
        *,
        head_ratio: float,
        fan_in: int,
        group_size: int,
        head_features: FeatureSlice = None,
        tail_features: FeatureSlice = None,
        label_groups: Union[Tensor, np.ndarray, Sequence[int], None] = None,
        bias: bool = True,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
        memory_budget: int = F.DEFAULT_MEMORY_BUDGET,
        backend: str = "auto",
        topk_graphs: int = 2,
    ) -> None:
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.topk_graphs = RoundGraphs(topk_graphs)
        self.topk_casts = CastCache()
        self.group_size = check_positive_int("group_size", group_size)
        self.fan_in = check_positive_int("fan_in", fan_in)
        self.memory_budget = check_memory_budget(memory_budget)
        check_backend(backend)  # also where there is no tail to take it
        freq = _as_numpy_1d("label_frequencies", label_frequencies)
        head_ids, tail_ids = split_head_tail(freq, head_ratio, self.group_size)
        freq = freq.astype(np.float64)
        self.num_labels = int(freq.size)
        self.head_ratio = float(head_ratio)
        self.head_slice = _resolve_slice("head_features", head_features, self.in_features)
        self.tail_slice = _resolve_slice("tail_features", tail_features, self.in_features)

        self.num_head_labels = int(head_ids.size)
        self.num_tail_labels = int(tail_ids.size)
        if label_groups is not None:
            tail_ids = self._tail_in_group_order(label_groups, tail_ids, freq)
        permutation = torch.from_numpy(np.concatenate([head_ids, tail_ids]).astype(np.int64))
        position = torch.empty_like(permutation)
        position[permutation] = torch.arange(self.num_labels)
        self.register_buffer("label_permutation", permutation.to(device))
        self.register_buffer("label_position", position.to(device))

        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]} or None, got {dtype}")
        factory = {"device": device, "dtype": dtype}
        self.head: Optional[nn.Linear] = None
        self.tail: Optional[GroupSharedFanIn] = None
        if self.num_head_labels:
            head_width = self.head_slice[1] - self.head_slice[0]
            self.head = nn.Linear(head_width, self.num_head_labels, bias=bias, **factory)
            if generator is not None:
                bound = 1.0 / math.sqrt(head_width)
                _uniform_(self.head.weight, bound, generator)
                if self.head.bias is not None:
                    _uniform_(self.head.bias, bound, generator)
        if self.num_tail_labels:
            tail_width = self.tail_slice[1] - self.tail_slice[0]
            if self.fan_in > tail_width:
                raise ValueError(f"fan_in={fan_in} must be <= the tail input width {tail_width}")
            self.tail = GroupSharedFanIn(
                tail_width,
                self.num_tail_labels,
                self.fan_in,
                self.group_size,
                bias=bias,
                generator=generator,
                memory_budget=memory_budget,
                backend=backend,
                **factory,
            )

    def _tail_in_group_order(self, label_groups: Any, tail_ids: np.ndarray, freq: np.ndarray) -> np.ndarray:
        groups = _as_numpy_1d("label_groups", label_groups)
        if groups.size != self.num_labels:
            raise ValueError(
                f"label_groups must have one entry per label ({self.num_labels}), got {groups.size}"
            )
        if not np.issubdtype(groups.dtype, np.integer):
            raise TypeError(f"label_groups must hold integer group ids, got dtype {groups.dtype}")
        tail_groups = groups[tail_ids]
        order = np.lexsort((tail_ids, -freq[tail_ids], tail_groups))
        tail_ids = tail_ids[order]
        ordered_groups = tail_groups[order]
        # A GSFI group that mixes two semantic groups shares one input pattern between unrelated
        # labels; it still works, but it usually means the groups were built on all labels.
        full = (ordered_groups.size // self.group_size) * self.group_size
        if full:
            blocks = ordered_groups[:full].reshape(-1, self.group_size)
            mixed = int(np.count_nonzero(blocks.min(axis=1) != blocks.max(axis=1)))
            if mixed:
                warnings.warn(
                    f"{mixed} of {blocks.shape[0]} tail groups mix labels of different label_groups "
                    f"ids; build the groups on the tail labels in sizes of group_size={self.group_size}",
                    stacklevel=3,
                )
        return tail_ids

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        # The label order of an incoming state is checked before anything is copied: a permutation that repeats
        # a label would leave one output column never written (uninitialised memory in every forward).
        permutation = state_dict.get(prefix + "label_permutation")
        position = state_dict.get(prefix + "label_position")
        if isinstance(permutation, Tensor) and isinstance(position, Tensor):
            _check_label_order(permutation, position, self.num_labels)
        elif isinstance(permutation, Tensor) or isinstance(position, Tensor):
            raise ValueError(f"{prefix}label_permutation and {prefix}label_position must be loaded together")
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    # ----------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The settings that fix the layer's shapes: :meth:`from_config` builds an untrained layer of the same
        shapes from them (no label frequencies needed), into which a state dict of this one loads (the label
        order, the index and the weights are all in the state dict)."""
        first = self.head if self.head is not None else self.tail
        return {
            "in_features": self.in_features, "num_labels": self.num_labels, "num_head_labels": self.num_head_labels,
            "fan_in": self.fan_in, "group_size": self.group_size, "head_features": list(self.head_slice),
            "tail_features": list(self.tail_slice), "bias": first is not None and first.bias is not None,
            "memory_budget": self.memory_budget, "backend": self.tail.backend if self.tail is not None else "auto",
        }

    @classmethod
    def from_config(
        cls, config: dict[str, Any], *, device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None
    ) -> HeadTailOutput:
        """An untrained layer with the shapes :meth:`config` describes (e.g. to load a checkpoint's state dict
        without the training data)."""
        missing = {"in_features", "num_labels", "num_head_labels", "fan_in", "group_size"} - set(config)
        if missing:
            raise ValueError(f"the output-layer config lacks {sorted(missing)}")
        num_labels = check_positive_int("num_labels", config["num_labels"])
        num_head = int(config["num_head_labels"])
        if not 0 <= num_head <= num_labels:
            raise ValueError(f"num_head_labels={num_head} must lie in [0, num_labels={num_labels}]")
        # any frequencies whose split puts num_head labels in the head: the label order comes from the state dict
        layer = cls(
            config["in_features"], np.arange(num_labels, 0, -1, dtype=np.float64), head_ratio=num_head / num_labels,
            fan_in=config["fan_in"], group_size=config["group_size"],
            head_features=tuple(config.get("head_features") or (0, config["in_features"])),
            tail_features=tuple(config.get("tail_features") or (0, config["in_features"])),
            bias=bool(config.get("bias", True)), memory_budget=config.get("memory_budget", F.DEFAULT_MEMORY_BUDGET),
            backend=config.get("backend", "auto"), device=device, dtype=dtype,
        )
        if layer.num_head_labels != num_head:
            raise ValueError(f"num_head_labels={num_head} is not a head size of group_size={config['group_size']}")
        return layer

    def _check_input(self, x: Tensor) -> Tensor:
        check_float_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); need at least one row")
        parameter = self._checked_parameters()
        if parameter is not None:
            # the parameters share one device and dtype (checked with their shapes when they last changed)
            if x.device != parameter.device:
                raise ValueError(f"x is on {x.device} but the layer is on {parameter.device}; move them to one device")
            if F.autocast_dtype(x) is not None:
                # autocast casts input and weights to one dtype, as for nn.Linear (an encoder's 16-bit output meets
                # float32 weights there), but leaves float64 as it is
                if parameter.dtype == torch.float64:
                    raise TypeError(
                        "the layer's parameters have dtype torch.float64, which autocast leaves as it is, but x "
                        f"({x.dtype}) is cast to the autocast dtype; cast the layer or the input (no implicit "
                        "precision change is made)"
                    )
            elif x.dtype != parameter.dtype:
                raise TypeError(f"x has dtype {x.dtype} but the layer's parameters have dtype {parameter.dtype}; cast "
                                "one of them (no implicit precision change is made)")
        return x.reshape(-1, self.in_features)

    def _checked_parameters(self) -> Optional[Tensor]:
        """The first parameter, after :meth:`_check_parameters` where any parameter changed since the last check
        (another object, storage or shape: ``.to()``, ``.half()``, an assignment), so that a call pays for a key of a
        few integers, not for the checks."""
        # straight from the submodules' parameter dicts (an assignment replaces the entry there): attribute access
        # through nn.Module.__getattr__ would cost more than the key
        parts = []
        for name in ("head", "tail"):
            part = self._modules.get(name)
            if part is not None:
                parts.extend(t for t in part._parameters.values() if t is not None)
        check_when_changed(self, parts, self._check_parameters)
        return parts[0] if parts else None

    def _check_parameters(self) -> None:
        """Check every part's parameters against the layer's shape and each other (one device and dtype), so that a
        parameter replaced by one of another shape is not read with the layer's layout by the fused loss and top-k."""
        head, tail = self.head, self.tail
        if head is not None:
            width = self.head_slice[1] - self.head_slice[0]
            check_float_tensor("head.weight", head.weight)
            if tuple(head.weight.shape) != (self.num_head_labels, width):
                raise ValueError(
                    f"head.weight must have shape ({self.num_head_labels}, {width}) [head labels, head features], "
                    f"got {tuple(head.weight.shape)}"
                )
            if head.bias is not None:
                check_float_tensor("head.bias", head.bias)
                if tuple(head.bias.shape) != (self.num_head_labels,):
                    raise ValueError(
                        f"head.bias must have shape ({self.num_head_labels},), got {tuple(head.bias.shape)}"
                    )
                check_same_device_dtype("head.weight", head.weight, **{"head.bias": head.bias})
        if tail is not None:
            tail.check_parameters()
        if head is not None and tail is not None:
            check_same_device_dtype("head.weight", head.weight, **{"tail.weight": tail.weight})
        if head is None and tail is None:
            raise ValueError("the layer has neither a head nor a tail")

    def _head_input(self, x2d: Tensor) -> Tensor:
        return x2d[:, self.head_slice[0] : self.head_slice[1]]

    def _tail_input(self, x2d: Tensor) -> Tensor:
        return x2d[:, self.tail_slice[0] : self.tail_slice[1]]

    def _check_labels(self, labels: Any) -> Tensor:
        return check_label_ids(labels, self.num_labels).to(self.label_position.device)

    # ----------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[..., num_labels]`` in original label order."""
        lead = x.shape[:-1]
        x2d = self._check_input(x)
        parts = []
        if self.head is not None:
            parts.append((self.label_permutation[: self.num_head_labels], self.head(self._head_input(x2d))))
        if self.tail is not None:
            parts.append((self.label_permutation[self.num_head_labels :], self.tail(self._tail_input(x2d))))
        # Scatter each part straight to its original columns: no permuted copy of the full logits.
        out = x2d.new_empty(x2d.shape[0], self.num_labels, dtype=parts[0][1].dtype)
        for columns, logits in parts:
            out.index_copy_(1, columns, logits)
        return out.reshape(*lead, self.num_labels)

    def logits_for(self, x: Tensor, labels: Union[Tensor, Sequence[int]]) -> Tensor:
        """Logits ``[..., len(labels)]`` of the given original label ids only (differentiable).

        Computes just the requested columns, e.g. positives plus sampled negatives.
        """
        lead = x.shape[:-1]
        x2d = self._check_input(x)
        labels = self._check_labels(labels)
        positions = self.label_position[labels]
        in_head = positions < self.num_head_labels
        head_cols = in_head.nonzero().flatten()
        tail_cols = (~in_head).nonzero().flatten()
        parts = []
        if head_cols.numel():
            rows = positions[head_cols]
            head = self.head
            bias = head.bias.index_select(0, rows) if head.bias is not None else None
            weight = head.weight.index_select(0, rows)
            parts.append((head_cols, nn.functional.linear(self._head_input(x2d), weight, bias)))
        if tail_cols.numel():
            tail = self.tail
            tail.check_group_index()
            tail_x, tail_weight, tail_bias = F._autocast_arguments(self._tail_input(x2d), tail.weight, tail.bias)
            logits = F._columns_checked(
                tail_x, tail_weight, tail.group_index, positions[tail_cols] - self.num_head_labels, tail_bias,
                self.memory_budget,
            )
            parts.append((tail_cols, logits))
        dtype = parts[0][1].dtype if parts else x2d.dtype
        out = x2d.new_empty(x2d.shape[0], labels.numel(), dtype=dtype)
        for columns, logits in parts:
            out.index_copy_(1, columns, logits)
        return out.reshape(*lead, labels.numel())

    @torch.no_grad()
    def init_bias_from_prior_(
        self, label_frequencies: Union[Tensor, np.ndarray, Sequence[float]], num_instances: int,
        smoothing: float = 1.0,
    ) -> None:
        """Set each label's bias to the log-odds of its training frequency, ``log(p / (1 - p))`` with
        ``p = (n_l + smoothing) / (num_instances + 2 * smoothing)``.

        With binary cross-entropy the logits then start at the labels' prior: the first steps are not spent
        pushing the scores of ~10^5 negatives per instance down, and head and tail labels start on one scale.
        Raises when the layer has no biases."""
        freq = _as_numpy_1d("label_frequencies", label_frequencies).astype(np.float64)
        if freq.size != self.num_labels:
            raise ValueError(f"label_frequencies has {freq.size} entries for {self.num_labels} labels")
        num_instances = check_positive_int("num_instances", num_instances)
        check_real("smoothing", smoothing, low=0.0, low_open=True)
        if not np.isfinite(freq).all():
            raise ValueError("label_frequencies must be finite (no NaN or inf)")
        if (freq < 0).any() or (freq > num_instances).any():
            raise ValueError(f"label_frequencies must lie in [0, num_instances={num_instances}]")
        parts = [m for m in (self.head, self.tail) if m is not None]
        if any(m.bias is None for m in parts):
            raise ValueError("the layer has no biases (bias=False)")
        p = (freq + smoothing) / (num_instances + 2 * smoothing)
        prior = torch.from_numpy(np.log(p) - np.log1p(-p))[self.label_permutation.cpu()]  # internal order
        if self.head is not None:
            self.head.bias.copy_(prior[: self.num_head_labels])
        if self.tail is not None:
            self.tail.bias.copy_(prior[self.num_head_labels :])

    def _positions_on_host(self) -> np.ndarray:
        """``label_position`` as a NumPy array, cached per version of the buffer (a state dict can replace it)."""
        buffer = self.label_position
        key = (buffer.data_ptr(), buffer._version, buffer.device)
        cached = getattr(self, "_host_positions", None)
        if cached is None or cached[0] != key:
            cached = (key, buffer.detach().cpu().numpy())
            self._host_positions = cached
        return cached[1]

    def loss(
        self, x: Tensor, targets: fused_loss.SparseTargets, loss: str = "bce", reduction: str = "batchmean"
    ) -> Tensor:
        """The training loss against sparse targets, without computing or storing the ``[batch, num_labels]`` logits.

        Equals ``sparse_bce_with_logits(self(x), targets)`` (``loss="bce"``) or ``sparse_squared_hinge(self(x),
        targets)`` (``loss="squared_hinge"``): the per-label loss summed over all labels, averaged over the rows
        (``reduction="batchmean"``) or summed over them too (``"sum"``), with label ``l`` of row ``i`` a positive
        when ``l`` is in ``targets[i]``. Differentiable with respect to
        ``x`` and every parameter. Its temporaries are chunks of labels of at most
        :func:`~lightning_haste.loss.workspace_bytes` (at most ``memory_budget``); on CUDA with bfloat16/float16
        the tail runs fused kernels that never store its logits.

        Args:
            x: encoder output ``[..., in_features]``; the rows are the flattened leading dimensions.
            targets: the positives: one 1-D integer tensor of original label ids per row, or a
                ``[rows, num_labels]`` torch sparse CSR tensor or SciPy sparse matrix (stored non-zeros are
                positives). A label listed twice in a row counts once.
            loss: ``"bce"`` (binary cross-entropy with logits) or ``"squared_hinge"``.
            reduction: ``"batchmean"`` (the sum over all entries divided by the rows) or ``"sum"`` (the sum over
                all ``rows * num_labels`` entries; with SGD its learning rate does not depend on the batch size).

        Returns:
            A scalar: float32 for 16-bit inputs (sums in float32, chunks added in float64), else the input dtype.
            Under ``torch.autocast`` the layer runs in the autocast dtype, as ``nn.Linear`` does.
        """
        args, autocast = self.loss_arguments(x, targets, loss, reduction=reduction)
        if autocast:
            with torch.autocast(args[0].device.type, enabled=False):
                return ops.head_tail_loss_2d(*args)
        return ops.head_tail_loss_2d(*args)

    def _op_arguments(self, x2d: Tensor, cached_casts: bool = False) -> tuple[Tensor, tuple, bool, bool]:
        """``(x2d, (head_weight, head_bias, tail_weight, tail_bias, tail_index), kernels, autocast)`` for the ops that
        take the whole layer (the fused loss, the fused top-k): under autocast the input and the parameters in the
        autocast dtype (the op then runs with autocast off; ``cached_casts``: the parameters' copies from
        ``topk_casts``, for ops that need no gradient), the tail's index validated, and when the tail runs the
        CUDA kernels (``kernels``) its parameters as they take them (contiguous, the index int32)."""
        tail = self.tail
        autocast_dtype = F.autocast_dtype(x2d)
        autocast = autocast_dtype is not None
        if autocast and cached_casts and x2d.is_cuda and not torch.compiler.is_compiling():
            x2d = x2d.to(autocast_dtype)
            head_weight, head_bias, tail_weight, tail_bias = self._cached_casts(x2d.dtype)
        else:
            x2d, head_weight, head_bias, tail_weight, tail_bias = F._autocast_arguments(
                x2d, *self._part_parameters().values()
            )
        kernels = False
        tail_index = None
        if tail is not None:
            tail.check_group_index()
            tail_index = tail.group_index
            kernels = tail.backend != "torch" and F._uses_kernels(x2d, tail_weight, tail_index, tail.backend)
            if kernels:
                tail_weight, tail_index, tail_bias = F.kernel_arguments(tail_weight, tail_index, tail_bias)
        return x2d, (head_weight, head_bias, tail_weight, tail_bias, tail_index), kernels, autocast

    def _part_parameters(self) -> dict[str, Optional[Tensor]]:
        """``head.weight``, ``head.bias``, ``tail.weight``, ``tail.bias`` by name, in that order (None where the part
        or its bias is absent)."""
        head, tail = self.head, self.tail
        return {
            "head.weight": head.weight if head is not None else None,
            "head.bias": head.bias if head is not None else None,
            "tail.weight": tail.weight if tail is not None else None,
            "tail.bias": tail.bias if tail is not None else None,
        }

    def _cached_casts(self, dtype: torch.dtype) -> tuple[Optional[Tensor], ...]:
        """The parameters ``(head.weight, head.bias, tail.weight, tail.bias)`` in ``dtype`` from ``topk_casts``
        (each refreshed if its parameter changed since)."""
        out = []
        for name, param in self._part_parameters().items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                param, made = self.topk_casts.get(name, param, dtype)
                if made and not torch.cuda.is_current_stream_capturing():
                    # a graph captured on an earlier copy must not replay it (inside a capture no copy is made:
                    # the replaying call refreshed them all before it)
                    self.topk_graphs.clear()
            out.append(param)
        return tuple(out)

    def clear_topk_cache(self) -> None:
        """Free what :meth:`topk` keeps between calls: its CUDA graphs and, under autocast, its copies of the
        parameters in the autocast dtype. ``train()`` calls this when such copies are kept (validation's copies are
        not kept while training)."""
        self.topk_graphs.clear()
        self.topk_casts.clear()

    def train(self, mode: bool = True) -> HeadTailOutput:
        if mode and len(self.topk_casts):
            self.clear_topk_cache()
        return super().train(mode)

    def _apply(self, fn: Any, recurse: bool = True) -> HeadTailOutput:
        # .to(), .cuda(), .half() ... replace the parameters: what the top-k kept of the old ones only holds memory
        self.clear_topk_cache()
        return super()._apply(fn, recurse)

    def loss_arguments(
        self, x: Tensor, targets: fused_loss.SparseTargets, loss: str = "bce", workspace: Optional[int] = None,
        reduction: str = "batchmean",
    ) -> tuple[tuple, bool]:
        """The validated arguments of :func:`lightning_haste.ops.head_tail_loss_2d` for :meth:`loss`, and whether
        autocast was on (the op then runs with it off, on arguments cast to its dtype). For callers that replay
        the loss on fixed targets, e.g. in a CUDA graph: this is the part of :meth:`loss` that reads the targets
        on the host and copies them to the device. ``workspace``: bytes per chunk of labels instead of
        :func:`~lightning_haste.loss.workspace_bytes` (for benchmarks)."""
        fused_loss.check_loss(loss)
        fused_loss.check_reduction(reduction)
        x2d = self._check_input(x)
        batch = x2d.shape[0]
        rows, labels = fused_loss.sparse_targets(targets, batch, self.num_labels)
        positions = self._positions_on_host()[labels]
        order = np.lexsort((rows, positions))
        rows, positions = rows[order], positions[order]

        tail = self.tail
        x2d, params, kernels, autocast = self._op_arguments(x2d)
        group_size = tail.group_size if tail is not None else 1
        fan_in = tail.fan_in if tail is not None else 1
        if workspace is None:
            workspace = fused_loss.workspace_bytes(batch, self.num_labels, self.memory_budget)
        workspace = check_positive_int("workspace", workspace)
        chunks = fused_loss.loss_chunks(batch, self.num_head_labels, self.num_tail_labels, group_size, fan_in,
                                        x2d.dtype, kernels, workspace)
        bounds = torch.from_numpy(np.searchsorted(positions, np.asarray(chunks.starts)).astype(np.int64))
        device = x2d.device
        pairs = torch.from_numpy(np.stack([rows, positions]))
        if device.type == "cuda" and not torch.compiler.is_compiling():  # (pinning is not traceable)
            # from pinned memory the copy is asynchronous: a copy from pageable memory would wait for the GPU to
            # finish the work queued before it (the previous step), and the host could not run ahead
            pairs = pairs.pin_memory()
        pairs = pairs.to(device, non_blocking=True)
        rows_t, positions_t = pairs[0], pairs[1]
        slices = [*self.head_slice, *self.tail_slice]
        args = (x2d, params, rows_t, positions_t, bounds, loss, reduction, slices, self.num_head_labels,
                self.num_tail_labels, kernels, workspace)
        return args, autocast

    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, label ids)`` per row in original label ids, sorted by descending score; of equal
        scores the smaller label id comes first (NaN ranks above ``+inf``; :mod:`lightning_haste.ranking`), the same
        on CPU and GPU. Scores are the layer's logits; on CUDA the tail's come from the main loop of the kernel
        that :meth:`forward` runs for the same batch (bit for bit the 16-bit logits it stores).

        The full ``[batch, num_labels]`` logits are never materialised (nor permuted). With the CUDA kernels (a
        bfloat16/float16 layer on CUDA) the tail's scores never leave the kernel either: it keeps only the labels
        that can still reach the top-k (:mod:`lightning_haste.topk`); its temporaries stay below an eighth of a
        16-bit ``[batch, num_labels]`` tensor. Otherwise (and for ``k`` above 4096) the labels are walked in
        chunks of at most ``memory_budget`` bytes with a running top-k.
        """
        k = check_positive_int("k", k)
        if k > self.num_labels:
            raise ValueError(f"k={k} must be <= num_labels={self.num_labels}")
        lead = x.shape[:-1]
        x2d = self._check_input(x)
        key = self._topk_graph_key(x2d, k)
        replayed = self._replayed_topk(key, x2d, k) if key is not None else None
        if replayed is not None and len(replayed) == 2:  # every round in the graph: exact, nothing to check
            scores, ids = replayed
        elif replayed is not None:
            scores, ids, unresolved, overflowed = replayed
            if bool(overflowed):  # a list overflowed in the one round: those rows by the whole eager path
                rows = unresolved.nonzero().flatten()
                rows_scores, rows_ids, _ = self._eager_topk(x2d.index_select(0, rows), k)
                scores, ids = scores.index_copy(0, rows, rows_scores), ids.index_copy(0, rows, rows_ids)
        else:
            scores, ids, fused = self._eager_topk(x2d, k)
            if key is not None:
                self.topk_graphs.remember(key, capturable=fused)
        return scores.reshape(*lead, k), ids.reshape(*lead, k)

    def _eager_topk(self, x2d: Tensor, k: int) -> tuple[Tensor, Tensor, bool]:
        """``(scores, ids, fused)``: the top-k by the candidate kernels launched one by one (``fused``; rounds until
        the lists hold every candidate), or by the chunked path where the kernels do not run; rows whose list
        keeps overflowing also by the chunked path."""
        fused = self._fused_topk(x2d, k)
        if fused is None:
            return (*self._chunked_topk(x2d, k), False)
        scores, ids, unresolved = fused
        if unresolved.numel() and bool(unresolved.any()):  # more than a list of scores tied at the k-th best
            rows = unresolved.nonzero().flatten()
            rows_scores, rows_ids = self._chunked_topk(x2d.index_select(0, rows), k)
            scores, ids = scores.index_copy(0, rows, rows_scores), ids.index_copy(0, rows, rows_ids)
        return scores, ids, True

    def _replayed_topk(self, key: tuple, x2d: Tensor, k: int) -> Optional[tuple[Tensor, ...]]:
        """The top-k replayed from the CUDA graph of ``key`` (captured on the key's second call): ``(scores, ids)``,
        exact, where the graph holds the rare further rounds and the fallback as conditional nodes
        (``RoundGraphs(conditional=True)`` where :func:`lightning_haste.topk.conditional_blocks_supported`: the host
        reads nothing back), else ``(scores, ids, unresolved [B], any unresolved [])`` of one round; None where the
        eager path runs instead (the key's first call, or a tail that does not run the kernels)."""
        assert self.tail is not None
        # validated here, outside the capture (inside it a no-op, as the index has not changed since)
        self.tail.check_group_index()
        device_type = x2d.device.type
        autocast_dtype = F.autocast_dtype(x2d)
        autocast = autocast_dtype is not None
        if autocast:
            # the graph reads the parameters' cached copies: refreshed here, before it replays (and before a capture,
            # which then finds them current)
            self._cached_casts(autocast_dtype)
        whole = self.topk_graphs.conditional and topk_rounds.conditional_blocks_supported(x2d.device)

        def fallback(unresolved: Tensor, scores: Tensor, ids: Tensor, static_x: Tensor) -> None:
            # The chunked path for every row (static shapes), kept for the flagged ones; under the caller's
            # autocast, as the eager fallback runs. Its chunks (logits and ranking keys) are held to a 64th of a
            # 16-bit [B, L] tensor: their memory stays in the graph's pool.
            budget = min(self.memory_budget, max(2**20, static_x.shape[0] * self.num_labels // 32))
            with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast) if autocast else (
                    contextlib.nullcontext()):
                exact_scores, exact_ids = self._chunked_topk(static_x, k, budget)
            rows = unresolved[:, None]
            scores.copy_(torch.where(rows, exact_scores.to(scores.dtype), scores))
            ids.copy_(torch.where(rows, exact_ids, ids))

        def one_round(static_x: Tensor) -> tuple[Tensor, ...]:
            if whole:
                pool = self.topk_graphs.pool
                on_device = topk_rounds.DeviceRounds(
                    lambda flag: topk_rounds.conditional_block(flag, pool), lambda u, s, i: fallback(u, s, i, static_x))
                fused = self._fused_topk(static_x, k, synchronize=False, on_device=on_device)
                assert fused is not None, "only keys whose eager call ran the kernels are captured"
                return fused[0], fused[1]
            fused = self._fused_topk(static_x, k, synchronize=False)
            assert fused is not None, "only keys whose eager call ran the kernels are captured"
            return fused  # with the round's overflow flag, which its merge wrote: the host reads one byte

        with torch.no_grad():
            return self.topk_graphs.replay(key, x2d.detach(), one_round)

    def _topk_graph_key(self, x2d: Tensor, k: int) -> Optional[tuple]:
        """What a captured top-k round of this input depends on besides the values it reads (inference mode too:
        a graph's tensors made under it cannot be written outside it); None where no graph is used (graphs off,
        not on CUDA, under ``torch.compile``, no tail)."""
        if self.topk_graphs.max_graphs == 0 or not x2d.is_cuda or torch.compiler.is_compiling() or self.tail is None:
            return None
        from . import kernels  # noqa: PLC0415 - imports no CuPy itself; the CUDA path only

        def described(t: Optional[Tensor]) -> Optional[tuple]:
            return None if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)

        head, tail = self.head, self.tail
        autocast_dtype = F.autocast_dtype(x2d)
        params = (head.weight if head is not None else None, head.bias if head is not None else None, tail.weight,
                  tail.bias, tail.group_index, self.label_permutation)
        return (
            tuple(x2d.shape), x2d.dtype, x2d.device, k, self.memory_budget, (*self.head_slice, *self.tail_slice),
            autocast_dtype is not None, autocast_dtype, kernels.tuning.current(), tail.backend,
            torch.is_inference_mode_enabled(), *(described(t) for t in params),
        )

    def _fused_topk(
        self, x2d: Tensor, k: int, synchronize: bool = True, on_device: Optional[topk_rounds.DeviceRounds] = None,
    ) -> Optional[tuple[Tensor, ...]]:
        """``(scores, ids, unresolved)`` of :func:`lightning_haste.ops.head_tail_topk` (autocast off, on arguments
        cast to its dtype), or of one round without a host synchronisation (``synchronize=False``, for a CUDA
        graph: with the round's overflow flag after them, unless ``on_device`` completes the rounds); None where
        the tail does not run the kernels or ``k`` is above their largest (``topk.MAX_FUSED_K``)."""
        fused = self._fused_topk_arguments(x2d)
        if fused is None or k > topk_rounds.MAX_FUSED_K:
            return None
        args, autocast = fused
        with torch.autocast(x2d.device.type, enabled=False) if autocast else contextlib.nullcontext():
            if synchronize:
                return ops.head_tail_topk(*args, k, self.memory_budget)
            return ops._head_tail_topk(*args, k, self.memory_budget, synchronize=False, on_device=on_device)

    def _fused_topk_arguments(self, x2d: Tensor) -> Optional[tuple[tuple, bool]]:
        """The arguments of :func:`lightning_haste.ops.head_tail_topk` (:meth:`_op_arguments` and the layer's
        shapes) and whether autocast was on; None when the tail does not run the CUDA kernels (the chunked path).
        Validates the tail's index either way."""
        x2d, params, kernels, autocast = self._op_arguments(x2d, cached_casts=True)
        if not kernels:
            return None
        args = (x2d, *params, [*self.head_slice, *self.tail_slice], self.num_head_labels, self.num_tail_labels,
                self.label_permutation)
        return args, autocast

    def _chunked_topk(self, x2d: Tensor, k: int, memory_budget: Optional[int] = None) -> tuple[Tensor, Tensor]:
        """The top-k by chunks of labels of at most ``memory_budget`` bytes (the layer's by default), merged in the
        ranking order."""
        memory_budget = self.memory_budget if memory_budget is None else memory_budget
        # a chunk's logits and their int64 ranking keys
        labels_per_chunk = max(1, memory_budget // ((x2d.element_size() + 8) * x2d.shape[0]))
        best: Optional[tuple[Tensor, Tensor]] = None
        head = self.head
        if head is not None:
            x_head = self._head_input(x2d)
            for c0 in range(0, self.num_head_labels, labels_per_chunk):
                c1 = min(self.num_head_labels, c0 + labels_per_chunk)
                logits = nnf.linear(x_head, head.weight[c0:c1], head.bias[c0:c1] if head.bias is not None else None)
                best = ranked_merge(best, logits, self.label_permutation[c0:c1], k)
        if self.tail is not None:
            tail = self.tail
            x_tail = self._tail_input(x2d)
            groups_per_chunk = max(1, labels_per_chunk // tail.group_size)
            for g0 in range(0, tail.num_groups, groups_per_chunk):
                g1 = min(tail.num_groups, g0 + groups_per_chunk)
                p0, p1 = g0 * tail.group_size, min(tail.out_features, g1 * tail.group_size)
                logits = F.group_shared_fanin(
                    x_tail,
                    tail.weight[g0 * tail.group_size : g1 * tail.group_size],
                    tail.group_index[g0:g1],
                    tail.bias[p0:p1] if tail.bias is not None else None,
                    p1 - p0,
                    memory_budget=memory_budget,
                    check_index=False,
                    backend=tail.backend,
                )
                start = self.num_head_labels + p0
                best = ranked_merge(best, logits, self.label_permutation[start : start + p1 - p0], k)
        assert best is not None
        return best

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_labels={self.num_labels}, "
            f"num_head_labels={self.num_head_labels}, num_tail_labels={self.num_tail_labels}, "
            f"head_features={self.head_slice}, tail_features={self.tail_slice}"
        )
