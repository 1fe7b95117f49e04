"""Dynamic sparse training (prune and regrow) for the group-shared fixed fan-in layer.

A rewire scores every slot of every group (``mean`` or ``max`` over the group's real labels of
``|weight|``), prunes the lowest-scoring slots of each group (a fraction of ``fan_in``, or all below a
threshold), regrows as many slots per group at features that the group did not read before (uniformly
at random, without replacement, so rows stay duplicate-free), and initialises the regrown weights. It is
vectorised over groups (no Python loop over groups) and runs wherever the layer lives.

With ``seed=`` (what :class:`~lightning_haste.SparseRegrowthCallback` uses) the random draws are keyed: every
draw of group ``g`` is a counter-based hash of ``(seed, g + layer.first_group, feature or weight slot)``, so a
group's rewire depends on nothing else: not on the other groups, the order in which they are processed, the
device, or which rank of a label-sharded layer holds the group. A layer split into shards (each with its
``first_group``) then rewires exactly like the whole layer.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .gsfi import GroupSharedFanIn

__all__ = ["RewireStats", "slot_scores", "rewire_", "reset_optimizer_state_", "regrown_weight_mask", "keyed_hash32"]

SCORES = ("mean", "max")
INITS = ("zero", "uniform")


@dataclass(frozen=True)
class RewireStats:
    """What one rewire did.

    Attributes:
        pruned_slots: slots pruned (and regrown) over all groups.
        pruned_per_group: their mean per group.
        mean_score: mean slot score before pruning.
        pruned_score: mean score of the pruned slots (0 when none).
        changed_fraction: fraction of all index entries that now point at another feature.
        regrown: bool ``[num_groups, fan_in]``, True at regrown slots.
    """

    pruned_slots: int
    pruned_per_group: float
    mean_score: float
    pruned_score: float
    changed_fraction: float
    regrown: Tensor


def slot_scores(layer: GroupSharedFanIn, score: str = "mean") -> Tensor:
    """Per-slot scores ``[num_groups, fan_in]`` (float32): ``mean`` or ``max`` of ``|weight|`` over the
    group's real labels (the padding labels of the last group do not count)."""
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    weight = layer.weight.detach().abs().float().view(layer.num_groups, layer.group_size, layer.fan_in)
    if score == "max":  # padding weights are zero, so they never win a max of absolute values
        return weight.amax(dim=1)
    labels = torch.full((layer.num_groups, 1), float(layer.group_size), device=weight.device)
    labels[-1] = layer.out_features - (layer.num_groups - 1) * layer.group_size
    return weight.sum(dim=1) / labels


def regrown_weight_mask(layer: GroupSharedFanIn, regrown: Tensor) -> Tensor:
    """Bool mask shaped like ``layer.weight``: the weights of regrown slots (padding labels excluded). ``regrown``:
    bool ``[num_groups, fan_in]``, the slots a rewire regrew."""
    if not isinstance(regrown, Tensor) or regrown.dtype != torch.bool or tuple(regrown.shape) != (
            layer.num_groups, layer.fan_in):
        raise ValueError(f"regrown must be a bool tensor of shape ({layer.num_groups}, {layer.fan_in}) "
                         "[num_groups, fan_in]")
    mask = regrown.repeat_interleave(layer.group_size, dim=0)
    mask[layer.out_features :] = False
    return mask


def check_init_scale(init_scale: Any) -> float:
    """``init_scale`` as a float if it is a finite number >= 0 (the half-width of the regrown weights' uniform
    draw), else an error."""
    if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real) or not math.isfinite(init_scale):
        raise TypeError(f"init_scale must be a finite real number, got {init_scale!r}")
    if init_scale < 0:
        raise ValueError(f"init_scale must be >= 0, got {init_scale}")
    return float(init_scale)


def _check_fraction(prune_fraction: Optional[float], threshold: Optional[float]) -> None:
    if (prune_fraction is None) == (threshold is None):
        raise ValueError("give exactly one of prune_fraction and threshold")
    value, name = (prune_fraction, "prune_fraction") if prune_fraction is not None else (threshold, "threshold")
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite real number, got {value!r}")
    if prune_fraction is not None and not 0.0 <= float(prune_fraction) <= 1.0:
        raise ValueError(f"prune_fraction must be in [0, 1], got {prune_fraction}")
    if threshold is not None and float(threshold) < 0.0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")


_MASK32 = 0xFFFFFFFF
# Distinct constants keep the hashes of the different draws (group keys, feature keys, weight values) apart.
_STREAM_GROUP, _STREAM_ROUND, _STREAM_FEATURE, _STREAM_WEIGHT, _STREAM_SLOT = (
    0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35, 0x27D4EB2F, 0x165667B1,
)


def _mul32(x: Any, constant: int) -> Any:
    """``x * constant mod 2**32`` for ``0 <= x < 2**32`` (a Python int or an int64 tensor), in two 16-bit halves of
    the constant so that no int64 product overflows (signed overflow is not defined behaviour on every device)."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Any) -> Any:
    """A bijection of ``[0, 2**32)`` with full avalanche (the "lowbias32" integer hash), elementwise."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _seed_words(seed: int, stream: int) -> int:
    """A 32-bit key of ``(seed, stream)`` for any integer seed (its low and high 32-bit words both count)."""
    seed = int(seed) % 2**64
    return _mix32((seed & _MASK32) ^ _mix32(((seed >> 32) & _MASK32) ^ _mix32(stream)))


def keyed_hash32(seed: int, stream: int, ids: Tensor) -> Tensor:
    """Counter-based 32-bit hashes (int64 tensor in ``[0, 2**32)``) of ``(seed, stream, id)`` for an int64 tensor of
    non-negative ``ids`` (< 2**63), elementwise: the same value for the same triple on every device and every
    rank, whatever else is hashed alongside."""
    ids = ids.long()
    low = ids & _MASK32
    high = ids >> 32
    return _mix32(_mix32(low ^ _seed_words(seed, stream)) ^ high)


def _top_new_features(
    group_index: Tensor, counts: Tensor, in_features: int, budget: int, bytes_per_key: int,
    row_keys: Callable[[int, int], Tensor],
) -> tuple[Tensor, Tensor]:
    """For every row, the ``counts[row]`` features not in the row with the largest keys (``row_keys(r0, r1)``:
    ``[r1 - r0, in_features]`` non-negative keys of rows ``r0 .. r1``, made in chunks of about ``budget`` bytes at
    ``bytes_per_key`` a key, in row order).

    Returns ``(candidates [rows, max_count], take [rows, max_count] bool)``; the features to use are
    ``candidates[take]`` in row-major order. No keys are made when no row regrows.
    """
    rows = group_index.shape[0]
    most = int(counts.max()) if rows else 0
    device = group_index.device
    candidates = torch.zeros(rows, most, dtype=torch.long, device=device)
    if most == 0:
        return candidates, torch.zeros(rows, 0, dtype=torch.bool, device=device)
    step = max(1, budget // (bytes_per_key * in_features))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        keys = row_keys(r0, r1)
        keys.scatter_(1, group_index[r0:r1].long(), -1)  # features the group reads already: never drawn
        candidates[r0:r1] = keys.topk(most, dim=1).indices
    take = torch.arange(most, device=device).unsqueeze(0) < counts.unsqueeze(1)
    return candidates, take


def _keyed_new_features(
    group_index: Tensor, counts: Tensor, in_features: int, seed: int, first_group: int, budget: int
) -> tuple[Tensor, Tensor]:
    """:func:`_draw_new_features` with keyed draws: the key of feature ``h`` for group ``g`` is
    ``mix(mix(a_g ^ f_h) ^ b_g)`` with per-group keys ``a_g, b_g`` and per-feature keys ``f_h`` (all hashes of the
    seed and the global ids). For a fixed group the key is a bijection of ``f_h``, itself a bijection of ``h``: the
    keys of a row are distinct, so the top keys, hence the drawn features, are the same on every device."""
    device = group_index.device
    feature_keys = keyed_hash32(seed, _STREAM_FEATURE, torch.arange(in_features, device=device))

    def row_keys(r0: int, r1: int) -> Tensor:
        groups = torch.arange(first_group + r0, first_group + r1, dtype=torch.long, device=device)
        outer = keyed_hash32(seed, _STREAM_GROUP, groups).unsqueeze(1)
        inner = keyed_hash32(seed, _STREAM_ROUND, groups).unsqueeze(1)
        return _mix32(_mix32(outer ^ feature_keys) ^ inner)

    # about three int64 [rows, in_features] temporaries per chunk
    return _top_new_features(group_index, counts, in_features, budget, 24, row_keys)


def _keyed_uniform_weights(
    layer: GroupSharedFanIn, mask: Tensor, init_scale: float, seed: int, budget: int
) -> Tensor:
    """``layer.weight`` with the entries at ``mask`` replaced by keyed uniform draws in ``[-init_scale, init_scale]``:
    the value of weight ``(row, slot)`` hashes ``(seed, global row, slot)``, the global row being
    ``first_group * group_size + row``. 24 random bits per value, computed in float64 and rounded once to the weight's
    dtype."""
    weight = layer.weight.detach()
    out = weight.clone()
    fan_in = weight.shape[1]
    device = weight.device
    slot_keys = keyed_hash32(seed, _STREAM_SLOT, torch.arange(fan_in, device=device))
    first_row = layer.first_group * layer.group_size
    step = max(1, budget // (24 * fan_in))
    for r0 in range(0, weight.shape[0], step):
        r1 = min(weight.shape[0], r0 + step)
        chunk_mask = mask[r0:r1]
        if not bool(chunk_mask.any()):
            continue
        rows = torch.arange(first_row + r0, first_row + r1, dtype=torch.long, device=device)
        bits = _mix32(keyed_hash32(seed, _STREAM_WEIGHT, rows).unsqueeze(1) ^ slot_keys)
        unit = ((bits >> 8).double() + 0.5) * 2.0**-23 - 1.0  # in (-1, 1), symmetric
        values = (unit * init_scale).to(weight.dtype)
        out[r0:r1] = torch.where(chunk_mask, values, out[r0:r1])
    return out


def _draw_new_features(
    group_index: Tensor, counts: Tensor, in_features: int, generator: Optional[torch.Generator], budget: int
) -> tuple[Tensor, Tensor]:
    """For every row, ``counts[row]`` distinct features not in the row, uniformly at random.

    Returns ``(candidates [rows, max_count], take [rows, max_count] bool)``; the features to use are
    ``candidates[take]`` in row-major order.
    """
    device = group_index.device
    draw_device = generator.device if generator is not None else device

    def row_keys(r0: int, r1: int) -> Tensor:
        return torch.rand(r1 - r0, in_features, generator=generator, device=draw_device).to(device)

    return _top_new_features(group_index, counts, in_features, budget, 4, row_keys)


def pruned_slot_count(prune_fraction: float, fan_in: int) -> int:
    """Slots a group prunes (and regrows) at ``prune_fraction``: ``floor(prune_fraction * fan_in)``, with a margin
    for fractions such as ``0.3 * 10`` that float arithmetic puts just below a whole number."""
    return math.floor(float(prune_fraction) * fan_in + 1e-9)


@torch.no_grad()
def rewire_(
    layer: GroupSharedFanIn,
    prune_fraction: Optional[float] = None,
    *,
    threshold: Optional[float] = None,
    score: str = "mean",
    regrow: str = "random",
    init: str = "zero",
    init_scale: float = 1e-3,
    generator: Optional[torch.Generator] = None,
    memory_budget: int = 64 * 2**20,
    seed: Optional[int] = None,
) -> RewireStats:
    """Prune and regrow the slots of every group of ``layer`` in place.

    Args:
        layer: the :class:`~lightning_haste.GroupSharedFanIn` to rewire.
        prune_fraction: fraction of each group's ``fan_in`` slots to prune (``floor(fraction * fan_in)``
            per group), lowest scores first (ties: lower slot first).
        threshold: instead of a fraction, prune every slot whose score is below this value.
        score: ``"mean"`` or ``"max"`` of ``|weight|`` over the group's labels.
        regrow: ``"random"``: uniform over the features the group did not read before the rewire.
        init: regrown weights start at ``"zero"`` or ``"uniform"`` in ``[-init_scale, init_scale]``.
        generator: random generator (seed it identically on every rank for identical topologies); all groups draw
            from it in turn, so a group's draw depends on the groups before it.
        memory_budget: bound in bytes on the temporary random keys.
        seed: instead of ``generator``, keyed draws: group ``g``'s new features and regrown weights depend only on
            ``(seed, layer.first_group + g)`` (see the module docstring), so the shards of a label-sharded layer
            rewire exactly as the whole layer does, on any number of ranks.

    Returns:
        :class:`RewireStats`; its ``regrown`` mask feeds :func:`reset_optimizer_state_`.
    """
    _check_fraction(prune_fraction, threshold)
    if regrow != "random":
        raise ValueError(f"regrow must be 'random', got {regrow!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_init_scale(init_scale)
    if seed is not None:
        if generator is not None:
            raise ValueError("give at most one of generator and seed")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be an integer, got {seed!r}")
    layer.check_group_index(force=True)  # in full: the new index is built from the old one
    num_groups, fan_in, in_features = layer.num_groups, layer.fan_in, layer.in_features
    scores = slot_scores(layer, score)
    # A slot whose weights are not finite carries no usable signal: it is pruned first, and reported.
    broken = ~torch.isfinite(scores)
    num_broken = int(broken.sum())
    if num_broken:
        warnings.warn(f"rewire: {num_broken} slots have non-finite weights; they are pruned first", stacklevel=2)
        scores = scores.masked_fill(broken, float("-inf"))
    order = torch.sort(scores, dim=1, stable=True).indices  # lowest first, ties by slot
    if prune_fraction is not None:
        count = pruned_slot_count(prune_fraction, fan_in)
        counts = torch.full((num_groups,), count, dtype=torch.long, device=scores.device)
    else:
        counts = (scores < float(threshold)).sum(dim=1)
    free = in_features - fan_in
    if int(counts.max()) > free:
        raise ValueError(
            f"cannot regrow {int(counts.max())} slots in a group: only {free} features are outside it "
            f"(in_features={in_features}, fan_in={fan_in})"
        )
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(fan_in, device=order.device).expand_as(order))
    pruned = ranks < counts.unsqueeze(1)  # [num_groups, fan_in]

    # Everything new is computed first, then written: a failure leaves the layer as it was.
    if seed is not None:
        candidates, take = _keyed_new_features(layer.group_index, counts, in_features, int(seed),
                                               int(getattr(layer, "first_group", 0)), memory_budget)
    else:
        candidates, take = _draw_new_features(layer.group_index, counts, in_features, generator, memory_budget)
    new_index = layer.group_index.clone()
    new_index[pruned] = candidates[take].to(new_index.dtype)
    changed = new_index != layer.group_index
    weight_mask = regrown_weight_mask(layer, pruned)
    if init == "zero":
        new_weight = layer.weight.masked_fill(weight_mask, 0.0)
    elif seed is not None:
        new_weight = _keyed_uniform_weights(layer, weight_mask, init_scale, int(seed), memory_budget)
    else:
        draw_device = generator.device if generator is not None else layer.weight.device
        values = torch.empty(layer.weight.shape, device=draw_device).uniform_(
            -init_scale, init_scale, generator=generator
        )
        new_weight = torch.where(weight_mask, values.to(layer.weight), layer.weight)
    layer.group_index.copy_(new_index)
    layer.weight.copy_(new_weight)
    layer.mark_group_index_valid()

    total = int(counts.sum())
    return RewireStats(
        pruned_slots=total,
        pruned_per_group=total / num_groups,
        mean_score=float(scores.mean()),
        pruned_score=float(scores[pruned].mean()) if total else 0.0,
        changed_fraction=float(changed.float().mean()),
        regrown=pruned,
    )


@torch.no_grad()
def reset_optimizer_state_(optimizer: torch.optim.Optimizer, param: Tensor, mask: Tensor) -> int:
    """Zero the optimizer state of ``param`` at ``mask`` (True), for any optimizer.

    Every per-parameter state tensor shaped like the parameter (SGD ``momentum_buffer``, Adam/AdamW
    ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ...) is zeroed where ``mask`` is True and left
    unchanged elsewhere. Returns how many state tensors were touched.
    """
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != param.shape:
        raise ValueError(f"mask must have the parameter's shape {tuple(param.shape)}, got {tuple(mask.shape)}")
    touched = 0
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(mask.to(value.device), 0)
            touched += 1
    return touched
