"""A label-sharded HASTE output layer for data-parallel training over ``torch.distributed`` (Lightning's DDP).

With plain DDP every rank holds the whole output layer and all-reduces its weight gradient every step:
``num_labels * fan_in`` values, more than the step itself costs at millions of labels. Here each rank owns a slice
of the labels instead (a contiguous run of the head's labels and a contiguous run of whole tail groups), while the
encoder stays data-parallel:

1. the encoder outputs of every rank's rows are all-gathered (the global batch, ``B * H`` values);
2. each rank runs the fused loss (:meth:`HeadTailOutput.loss`) of its labels on the global batch: its part of the
   loss, the input gradient of its part, and its weight gradients;
3. the input gradients are reduce-scattered back, each rank receiving the sum over the ranks for its own rows
   (``B * H`` values); the output layer's parameters are not all-reduced at all.

Communication per step is ``O(B * H)``, independent of the number of labels. Top-k merges the per-shard top-k
candidates (``k`` per row and rank) into the global top-k. The state dict of a sharded layer is the state dict of
the whole :class:`HeadTailOutput` (gathered from the ranks), so checkpoints load on any number of ranks, sharded
or not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Optional, Union

import numpy as np
import scipy.sparse
import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import loss as fused_loss
from ._checks import check_label_ids, check_positive_int
from .head_tail import HeadTailOutput, _check_label_order
from .ranking import ranked_topk

__all__ = ["LabelPartition", "ShardedHeadTailOutput", "partition_labels", "merge_topk", "shard_output"]

_HALF = (torch.float16, torch.bfloat16)
# The parameters of the whole layer, in the order the ranks gather them.
_PARAMETERS = ("head.weight", "head.bias", "tail.weight", "tail.bias")


# ------------------------------------------------------------------------------------------------
# Which labels a rank owns.
@dataclasses.dataclass(frozen=True)
class LabelPartition:
    """How the labels of a :class:`HeadTailOutput` split over ``world_size`` ranks.

    Rank ``r`` owns the head labels at internal positions ``[head_bounds[r], head_bounds[r + 1])`` (multiples of
    ``group_size``, except at the end of the head) and the tail groups ``[group_bounds[r], group_bounds[r + 1])``
    (whole groups: a group's labels share one index row, which its rewiring changes as a whole).
    """

    world_size: int
    num_head: int
    num_tail: int
    group_size: int
    head_bounds: tuple[int, ...]
    group_bounds: tuple[int, ...]

    def head_range(self, rank: int) -> tuple[int, int]:
        """Internal head positions ``[h0, h1)`` of ``rank``."""
        return self.head_bounds[rank], self.head_bounds[rank + 1]

    def group_range(self, rank: int) -> tuple[int, int]:
        """Tail groups ``[g0, g1)`` of ``rank``."""
        return self.group_bounds[rank], self.group_bounds[rank + 1]

    def tail_range(self, rank: int) -> tuple[int, int]:
        """Tail labels ``[t0, t1)`` (offsets inside the tail, padding excluded) of ``rank``."""
        g0, g1 = self.group_range(rank)
        return g0 * self.group_size, min(self.num_tail, g1 * self.group_size)

    def num_labels(self, rank: int) -> int:
        """Labels ``rank`` owns."""
        h0, h1 = self.head_range(rank)
        t0, t1 = self.tail_range(rank)
        return (h1 - h0) + (t1 - t0)

    def positions(self, rank: int) -> np.ndarray:
        """The internal positions of the whole layer that ``rank`` owns, head first (int64)."""
        h0, h1 = self.head_range(rank)
        t0, t1 = self.tail_range(rank)
        return np.concatenate([np.arange(h0, h1), self.num_head + np.arange(t0, t1)]).astype(np.int64)

    def rows(self, name: str, rank: int) -> tuple[int, int]:
        """Rows ``[r0, r1)`` of the whole layer's parameter ``name`` (``head.weight``, ``head.bias``,
        ``tail.weight``, ``tail.bias``, ``tail.group_index``) that ``rank`` holds."""
        if name.startswith("head."):
            return self.head_range(rank)
        g0, g1 = self.group_range(rank)
        if name == "tail.weight":  # padded rows: whole groups
            return g0 * self.group_size, g1 * self.group_size
        if name == "tail.group_index":
            return g0, g1
        if name == "tail.bias":
            return self.tail_range(rank)
        raise KeyError(f"no parameter or buffer {name!r} is split by labels")


def partition_labels(num_head: int, num_tail: int, group_size: int, world_size: int) -> LabelPartition:
    """Split the head's labels (in blocks of ``group_size``) and the tail's groups as evenly as possible over
    ``world_size`` ranks, in rank order. Every rank must own part of the head (if there is one) and at least one
    tail group (if there is a tail): the ranks then hold layers of one structure, which the collectives, the
    optimizer state and the rewiring of the tail rely on."""
    world_size = check_positive_int("world_size", world_size)
    group_size = check_positive_int("group_size", group_size)
    if num_head < 0 or num_tail < 0 or num_head + num_tail == 0:
        raise ValueError(f"need a head or a tail, got num_head={num_head}, num_tail={num_tail}")
    head_blocks = -(-num_head // group_size)
    num_groups = -(-num_tail // group_size)
    for part, count, unit in (("head", head_blocks, "blocks of group_size labels"), ("tail", num_groups, "groups")):
        if 0 < count < world_size:
            raise ValueError(
                f"the {part} has {count} {unit}, fewer than the {world_size} ranks: every rank must own part of it "
                f"(use fewer ranks, a smaller group_size, or a head_ratio that gives the {part} more labels)"
            )
    head_bounds = tuple(min(num_head, (r * head_blocks // world_size) * group_size) for r in range(world_size + 1))
    group_bounds = tuple(r * num_groups // world_size for r in range(world_size + 1))
    return LabelPartition(world_size, num_head, num_tail, group_size, head_bounds, group_bounds)


# ------------------------------------------------------------------------------------------------
# Collectives.
def _all_gather_into(out: Tensor, tensor: Tensor, group: Any) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor, group=group)


def _reduce_scatter_into(out: Tensor, tensor: Tensor, group: Any) -> None:
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, tensor, group=group)


def _all_gather_rows(tensor: Tensor, counts: Sequence[int], group: Any) -> Tensor:
    """The rows of every rank's ``tensor`` (``counts[r]`` rows on rank ``r``), concatenated in rank order."""
    world = len(counts)
    most = max(counts)
    piece = tensor.contiguous()
    if piece.shape[0] < most:
        piece = torch.cat([piece, piece.new_zeros((most - piece.shape[0], *piece.shape[1:]))])
    out = piece.new_empty((world * most, *piece.shape[1:]))
    _all_gather_into(out, piece, group)
    if all(c == most for c in counts):
        return out
    return torch.cat([out[r * most : r * most + counts[r]] for r in range(world)])


def _reduce_scatter_rows(tensor: Tensor, counts: Sequence[int], rank: int, group: Any) -> Tensor:
    """Rank ``rank``'s rows of the sum over the ranks of ``tensor`` (the global rows, ``counts`` per rank)."""
    world = len(counts)
    most = max(counts)
    if all(c == most for c in counts):
        buffer = tensor.contiguous()
    else:
        buffer = tensor.new_zeros((world * most, *tensor.shape[1:]))
        offsets = np.concatenate([[0], np.cumsum(counts)])
        for r in range(world):
            buffer[r * most : r * most + counts[r]] = tensor[offsets[r] : offsets[r + 1]]
    out = buffer.new_empty((most, *buffer.shape[1:]))
    _reduce_scatter_into(out, buffer, group)
    return out[: counts[rank]]


class _GatherRows(torch.autograd.Function):
    """All-gather of the rows (forward); reduce-scatter of the gradient (backward), summed in float32 for 16-bit
    gradients, times ``grad_scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counts: tuple[int, ...], rank: int, group: Any,  # type: ignore[override]
                grad_scale: float) -> Tensor:
        ctx.counts, ctx.rank, ctx.group, ctx.grad_scale = counts, rank, group, grad_scale
        return _all_gather_rows(x.detach(), counts, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:  # type: ignore[override]
        dtype = grad.dtype
        wide = grad.to(torch.float32) if dtype in _HALF else grad
        local = _reduce_scatter_rows(wide, ctx.counts, ctx.rank, ctx.group)
        if ctx.grad_scale != 1.0:
            local = local * ctx.grad_scale
        return local.to(dtype), None, None, None, None


class _SumOverRanks(torch.autograd.Function):
    """The sum over the ranks of a per-rank scalar (forward). Backward passes the gradient through unchanged: every
    rank differentiates the same total with respect to its own part, whose derivative is 1."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, group: Any) -> Tensor:  # type: ignore[override]
        total = value.detach().clone()
        dist.all_reduce(total, group=group)
        return total

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:  # type: ignore[override]
        return grad, None


def merge_topk(scores: Tensor, label_ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top ``k`` of candidate ``(scores, label ids)`` ``[rows, candidates]``, ordered by score descending, ties
    by smaller label id. Candidates that are the top-k of disjoint label sets under this same order merge into the
    top-k of their union exactly (the ranking order of :mod:`lightning_haste.ranking`)."""
    return ranked_topk(scores, label_ids, k)


# ------------------------------------------------------------------------------------------------
class ShardedHeadTailOutput(nn.Module):
    """One rank's shard of a :class:`HeadTailOutput`, trained data-parallel over ``torch.distributed``.

    Build it with :func:`shard_output` (or :meth:`from_full`) from the whole layer, identically initialised on every
    rank; each rank keeps its slice (:func:`partition_labels`). The shard is a :class:`HeadTailOutput` over the
    rank's labels (``self.shard``; its label ids are the owned original ids in increasing order, so its ties break
    as the whole layer's do); every input and output speaks original label ids of the whole layer.

    :meth:`loss`, :meth:`topk`, :meth:`forward` and :meth:`logits_for` are collective: every rank of the process
    group calls them in the same order, each with its own rows (the row counts may differ). So are
    :meth:`state_dict` (it gathers the whole layer, whose keys and shapes it has) and the optimizer-state hooks of
    :meth:`attach_optimizer`.

    Gradients (the rule): :meth:`loss` returns, on every rank, the loss of the whole layer on the global batch (the
    concatenation of every rank's rows, in rank order), reduced over all of it: ``"sum"`` over every entry,
    ``"batchmean"`` divided by the global row count. Its backward gives each shard parameter exactly the
    gradient of the unsharded layer's loss on the global batch, and each rank's input its rows of that loss's input
    gradient. DDP then averages the encoder's gradients over the ``N`` ranks, which would give the encoder ``1/N``
    of the global-batch gradient: ``loss(..., compensate_ddp_average=True)`` multiplies the input gradient by ``N``
    so that, after DDP's average, the encoder's gradient is also exactly the global batch's (what
    :class:`~lightning_haste.HasteXMCModule` does). Exclude the shard's parameters and buffers from DDP
    (:meth:`ddp_ignored_names`): they differ between ranks and must be neither broadcast nor all-reduced.

    Precision: float32 and float64 give the unsharded layer's values up to the order of the sums (each rank adds
    its labels' part of the input gradient, then the ranks' parts are added). With 16-bit inputs the fused loss
    returns each rank's part rounded to the input dtype; the parts are summed in float32 and rounded once more,
    so the input gradient can differ from the unsharded layer's (summed over all labels in float32, rounded once)
    by a rounding of the input dtype per rank.

    Args:
        config: the whole layer's :meth:`HeadTailOutput.config`.
        rank, world_size: this rank and the number of ranks (default: ``torch.distributed``'s).
        device, dtype: of the shard's parameters.
    """

    shard_label_ids: Tensor

    def __init__(
        self, config: dict[str, Any], *, rank: Optional[int] = None, world_size: Optional[int] = None,
        device: Optional[torch.device | str] = None, dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        rank, world_size = _rank_and_world(rank, world_size)
        # the whole layer's shapes, validated by building it on the meta device (no memory, no random draws)
        with torch.random.fork_rng(devices=[]):
            whole = HeadTailOutput.from_config(config, device="meta")
        self.full_config = whole.config()
        self.in_features, self.num_labels = whole.in_features, whole.num_labels
        self.num_head_labels, self.num_tail_labels = whole.num_head_labels, whole.num_tail_labels
        self.group_size, self.fan_in = whole.group_size, whole.fan_in
        self.head_slice, self.tail_slice = whole.head_slice, whole.tail_slice
        self.rank, self.world_size = rank, world_size
        self.partition = partition_labels(self.num_head_labels, self.num_tail_labels, self.group_size, world_size)
        h0, h1 = self.partition.head_range(rank)
        local = dict(self.full_config, num_labels=self.partition.num_labels(rank), num_head_labels=h1 - h0)
        with torch.random.fork_rng(devices=[]):  # the untrained shard's draws are overwritten: keep the RNG as it was
            self.shard = HeadTailOutput.from_config(local, device=device, dtype=dtype)
        if self.shard.tail is not None:
            self.shard.tail.first_group = self.partition.group_range(rank)[0]
        self._full_shapes = {name: tuple(t.shape) for name, t in whole.state_dict().items()}
        # an untrained layer's label order is the identity: the shard owns the ids of its positions, in order (a
        # loaded state replaces them, see _load_full_state_pre_hook)
        ids = self.partition.positions(rank)
        self.register_buffer("shard_label_ids", torch.from_numpy(ids).to(device), persistent=False)
        self._host_ids: Optional[tuple[Any, np.ndarray]] = None
        self._host_group: Any = None
        self._register_state_dict_hook(_full_state_dict_hook)
        self._register_load_state_dict_pre_hook(_load_full_state_pre_hook, with_module=True)

    # -- building -----------------------------------------------------------------------------------
    @classmethod
    def from_full(
        cls, layer: HeadTailOutput, *, rank: Optional[int] = None, world_size: Optional[int] = None,
        device: Optional[torch.device | str] = None,
    ) -> ShardedHeadTailOutput:
        """This rank's shard of ``layer`` (the whole layer, the same on every rank), with copies of its weights,
        index and label order. No communication."""
        first = next(iter(layer.parameters()))
        sharded = cls(layer.config(), rank=rank, world_size=world_size, device=device or first.device,
                      dtype=first.dtype)
        sharded.load_state_dict(layer.state_dict())
        return sharded

    # -- properties ---------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """The whole layer's :meth:`HeadTailOutput.config` (a checkpoint of a sharded layer is a whole layer's)."""
        return dict(self.full_config)

    def ddp_ignored_names(self, prefix: str = "") -> list[str]:
        """The names (under ``prefix``, e.g. ``"output."``) of every parameter and buffer of this layer, for
        ``DistributedDataParallel._set_params_and_buffers_to_ignore_for_model``: DDP must neither all-reduce the
        shard's gradients nor broadcast rank 0's shard over the others."""
        names = [prefix + name for name, _ in self.named_parameters()]
        return names + [prefix + name for name, _ in self.named_buffers()]

    def _group(self) -> Any:
        return None  # the default process group

    def _host_process_group(self) -> Any:
        """A gloo group for the host-side exchanges (row counts, targets): with NCCL they would need device copies
        and a synchronisation of the host with the device every step."""
        if self._host_group is None:
            self._host_group = "default" if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return None if self._host_group == "default" else self._host_group

    def _check_distributed(self) -> None:
        if self.world_size == 1:
            return
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                f"this layer is rank {self.rank} of a {self.world_size}-rank label-sharded layer: torch.distributed "
                "must be initialised (the layer's collectives need every rank)"
            )
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise RuntimeError(
                f"the layer was sharded for rank {self.rank} of {self.world_size}, but this process is rank "
                f"{dist.get_rank()} of {dist.get_world_size()}"
            )

    def _shard_ids_on_host(self) -> np.ndarray:
        buffer = self.shard_label_ids
        key = (buffer.data_ptr(), buffer._version, buffer.device)
        if self._host_ids is None or self._host_ids[0] != key:
            self._host_ids = (key, buffer.detach().cpu().numpy())
        return self._host_ids[1]

    def _exchange_host(self, values: np.ndarray) -> list[np.ndarray]:
        """Every rank's int64 ``values`` (1-D, lengths may differ), in rank order."""
        if self.world_size == 1:
            return [values]
        group = self._host_process_group()
        local = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
        counts = torch.tensor([local.numel()], dtype=torch.int64)
        all_counts = torch.empty(self.world_size, dtype=torch.int64)
        _all_gather_into(all_counts, counts, group)
        sizes = all_counts.tolist()
        gathered = _all_gather_rows(local, sizes, group)
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        return [gathered[offsets[r] : offsets[r + 1]].numpy() for r in range(self.world_size)]

    def _row_counts(self, rows: int) -> tuple[int, ...]:
        return tuple(int(v[0]) for v in self._exchange_host(np.array([rows], dtype=np.int64)))

    def _own_rows(self, counts: tuple[int, ...]) -> tuple[int, int]:
        """This rank's rows ``[r0, r1)`` of the global batch (the ranks' rows in rank order, ``counts`` each)."""
        r0 = sum(counts[: self.rank])
        return r0, r0 + counts[self.rank]

    def _gather_input(self, x2d: Tensor, counts: tuple[int, ...], grad_scale: float = 1.0) -> Tensor:
        if self.world_size == 1:
            return x2d if grad_scale == 1.0 else _scale_gradient(x2d, grad_scale)
        return _GatherRows.apply(x2d, counts, self.rank, self._group(), grad_scale)

    # -- computing ----------------------------------------------------------------------------------
    def loss(
        self, x: Tensor, targets: fused_loss.SparseTargets, loss: str = "bce", reduction: str = "batchmean", *,
        compensate_ddp_average: bool = False,
    ) -> Tensor:
        """The loss of the whole layer on the global batch (see the class docstring for the gradients), without
        the ``[batch, num_labels]`` logits. Collective.

        Args:
            x: this rank's encoder output ``[..., in_features]``.
            targets: this rank's rows' positives in original label ids, as :meth:`HeadTailOutput.loss` takes them.
            loss, reduction: as for :meth:`HeadTailOutput.loss`; ``"batchmean"`` divides by the global row count.
            compensate_ddp_average: multiply the gradient reaching ``x`` by the world size, undoing DDP's average
                of the encoder's gradients (the encoder then gets the global batch's gradient).

        Returns:
            The same scalar on every rank.
        """
        fused_loss.check_loss(loss)
        fused_loss.check_reduction(reduction)
        self._check_distributed()
        x2d = self.shard._check_input(x)
        rows, labels = fused_loss.sparse_targets(targets, x2d.shape[0], self.num_labels)
        counts = self._row_counts(x2d.shape[0])
        offset, _ = self._own_rows(counts)
        pairs = self._exchange_host(np.concatenate([rows + offset, labels]))
        all_rows = np.concatenate([p[: p.size // 2] for p in pairs])
        all_labels = np.concatenate([p[p.size // 2 :] for p in pairs])
        ids = self._shard_ids_on_host()
        local = np.minimum(np.searchsorted(ids, all_labels), ids.size - 1)
        owned = ids[local] == all_labels
        batch = sum(counts)
        indptr = np.concatenate([[0], np.cumsum(np.bincount(all_rows[owned], minlength=batch))])
        csr = scipy.sparse.csr_matrix(
            (np.ones(int(owned.sum()), dtype=np.float32), local[owned], indptr), shape=(batch, ids.size)
        )
        scale = float(self.world_size) if compensate_ddp_average else 1.0
        x_global = self._gather_input(x2d, counts, scale)
        part = self.shard.loss(x_global, csr, loss=loss, reduction=reduction)
        if self.world_size == 1:
            return part
        return _SumOverRanks.apply(part, self._group())

    @torch.no_grad()
    def topk(self, x: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Top-``k`` ``(scores, label ids)`` of this rank's rows over all labels, score descending, ties by smaller
        label id (original ids). Each rank takes the top-k of its labels for the global batch; the ``k``
        candidates per row and rank are all-gathered and merged (:func:`merge_topk`). Collective."""
        k = check_positive_int("k", k)
        if k > self.num_labels:
            raise ValueError(f"k={k} must be <= num_labels={self.num_labels}")
        self._check_distributed()
        lead = x.shape[:-1]
        x2d = self.shard._check_input(x)
        counts = self._row_counts(x2d.shape[0])
        x_global = self._gather_input(x2d, counts)
        local_k = min(k, self.shard.num_labels)
        scores, local_ids = self.shard.topk(x_global, local_k)
        ids = self.shard_label_ids[local_ids]
        if local_k < k:  # a shard with fewer than k labels: candidates that sort after every real one
            pad = k - local_k
            scores = torch.cat([scores, scores.new_full((scores.shape[0], pad), float("-inf"))], dim=1)
            ids = torch.cat([ids, ids.new_full((ids.shape[0], pad), self.num_labels)], dim=1)
        if self.world_size > 1:
            group = self._group()
            all_scores = scores.new_empty((self.world_size * scores.shape[0], k))
            all_ids = ids.new_empty((self.world_size * ids.shape[0], k))
            _all_gather_into(all_scores, scores.contiguous(), group)
            _all_gather_into(all_ids, ids.contiguous(), group)
            all_scores = all_scores.view(self.world_size, -1, k)
            all_ids = all_ids.view(self.world_size, -1, k)
            r0, r1 = self._own_rows(counts)
            scores = all_scores[:, r0:r1].permute(1, 0, 2).reshape(r1 - r0, -1)
            ids = all_ids[:, r0:r1].permute(1, 0, 2).reshape(r1 - r0, -1)
        scores, ids = merge_topk(scores, ids, k)
        return scores.reshape(*lead, k), ids.reshape(*lead, k)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[..., num_labels]`` of this rank's rows, original label order (differentiable). Collective.
        Forms the full logits of every row on every rank: the slow path, for losses of one's own (training uses
        :meth:`loss`, prediction :meth:`topk`). A backward of per-rank losses computed from these logits gives the
        shard's parameters the gradient of the sum of the ranks' losses."""
        self._check_distributed()
        lead = x.shape[:-1]
        x2d = self.shard._check_input(x)
        counts = self._row_counts(x2d.shape[0])
        x_global = self._gather_input(x2d, counts)
        local = self.shard(x_global)  # [global rows, labels of this shard], in shard label-id order
        pieces = _AllGatherColumns.apply(local, self.rank, self._group(), self._all_shard_sizes())
        r0, r1 = self._own_rows(counts)
        ids = self._all_shard_ids()
        out = local.new_empty(r1 - r0, self.num_labels)
        out = out.index_copy(1, ids, pieces[r0:r1])
        return out.reshape(*lead, self.num_labels)

    def logits_for(self, x: Tensor, labels: Union[Tensor, Sequence[int]]) -> Tensor:
        """Logits ``[..., len(labels)]`` of this rank's rows for the given original label ids only (differentiable),
        as :meth:`HeadTailOutput.logits_for` of the whole layer. Collective, and ``labels`` must be the same on
        every rank (checked: every rank computes the columns of the labels it holds for every rank's rows).
        Gradients follow :meth:`forward`'s rule: the shard's parameters get the gradient of the sum of the ranks'
        losses."""
        self._check_distributed()
        lead = x.shape[:-1]
        x2d = self.shard._check_input(x)
        labels = check_label_ids(labels, self.num_labels)
        wanted = labels.cpu().numpy()
        if self.world_size > 1 and any(not np.array_equal(other, wanted) for other in self._exchange_host(wanted)):
            raise ValueError("logits_for needs the same labels on every rank (each rank computes the columns of the "
                             "labels it holds)")
        counts = self._row_counts(x2d.shape[0])
        x_global = self._gather_input(x2d, counts)
        # where each wanted label lives: its position in the ranks' shards, concatenated in rank order
        all_ids = self._all_shard_ids().cpu().numpy()
        position = np.empty(self.num_labels, dtype=np.int64)
        position[all_ids] = np.arange(all_ids.size)
        sizes = np.asarray(self._all_shard_sizes())
        ends = np.cumsum(sizes)
        where = position[wanted]
        owner = np.searchsorted(ends, where, side="right")
        by_owner = np.argsort(owner, kind="stable")  # the gathered columns come in rank order
        mine = by_owner[owner[by_owner] == self.rank]
        local_ids = torch.as_tensor(where[mine] - (ends[self.rank] - sizes[self.rank]),
                                    device=self.shard_label_ids.device)
        local = self.shard.logits_for(x_global, local_ids)  # [global rows, this rank's wanted labels]
        columns = tuple(int(c) for c in np.bincount(owner, minlength=self.world_size))
        gathered = _AllGatherColumns.apply(local, self.rank, self._group(), columns)
        r0, r1 = self._own_rows(counts)
        back = torch.as_tensor(np.argsort(by_owner, kind="stable"), device=gathered.device)
        return gathered[r0:r1].index_select(1, back).reshape(*lead, len(wanted))

    def _all_shard_sizes(self) -> tuple[int, ...]:
        return tuple(self.partition.num_labels(r) for r in range(self.world_size))

    def _all_shard_ids(self) -> Tensor:
        """Every rank's ``shard_label_ids``, concatenated in rank order (cached while the label order stands)."""
        ids = self._shard_ids_on_host()
        cached = getattr(self, "_gathered_ids", None)
        if cached is None or cached[0] is not ids:
            full = np.concatenate(self._exchange_host(ids))
            cached = (ids, torch.from_numpy(full).to(self.shard_label_ids.device))
            self._gathered_ids = cached
        return cached[1]

    @torch.no_grad()
    def init_bias_from_prior_(self, label_frequencies: Any, num_instances: int, smoothing: float = 1.0) -> None:
        """:meth:`HeadTailOutput.init_bias_from_prior_` on this shard's labels (``label_frequencies`` of all
        labels, original ids). No communication."""
        freq = np.asarray(label_frequencies)
        if freq.ndim != 1 or freq.size != self.num_labels:
            raise ValueError(f"label_frequencies must have {self.num_labels} entries, got shape {freq.shape}")
        self.shard.init_bias_from_prior_(freq[self._shard_ids_on_host()], num_instances, smoothing)

    # -- the whole layer ----------------------------------------------------------------------------
    def _gather_full(self, name: str, local: Tensor) -> Tensor:
        """The whole layer's ``name`` (a parameter, its optimizer state, or ``tail.group_index``) from every
        rank's rows. Collective."""
        if self.world_size == 1:
            return local
        counts = [r1 - r0 for r0, r1 in (self.partition.rows(name, r) for r in range(self.world_size))]
        return _all_gather_rows(local, counts, self._group())

    def _local_rows(self, name: str, full: Tensor) -> Tensor:
        r0, r1 = self.partition.rows(name, self.rank)
        return full[r0:r1]

    def full_label_permutation(self) -> Tensor:
        """The whole layer's ``label_permutation`` (internal position -> original id). Collective."""
        mine = self.shard_label_ids[self.shard.label_permutation]
        if self.world_size == 1:
            return mine
        # the whole layer's positions are every rank's head labels, then every rank's tail labels
        heads = [h1 - h0 for h0, h1 in (self.partition.head_range(r) for r in range(self.world_size))]
        tails = [t1 - t0 for t0, t1 in (self.partition.tail_range(r) for r in range(self.world_size))]
        split = heads[self.rank]
        return torch.cat([_all_gather_rows(mine[:split], heads, self._group()),
                          _all_gather_rows(mine[split:], tails, self._group())])

    def to_unsharded(self) -> HeadTailOutput:
        """The whole layer as a :class:`HeadTailOutput` on every rank (e.g. for prediction on one device).
        Collective."""
        first = next(iter(self.parameters()))
        layer = HeadTailOutput.from_config(self.full_config, device=first.device, dtype=first.dtype)
        layer.load_state_dict(self.state_dict())
        return layer

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer``'s state dict hold the whole layer's optimizer state (gathered; collective), and its
        ``load_state_dict`` keep this rank's slice of a whole layer's state, so that optimizer checkpoints move
        between world sizes (and an unsharded layer's load here) and resume exactly on the same world size."""
        optimizer.register_state_dict_post_hook(self._optimizer_state_post_hook)
        optimizer.register_load_state_dict_pre_hook(self._optimizer_load_pre_hook)

    def _optimizer_parameters(self, optimizer: torch.optim.Optimizer) -> list[tuple[int, str, Tensor]]:
        names = {id(p): name for name, p in self.shard.named_parameters()}
        flat = [p for group in optimizer.param_groups for p in group["params"]]
        found = [(i, names[id(p)], p) for i, p in enumerate(flat) if id(p) in names]
        return sorted(found, key=lambda item: _PARAMETERS.index(item[1]))

    def _optimizer_state_post_hook(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        self._check_distributed()
        state = dict(state_dict["state"])
        for index, name, param in self._optimizer_parameters(optimizer):
            entry = state.get(index)
            if entry is None:
                continue
            entry = dict(entry)  # the optimizer's own per-parameter dict stays as it is
            for key in sorted(entry):
                value = entry[key]
                if isinstance(value, Tensor) and tuple(value.shape) == tuple(param.shape):
                    entry[key] = self._gather_full(name, value)
            state[index] = entry
        return dict(state_dict, state=state)

    def _optimizer_load_pre_hook(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        state = dict(state_dict["state"])
        for index, name, param in self._optimizer_parameters(optimizer):
            entry = state.get(index)
            if entry is None:
                continue
            entry = dict(entry)
            full_shape = self._full_shapes[name]
            for key, value in entry.items():
                if isinstance(value, Tensor) and tuple(value.shape) == full_shape and full_shape != tuple(param.shape):
                    entry[key] = self._local_rows(name, value).clone()
            state[index] = entry
        return dict(state_dict, state=state)

    def extra_repr(self) -> str:
        h0, h1 = self.partition.head_range(self.rank)
        g0, g1 = self.partition.group_range(self.rank)
        return (
            f"rank={self.rank}, world_size={self.world_size}, num_labels={self.num_labels}, "
            f"head=[{h0}, {h1}), groups=[{g0}, {g1})"
        )


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:  # type: ignore[override]
        return grad * ctx.scale, None


def _scale_gradient(x: Tensor, scale: float) -> Tensor:
    return _ScaleGradient.apply(x, scale)


class _AllGatherColumns(torch.autograd.Function):
    """Every rank's ``[rows, columns_r]`` block, concatenated along the columns in rank order (forward); each
    rank's block of the summed gradient (backward: every rank's loss reads every rank's columns)."""

    @staticmethod
    def forward(ctx: Any, block: Tensor, rank: int, group: Any,  # type: ignore[override]
                sizes: tuple[int, ...]) -> Tensor:
        ctx.rank, ctx.group, ctx.sizes = rank, group, sizes
        if len(sizes) == 1:
            return block.detach().clone()
        gathered = _all_gather_rows(block.detach().t(), sizes, group)
        return gathered.t().contiguous()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple:  # type: ignore[override]
        if len(ctx.sizes) == 1:
            return grad, None, None, None
        dtype = grad.dtype
        wide = grad.to(torch.float32) if dtype in _HALF else grad
        local = _reduce_scatter_rows(wide.t().contiguous(), ctx.sizes, ctx.rank, ctx.group)
        return local.t().to(dtype), None, None, None


def _rank_and_world(rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    initialized = dist.is_available() and dist.is_initialized()
    if world_size is None:
        world_size = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    world_size = check_positive_int("world_size", world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an integer in [0, world_size={world_size}), got {rank!r}")
    return rank, world_size


def shard_output(
    layer: HeadTailOutput, *, rank: Optional[int] = None, world_size: Optional[int] = None,
    device: Optional[torch.device | str] = None,
) -> ShardedHeadTailOutput:
    """This rank's :class:`ShardedHeadTailOutput` of ``layer`` (built identically on every rank, e.g. from one
    seed); rank and world size default to ``torch.distributed``'s. See :meth:`ShardedHeadTailOutput.from_full`."""
    return ShardedHeadTailOutput.from_full(layer, rank=rank, world_size=world_size, device=device)


# ------------------------------------------------------------------------------------------------
# State dict: the whole layer's keys and shapes.
_SHARD = "shard."


def _full_state_dict_hook(module: ShardedHeadTailOutput, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """Replace the shard's entries by the whole layer's (gathered from every rank; collective)."""
    module._check_distributed()
    local = {key[len(prefix) + len(_SHARD):]: state_dict.pop(key) for key in list(state_dict)
             if key.startswith(prefix + _SHARD)}
    for name in (*_PARAMETERS, "tail.group_index"):
        if name in local:
            state_dict[prefix + name] = module._gather_full(name, local[name].detach())
    permutation = module.full_label_permutation()
    position = torch.empty_like(permutation)
    position[permutation] = torch.arange(permutation.numel(), device=permutation.device)
    state_dict[prefix + "label_permutation"] = permutation
    state_dict[prefix + "label_position"] = position
    for key, value in local.items():  # anything else the shard saves (extra state of subclasses)
        if key not in _PARAMETERS and key not in ("tail.group_index", "label_permutation", "label_position"):
            state_dict[prefix + _SHARD + key] = value


def _load_full_state_pre_hook(module: ShardedHeadTailOutput, state_dict: dict, prefix: str, local_metadata: Any,
                              strict: bool, missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Turn the whole layer's entries into this rank's shard's (its rows, its label order). No communication."""
    permutation = state_dict.get(prefix + "label_permutation")
    position = state_dict.get(prefix + "label_position")
    if not isinstance(permutation, Tensor) or not isinstance(position, Tensor):
        return  # not a whole layer's state: the shard's own keys load (or are reported missing) as usual
    _check_label_order(permutation, position, module.num_labels)
    for name in (*_PARAMETERS, "tail.group_index"):
        key = prefix + name
        if key not in state_dict:
            continue
        value = state_dict.pop(key)
        expected = module._full_shapes.get(name)
        if expected is None or tuple(value.shape) != expected:
            error_msgs.append(f"{key}: shape {tuple(value.shape)} does not match the layer's {expected}")
            continue
        state_dict[prefix + _SHARD + name] = module._local_rows(name, value)
    state_dict.pop(prefix + "label_permutation")
    state_dict.pop(prefix + "label_position")
    owned = permutation.detach().cpu()[torch.from_numpy(module.partition.positions(module.rank))]
    ids, local_permutation = torch.sort(owned)  # shard label id j is the j-th smallest owned original id
    # local_permutation[j] = the local position holding id j; the shard's permutation maps positions to ids
    shard_permutation = torch.empty_like(local_permutation)
    shard_permutation[local_permutation] = torch.arange(local_permutation.numel())
    shard_position = local_permutation
    device = module.shard_label_ids.device
    state_dict[prefix + _SHARD + "label_permutation"] = shard_permutation.to(device)
    state_dict[prefix + _SHARD + "label_position"] = shard_position.to(device)
    with torch.no_grad():
        module.shard_label_ids.copy_(ids.to(device))
    module._gathered_ids = None
