"""Top-k of the output layer on CUDA with the fused candidate kernels: no ``[batch, num_labels]`` tensor and no
round trips of partial results through ``torch.topk``.

A row's top-k is found by a bound ``T`` on its k-th best score: any ``k`` of the row's actual scores give one (their
k-th best cannot exceed the row's). Every label scoring at least ``T`` is a candidate, appended with its score and
internal position to the row's list of ``cap`` slots by the kernels (``gsfi_topk_dense_candidates`` for the
head's logits, which cuBLAS computes in chunks of columns; ``gsfi_topk_candidates`` for the tail, on the forward's
tensor-core tiles); the row's top-k is the top-k of its list in the ranking order of
:mod:`lightning_haste.ranking` (``gsfi_topk_merge``: a sort of the list's ranking keys per row). Nothing is
approximate: every label that can be in the top-k, ties included, is in the list.

Where the bound comes from, per row: the k-th best of the maxima of blocks of the first columns of the head's first
chunk (:func:`block_bound`), then the k-th best of the row's list after the head's last chunk and after an earlier
chunk where the bound would otherwise have let more than a sixteenth of a list through by the end of the next one
(the list holds every score seen at or above the bound, so this is the k-th best of all the head's scores so far),
and, when the head is small against the tail, the same after each of the tail's first segments of groups (segments
that double what was seen: a sample that costs nothing extra, those groups are not scored again). A label not yet
seen then enters the list with probability about ``k / seen``. A list that overflows (more candidates than slots)
is retried with the k-th best of its stored candidates as the new bound, which rises each time unless the row holds
more than ``cap`` scores tied at the boundary; rows that still overflow after :data:`MAX_ROUNDS` are returned as
unresolved, for the caller's exact chunked path. The first round's first bound also zeroes the lists' counts and the
overflow flag, and its merge flags the rows whose list overflowed: no launches of their own. A head chunk of at most
:data:`CHUNK_COLUMNS` columns takes one launch for its bound, candidates and bound from the lists
(``gsfi_topk_chunk``, a CTA a row), a longer one three (its candidates spread over many CTAs a row).

The lists (at most a twenty-fourth) and a head chunk (at most a sixteenth; one at a time) stay below an eighth of a
16-bit ``[batch, num_labels]`` tensor.

A round is a dozen or more kernel launches and their torch glue, which at small shapes costs the host more time than
the GPU needs for the work: :class:`RoundGraphs` captures one round per input shape in a CUDA graph and replays it
for the calls that follow (validation and prediction call the top-k with one batch shape over and over). Where the
graph can hold conditional nodes (:func:`conditional_blocks_supported`: torch adds them from 2.12 on, and
:mod:`lightning_haste.kernels.graphs` through the CUDA driver before that), it holds the whole exact top-k: the
further rounds and the chunked fallback are conditional blocks that run only where the GPU found a list that
overflowed (:class:`DeviceRounds`), so a replayed call reads nothing back and the host never waits for the GPU;
elsewhere the host reads the round's overflow flag after each replay.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as nnf

__all__ = [
    "MAX_ROUNDS", "CastCache", "DeviceRounds", "RoundGraphs", "block_bound", "bound_blocks", "candidate_capacity",
    "conditional_block", "conditional_blocks_supported", "fused_topk", "head_chunk_columns",
]

#: Passes over the labels before a row whose list keeps overflowing is left to the chunked path.
MAX_ROUNDS = 3
#: Slots per row at most (a larger list costs memory and merge time and is rarely needed).
MAX_CAPACITY = 16384


def candidate_capacity(batch: int, num_labels: int, k: int, memory_budget: int) -> int:
    """Slots per row: a multiple of 256 at or below ``num_labels / 96`` (8 bytes a slot: the lists take at most a
    twenty-fourth of a 16-bit ``[batch, num_labels]`` tensor, which leaves room for a head chunk of a sixteenth;
    the bound lets about ``k * num_labels / seen`` labels through, where ``seen`` is at least a sixteenth, and
    single rows several times the mean), at least ``16 k`` and 256 (room for a sample of a quarter of a list and
    about k candidates for each segment that doubles it), at most :data:`MAX_CAPACITY`, ``num_labels`` and
    ``memory_budget`` bytes (but not below ``16 k``)."""
    cap = num_labels // 96 // 256 * 256
    cap = max(cap, 16 * k, 256)
    cap = min(cap, max(MAX_CAPACITY, 16 * k), max(16 * k, memory_budget // (8 * batch)))
    return max(k, min(cap, num_labels))


def head_chunk_columns(batch: int, num_labels: int, num_head: int, k: int, memory_budget: int) -> int:
    """Head logits computed per chunk: the head split into equal chunks of at most a sixteenth of a 16-bit
    ``[batch, num_labels]`` tensor (and ``memory_budget``), at least ``k`` columns so that the first chunk gives a
    bound. With the lists, below an eighth of that tensor."""
    most = max(k, min(max(1, num_labels // 16), memory_budget // (2 * batch)))
    chunks = max(1, -(-num_head // most))
    return max(k, -(-num_head // chunks))


#: Blocks per k of a bound from block maxima (:func:`block_bound`), and the fewest and most blocks.
BLOCKS_PER_K, MIN_BLOCKS, MAX_BLOCKS = 8, 1024, 4096
#: The longest head chunk whose first-round work one launch does, a CTA a row (``gsfi_topk_chunk``: the bound, the
#: candidates and the bound from the lists), where three launches would otherwise take it
#: (:class:`~lightning_haste.kernels.tuning.TopkTuning` overrides it).
CHUNK_COLUMNS = 16384
#: Columns per block of the first head chunk that its first bound reads.
FIRST_SAMPLE_PER_BLOCK = 8
#: The largest k of the candidate kernels (a bound takes the k-th best of at most MAX_BLOCKS block maxima); a
#: larger k runs the chunked top-k.
MAX_FUSED_K = MAX_BLOCKS
#: Blocks of a bound from a row's list: a list of at most this many candidates gives the exact k-th best of every
#: score seen so far (the list holds all of them at or above the old bound), a longer one nearly that.
LIST_BLOCKS = MAX_BLOCKS


def bound_blocks(k: int) -> int:
    """Blocks of a bound from block maxima: ``8 k``, at least 1024 (the kernel reads a row with a thread per block,
    so fewer would leave it latency-bound; more blocks only tighten the bound), at most 4096."""
    return min(MAX_BLOCKS, max(BLOCKS_PER_K * k, MIN_BLOCKS))


def block_bound(scores: Tensor, k: int, blocks: Optional[int] = None) -> Optional[Tensor]:
    """A float32 lower bound ``[B]`` of each row's k-th best score in ``scores [B, n]``, or None when ``n < k``: what
    the kernel ``gsfi_topk_bound`` computes on the GPU (the reference of the CPU tests).

    Column ``c`` falls into block ``c mod m`` of ``m = min(n, blocks)`` strided blocks (``blocks``, at least ``k``,
    defaults to :func:`bound_blocks`, or ``k`` where that is larger; a row of at most ``blocks`` entries gets its
    exact k-th best); each block's maximum is an actual score of a distinct label, so the k-th best of the maxima
    is a bound. A pass over the scores and a sort of ``m`` values per row instead of a top-k over all ``n``; the
    bound ranks near the row's ``k``-th best when the scores are not ordered along the columns. NaN counts as
    ``+inf`` here (a NaN ranks above every number, so ``+inf`` is still a bound)."""
    batch, n = scores.shape
    if blocks is not None and blocks < k:
        raise ValueError(f"blocks={blocks} must be >= k={k}: the k-th best of fewer block maxima is no bound")
    if n < k:
        return None
    blocks = min(n, max(k, bound_blocks(k)) if blocks is None else blocks)
    padded = nnf.pad(scores.float(), (0, -n % blocks), value=-math.inf)
    maxima = _nan_as_inf(padded).reshape(batch, -1, blocks).amax(dim=1)
    return maxima.topk(k, dim=1).values[:, -1]


def _nan_as_inf(values: Tensor) -> Tensor:
    """``values`` with NaN as ``+inf`` and the infinities kept (``nan_to_num`` alone would turn them into the
    largest finite values)."""
    return values.nan_to_num(nan=math.inf, posinf=math.inf, neginf=-math.inf)


def _kth_best(scores: Tensor, k: int) -> Tensor:
    """The k-th best value of each row as a float32 bound (NaN counts as +inf)."""
    return _nan_as_inf(scores.float()).topk(k, dim=1).values[:, -1].contiguous()


def fused_topk(
    x_head: Optional[Tensor], x_tail: Optional[Tensor], head_weight: Optional[Tensor], head_bias: Optional[Tensor],
    tail_weight: Optional[Tensor], tail_bias: Optional[Tensor], tail_index: Optional[Tensor], group_size: int,
    num_head: int, num_tail: int, label_permutation: Tensor, k: int, memory_budget: int, synchronize: bool = True,
    on_device: Optional[DeviceRounds] = None,
) -> tuple[Tensor, ...]:
    """``(scores [B, k], label ids [B, k], unresolved [B] bool)`` of the layer's top-k in the ranking order.

    ``x_head`` / ``x_tail``: the head's and the tail's inputs ``[B, H_head]`` / ``[B, H_tail]`` (bfloat16 or
    float16 CUDA tensors); the tail's parameters as the kernels take them (contiguous, int32 index). Rows flagged
    ``unresolved`` kept overflowing their lists (more than ``cap`` scores tied at their k-th best): their entries
    are not set and the caller computes them another way.

    ``unresolved`` is empty when every row was resolved. ``synchronize=False`` makes one round with no host
    synchronisation (so that it can be captured in a CUDA graph): rows whose list overflowed come back unresolved
    (``unresolved`` is then always ``[B]``), followed by a 0-d bool tensor, whether any did (all four views of
    one buffer, in this order). With ``on_device`` as well, the further rounds and the fallback run in
    its conditional blocks instead (:class:`DeviceRounds`): still no host synchronisation, and every row resolved."""
    from . import kernels  # noqa: PLC0415 - the CUDA path only; kernels imports no CuPy itself

    x_any = x_tail if x_tail is not None else x_head
    batch, device, dtype = x_any.shape[0], x_any.device, x_any.dtype
    num_labels = num_head + num_tail
    # the merge sorts a whole list in shared memory (every slot, without a host synchronisation to learn the
    # longest): the device's shared memory caps the lists too
    cap = max(k, min(candidate_capacity(batch, num_labels, k, memory_budget),
                     kernels.topk.max_merge_slots(device.index)))
    chunk = head_chunk_columns(batch, num_labels, num_head, k, memory_budget)
    own = kernels.tuning.current().topk
    chunk_columns = CHUNK_COLUMNS if own.chunk_columns is None else own.chunk_columns
    if synchronize and num_head and chunk > chunk_columns >= max(k, chunk // 4):
        # This call's head chunks take three launches, but the further rounds that a later CUDA graph of this
        # shape captures (head chunks of a quarter) take gsfi_topk_chunk: loaded now, outside any capture.
        kernels.topk.chunk_plan_of(dtype, batch, bound_blocks(k), LIST_BLOCKS, device.index)
    num_groups = tail_index.shape[0] if tail_index is not None else 0
    xt = kernels.layout.transpose_input(x_tail) if num_tail else None
    # The first bound (from the head's first chunk) sets the bounds and zeroes the counts and the overflow flag in
    # its own launch; without a head, they are filled here.
    resets = num_head > 0
    count, score, position = kernels.topk.candidate_buffers(batch, cap, device, zeroed=not resets)
    # The outputs in one buffer (ids, scores, the rows whose list overflowed, whether any did), in the order of
    # :func:`_pack`: a graph that returns them copies nothing to pack them.
    outputs = torch.empty(batch * k * 8 + batch * k * 2 + batch + 1, dtype=torch.uint8, device=device)
    best_ids = outputs[: batch * k * 8].view(torch.long).view(batch, k)
    best_scores = outputs[batch * k * 8 : batch * k * 10].view(dtype).view(batch, k)
    unresolved = outputs[batch * k * 10 : batch * k * 10 + batch].view(torch.bool)
    any_unresolved = outputs[-1:].view(torch.bool).view(())
    if not resets:
        any_unresolved.zero_()

    def one_round(threshold: Tensor, first: bool, chunk: int = chunk) -> None:
        """The candidates of every row whose threshold is not NaN (raised in place on the first round), merged."""
        bound_from = 0  # the scores whose k-th best (nearly) the first round's bound is
        bound_at = 0  # the head labels seen when the bound was last raised
        for c0 in range(0, num_head, chunk):
            c1 = min(num_head, c0 + chunk)
            logits = nnf.linear(x_head, head_weight[c0:c1], head_bias[c0:c1] if head_bias is not None else None)
            sample = None
            if first and c0 == 0:
                # The first bound: the k-th best of the block maxima of the chunk's first columns (8 per block,
                # more where the chunk is long). It only has to keep this chunk's candidates well within a list:
                # about k * chunk / sample of them on average, at most an eighth of a list, as single rows reach
                # several times the mean; the bound from the list after the chunk is the chunk's exact k-th best
                # either way.
                sample = min(c1 - c0, max(FIRST_SAMPLE_PER_BLOCK * bound_blocks(k), -(-8 * k * (c1 - c0) // cap)))
                bound_from = sample
            # The list holds every score seen so far at or above the bound: its k-th best is the k-th best of all
            # the head's chunks so far (exact up to LIST_BLOCKS candidates), where a chunk's own block maxima would
            # bound by that chunk alone; the next chunk and the tail then add about k * (their labels / the labels
            # seen) candidates. Raised so before the tail, and before the next chunk where the bound so far would
            # have let more than a sixteenth of a list through by the end of it, counting every label it has met
            # since it was raised (a launch saved where it would not: two chunks of a head under a bound from a
            # sample of the first).
            next_chunk = min(num_head, c1 + chunk) - c1
            raise_bound = first and ((c1 >= num_head and num_tail)
                                     or k * (c1 - bound_at + next_chunk) > (cap // 16) * bound_from)
            if c1 - c0 <= chunk_columns:
                # one launch, a CTA a row: the bound, the candidates and the bound from the lists
                kernels.topk.gsfi_topk_chunk(
                    logits, k, threshold, count, score, position, c0, blocks=bound_blocks(k), list_blocks=LIST_BLOCKS,
                    sample=sample, reset_flag=any_unresolved if sample is not None else None, raise_bound=raise_bound)
            else:
                if sample is not None:
                    kernels.topk.gsfi_topk_bound(logits[:, :sample], k, threshold, bound_blocks(k), reset_count=count,
                                                 reset_flag=any_unresolved)
                kernels.topk.gsfi_topk_dense_candidates(logits, threshold, count, score, position, c0)
                if raise_bound:
                    kernels.topk.gsfi_topk_bound(score, k, threshold, LIST_BLOCKS, count, dtype)
            if raise_bound:
                bound_from = bound_at = c1
            logits = None  # freed before the next chunk's logits are allocated: one chunk at a time
        g0 = 0
        # While the scores seen so far make a weak bound (a bound from n scores lets about k * m / n of m more
        # through), the tail is taken in segments that double what was seen, the bound raised to the k-th best
        # of the list after each: every segment then adds about k candidates. Once the rest would add at most an
        # eighth of a list on average (rows whose best scores lie in the tail add several times the mean), it is
        # taken in one launch.
        seen = num_head if num_head >= k else 0
        while first and g0 < num_groups and (not seen or k * (num_tail - g0 * group_size) > (cap // 8) * seen):
            g1 = min(num_groups, g0 + max(1, -(-max(cap // 4, seen) // group_size)))
            _tail_candidates(kernels, xt, batch, tail_weight, tail_bias, tail_index, group_size, num_tail,
                             num_head, g0, g1, threshold, count, score, position)
            seen += (g1 - g0) * group_size
            g0 = g1
            # the list's scores are actual scores too (a row listing fewer than k keeps its bound)
            kernels.topk.gsfi_topk_bound(score, k, threshold, LIST_BLOCKS, count, dtype)
        _tail_candidates(kernels, xt, batch, tail_weight, tail_bias, tail_index, group_size, num_tail, num_head,
                         g0, num_groups, threshold, count, score, position)
        # Every row of this round (threshold not NaN) is merged, each sorting only its own list; an overflowed
        # one is merged again in the next round or flagged unresolved (the first round's merge flags them).
        flags = (unresolved, any_unresolved) if first else (None, None)
        kernels.topk.gsfi_topk_merge(count, score, position, cap, label_permutation, threshold, k, best_scores,
                                     best_ids, *flags)

    def retry(threshold: Tensor, stuck: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """``(threshold, progress, stuck)`` of the next round: overflowed rows again with the k-th best of their
        full lists as the bound (stuck where it does not rise: more than a list of scores tie at it), the others
        with NaN (they take no candidates and are not merged again); the lists emptied."""
        over = count > cap
        raised = _kth_best(score, k)
        progress = over & (raised > threshold)
        stuck = over & ~progress if stuck is None else stuck | (over & ~progress)
        count.zero_()
        return torch.where(progress, raised, math.nan).contiguous(), progress, stuck

    threshold = torch.empty(batch, dtype=torch.float32, device=device)
    if not resets:
        threshold.fill_(-math.inf)
    one_round(threshold, first=True)
    if not synchronize and on_device is None:
        return best_scores, best_ids, unresolved, any_unresolved
    if not synchronize:
        # The rare rounds as conditional blocks of the caller's graph: they run only where a list overflowed, a
        # flag the GPU computes; the host reads nothing.
        with on_device.when(any_unresolved):
            # A block's work allocates on a stream of its own, so the graph's pool keeps its memory besides the
            # first round's: smaller head chunks here (a quarter) keep that small.
            stuck = None
            for _ in range(MAX_ROUNDS - 1):
                threshold, _, stuck = retry(threshold, stuck)
                one_round(threshold, first=False, chunk=max(k, chunk // 4))
            unresolved.copy_(stuck | (count > cap))
            with on_device.when(unresolved.any()):
                on_device.fallback(unresolved, best_scores, best_ids)
                unresolved.zero_()
        return best_scores, best_ids, unresolved
    stuck: Optional[Tensor] = None  # rows whose bound stopped rising: more than a list of scores tie at it
    for r in range(MAX_ROUNDS - 1):
        # The round's one host synchronisation, after all its work is queued (the GPU is not left idle while the
        # host waits and then launches the merge): did any list overflow? (The first round's merge wrote the flag;
        # later merges do not.)
        if not (bool(any_unresolved) if r == 0 else int(count.max()) > cap):
            return best_scores, best_ids, stuck if stuck is not None else count.new_empty(0, dtype=torch.bool)
        threshold, progress, stuck = retry(threshold, stuck)
        if not bool(progress.any()):
            break
        one_round(threshold, first=False)
    assert stuck is not None
    return best_scores, best_ids, stuck | (count > cap)


class DeviceRounds:
    """How :func:`fused_topk` completes a captured round without the host: ``when(flag)`` is a context whose
    work runs only where the 0-d bool CUDA tensor ``flag`` is true at replay (a conditional node of the CUDA graph
    being captured: :func:`conditional_block`), and ``fallback(unresolved, scores, ids)`` writes the exact top-k of
    the rows flagged in ``unresolved [B]`` into ``scores`` and ``ids`` in place (the caller's chunked path, all of
    its work captured with static shapes)."""

    def __init__(self, when: Callable[[Tensor], contextlib.AbstractContextManager],
                 fallback: Callable[[Tensor, Tensor, Tensor], None]) -> None:
        self.when = when
        self.fallback = fallback


def conditional_blocks_supported(device: torch.device) -> bool:
    """Whether CUDA graphs captured on ``device`` can hold conditional nodes (:func:`conditional_block`): a CUDA
    12.4+ build of torch, with ``CUDAGraph.begin_capture_to_if_node`` or else a CUDA 12.4+ driver through which
    :mod:`lightning_haste.kernels.graphs` adds the nodes, and a small graph with nested blocks that allocate, which
    replays right on this device and driver (tried once per device; never while a capture is under way)."""
    if device.type != "cuda":
        return False
    probed = _CONDITIONAL_PROBES.get(device.index) if device.index is not None else None
    if probed is not None:  # the answer of the checks below once they reached the probe (validation asks every call)
        return probed
    if torch.version.cuda is None or getattr(torch.version, "hip", None):
        return False
    if tuple(int(v) for v in torch.version.cuda.split(".")[:2]) < (12, 4):
        return False
    if not _torch_captures_conditionals():
        from . import kernels  # noqa: PLC0415 - the CUDA path only

        if not kernels.graphs.available():
            return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CONDITIONAL_PROBES:
        if torch.cuda.is_current_stream_capturing():
            return False
        _CONDITIONAL_PROBES[index] = _probe_conditional_block(index)
    return _CONDITIONAL_PROBES[index]


_CONDITIONAL_PROBES: dict[int, bool] = {}


def _torch_captures_conditionals() -> bool:
    graph_type = torch.cuda.CUDAGraph
    return all(hasattr(graph_type, name) for name in (
        "get_currently_capturing_graph", "begin_capture_to_if_node", "end_capture_to_conditional_node"))


def _prepare_conditional_capture(device: torch.device) -> None:
    """What a capture with conditional blocks needs done before it starts: where the package adds the nodes itself,
    this thread's cuBLAS handles (:func:`lightning_haste.kernels.graphs.prepare_libraries`)."""
    if not _torch_captures_conditionals():
        from . import kernels  # noqa: PLC0415 - the CUDA path only

        kernels.graphs.prepare_libraries(device)


def _probe_conditional_block(index: int) -> bool:
    """Capture two nested blocks that allocate (what :func:`fused_topk`'s blocks do) and replay them with the
    flags off, the outer on, and both on."""
    try:
        with torch.cuda.device(index):
            _prepare_conditional_capture(torch.device("cuda", index))
            outer = torch.zeros((), dtype=torch.bool, device="cuda")
            inner = torch.zeros((), dtype=torch.bool, device="cuda")
            out = torch.zeros(2, dtype=torch.int32, device="cuda")
            graph = torch.cuda.CUDAGraph()
            pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                with conditional_block(outer, pool):
                    out[0:1].add_(torch.ones(1, dtype=torch.int32, device="cuda"))
                    with conditional_block(inner, pool):
                        ones = torch.ones(1, 1, device="cuda")  # a GEMM, as the top-k's blocks run
                        out[1:2].add_(nnf.linear(ones, ones * 10).round().int().flatten())
            seen = []
            for outer_on, inner_on in ((False, True), (True, False), (True, True)):
                outer.fill_(outer_on)
                inner.fill_(inner_on)
                graph.replay()
                seen.append(out.tolist())
            del graph
            return seen == [[0, 0], [1, 0], [2, 10]]
    except Exception as exc:  # noqa: BLE001 - any failure means: no conditional nodes here
        warnings.warn(f"CUDA graphs with conditional nodes do not work here ({type(exc).__name__}: "
                      f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); the top-k's graph holds one round and "
                      "the host checks its lists", RuntimeWarning, stacklevel=3)
        return False


@contextlib.contextmanager
def conditional_block(flag: Tensor, pool: Optional[tuple[int, int]] = None) -> Iterator[None]:
    """Capture the block's work into a conditional node of the CUDA graph being captured: at replay it runs only
    where the 0-d bool tensor ``flag`` is true. Its allocations come from the capture's memory pool ``pool`` (the
    ``pool`` given to ``torch.cuda.graph``; needed where torch cannot add the node itself and
    :mod:`lightning_haste.kernels.graphs` does)."""
    if _torch_captures_conditionals():
        graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
        graph.begin_capture_to_if_node(flag)
        try:
            yield
        finally:
            graph.end_capture_to_conditional_node()
        return
    if pool is None:
        raise ValueError("this torch adds no conditional nodes itself: conditional_block needs the capture's pool")
    from . import kernels  # noqa: PLC0415 - the CUDA path only

    with kernels.graphs.conditional_block(flag, pool):
        yield


def _tail_candidates(
    kernels, xt: Tensor, batch: int, weight: Tensor, bias: Optional[Tensor], index: Tensor, group_size: int,
    num_tail: int, num_head: int, g0: int, g1: int, threshold: Tensor, count: Tensor, score: Tensor,
    position: Tensor,
) -> None:
    """The candidates of tail groups ``[g0, g1)``, at internal positions ``num_head + g * group_size + j``."""
    if g1 <= g0:
        return
    p0, p1 = g0 * group_size, min(num_tail, g1 * group_size)
    kernels.topk.gsfi_topk_candidates(
        xt, batch, weight[p0 : g1 * group_size], index[g0:g1], bias[p0:p1] if bias is not None else None, p1 - p0,
        threshold, count, score, position, num_head + p0, checked=False,
    )


class CastCache:
    """Copies of a layer's parameters in another dtype, kept between top-k calls under autocast (a float32 layer in
    ``bf16-mixed`` validation would otherwise cast all its weights on every batch, several times the top-k's own
    memory traffic).

    A copy is refreshed in place (same memory: a CUDA graph that reads it stays valid) when its parameter changed in
    place since (its version counter moved, e.g. an optimizer step or a rewire), and made anew when the parameter is
    another tensor (other memory, shape or strides); :meth:`get` says when it made one, so that the caller drops
    whatever read the old copy. Writes that bypass the version counter (through ``.data``) are not seen: call
    :meth:`clear` after such an edit.

    Not kept by ``copy.deepcopy`` or pickling (a copy starts empty)."""

    def __init__(self) -> None:
        self._copies: dict[str, tuple[tuple, int, Tensor]] = {}  # name -> (what the parameter is, version, copy)

    def __len__(self) -> int:
        return len(self._copies)

    def clear(self) -> None:
        """Drop every copy (its memory goes back to torch's caching allocator)."""
        self._copies.clear()

    def __deepcopy__(self, memo: dict) -> CastCache:
        return CastCache()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()  # type: ignore[misc]

    def get(self, name: str, param: Tensor, dtype: torch.dtype) -> tuple[Tensor, bool]:
        """``(param`` in ``dtype``, contiguous, detached; ``made)``: ``made`` when a new copy was allocated (any
        earlier copy under ``name`` is dropped)."""
        described = (param.data_ptr(), tuple(param.shape), param.stride(), param.dtype, param.device, dtype)
        entry = self._copies.get(name)
        version = param._version
        if entry is not None and entry[0] == described:
            if entry[1] != version:
                with torch.no_grad():
                    entry[2].copy_(param)
                self._copies[name] = (described, version, entry[2])
            return entry[2], False
        self._copies.pop(name, None)
        with torch.no_grad():
            copy = param.detach().to(dtype=dtype, memory_format=torch.contiguous_format, copy=True)
        self._copies[name] = (described, version, copy)
        return copy, True


class RoundGraphs:
    """CUDA graphs of one round of the fused top-k (``synchronize=False``), one per key, replayed instead of
    launching the round's kernels one by one.

    The key must hold everything the captured work depends on other than the values it reads: the input's shape
    and dtype, ``k``, and the data pointers, shapes, strides and dtypes of the parameters (a graph reads its
    tensors through the pointers it was captured with, so in-place updates of the parameters, e.g. optimizer
    steps or a rewire of the index in place, are seen by the next replay; a parameter moved to new memory gives a
    new key). A key is captured the second time it is seen: the first call runs eagerly, which loads the kernels
    and the libraries' handles outside the capture. At most ``max_graphs`` graphs are kept (the least recently
    used goes first; the default two cover validation's full batches and its last one); they share one memory
    pool, which holds what one round allocates (below an eighth of a 16-bit ``[batch, num_labels]`` tensor) plus
    each graph's input copy and outputs, in segments that the caching allocator rounds up (a request of 1-10 MiB
    takes 20 MiB).

    ``conditional`` (default): where graphs can hold conditional nodes (:func:`conditional_blocks_supported`), a
    graph holds the whole exact top-k, the further rounds and the fallback as conditional blocks
    (:class:`DeviceRounds`), so that a replayed call reads nothing back; their work allocates on streams of its
    own, which the pool keeps besides the first round's. ``conditional=False``, or where graphs cannot hold such
    nodes: a graph holds one round, and the host reads its overflow flag after each replay (one synchronisation a
    call) and completes the rows that overflowed eagerly.

    Not kept by ``copy.deepcopy`` or pickling (a copy starts empty)."""

    def __init__(self, max_graphs: int = 2, conditional: bool = True) -> None:
        if not isinstance(max_graphs, int) or isinstance(max_graphs, bool) or max_graphs < 0:
            raise ValueError(f"max_graphs must be a non-negative int, got {max_graphs!r}")
        if not isinstance(conditional, bool):
            raise TypeError(f"conditional must be a bool, got {conditional!r}")
        self.max_graphs = max_graphs
        self.conditional = conditional
        # key -> (graph, static input, the outputs packed in one byte buffer, their layout in it)
        self._graphs: OrderedDict[Hashable, tuple] = OrderedDict()
        self._seen: OrderedDict[Hashable, bool] = OrderedDict()  # keys run once eagerly (False: capture failed)
        self._pool: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self._graphs)

    @property
    def pool(self) -> Optional[tuple]:
        """The memory pool the graphs share (None before the first capture): what a conditional block captured in
        a graph allocates comes from it (:func:`conditional_block`)."""
        return self._pool

    def clear(self) -> None:
        """Drop every graph and its memory (returned to torch's caching allocator)."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None

    def __deepcopy__(self, memo: dict) -> RoundGraphs:
        return RoundGraphs(self.max_graphs, self.conditional)

    def __getstate__(self) -> dict:
        return {"max_graphs": self.max_graphs, "conditional": self.conditional}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["max_graphs"], state.get("conditional", True))  # type: ignore[misc]

    def replay(
        self, key: Hashable, x: Tensor, round_fn: Callable[[Tensor], tuple[Tensor, ...]]
    ) -> Optional[tuple[Tensor, ...]]:
        """``round_fn(x)``'s outputs (copies) from the graph of ``key``, captured now if the key was
        :meth:`remember`-ed as capturable; None when the caller should run the round eagerly instead (and then
        :meth:`remember` the key): graphs off, a capture under way on this stream, a key not seen yet or not
        capturable, or a capture of this key that failed."""
        if self.max_graphs == 0 or not x.is_cuda:
            return None
        # a graph is captured and replayed on the current device's streams: the input's device made current
        with torch.cuda.device(x.device):
            if torch.cuda.is_current_stream_capturing():
                return None
            entry = self._graphs.get(key)
            if entry is None:
                if not self._seen.get(key, False):
                    return None
                entry = self._capture(key, x, round_fn)
                if entry is None:
                    return None
            else:
                self._graphs.move_to_end(key)
            graph, static_x, packed, layout = entry
            static_x.copy_(x)
            graph.replay()
            # one copy of all the outputs (the next replay overwrites the graph's), one allocation and one launch
            return _unpack(packed.clone(), layout)  # type: ignore[return-value]

    def remember(self, key: Hashable, capturable: bool) -> None:
        """Note that ``key`` ran once eagerly (its kernels are loaded): its next call is captured if
        ``capturable``. A key already noted keeps its first note (a failed capture is not retried)."""
        if self.max_graphs == 0:
            return
        self._seen.setdefault(key, capturable)
        self._seen.move_to_end(key)
        while len(self._seen) > 4 * self.max_graphs:
            self._seen.popitem(last=False)

    def _capture(
        self, key: Hashable, x: Tensor, round_fn: Callable[[Tensor], tuple[Tensor, ...]]
    ) -> Optional[tuple]:
        while len(self._graphs) >= self.max_graphs:
            self._graphs.popitem(last=False)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # filled by each replay, this one included
        if self.conditional:
            _prepare_conditional_capture(x.device)  # the blocks' head GEMMs: cuBLAS's handles made out here
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: a capture fails only on this thread's illegal calls, not on e.g. a pinning thread's
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                packed, layout = _pack(round_fn(static_x))
        except RuntimeError as exc:
            torch.cuda.synchronize(x.device)
            self._seen[key] = False
            warnings.warn(f"the top-k round could not be captured in a CUDA graph; it runs eagerly for this shape "
                          f"({str(exc).splitlines()[0][:200]})", RuntimeWarning, stacklevel=4)
            return None
        entry = (graph, static_x, packed, layout)
        self._graphs[key] = entry
        return entry


def _pack(outputs: tuple[Tensor, ...]) -> tuple[Tensor, tuple[tuple[int, int, int, torch.dtype, tuple], ...]]:
    """The tensors' bytes in one uint8 buffer and where each lies (``(position in outputs, offset, bytes, dtype,
    shape)``). Wider dtypes come first, so that every offset is a multiple of its dtype's size (a block's size is
    a multiple of its own element size, and element sizes are powers of two)."""
    order = sorted(range(len(outputs)), key=lambda i: -outputs[i].element_size())
    layout, pieces, offset = [], [], 0
    for i in order:
        flat = outputs[i].contiguous().reshape(-1).view(torch.uint8)
        layout.append((i, offset, flat.numel(), outputs[i].dtype, tuple(outputs[i].shape)))
        pieces.append(flat)
        offset += flat.numel()
    first = pieces[0]
    storage = first.untyped_storage().data_ptr()
    if all(p.untyped_storage().data_ptr() == storage and p.data_ptr() == first.data_ptr() + start
           for p, (_, start, _, _, _) in zip(pieces, layout, strict=True)):
        # already laid out so, in one buffer (fused_topk's outputs): a view, no copy
        return first.as_strided((offset,), (1,), first.storage_offset()), tuple(layout)
    return torch.cat(pieces), tuple(layout)


def _unpack(packed: Tensor, layout: tuple[tuple[int, int, int, torch.dtype, tuple], ...]) -> tuple[Tensor, ...]:
    """The tensors of :func:`_pack`'s layout, as views of ``packed``."""
    out: list[Optional[Tensor]] = [None] * len(layout)
    for i, offset, size, dtype, shape in layout:
        out[i] = packed[offset : offset + size].view(dtype).view(shape)
    return tuple(out)  # type: ignore[arg-type]
