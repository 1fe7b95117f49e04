"""The fused top-k's rounds (bounds from the head and from a sample of the tail, overflowing lists retried, rows
left unresolved) on CPU, with the candidate kernels stood in for by PyTorch code that keeps their contract:
candidates appended in an arbitrary order, counts that run past the lists' capacity."""

import contextlib

import numpy as np
import pytest
import torch

import lightning_haste as lh
from lightning_haste import functional as F
from lightning_haste import kernels
from lightning_haste import topk as fused
from lightning_haste.ranking import rank_keys, ranked_topk


class Lists:
    """The kernels' contract in PyTorch: every score >= the row's bound (NaN bound: the row is skipped) is appended
    at slot count[b] (in a random order), written only while the slot is below the capacity."""

    def __init__(self, seed: int) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.launches = {"tail": 0, "dense": 0, "chunk": 0, "merge": 0}

    def append(self, z: torch.Tensor, positions: torch.Tensor, threshold, count, score, position) -> None:
        cap = score.shape[1]
        for b in range(z.shape[0]):
            bound = float(threshold[b])
            if bound != bound:
                continue
            row = z[b].float()
            keep = (~(row < bound)).nonzero().flatten()
            keep = keep[torch.randperm(keep.numel(), generator=self.gen)]
            start = int(count[b])
            slots = torch.arange(start, start + keep.numel())
            inside = slots < cap
            score[b, slots[inside]] = row[keep[inside]]
            position[b, slots[inside]] = positions[keep[inside]].int()
            count[b] += keep.numel()

    def tail(self, xt, batch, weight, group_index, bias, out_features, threshold, count, score, position, offset=0,
             *, checked=True):
        self.launches["tail"] += 1
        z = F.group_shared_fanin(xt.t()[:batch], weight, group_index, bias, out_features, check_index=False)
        self.append(z, offset + torch.arange(out_features), threshold, count, score, position)

    def dense(self, logits, threshold, count, score, position, offset=0):
        self.launches["dense"] += 1
        self.append(logits, offset + torch.arange(logits.shape[1]), threshold, count, score, position)

    def bound(self, values, k, threshold, blocks, count=None, dtype=None, reset_count=None, reset_flag=None):
        assert blocks == (fused.bound_blocks(k) if count is None else fused.LIST_BLOCKS)
        if reset_count is not None:  # the first bound: the bounds set, the counts and the flag zeroed
            assert count is None
            threshold.fill_(-float("inf"))
            reset_count.zero_()
            if reset_flag is not None:
                reset_flag.zero_()
        for b in range(values.shape[0]):
            if float(threshold[b]) != float(threshold[b]):
                continue
            n = values.shape[1] if count is None else min(int(count[b]), values.shape[1])
            bound = fused.block_bound(values[b : b + 1, :n], k, blocks)
            if bound is not None:
                threshold[b] = torch.maximum(threshold[b], bound[0])

    def chunk(self, logits, k, threshold, count, score, position, offset, *, blocks, list_blocks, sample=None,
              reset_flag=None, raise_bound=False):
        # gsfi_topk_chunk's contract: the three launches it stands for, in one
        self.launches["chunk"] += 1
        assert blocks == fused.bound_blocks(k) and list_blocks == fused.LIST_BLOCKS
        own = kernels.tuning.current().topk.chunk_columns
        assert logits.shape[1] <= (fused.CHUNK_COLUMNS if own is None else own)  # the rule in force
        if sample is not None:
            self.bound(logits[:, :sample], k, threshold, blocks, reset_count=count, reset_flag=reset_flag)
        self.append(logits, offset + torch.arange(logits.shape[1]), threshold, count, score, position)
        if raise_bound:
            self.bound(score, k, threshold, list_blocks, count, logits.dtype)

    def merge(self, count, score, position, width, label_permutation, threshold, k, out_score, out_id,
              unresolved=None, any_unresolved=None):
        self.launches["merge"] += 1
        self.longest = max(getattr(self, "longest", 0), int(count.max()))
        if unresolved is not None:
            unresolved.copy_(count > score.shape[1])
            any_unresolved |= unresolved.any()
        for b in range(count.shape[0]):
            if float(threshold[b]) != float(threshold[b]):
                continue
            n = min(int(count[b]), score.shape[1], width)
            ids = label_permutation[position[b, :n].long()]
            keys = rank_keys(score[b, :n], ids)
            order = keys.argsort(descending=True)[:k]
            out_score[b] = score[b, :n][order].to(out_score.dtype)
            out_id[b] = ids[order]


@pytest.fixture(params=["chunk_launch", "three_launches"])
def lists(request, monkeypatch):
    # every head chunk by gsfi_topk_chunk (one launch; the default for chunks as short as these), or by the bound,
    # candidate and list-bound kernels (three launches)
    stand_in = Lists(seed=0)
    stand_in.chunk_columns = fused.CHUNK_COLUMNS if request.param == "chunk_launch" else 0
    with kernels.tuning.use(kernels.tuning.TopkTuning(chunk_columns=stand_in.chunk_columns)):
        yield from _standing_in(stand_in, monkeypatch)


def _standing_in(stand_in, monkeypatch):
    monkeypatch.setattr(kernels.topk, "gsfi_topk_candidates", stand_in.tail)
    monkeypatch.setattr(kernels.topk, "gsfi_topk_dense_candidates", stand_in.dense)
    monkeypatch.setattr(kernels.topk, "gsfi_topk_merge", stand_in.merge)
    monkeypatch.setattr(kernels.topk, "gsfi_topk_bound", stand_in.bound)
    monkeypatch.setattr(kernels.topk, "gsfi_topk_chunk", stand_in.chunk)
    monkeypatch.setattr(kernels.topk, "chunk_plan", lambda *args: None)  # loaded ahead for captured rounds
    monkeypatch.setattr(kernels.runtime, "zero_", lambda t: t.zero_())
    monkeypatch.setattr(kernels.topk, "max_merge_slots", lambda index: 2**14)  # an H100's, without a device
    yield stand_in


def _run(layer: lh.HeadTailOutput, x: torch.Tensor, k: int, budget: int, **kwargs):
    tail = layer.tail
    head = layer.head
    return fused.fused_topk(
        x[:, layer.head_slice[0] : layer.head_slice[1]] if head is not None else None,
        x[:, layer.tail_slice[0] : layer.tail_slice[1]], head.weight if head is not None else None,
        head.bias if head is not None else None, tail.weight, tail.bias, tail.group_index.int(), tail.group_size,
        layer.num_head_labels, layer.num_tail_labels, layer.label_permutation, k, budget, **kwargs,
    )


class Conditional:
    """A stand-in for the graph's conditional blocks: a capture records a block's work whatever the flag, so the
    block always runs here (its work must then leave resolved rows as they are); the flags are kept."""

    def __init__(self, reference) -> None:
        self.flags: list[bool] = []
        self.fallbacks: list[torch.Tensor] = []
        self.reference = reference  # (scores, ids) of every row

    @contextlib.contextmanager
    def when(self, flag: torch.Tensor):
        assert flag.dtype == torch.bool and flag.dim() == 0
        self.flags.append(bool(flag))
        yield

    def fallback(self, unresolved, scores, ids) -> None:
        self.fallbacks.append(unresolved.clone())
        rows = unresolved[:, None]
        scores.copy_(torch.where(rows, self.reference[0], scores))
        ids.copy_(torch.where(rows, self.reference[1], ids))


def _layer(num_labels, head_ratio, group_size=8, seed=0):
    freq = np.random.default_rng(seed).integers(1, 1000, num_labels)
    layer = lh.HeadTailOutput(32, freq, head_ratio=head_ratio, fan_in=8, group_size=group_size,
                              dtype=torch.bfloat16, generator=torch.Generator().manual_seed(seed))
    x = torch.randn(13, 32, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    return layer.requires_grad_(False), x


@pytest.mark.parametrize(("num_labels", "head_ratio", "k", "cap"), [
    (3000, 0.1, 5, None),  # a bound from the head
    (3000, 0.0, 20, None),  # no head: the tail's first groups
    (3000, 0.01, 40, None),  # a small head: both
    (5000, 0.3, 9, None),  # several head chunks, a rising bound
    (3000, 0.0, 7, 64),  # lists far too short: retried rounds
])
def test_rounds_give_the_ranked_topk(lists, monkeypatch, num_labels, head_ratio, k, cap):
    if cap is not None:
        monkeypatch.setattr(fused, "candidate_capacity", lambda batch, labels, kk, budget: max(kk, cap))
    layer, x = _layer(num_labels, head_ratio)
    if cap is not None:
        # the best scores in the tail's last groups: the first segments' bounds let far more than a list through
        layer.tail.weight[-num_labels // 4 :] *= 8
    budget = 13 * 2 * 700  # head chunks of 700 columns
    scores, ids, unresolved = _run(layer, x, k, budget)
    want_scores, want_ids = ranked_topk(layer(x), torch.arange(num_labels), k)
    resolved = ~unresolved if unresolved.numel() else torch.ones(x.shape[0], dtype=torch.bool)
    if cap is None:
        assert resolved.all()
    else:
        assert lists.launches["merge"] > 1 and resolved.any()  # retried rounds resolve some rows at least
    assert torch.equal(ids[resolved], want_ids[resolved])
    assert torch.equal(scores[resolved], want_scores[resolved])


def _tied_beyond_a_list(monkeypatch):
    """Lists of 32 slots and a layer whose every row ties more than 32 tail labels at its top score."""
    monkeypatch.setattr(fused, "candidate_capacity", lambda batch, labels, kk, budget: 32)
    layer, x = _layer(2000, 0.05)
    layer.tail.weight.zero_()
    layer.tail.bias.zero_()
    layer.head.weight.zero_()
    layer.head.bias.fill_(-1.0)  # the head below the tail's 0.0 ties: more than 32 tail labels tie at the top
    x[3:] = 0  # rows 3.. tie everywhere at 0 as well; rows 0..2 too (zero tail weights): all unresolved
    return layer, x


def test_rows_tied_beyond_a_list_come_back_unresolved(lists, monkeypatch):
    layer, x = _tied_beyond_a_list(monkeypatch)
    _, _, unresolved = _run(layer, x, 5, 2**20)
    assert unresolved.all()
    # the layer's topk completes them by the chunked path: the smallest tail label ids with score 0
    monkeypatch.setattr(type(layer), "_fused_topk_arguments", lambda self, x2d: _fused_arguments(self, x2d))
    scores, ids = layer.topk(x, 5)
    want_scores, want_ids = ranked_topk(layer(x), torch.arange(2000), 5)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)


@pytest.mark.parametrize(("num_labels", "head_ratio", "k", "cap", "overflow"), [
    (3000, 0.1, 5, None, False),  # nothing overflows: the blocks' work changes nothing
    (3000, 0.0, 7, 64, True),  # lists far too short: the further rounds in the block
])
def test_device_rounds_give_the_ranked_topk_without_the_host(lists, monkeypatch, num_labels, head_ratio, k, cap,
                                                             overflow):
    if cap is not None:
        monkeypatch.setattr(fused, "candidate_capacity", lambda batch, labels, kk, budget: max(kk, cap))
    layer, x = _layer(num_labels, head_ratio)
    if cap is not None:
        layer.tail.weight[-num_labels // 4 :] *= 8
    want_scores, want_ids = ranked_topk(layer(x), torch.arange(num_labels), k)
    blocks = Conditional((want_scores, want_ids))
    scores, ids, unresolved = _run(layer, x, k, 13 * 2 * 700, synchronize=False,
                                   on_device=fused.DeviceRounds(blocks.when, blocks.fallback))
    assert blocks.flags[0] == overflow and len(blocks.flags) == 2
    assert not unresolved.any()
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)
    if overflow:
        assert lists.launches["merge"] == fused.MAX_ROUNDS


def test_device_rounds_leave_rows_tied_beyond_a_list_to_the_fallback(lists, monkeypatch):
    layer, x = _tied_beyond_a_list(monkeypatch)
    want_scores, want_ids = ranked_topk(layer(x), torch.arange(2000), 5)
    blocks = Conditional((want_scores, want_ids))
    scores, ids, unresolved = _run(layer, x, 5, 2**20, synchronize=False,
                                   on_device=fused.DeviceRounds(blocks.when, blocks.fallback))
    assert blocks.flags == [True, True] and blocks.fallbacks[0].all() and not unresolved.any()
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)


def _fused_arguments(layer, x2d):
    tail, head = layer.tail, layer.head
    args = (x2d, head.weight, head.bias, tail.weight, tail.bias, tail.group_index.int(),
            [*layer.head_slice, *layer.tail_slice], layer.num_head_labels, layer.num_tail_labels,
            layer.label_permutation)
    return args, False


def test_capacity_and_chunks_follow_the_memory_rules():
    # lists: a multiple of 256 at or below L / 96, at least 16 k and 256, at most 16384 (unless 16 k is more) and L
    assert fused.candidate_capacity(64, 670091, 5, 2**28) == 6912
    assert fused.candidate_capacity(512, 131072, 5, 2**28) == 1280
    assert fused.candidate_capacity(512, 131072, 100, 2**28) == 1600
    assert fused.candidate_capacity(128, 8623847, 100, 2**28) == 16384
    assert fused.candidate_capacity(4, 300, 100, 2**28) == 300
    assert fused.candidate_capacity(4, 100000, 128, 2**28) == 2048
    assert fused.candidate_capacity(512, 131072, 128, 2**20) == 2048  # 16 k even above the budget
    # head chunks: equal, at most a sixteenth of the labels, at least k
    assert fused.head_chunk_columns(64, 670091, 67024, 5, 2**28) == 33512
    assert fused.head_chunk_columns(64, 670091, 20000, 5, 2**28) == 20000
    assert fused.head_chunk_columns(64, 100, 60, 50, 2**28) == 50  # k columns even above a sixteenth
    assert fused.head_chunk_columns(64, 100, 0, 50, 2**28) == 50
    # a chunk and the lists stay below an eighth of a 16-bit [B, L] (8 bytes a slot, 2 a logit)
    for batch, labels, head, k in [(64, 670091, 67024, 100), (512, 131072, 6560, 5), (128, 8623847, 431200, 100)]:
        chunk = fused.head_chunk_columns(batch, labels, head, k, 2**30)
        lists = 8 * fused.candidate_capacity(batch, labels, k, 2**30)
        assert (2 * min(chunk, head) + lists) / (2 * labels) < 1 / 8


@pytest.mark.parametrize("n", [3, 5, 40, 41, 1000])
def test_block_bound_is_a_lower_bound_of_the_kth_best(n):
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(20, n, generator=gen).bfloat16()
    scores[0, : min(n, 3)] = float("nan")
    bound = fused.block_bound(scores, 5)
    if n < 5:
        assert bound is None
        return
    kth = ranked_topk(scores, torch.arange(n), 5)[0][:, -1].float().nan_to_num(nan=float("inf"), posinf=float("inf"))
    assert bound.dtype == torch.float32 and torch.all(bound <= kth)


def test_block_bound_takes_at_least_k_blocks():
    # k above the default blocks (MAX_BLOCKS) takes k blocks; fewer blocks than k given by hand are refused
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(4, 10000, generator=gen)
    k = fused.MAX_BLOCKS + 1
    bound = fused.block_bound(scores, k)
    assert torch.all(bound <= scores.topk(k, dim=1).values[:, -1])
    with pytest.raises(ValueError, match="blocks=2 must be >= k=3"):
        fused.block_bound(scores, 3, blocks=2)


def test_a_k_above_the_kernels_largest_takes_the_chunked_path(monkeypatch):
    # the candidate kernels take k up to MAX_FUSED_K (a bound's blocks); above it HeadTailOutput does not call them
    layer, x = _layer(3000, 0.1)
    calls = []
    monkeypatch.setattr(layer, "_fused_topk_arguments", lambda x2d: (calls.append(x2d) or ((), False)))
    monkeypatch.setattr(lh.ops, "head_tail_topk", lambda *a: pytest.fail("the kernels ran"))
    assert layer._fused_topk(x, fused.MAX_FUSED_K + 1) is None
    assert len(calls) == 1  # the arguments (and the tail's index) were still checked


def test_the_tail_is_bounded_by_the_kth_best_of_the_whole_head(lists, monkeypatch):
    # Each head chunk's candidates raise the bound to the k-th best of the list, i.e. of every head score so far:
    # the tail then sees the k-th best of the whole head, not of one chunk's block maxima.
    layer, x = _layer(5000, 0.3)
    seen = []
    tail = lists.tail

    def recording_tail(xt, batch, weight, group_index, bias, out_features, threshold, *args, **kwargs):
        seen.append(threshold.clone())
        tail(xt, batch, weight, group_index, bias, out_features, threshold, *args, **kwargs)

    monkeypatch.setattr(kernels.topk, "gsfi_topk_candidates", recording_tail)
    k = 9
    budget = 2**20
    chunks = -(-layer.num_head_labels // fused.head_chunk_columns(13, 5000, layer.num_head_labels, k, budget))
    scores, ids, unresolved = _run(layer, x, k, budget)
    head_logits = layer.head(x[:, layer.head_slice[0] : layer.head_slice[1]])
    assert chunks > 2 and lists.launches["dense" if lists.chunk_columns == 0 else "chunk"] == chunks
    assert len(seen) == 1
    kth = head_logits.float().topk(k, dim=1).values[:, -1]
    assert torch.equal(seen[0], kth)
    want_scores, want_ids = ranked_topk(layer(x), torch.arange(5000), k)
    assert not unresolved.numel() and torch.equal(ids, want_ids) and torch.equal(scores, want_scores)


def test_round_graphs_bookkeeping_without_a_device():
    import copy  # noqa: PLC0415
    import pickle  # noqa: PLC0415

    with pytest.raises(ValueError, match="max_graphs"):
        fused.RoundGraphs(-1)
    with pytest.raises(ValueError, match="max_graphs"):
        lh.HeadTailOutput(16, [3, 2, 1], head_ratio=0.0, fan_in=8, group_size=1, topk_graphs=True)
    graphs = fused.RoundGraphs(2)
    calls = []
    x = torch.zeros(2, 3)
    graphs.remember("a", capturable=True)
    # CPU tensors never replay, whatever was remembered: the round runs eagerly
    assert graphs.replay("a", x, lambda t: calls.append(t)) is None and not calls
    for key in "bcdefghijk":
        graphs.remember(key, capturable=key != "c")
    assert len(graphs._seen) == 8  # at most four keys a graph noted
    graphs.remember("k", capturable=False)  # a key keeps its first note
    assert graphs._seen["k"] is True
    assert len(copy.deepcopy(graphs)._seen) == 0 and copy.deepcopy(graphs).max_graphs == 2
    restored = pickle.loads(pickle.dumps(graphs))
    assert len(restored._seen) == 0 and restored.max_graphs == 2
    off = fused.RoundGraphs(0)
    off.remember("a", capturable=True)
    assert len(off._seen) == 0
    with pytest.raises(TypeError, match="conditional"):
        fused.RoundGraphs(2, conditional=1)
    one_round = fused.RoundGraphs(3, conditional=False)
    assert not copy.deepcopy(one_round).conditional and not pickle.loads(pickle.dumps(one_round)).conditional
    assert graphs.conditional  # on by default (where graphs can hold conditional nodes)
    assert not fused.conditional_blocks_supported(torch.device("cpu"))


def test_a_conditional_block_checks_its_flag_before_touching_the_graph():
    from lightning_haste import kernels  # noqa: PLC0415 - kernels imports no CuPy itself

    pool = (0, 1)
    for flag in (torch.zeros((), dtype=torch.bool), torch.zeros(2, dtype=torch.bool)):
        with pytest.raises(ValueError, match="one-element bool or integer CUDA tensor"):
            with kernels.graphs.conditional_block(flag, pool):
                pass
    with pytest.raises(ValueError, match="one-element bool or integer CUDA tensor"):
        with kernels.graphs.conditional_block(torch.zeros((), dtype=torch.float32), pool):
            pass


def test_a_layer_on_cpu_keeps_no_graphs():
    layer, x = _layer(3000, 0.1)
    for _ in range(3):
        layer.topk(x, 5)
    assert layer._topk_graph_key(x, 5) is None and len(layer.topk_graphs._seen) == 0
    twin = __import__("copy").deepcopy(layer)
    assert isinstance(twin.topk_graphs, fused.RoundGraphs) and twin.topk_graphs is not layer.topk_graphs


def test_cast_cache_refreshes_in_place_and_renews_for_another_tensor():
    import copy  # noqa: PLC0415
    import pickle  # noqa: PLC0415

    cache = fused.CastCache()
    gen = torch.Generator().manual_seed(5)
    param = torch.nn.Parameter(torch.randn(7, 5, generator=gen))
    first, made = cache.get("w", param, torch.bfloat16)
    assert made and first.dtype == torch.bfloat16 and not first.requires_grad
    assert torch.equal(first, param.detach().bfloat16())
    again, made = cache.get("w", param, torch.bfloat16)
    assert not made and again is first
    with torch.no_grad():  # an optimizer step: the copy follows, in the same memory
        param.mul_(-3.0)
    refreshed, made = cache.get("w", param, torch.bfloat16)
    assert not made and refreshed.data_ptr() == first.data_ptr()
    assert torch.equal(refreshed, param.detach().bfloat16())
    half, made = cache.get("w", param, torch.float16)  # another dtype: a new copy
    assert made and half.dtype == torch.float16 and len(cache) == 1
    strided = torch.nn.Parameter(torch.randn(5, 7, generator=gen).t())  # another tensor, not contiguous
    copied, made = cache.get("w", strided, torch.float16)
    assert made and copied.is_contiguous() and torch.equal(copied, strided.detach().half())
    assert len(copy.deepcopy(cache)) == 0 and len(pickle.loads(pickle.dumps(cache))) == 0
    cache.clear()
    assert len(cache) == 0


def test_cpu_topk_under_autocast_keeps_no_casts():
    layer, x = _layer(3000, 0.1)
    layer, x = layer.float(), x.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = layer.topk(x, 5)
    # on CPU the chunked path casts per chunk, as the layer's forward does
    assert scores.dtype == torch.bfloat16 and len(layer.topk_casts) == 0
    layer.topk_casts.get("tail.weight", layer.tail.weight, torch.bfloat16)
    layer.eval()
    assert len(layer.topk_casts) == 1
    layer.train()
    assert len(layer.topk_casts) == 0
    layer.topk_casts.get("tail.weight", layer.tail.weight, torch.bfloat16)
    layer.topk_graphs.remember("a key", capturable=True)
    layer.double()  # new parameters: the copies of the old ones and the graphs' notes go
    assert len(layer.topk_casts) == 0 and len(layer.topk_graphs._seen) == 0
    assert layer.tail.weight.dtype == torch.float64


def test_graph_outputs_pack_into_one_buffer_and_unpack_as_views():
    gen = torch.Generator().manual_seed(2)
    outputs = (torch.randn(3, 5, generator=gen).bfloat16(), torch.randint(-9, 9, (3, 5), generator=gen),
               torch.rand(3, generator=gen) > 0.5, torch.tensor(True), torch.randn(2, 2, generator=gen).t(),
               torch.empty(0, 4, dtype=torch.float16))
    packed, layout = fused._pack(outputs)
    assert packed.dtype == torch.uint8 and packed.numel() == sum(t.numel() * t.element_size() for t in outputs)
    copy = packed.clone()
    unpacked = fused._unpack(copy, layout)
    for got, want in zip(unpacked, outputs, strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
        assert got.numel() == 0 or got.untyped_storage().data_ptr() == copy.untyped_storage().data_ptr()


def test_outputs_already_laid_out_in_one_buffer_pack_without_a_copy():
    # fused_topk's outputs are views of one buffer in the packing order: packed as a view of it; a buffer in
    # another order, or a gap, is copied as any outputs are
    batch, k = 3, 4
    buffer = torch.arange(8 + batch * k * 10 + batch + 1, dtype=torch.uint8)[8:]  # not at its storage's start
    ids = buffer[: batch * k * 8].view(torch.long).view(batch, k)
    scores = buffer[batch * k * 8 : batch * k * 10].view(torch.bfloat16).view(batch, k)
    flags = buffer[batch * k * 10 : batch * k * 10 + batch].view(torch.bool)
    packed, layout = fused._pack((scores, ids, flags))
    assert packed.data_ptr() == buffer.data_ptr() and packed.numel() == batch * k * 10 + batch
    for got, want in zip(fused._unpack(packed.clone(), layout), (scores, ids, flags), strict=True):
        assert torch.equal(got, want)
    gap = buffer[batch * k * 10 + 1 : batch * k * 10 + 1 + batch].view(torch.bool)
    packed, _ = fused._pack((scores, ids, gap))
    assert packed.data_ptr() != buffer.data_ptr()


def test_many_head_chunks_keep_the_lists_short(lists):
    # Fifteen head chunks under one bound from a sample of the first would each add about k candidates: the bound
    # is raised from the list wherever the labels met since it was last raised would pass more than a sixteenth of
    # a list, so the lists stay far below their capacity (256 slots here)
    layer, x = _layer(20000, 0.9)
    k = 12
    scores, ids, unresolved = _run(layer, x, k, 2**30)
    want_scores, want_ids = ranked_topk(layer(x), torch.arange(20000), k)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores) and unresolved.numel() == 0
    assert lists.longest <= 128, lists.longest


def test_the_chunk_kernel_of_captured_rounds_is_loaded_by_the_eager_call(lists, monkeypatch):
    # head chunks of 1,200 columns take three launches under chunk_columns=400, but the further rounds a graph of
    # the shape captures take chunks of a quarter (300), which gsfi_topk_chunk does: the eager call loads its plan
    # (outside any capture), and only where that is so
    layer, x = _layer(20000, 0.3)
    loaded = []
    monkeypatch.setattr(kernels.topk, "chunk_plan", lambda *args: loaded.append(args))
    k = 5
    assert fused.head_chunk_columns(13, 20000, layer.num_head_labels, k, 2**30) == 1200
    for chunk_columns, synchronize, want in ((400, True, 1), (400, False, 0), (1200, True, 0), (299, True, 0)):
        loaded.clear()
        with kernels.tuning.use(kernels.tuning.TopkTuning(chunk_columns=chunk_columns)):
            _run(layer, x, k, 2**30, synchronize=synchronize)
        assert len(loaded) == want, (chunk_columns, synchronize)
        if want:
            assert loaded[0][1:3] == (13, max(fused.bound_blocks(k), fused.LIST_BLOCKS))
