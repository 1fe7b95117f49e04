"""The group-shared fixed fan-in layer as an ``nn.Module``."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from . import functional as F
from ._checks import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_backend,
    check_float_tensor,
    check_group_index,
    check_memory_budget,
    check_positive_int,
    check_same_device_dtype,
    check_when_changed,
    num_groups_for,
)

if TYPE_CHECKING:  # pragma: no cover
    from .dst import RewireStats

__all__ = ["GroupSharedFanIn", "bank_interleaved_order", "sample_group_index"]

#: Residues of the feature ids that :func:`bank_interleaved_order` deals out in turn.
BANK_RESIDUES = 8


def _rows_per_chunk(in_features: int, budget: int = 64 * 2**20) -> int:
    return max(1, budget // (4 * in_features))


def bank_interleaved_order(group_index: Tensor) -> Tensor:
    """Per-row column order that deals the features out by residue mod 8, in turn.

    Within each row, features are taken in ascending order inside each residue class ``f % 8``, and
    the classes are interleaved: position ``8q + r`` holds the ``q``-th feature of residue ``r`` as
    long as that class lasts. The CUDA kernels read the rows of 8 (forward gathers) or 4 (grad-input
    adds) consecutive slots of a group in one shared-memory access, and a row's bank is set by its
    feature id mod 8 (mod 4): with distinct residues those accesses are free of bank conflicts.
    The layer's function does not depend on the order of a group's slots.

    Returns an int64 ``[num_groups, fan_in]`` permutation to apply with ``gather(1, order)``.
    """
    if not isinstance(group_index, Tensor) or group_index.dim() != 2:
        raise ValueError("group_index must be a 2-D tensor [num_groups, fan_in]")
    if group_index.dtype not in INDEX_DTYPES:
        raise TypeError(f"group_index must have dtype torch.int32 or torch.int64, got {group_index.dtype}")
    if group_index.numel() == 0:
        return torch.zeros(group_index.shape, dtype=torch.long, device=group_index.device)
    if int(group_index.min()) < 0:
        raise ValueError("group_index holds negative feature ids")
    features = group_index.long()
    residue = features % BANK_RESIDUES
    by_class = torch.argsort(residue * (int(features.max()) + 1) + features, dim=1)
    class_sorted = residue.gather(1, by_class)
    counts = torch.zeros(features.shape[0], BANK_RESIDUES, dtype=torch.long, device=features.device)
    counts.scatter_add_(1, residue, torch.ones_like(residue))
    starts = counts.cumsum(1) - counts
    position = torch.arange(features.shape[1], device=features.device).expand_as(features)
    rank = position - starts.gather(1, class_sorted)
    return by_class.gather(1, torch.argsort(rank * BANK_RESIDUES + class_sorted, dim=1))


def sample_group_index(
    num_groups: int,
    in_features: int,
    fan_in: int,
    *,
    balanced: bool = True,
    generator: Optional[torch.Generator] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    """Draw ``fan_in`` distinct features (without replacement) for every group.

    With ``balanced`` (the default) and ``fan_in`` a multiple of 8 (as the CUDA kernels require), every
    group takes ``fan_in / 8`` features from each residue class ``f % 8`` of the feature ids, uniformly
    at random within the class: a feature is read with probability ``fan_in / in_features`` (exactly
    when ``in_features`` is a multiple of 8; else its class size rounds it), and in
    :func:`bank_interleaved_order` each aligned block of 8 slots then holds 8 distinct residues, so the
    kernels' shared-memory accesses are free of bank conflicts (a uniform draw leaves some classes
    short, and the tail of a row repeats residues). Otherwise, or with ``balanced=False``, the rows are
    uniform draws from all ``fan_in``-subsets.

    Returns an int32 ``[num_groups, fan_in]`` tensor whose rows are in :func:`bank_interleaved_order`.
    Rows are drawn in chunks so that the temporary random matrix stays small for millions of groups.
    """
    num_groups = check_positive_int("num_groups", num_groups)
    in_features = check_positive_int("in_features", in_features)
    fan_in = check_positive_int("fan_in", fan_in)
    if fan_in > in_features:
        raise ValueError(f"fan_in={fan_in} must be <= in_features={in_features}")
    draw_device = generator.device if generator is not None else torch.device("cpu")
    out = torch.empty(num_groups, fan_in, dtype=torch.int32, device=draw_device)
    step = _rows_per_chunk(in_features)
    for r0 in range(0, num_groups, step):
        r1 = min(num_groups, r0 + step)
        if balanced and fan_in % BANK_RESIDUES == 0:
            chosen = _balanced_draw(r1 - r0, in_features, fan_in, generator, draw_device)
        else:
            keys = torch.rand(r1 - r0, in_features, generator=generator, device=draw_device)
            chosen = keys.topk(fan_in, dim=1, sorted=False).indices
        out[r0:r1] = chosen.gather(1, bank_interleaved_order(chosen)).to(torch.int32)
    return out.to(device) if device is not None else out


def _balanced_draw(
    rows: int, in_features: int, fan_in: int, generator: Optional[torch.Generator], device: torch.device
) -> Tensor:
    """``[rows, fan_in]`` distinct features, ``fan_in / 8`` from each residue class (``fan_in % 8 == 0``).

    Feature ``8 i + r`` is entry ``(i, r)`` of a ``[ceil(in_features / 8), 8]`` grid; the top keys of each
    column are a uniform draw within the class (the smallest class has ``in_features // 8 >= fan_in / 8``
    members). Entry ``(q, r)`` of the ``[fan_in / 8, 8]`` result, flattened, is slot ``8 q + r``.
    """
    per_class = -(-in_features // BANK_RESIDUES)
    keys = torch.rand(rows, per_class, BANK_RESIDUES, generator=generator, device=device)
    feature = torch.arange(per_class * BANK_RESIDUES, device=device).view(per_class, BANK_RESIDUES)
    keys[:, feature >= in_features] = -1.0  # grid entries past in_features are never drawn
    residue = torch.arange(BANK_RESIDUES, device=device)
    chosen = keys.topk(fan_in // BANK_RESIDUES, dim=1).indices * BANK_RESIDUES + residue
    return chosen.reshape(rows, fan_in)


def _uniform_(tensor: Tensor, bound: float, generator: Optional[torch.Generator]) -> None:
    """``tensor.uniform_(-bound, bound)`` drawing from ``generator`` even if it lives elsewhere."""
    with torch.no_grad():
        if generator is None or generator.device == tensor.device:
            tensor.uniform_(-bound, bound, generator=generator)
        else:
            draw = torch.empty(tensor.shape, dtype=torch.float32, device=generator.device)
            tensor.copy_(draw.uniform_(-bound, bound, generator=generator))


class GroupSharedFanIn(nn.Module):
    """Group-shared fixed fan-in sparse linear layer (HASTE).

    ``out_features`` labels are split into ``num_groups = ceil(out_features / group_size)`` groups of
    ``group_size`` consecutive labels. All labels of a group read the same ``fan_in`` input features
    (``group_index[g]``) but keep their own weights, so the layer has ``out_features * fan_in`` weights
    instead of ``out_features * in_features``. ``group_size=1`` is standard per-label fixed fan-in.

    The last group is padded up to ``group_size`` labels; the padding labels' weights are zero,
    receive an exactly-zero gradient and their logits are never returned.

    Args:
        in_features: input width ``H``.
        out_features: number of labels ``L``.
        fan_in: inputs per label ``K``, ``1 <= fan_in <= in_features``.
        group_size: labels per group ``G`` (default 32).
        bias: learn a per-label bias.
        device, dtype: factory arguments, as for ``nn.Linear``.
        generator: random generator for the index sampling and the weight initialisation. The index
            is drawn by :func:`sample_group_index` (balanced over feature-id residues mod 8 when
            ``fan_in`` is a multiple of 8, which keeps the CUDA kernels free of bank conflicts).
        memory_budget: bound in bytes on the temporaries of the pure-PyTorch path (default 256 MiB).
        backend: ``"auto"`` (CUDA kernels for bfloat16/float16 CUDA tensors when the shape is supported,
            else the pure-PyTorch path), ``"cuda"`` (kernels required) or ``"torch"``.

    Shape:
        input ``[..., in_features]`` -> output ``[..., out_features]``.
    """

    weight: Tensor
    group_index: Tensor
    bias: Optional[Tensor]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fan_in: int,
        group_size: int = 32,
        bias: bool = True,
        *,
        device: Optional[torch.device | str] = None,
        dtype: Optional[torch.dtype] = None,
        generator: Optional[torch.Generator] = None,
        memory_budget: int = F.DEFAULT_MEMORY_BUDGET,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_backend(backend)
        self.backend = backend
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.fan_in = check_positive_int("fan_in", fan_in)
        self.group_size = check_positive_int("group_size", group_size)
        if self.fan_in > self.in_features:
            raise ValueError(f"fan_in={fan_in} must be <= in_features={in_features}")
        self.memory_budget = check_memory_budget(memory_budget)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be one of {[str(d) for d in FLOAT_DTYPES]}, got {dtype}")
        factory = {"device": device, "dtype": dtype}
        self.num_groups = num_groups_for(self.out_features, self.group_size)
        # The global id of group 0: non-zero for the tail shard of a label-sharded layer, whose keyed rewiring
        # draws (``rewire(seed=...)``) are then those of the same groups of the whole layer.
        self.first_group = 0
        self.weight = nn.Parameter(torch.empty(self.num_groups * self.group_size, self.fan_in, **factory))
        self.bias = nn.Parameter(torch.empty(self.out_features, **factory)) if bias else None
        self.register_buffer(
            "group_index",
            sample_group_index(self.num_groups, self.in_features, self.fan_in, generator=generator).to(
                self.weight.device
            ),
        )
        self._validated_index: Optional[tuple[int, int, int]] = self._index_key()
        self.reset_parameters(generator=generator)

    @property
    def padded_out_features(self) -> int:
        """``num_groups * group_size``: rows of ``weight``, padding labels included."""
        return self.num_groups * self.group_size

    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Uniform(+-1/sqrt(fan_in)) weights and bias (``nn.Linear``'s rule on the true fan-in)."""
        bound = 1.0 / math.sqrt(self.fan_in)
        _uniform_(self.weight, bound, generator)
        if self.bias is not None:
            _uniform_(self.bias, bound, generator)
        self.zero_padding_()

    @torch.no_grad()
    def zero_padding_(self) -> None:
        """Set the weights of the padding labels of the last group to exactly zero."""
        self.weight[self.out_features :].zero_()

    def _index_key(self) -> tuple[int, int, int]:
        # The tensor object, its storage and its version: an in-place edit bumps ``_version``, ``load_state_dict``
        # copies in place, and assigning another tensor (or ``.data``) changes the object or the storage, so any
        # of these is noticed and the index is checked again before use.
        index = self.group_index
        return (id(index), index.data_ptr(), index._version)

    def _check_group_index_layout(self) -> None:
        """The per-use checks that read no values: type, dtype, shape, contiguity and device."""
        index = self.group_index
        if not isinstance(index, Tensor):
            raise TypeError(f"group_index must be a torch.Tensor, got {type(index).__name__}")
        if index.dtype not in INDEX_DTYPES:
            raise TypeError(f"group_index must have dtype torch.int32 or torch.int64, got {index.dtype}")
        if tuple(index.shape) != (self.num_groups, self.fan_in):
            raise ValueError(
                f"group_index must have shape ({self.num_groups}, {self.fan_in}) [num_groups, fan_in], got "
                f"{tuple(index.shape)}; it was replaced by a tensor of another shape"
            )
        if not index.is_contiguous():
            raise ValueError("group_index must be contiguous; it was replaced by a strided view")
        if index.device != self.weight.device:
            raise ValueError(f"group_index is on {index.device} but weight is on {self.weight.device}")

    def check_parameters(self) -> None:
        """Check ``weight`` and ``bias`` against the layer's shape (the forward does when either changed: another
        object, storage or shape): a parameter replaced by one of another shape, dtype or device would otherwise be
        read as if it had the layer's layout."""
        weight, bias = self.weight, self.bias
        check_float_tensor("weight", weight)
        if tuple(weight.shape) != (self.num_groups * self.group_size, self.fan_in):
            raise ValueError(
                f"weight must have shape ({self.num_groups * self.group_size}, {self.fan_in}) "
                f"[num_groups * group_size, fan_in], got {tuple(weight.shape)}; it was replaced by a tensor of another "
                "shape"
            )
        if bias is not None:
            check_float_tensor("bias", bias)
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(
                    f"bias must have shape ({self.out_features},) [out_features], got {tuple(bias.shape)}"
                )
            check_same_device_dtype("weight", weight, bias=bias)

    def check_group_index(self, *, force: bool = False) -> None:
        """Validate ``group_index``: its layout on every call, its values when it changed.

        Every call checks what costs no read of the values: a tensor of dtype int32/int64, shape
        ``[num_groups, fan_in]``, contiguous, on the weight's device (so it cannot be swapped for a tensor of
        another shape, e.g. a one-row view). The values (range ``[0, in_features)``, distinct entries per row) are
        read when the index is not the one last validated: another tensor object, another storage, or an in-place
        edit since (its version counter moved), or always with ``force=True``. The layer validates its index when
        it is built, when a state dict is loaded and in full before every rewire.

        Limit: writes that bypass the version counter (through ``.data``, a NumPy or DLPack view) are not seen;
        call ``check_group_index(force=True)`` after such an edit. Hashing the values on every call would cost as
        much as reading them. Under ``torch.compile`` the per-call check is skipped: compiled code reads no data
        pointers or tensor versions.
        """
        if torch.compiler.is_compiling():
            return
        self._check_group_index_layout()
        key = self._index_key()
        if force or key != self._validated_index:
            check_group_index(
                self.group_index, self.in_features, num_groups=self.num_groups, fan_in=self.fan_in
            )
            self._validated_index = self._index_key()

    def mark_group_index_valid(self) -> None:
        """Record the current ``group_index`` as validated (for code that built it valid, e.g. a rewire)."""
        self._validated_index = self._index_key()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        # Validate an incoming index before it is copied in: a bad one raises and leaves the layer as it was.
        incoming = state_dict.get(prefix + "group_index")
        if isinstance(incoming, Tensor) and tuple(incoming.shape) == tuple(self.group_index.shape):
            check_group_index(incoming, self.in_features, num_groups=self.num_groups, fan_in=self.fan_in)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if isinstance(incoming, Tensor) and tuple(incoming.shape) == tuple(self.group_index.shape):
            self.mark_group_index_valid()

    def rewire(
        self,
        prune_fraction: Optional[float] = None,
        *,
        threshold: Optional[float] = None,
        score: str = "mean",
        regrow: str = "random",
        init: str = "zero",
        init_scale: float = 1e-3,
        generator: Optional[torch.Generator] = None,
        seed: Optional[int] = None,
    ) -> RewireStats:
        """Prune and regrow the slots of every group in place; see :func:`lightning_haste.dst.rewire_` (``seed``:
        keyed draws, each group's depending only on the seed and its global id ``first_group + g``).

        Reset the optimizer state of the regrown weights afterwards with
        :func:`lightning_haste.dst.reset_optimizer_state_` and ``dst.regrown_weight_mask(layer, stats.regrown)``.
        """
        from .dst import rewire_  # noqa: PLC0415 - dst imports this module for typing only

        return rewire_(
            self, prune_fraction, threshold=threshold, score=score, regrow=regrow, init=init,
            init_scale=init_scale, generator=generator, seed=seed,
        )

    def forward(self, x: Tensor) -> Tensor:
        # The layer's own tensors are consistent by construction (and checked on load): only the input is
        # validated per call, and the index only when it changed.
        check_float_tensor("x", x)
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"x must have shape [..., {self.in_features}] (in_features), got {tuple(x.shape)}"
            )
        if x.numel() == 0:
            raise ValueError(f"x is an empty batch (shape {tuple(x.shape)}); need at least one row")
        weight, bias = self.weight, self.bias
        check_when_changed(self, (weight, bias), self.check_parameters)
        if x.device != weight.device:
            raise ValueError(f"x is on {x.device} but weight is on {weight.device}; move them to one device")
        self.check_group_index()
        x, weight, bias = F._autocast_arguments(x, weight, bias)
        if x.dtype != weight.dtype:
            under = " under autocast, which leaves float64 as it is" if torch.is_autocast_enabled(x.device.type) else ""
            raise TypeError(
                f"x has dtype {x.dtype} but weight has dtype {weight.dtype}{under}; cast one of them "
                "(no implicit precision change is made)"
            )
        return F.apply_checked(
            x, weight, self.group_index, bias, self.out_features, self.memory_budget, self.backend
        )

    @torch.no_grad()
    def interleave_group_index_(self) -> None:
        """Put every group's slots in :func:`bank_interleaved_order` (index and weight columns together).

        The function of the layer is unchanged; the CUDA kernels run faster on this order. New layers
        already have it; use this on an index that came from elsewhere (a checkpoint of another tool),
        before creating the optimizer (per-slot optimizer state is not permuted).
        """
        self.check_group_index(force=True)
        order = bank_interleaved_order(self.group_index)
        self.group_index.copy_(self.group_index.gather(1, order.to(torch.int64)))
        weight = self.weight.view(self.num_groups, self.group_size, self.fan_in)
        weight.copy_(weight.gather(2, order.unsqueeze(1).expand_as(weight)))
        self.mark_group_index_valid()  # a permutation of each valid row is valid

    def to_dense(self) -> Tensor:
        """The equivalent masked dense weight ``[out_features, in_features]`` (differentiable)."""
        self.check_group_index()
        rows = self.group_index.long().repeat_interleave(self.group_size, dim=0)[: self.out_features]
        dense = self.weight.new_zeros(self.out_features, self.in_features)
        return dense.scatter(1, rows, self.weight[: self.out_features])

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, fan_in={self.fan_in}, "
            f"group_size={self.group_size}, num_groups={self.num_groups}, bias={self.bias is not None}"
        )
