"""Dynamic sparse training (prune and regrow) for the group-shared fixed fan-in layer.

A rewire scores every slot of every group (``mean`` or ``max`` over the group's real labels of
``|weight|``), prunes the lowest-scoring slots of each group (a fraction of ``fan_in``, or all below a
threshold), regrows as many slots per group at features that the group did not read before (uniformly
at random, without replacement, so rows stay duplicate-free), and initialises the regrown weights. It is
vectorised over groups (no Python loop over groups) and runs wherever the layer lives.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from .gsfi import GroupSharedFanIn

__all__ = ["RewireStats", "slot_scores", "rewire_", "reset_optimizer_state_", "regrown_weight_mask"]

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
    """Bool mask shaped like ``layer.weight``: the weights of regrown slots (padding labels excluded)."""
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


def _draw_new_features(
    group_index: Tensor, counts: Tensor, in_features: int, generator: Optional[torch.Generator], budget: int
) -> tuple[Tensor, Tensor]:
    """For every row, ``counts[row]`` distinct features not in the row, uniformly at random.

    Returns ``(candidates [rows, max_count], take [rows, max_count] bool)``; the features to use are
    ``candidates[take]`` in row-major order.
    """
    rows = group_index.shape[0]
    most = int(counts.max()) if rows else 0
    device = group_index.device
    candidates = torch.zeros(rows, most, dtype=torch.long, device=device)
    if most == 0:
        return candidates, torch.zeros(rows, 0, dtype=torch.bool, device=device)
    draw_device = generator.device if generator is not None else device
    step = max(1, budget // (4 * in_features))
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        keys = torch.rand(r1 - r0, in_features, generator=generator, device=draw_device).to(device)
        keys.scatter_(1, group_index[r0:r1].long(), -1.0)  # features the group reads already: never drawn
        candidates[r0:r1] = keys.topk(most, dim=1).indices
    take = torch.arange(most, device=device).unsqueeze(0) < counts.unsqueeze(1)
    return candidates, take


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
        generator: random generator (seed it identically on every rank for identical topologies).
        memory_budget: bound in bytes on the temporary random keys.

    Returns:
        :class:`RewireStats`; its ``regrown`` mask feeds :func:`reset_optimizer_state_`.
    """
    _check_fraction(prune_fraction, threshold)
    if regrow != "random":
        raise ValueError(f"regrow must be 'random', got {regrow!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    check_init_scale(init_scale)
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
        count = math.floor(float(prune_fraction) * fan_in + 1e-9)
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
    candidates, take = _draw_new_features(layer.group_index, counts, in_features, generator, memory_budget)
    new_index = layer.group_index.clone()
    new_index[pruned] = candidates[take].to(new_index.dtype)
    changed = new_index != layer.group_index
    weight_mask = regrown_weight_mask(layer, pruned)
    if init == "zero":
        new_weight = layer.weight.masked_fill(weight_mask, 0.0)
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
    if mask.shape != param.shape:
        raise ValueError(f"mask must have the parameter's shape {tuple(param.shape)}, got {tuple(mask.shape)}")
    touched = 0
    for value in optimizer.state.get(param, {}).values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            value.masked_fill_(mask.to(value.device), 0)
            touched += 1
    return touched
