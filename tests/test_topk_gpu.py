"""The fused top-k (candidate kernels) against the forward's logits and the float64 reference (run on a GPU:
PYTHONPATH=. python3 -m pytest -m gpu tests/test_topk_gpu.py)."""

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as nnf

import lightning_haste as lh
from lightning_haste import kernels, ops
from lightning_haste import topk as fused
from lightning_haste.kernels import tuning
from lightning_haste.ranking import ranked_topk

pytestmark = pytest.mark.gpu

# (batch, in_features, num_labels, group_size, fan_in, head_ratio, k, dtype)
CASES = [
    (1, 64, 1001, 8, 16, 0.1, 1, torch.bfloat16),  # B = 1, k = 1, odd L
    (37, 384, 5003, 16, 64, 0.1, 5, torch.bfloat16),
    (130, 256, 20011, 32, 128, 0.05, 128, torch.bfloat16),  # k = 128, B over two row tiles
    (64, 384, 4099, 64, 128, 0.0, 100, torch.float16),  # no head: the tail's first groups give the bound
    (70, 600, 3001, 128, 64, 0.02, 90, torch.bfloat16),  # k above the head's label count
    (9, 4096, 2000, 32, 24, 0.1, 10, torch.bfloat16),  # H too large for shared memory: streamed gathers
    (200, 96, 50000, 16, 16, 0.3, 64, torch.float16),  # several head chunks
    (513, 128, 3000, 8, 8, 0.1, 5, torch.bfloat16),
]


def _layer(case, seed):
    batch, in_features, num_labels, group_size, fan_in, head_ratio, k, dtype = case
    freq = np.random.default_rng(seed).zipf(1.5, num_labels).clip(max=10**6)
    layer = lh.HeadTailOutput(in_features, freq, head_ratio=head_ratio, fan_in=fan_in, group_size=group_size,
                              dtype=dtype, generator=torch.Generator().manual_seed(seed)).cuda()
    gen = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randn(batch, in_features, device="cuda", generator=gen).to(dtype)
    return layer, x


def _forward_logits(layer, x, k):
    """The logits in original label order as the candidate kernels see them: the head by cuBLAS in the same
    chunks of columns, the tail by the forward (the kernel whose main loop the candidate kernel runs, under the
    tuning in force)."""
    batch = x.shape[0]
    internal = []
    if layer.head is not None:
        chunk = fused.head_chunk_columns(batch, layer.num_labels, layer.num_head_labels, k,
                                          layer.memory_budget)
        for c0 in range(0, layer.num_head_labels, chunk):
            c1 = min(layer.num_head_labels, c0 + chunk)
            b = layer.head.bias[c0:c1] if layer.head.bias is not None else None
            internal.append(nnf.linear(x[:, layer.head_slice[0] : layer.head_slice[1]], layer.head.weight[c0:c1], b))
    internal.append(layer.tail(x[:, layer.tail_slice[0] : layer.tail_slice[1]]))
    internal = torch.cat(internal, dim=1)
    out = torch.empty_like(internal)
    out[:, layer.label_permutation] = internal
    return out


def _float64_logits(layer, x):
    ref = layer.double()
    try:
        return ref(x.double())
    finally:
        layer.to(x.dtype)


@pytest.mark.parametrize("kernel", ["auto", "mma", "wgmma"])  # the forward's choice, or either main loop forced
@pytest.mark.parametrize("case", CASES, ids=[f"B{c[0]}-H{c[1]}-L{c[2]}-G{c[3]}-K{c[4]}-k{c[6]}" for c in CASES])
@torch.no_grad()
def test_fused_topk_equals_the_ranked_forward_logits(case, kernel):
    k = case[6]
    layer, x = _layer(case, seed=sum(case[:5]))
    with tuning.use(tuning.ForwardTuning(kernel=kernel)):
        scores, ids = layer.topk(x, k)
        logits = _forward_logits(layer, x, k)
    want_scores, want_ids = ranked_topk(logits, torch.arange(layer.num_labels, device="cuda"), k)
    assert torch.equal(ids, want_ids)
    assert torch.equal(scores, want_scores)
    # and against float64: the scores are the returned labels' logits within 16-bit rounding, and no label
    # outside the top-k scores above the k-th by more than that
    exact = _float64_logits(layer, x)
    tol = (2**-7 if x.dtype == torch.bfloat16 else 2**-10) * 4 * (1 + exact.abs().max())
    assert torch.allclose(scores.double(), exact.gather(1, ids), rtol=0, atol=float(tol))
    outside = exact.scatter(1, ids, -math.inf).max(dim=1).values
    assert torch.all(outside <= exact.gather(1, ids)[:, -1] + tol)


@torch.no_grad()
def test_fused_topk_does_not_read_unwritten_list_slots(monkeypatch):
    case = CASES[2]
    layer, x = _layer(case, seed=5)
    want = layer.topk(x, case[6])

    def poisoned(batch, cap, device, zeroed=True):
        # counts that are not zeroed here are zeroed by the first bound: poisoned too
        count = torch.zeros(batch, dtype=torch.int32, device=device) if zeroed else torch.full(
            (batch,), 2**20, dtype=torch.int32, device=device)
        score = torch.full((batch, cap), math.nan, device=device)
        position = torch.full((batch, cap), 2**30, dtype=torch.int32, device=device)
        return count, score, position

    monkeypatch.setattr(kernels.topk, "candidate_buffers", poisoned)
    got = layer.topk(x, case[6])
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("cap", [8, 40])
@torch.no_grad()
def test_overflowing_lists_are_retried_exactly(monkeypatch, cap):
    # lists far too short for the candidates: the rounds raise the bound, the last rows go to the chunked path
    case = (50, 128, 7001, 16, 32, 0.01, 8, torch.bfloat16)
    layer, x = _layer(case, seed=11)
    monkeypatch.setattr(fused, "candidate_capacity", lambda batch, num_labels, k, budget: max(k, cap))
    scores, ids = layer.topk(x, 8)
    want_scores, want_ids = ranked_topk(_forward_logits(layer, x, 8), torch.arange(7001, device="cuda"), 8)
    assert torch.equal(ids, want_ids) and torch.equal(scores, want_scores)


@torch.no_grad()
def test_all_scores_tied_fall_back_to_the_smallest_ids():
    case = (20, 64, 3000, 32, 16, 0.05, 50, torch.bfloat16)
    layer, x = _layer(case, seed=3)
    for p in layer.parameters():
        p.zero_()
    if fused.conditional_blocks_supported(torch.device("cuda")):
        layer.topk_graphs = fused.RoundGraphs(2, conditional=True)  # the fallback in a conditional block
    for call in range(3):  # eager, captured, replayed
        _poison_graph_outputs(layer)
        scores, ids = layer.topk(x, 50)
        assert torch.equal(ids, torch.arange(50, device="cuda").expand(20, 50)), call
        assert torch.equal(scores, torch.zeros_like(scores)), call


@torch.no_grad()
def test_replayed_topk_reads_nothing_back_where_graphs_take_conditional_blocks():
    if not fused.conditional_blocks_supported(torch.device("cuda")):
        pytest.skip("this torch or driver captures no conditional nodes")
    case = (37, 384, 5003, 16, 64, 0.1, 5, torch.bfloat16)
    layer, x = _layer(case, seed=21)
    layer.topk_graphs = fused.RoundGraphs(2, conditional=True)
    layer.topk(x, 5)
    layer.topk(x, 5)  # captured
    want = ranked_topk(_forward_logits(layer, x, 5), torch.arange(5003, device="cuda"), 5)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        scores, ids = layer.topk(x, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(ids, want[1]) and torch.equal(scores, want[0])


@torch.no_grad()
def test_fused_topk_under_autocast_and_nan_scores():
    case = (33, 128, 4000, 16, 32, 0.1, 6, torch.float32)
    layer, x = _layer(case, seed=4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        scores, ids = layer.topk(x, 6)
        want = ranked_topk(layer(x), torch.arange(4000, device="cuda"), 6)
    assert scores.dtype == torch.bfloat16
    # the autocast forward may take the Hopper kernel: equal up to one rounding of a 16-bit logit
    assert torch.allclose(scores.float(), want[0].float(), rtol=2**-7, atol=0)
    layer_bf16, xb = _layer((33, 128, 4000, 16, 32, 0.1, 6, torch.bfloat16), seed=4)
    layer_bf16.tail.weight[5].fill_(math.nan)  # tail position 5: NaN ranks first
    label = int(layer_bf16.label_permutation[layer_bf16.num_head_labels + 5])
    _, nan_ids = layer_bf16.topk(xb, 6)
    assert torch.all(nan_ids[:, 0] == label)


@torch.no_grad()
@pytest.mark.parametrize("conditional", [False, True])
def test_topk_peak_memory_below_an_eighth_of_the_logits(conditional):
    # the first call (eager), the second (captured in a CUDA graph) and the third (replayed); what the graph
    # keeps between calls counts too
    case = (256, 384, 670091, 16, 128, 0.1, 100, torch.bfloat16)
    layer, x = _layer(case, seed=6)
    layer.topk_graphs = fused.RoundGraphs(2, conditional=conditional)
    conditional = conditional and fused.conditional_blocks_supported(x.device)
    eighth = 256 * 670091 * 2 / 8
    layer.topk(x, 100)  # compile the kernels outside the measurement
    layer.topk_graphs.clear()
    for _ in range(3):  # a capture too: the libraries' per-stream state (cuBLAS's workspace) is made once
        layer.topk(x[:255], 100)
    layer.topk_graphs.clear()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        scores, ids = layer.topk(x, 100)
    torch.cuda.synchronize()
    assert len(layer.topk_graphs) == 1
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < eighth, peak
    del scores, ids
    torch.cuda.empty_cache()
    # what the graph keeps between calls: the round's temporaries in its private memory pool, whose segments the
    # caching allocator rounds up (a request of 1-10 MiB takes a 20 MiB segment)
    kept = torch.cuda.memory_reserved() - base_reserved
    if conditional:
        # and the conditional blocks' temporaries (the further rounds' and the fallback's, each below an eighth),
        # which the allocator keeps per stream: each body's stream rounds its own segments up
        assert kept < 2 * eighth + 3 * 20 * 2**20, kept
    else:
        assert kept < eighth + 20 * 2**20, kept
    layer.topk_graphs.clear()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_reserved() <= base_reserved


def _no_graphs(layer):
    """A copy of the layer that launches the kernels one by one (deepcopy starts without graphs)."""
    import copy  # noqa: PLC0415

    twin = copy.deepcopy(layer)
    twin.topk_graphs = fused.RoundGraphs(0)
    return twin


def _poison_graph_outputs(layer):
    """Every byte of the graphs' packed outputs 0xFF: NaN scores, ids -1, an overflow flag set (a replay that
    did not rewrite all of them would show)."""
    for _graph, _static_x, packed, _layout in layer.topk_graphs._graphs.values():
        packed.fill_(255)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{c[0]}-L{c[2]}-G{c[3]}-k{c[6]}")
@torch.no_grad()
def test_replayed_topk_equals_the_kernels_launched_one_by_one(case):
    k = case[6]
    layer, _ = _layer(case, seed=sum(case[:5]) + 1)
    twin = _no_graphs(layer)
    gen = torch.Generator(device="cuda").manual_seed(9)
    for call in range(4):  # eager, captured, replayed twice on fresh inputs, the graph's outputs poisoned
        x = torch.randn(case[0], case[1], device="cuda", generator=gen).to(case[7])
        _poison_graph_outputs(layer)
        got, want = layer.topk(x, k), twin.topk(x, k)
        assert torch.equal(got[1], want[1]), call
        assert torch.equal(got[0], want[0]), call
        assert len(layer.topk_graphs) == (call >= 1)
    assert len(twin.topk_graphs) == 0


@torch.no_grad()
def test_replayed_topk_sees_parameters_changed_in_place():
    case = (40, 256, 9001, 16, 32, 0.1, 20, torch.bfloat16)
    layer, x = _layer(case, seed=12)
    for _ in range(2):
        layer.topk(x, 20)
    assert len(layer.topk_graphs) == 1
    gen = torch.Generator(device="cuda").manual_seed(3)
    layer.tail.weight.mul_(-1.5)
    layer.head.bias.add_(torch.randn(layer.head.bias.shape, device="cuda", generator=gen).to(layer.head.bias.dtype))
    # a rewire in place: another valid pattern for every group (the index is validated again before the replay)
    index = layer.tail.group_index
    index.copy_(torch.stack([torch.randperm(256, generator=gen, device="cuda")[:32] for _ in range(index.shape[0])]))
    got = layer.topk(x, 20)
    assert len(layer.topk_graphs) == 1  # the same graph, replayed
    want = ranked_topk(_forward_logits(layer, x, 20), torch.arange(9001, device="cuda"), 20)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    # a parameter in new memory is a new key: captured on its second call, the old graph kept until evicted
    layer.tail.weight = torch.nn.Parameter(layer.tail.weight.detach().clone())
    for _ in range(2):
        got = layer.topk(x, 20)
    assert len(layer.topk_graphs) == 2
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


@torch.no_grad()
def test_replayed_topk_under_autocast_casts_the_current_parameters():
    case = (33, 128, 4000, 16, 32, 0.1, 6, torch.float32)
    layer, x = _layer(case, seed=4)
    twin = _no_graphs(layer)
    layer.eval()
    copies = None
    for step in range(5):
        twin.topk_casts.clear()  # the reference casts the parameters afresh on every call
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = layer.topk(x, 6), twin.topk(x, 6)
        assert got[0].dtype == torch.bfloat16
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0]), step
        # the cached bfloat16 copies of the four float32 parameters, refreshed in place (the graph reads them)
        pointers = {name: entry[2].data_ptr() for name, entry in layer.topk_casts._copies.items()}
        assert len(pointers) == 4 and (copies is None or pointers == copies), step
        copies = pointers
        for t in (layer, twin):  # an optimizer step on the float32 parameters, a bias changed in place too
            t.tail.weight.add_(0.01 * step)
            t.head.bias.mul_(1.0 + 0.1 * step)
    assert len(layer.topk_graphs) == 1
    got_plain = layer.topk(x, 6)  # autocast off: another key, eager on its first call
    assert got_plain[0].dtype == torch.float32
    assert len(layer.topk_graphs) == 1
    # a parameter replaced by another tensor: a new copy, and the graphs that read the old one dropped
    for t in (layer, twin):
        t.tail.weight = torch.nn.Parameter(t.tail.weight.detach() * -1.0)
    for _ in range(3):
        twin.topk_casts.clear()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got, want = layer.topk(x, 6), twin.topk(x, 6)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert layer.topk_casts._copies["tail.weight"][2].data_ptr() != copies["tail.weight"]
    # training mode frees the copies and the graphs; evaluation mode alone keeps them
    layer.eval()
    assert len(layer.topk_casts) == 4 and len(layer.topk_graphs) == 1
    layer.train()
    assert len(layer.topk_casts) == 0 and len(layer.topk_graphs) == 0


@pytest.mark.parametrize("conditional", [True, False])
@pytest.mark.parametrize("cap", [8, 40])
@torch.no_grad()
def test_replayed_rows_whose_list_overflowed_are_completed(monkeypatch, cap, conditional):
    # by the further rounds and the chunked fallback in the graph's conditional blocks, or (graphs of one round)
    # by the eager rounds after the host read the flag
    if conditional and not fused.conditional_blocks_supported(torch.device("cuda")):
        pytest.skip("this torch or driver captures no conditional nodes")
    case = (50, 128, 7001, 16, 32, 0.01, 8, torch.bfloat16)
    layer, x = _layer(case, seed=11)
    layer.topk_graphs = fused.RoundGraphs(2, conditional=conditional)
    monkeypatch.setattr(fused, "candidate_capacity", lambda batch, num_labels, k, budget: max(k, cap))
    want = ranked_topk(_forward_logits(layer, x, 8), torch.arange(7001, device="cuda"), 8)
    for call in range(4):
        _poison_graph_outputs(layer)
        scores, ids = layer.topk(x, 8)
        assert torch.equal(ids, want[1]) and torch.equal(scores, want[0]), call
    assert len(layer.topk_graphs) == 1


@torch.no_grad()
def test_topk_graphs_are_bounded_and_not_copied():
    import copy  # noqa: PLC0415

    layer = lh.HeadTailOutput(128, np.arange(3000, 0, -1), head_ratio=0.1, fan_in=32, group_size=16,
                              dtype=torch.bfloat16, topk_graphs=2, generator=torch.Generator().manual_seed(1)).cuda()
    twin = _no_graphs(layer)
    gen = torch.Generator(device="cuda").manual_seed(2)
    for batch in (30, 31, 32, 30, 31, 32):
        for _ in range(2):
            x = torch.randn(batch, 128, device="cuda", generator=gen).bfloat16()
            got, want = layer.topk(x, 5), twin.topk(x, 5)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
        assert len(layer.topk_graphs) <= 2
    assert len(copy.deepcopy(layer).topk_graphs) == 0
    layer.topk_graphs.clear()
    assert len(layer.topk_graphs) == 0


def test_head_tail_topk_op_is_registered_for_compile():
    case = (16, 64, 1000, 16, 16, 0.1, 5, torch.bfloat16)
    layer, x = _layer(case, seed=7)
    args, _ = layer._fused_topk_arguments(x)
    torch.library.opcheck(ops._head_tail_topk_op, (*args, 5, layer.memory_budget),
                          test_utils=("test_schema", "test_faketensor"))
    compiled = torch.compile(lambda t: layer.topk(t, 5), fullgraph=False)
    with torch.no_grad():
        got = compiled(x)
        want = layer.topk(x, 5)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("k", [1, 5, 100, 128, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_merge_of_long_lists_with_special_values(k, dtype):
    # Lists of every length up to the capacity, including far longer than the merge's cut (2 m slots for
    # m = 4 k blocks): values of the 16-bit dtype with NaN, +-inf, -0.0 / 0.0, ties and subnormals; rows with
    # fewer than k slots are not merged (the caller never asks), rows with a NaN threshold are left alone.
    gen = torch.Generator(device="cuda").manual_seed(k)
    batch, cap, num_labels = 64, 4096, 50000
    count = torch.randint(k, cap + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    count[0], count[1], count[2] = cap, k, cap + 7  # full, the least, overflowed (the first cap slots count)
    values = torch.randn(batch, cap, generator=gen, device="cuda").to(dtype)
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-40, -1e-40, 1.0], device="cuda")
    pick = torch.randint(0, 8, (batch, cap), generator=gen, device="cuda")
    where = torch.rand(batch, cap, generator=gen, device="cuda") < 0.05
    values = torch.where(where, special[pick].to(dtype), values)
    values[3] = values[3, 0]  # a row tied everywhere
    score = values.float()
    position = torch.stack([torch.randperm(num_labels, generator=gen, device="cuda")[:cap] for _ in range(batch)])
    position = position.int()
    permutation = torch.randperm(num_labels, generator=gen, device="cuda")
    threshold = torch.zeros(batch, device="cuda")
    threshold[5] = math.nan
    out_score = torch.full((batch, k), 7.0, device="cuda", dtype=dtype)
    out_id = torch.full((batch, k), -5, device="cuda", dtype=torch.long)
    kernels.topk.gsfi_topk_merge(count, score, position, cap, permutation, threshold, k, out_score, out_id)
    for b in range(batch):
        if b == 5:
            assert (out_score[b] == 7.0).all() and (out_id[b] == -5).all()
            continue
        n = min(int(count[b]), cap)
        ids = permutation[position[b, :n].long()]
        want_scores, want_ids = ranked_topk(values[b : b + 1, :n], ids, k)
        assert torch.equal(out_id[b], want_ids[0]), b
        assert torch.equal(out_score[b].view(torch.int16), want_scores[0].view(torch.int16)) or torch.equal(
            out_score[b].float().nan_to_num(nan=1234.0), want_scores[0].float().nan_to_num(nan=1234.0)), b


def test_replayed_topk_under_inference_mode_as_validation_runs_it():
    case = (64, 256, 9001, 32, 64, 0.05, 10, torch.bfloat16)
    layer, x = _layer(case, seed=21)
    twin = _no_graphs(layer)
    with torch.inference_mode():
        for _ in range(3):
            got, want = layer.topk(x, 10), twin.topk(x, 10)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert len(layer.topk_graphs) == 1
    with torch.no_grad():  # outside inference mode: a key of its own (a graph's inference tensors stay inside)
        for _ in range(3):
            got = layer.topk(x, 10)
            assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert len(layer.topk_graphs) == 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_merge_flags_the_rows_whose_list_overflowed(dtype):
    # With the flag outputs, every row writes unresolved[b] = count[b] > cap (rows with a NaN threshold too) and
    # the flag is set where one overflowed and left as the caller zeroed it where none did (outputs poisoned).
    gen = torch.Generator(device="cuda").manual_seed(7)
    batch, cap, k, num_labels = 37, 512, 5, 4000
    score = torch.randn(batch, cap, generator=gen, device="cuda").to(dtype).float()
    position = torch.stack([torch.randperm(num_labels, generator=gen, device="cuda")[:cap] for _ in range(batch)])
    permutation = torch.randperm(num_labels, generator=gen, device="cuda")
    threshold = torch.zeros(batch, device="cuda")
    threshold[4] = math.nan
    for overflowed in ([], [0, 4, 36]):
        count = torch.randint(k, cap + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
        count[overflowed] = cap + 1 + torch.arange(len(overflowed), device="cuda", dtype=torch.int32)
        unresolved = torch.ones(batch, dtype=torch.bool, device="cuda")
        flag = torch.zeros((), dtype=torch.bool, device="cuda")
        out_score = torch.empty(batch, k, device="cuda", dtype=dtype)
        out_id = torch.empty(batch, k, device="cuda", dtype=torch.long)
        kernels.topk.gsfi_topk_merge(count, score, position.int(), cap, permutation, threshold, k, out_score,
                                     out_id, unresolved, flag)
        assert torch.equal(unresolved, count > cap)
        assert bool(flag) == bool(overflowed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1, 5, 7, 8, 9, 15, 16, 2051, 40013])
@torch.no_grad()
def test_dense_candidate_lists_hold_exactly_the_logits_at_or_above_the_bound(cols, dtype):
    # Rows that start anywhere against a 16-byte boundary (a chunk of columns at an odd offset of a wider tensor:
    # the kernel reads the columns before the first boundary and after the last whole vector one by one), NaN and
    # infinite logits, ties at the bound; rows with a NaN threshold take none, -inf every logit, +inf only +inf and
    # NaN; lists counting on from a nonzero count; nothing written past the count (buffers poisoned).
    gen = torch.Generator(device="cuda").manual_seed(cols)
    batch, offset = 45, 3
    wide = torch.randn(batch, cols + 11, generator=gen, device="cuda").to(dtype)
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0], device="cuda").to(dtype)
    where = torch.rand(batch, cols + 11, generator=gen, device="cuda") < 0.03
    wide = torch.where(where, special[torch.randint(0, 5, wide.shape, generator=gen, device="cuda")], wide)
    logits = wide[:, 5 : 5 + cols]
    z = logits.float()
    passing = (torch.rand(batch, generator=gen, device="cuda") * cols).long()
    threshold = z.nan_to_num(nan=-math.inf).sort(dim=1, descending=True).values.gather(1, passing[:, None])[:, 0]
    threshold = threshold.contiguous()
    threshold[0], threshold[1], threshold[2] = math.nan, -math.inf, math.inf
    cap = cols + 20
    start = torch.randint(0, 8, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    count = start.clone()
    score = torch.full((batch, cap), 1234.5, device="cuda")
    position = torch.full((batch, cap), -1, dtype=torch.int32, device="cuda")
    kernels.topk.gsfi_topk_dense_candidates(logits, threshold, count, score, position, offset)
    for b in range(batch):
        s0, n = int(start[b]), int(count[b])
        want = (~(z[b] < threshold[b])).nonzero().flatten() if b != 0 else z.new_empty(0, dtype=torch.long)
        assert n - s0 == want.numel(), b
        got_pos, order = (position[b, s0:n].long() - offset).sort()
        assert torch.equal(got_pos, want), b
        assert torch.equal(score[b, s0:n][order].nan_to_num(nan=7.0), z[b, want].nan_to_num(nan=7.0)), b
        assert bool((score[b, n:] == 1234.5).all()) and bool((position[b, n:] == -1).all()), b


@pytest.mark.parametrize("k", [300, fused.MAX_FUSED_K, fused.MAX_FUSED_K + 1, 5000])
@torch.no_grad()
def test_large_k_equals_the_ranked_forward_logits(k):
    # k up to the kernels' largest through the kernels, above it through the chunked path (whose head is one
    # product here, as the forward's): each the ranked logits of the products it runs
    case = (24, 128, 20011, 16, 32, 0.1, k, torch.bfloat16)
    layer, x = _layer(case, seed=k)
    logits = _forward_logits(layer, x, k) if k <= fused.MAX_FUSED_K else layer(x)
    want_scores, want_ids = ranked_topk(logits, torch.arange(layer.num_labels, device="cuda"), k)
    for _ in range(3):  # eager, captured, replayed
        scores, ids = layer.topk(x, k)
        assert torch.equal(ids, want_ids)
        assert torch.equal(scores, want_scores)


@pytest.mark.parametrize("k", [1, 5, 100, 128])
@pytest.mark.parametrize("source", ["logits", "lists", "first"])
@torch.no_grad()
def test_bound_kernel_equals_the_block_maxima_reference(k, source):
    # The kernel's k-th best of the block maxima (a radix selection) against block_bound's torch.topk, exactly:
    # NaN (as +inf), +-inf, -0.0 / 0.0 and heavy ties among random values, rows of fewer blocks than the kernel's,
    # rows with fewer than k entries (kept as they are), a NaN threshold (skipped) and one already above the bound.
    # "first": the call's first bound, which sets the bounds (the old ones poisoned; -inf where fewer than k) and
    # zeroes the lists' counts and the overflow flag.
    gen = torch.Generator(device="cuda").manual_seed(100 + k)
    batch, cols = 48, 9000
    blocks = fused.bound_blocks(k)
    values = torch.randn(batch, cols, generator=gen, device="cuda")
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, -1.0], device="cuda")
    pick = torch.randint(0, 7, (batch, cols), generator=gen, device="cuda")
    where = torch.rand(batch, cols, generator=gen, device="cuda") < 0.02
    values = torch.where(where, special[pick], values).bfloat16()
    values[1] = values[1].round()  # integers: ties everywhere
    values[2] = 0.0
    values[2, 7] = -0.0
    count = torch.randint(0, cols + 1, (batch,), generator=gen, device="cuda", dtype=torch.int32)
    count[:4] = torch.tensor([cols, 5, k - 1, blocks // 2], dtype=torch.int32)
    threshold = torch.full((batch,), -math.inf, device="cuda")
    threshold[5], threshold[6] = math.nan, 1e30
    lists = source == "lists"
    if source == "first":
        values = values[:, : k - 1] if k == 128 else values  # (k = 128: every row with fewer than k entries)
        threshold.fill_(math.nan)
        before = torch.full_like(threshold, -math.inf)
        reset_count = torch.full((batch,), 77, dtype=torch.int32, device="cuda")
        flag = torch.ones((), dtype=torch.bool, device="cuda")
        kernels.topk.gsfi_topk_bound(values, k, threshold, blocks, reset_count=reset_count, reset_flag=flag)
        assert not bool(reset_count.any()) and not bool(flag)
    before = threshold.clone() if source != "first" else before
    if lists:
        kernels.topk.gsfi_topk_bound(values.float(), k, threshold, blocks, count, torch.bfloat16)
    elif source == "logits":
        kernels.topk.gsfi_topk_bound(values, k, threshold, blocks)
    for b in range(batch):
        n = min(int(count[b]), cols) if lists else values.shape[1]
        want = fused.block_bound(values[b : b + 1, :n], k, blocks) if n else None
        expected = before[b] if want is None or math.isnan(before[b]) else torch.maximum(before[b], want[0])
        assert torch.equal(threshold[b], expected) or (math.isnan(threshold[b]) and math.isnan(expected)), b


@pytest.mark.parametrize("own", [tuning.TopkTuning(), tuning.TopkTuning(min_ctas=1), tuning.TopkTuning(min_ctas=2)],
                         ids=["auto", "one-cta", "two-ctas"])
@pytest.mark.parametrize("case", [(130, 384, 20000, 16, 64), (96, 256, 12000, 32, 128), (200, 768, 9000, 32, 128),
                                  (64, 768, 9000, 64, 128)], ids=lambda c: f"B{c[0]}-G{c[3]}-K{c[4]}")
@torch.no_grad()
def test_candidate_lists_hold_exactly_the_logits_at_or_above_the_bound(case, own):
    # The candidate kernel against the forward's stored logits: each row's list holds exactly its logits z >=
    # threshold (positions offset + p, scores bit for bit), count[b] their number, nothing written past it (the
    # buffers poisoned); rows with a NaN threshold take none, -inf every logit, +inf none. Bounds that are logits
    # (ties at the bound) or just above one, letting 5-25 % of a row through, so that the screen (a comparison of
    # the unrounded sums) passes many lanes; the registers held to the CTAs per multiprocessor as planned, or
    # forced to one or two; both main loops (the batches and group sizes pick them).
    batch, in_features, num_labels, group_size, fan_in = case
    gen = torch.Generator(device="cuda").manual_seed(batch + fan_in)
    layer = lh.GroupSharedFanIn(in_features, num_labels, fan_in=fan_in, group_size=group_size, dtype=torch.bfloat16,
                                generator=torch.Generator().manual_seed(batch)).cuda()
    layer.bias.normal_(generator=gen)
    x = torch.randn(batch, in_features, device="cuda", generator=gen).bfloat16()
    z = layer(x).float()
    passing = ((torch.rand(batch, device="cuda", generator=gen) * 0.2 + 0.05) * num_labels).long()  # 5-25 %
    threshold = z.sort(dim=1, descending=True).values.gather(1, passing[:, None]).squeeze(1).contiguous()
    threshold[3] = math.nan
    threshold[4] = -math.inf
    threshold[5] = math.inf
    threshold[6:9] = torch.nextafter(threshold[6:9], torch.tensor(math.inf, device="cuda"))  # between 16-bit values
    cap = num_labels + 7
    count = torch.zeros(batch, dtype=torch.int32, device="cuda")
    score = torch.full((batch, cap), math.nan, device="cuda")
    position = torch.full((batch, cap), -1, dtype=torch.int32, device="cuda")
    xt = kernels.layout.transpose_input(x)
    weight, index, bias = lh.functional.kernel_arguments(layer.weight, layer.group_index, layer.bias)
    with tuning.use(own):
        kernels.topk.gsfi_topk_candidates(xt, batch, weight, index, bias, num_labels, threshold, count, score,
                                          position, offset=1000)
    torch.cuda.synchronize()
    for b in range(batch):
        n = int(count[b])
        if b == 3:
            assert n == 0
            continue
        want = (z[b] >= threshold[b]).nonzero().flatten()
        assert n == want.numel(), b
        got_pos, order = (position[b, :n].long() - 1000).sort()
        assert torch.equal(got_pos, want), b
        assert torch.equal(score[b, :n][order], z[b, want]), b
        assert bool(score[b, n:].isnan().all()) and bool((position[b, n:] == -1).all()), b


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cols", [1, 7, 9, 2051, 16384, 40013])
@pytest.mark.parametrize("mode", ["first", "first_raise", "next", "next_raise"])
@torch.no_grad()
def test_chunk_kernel_equals_its_three_launches(mode, cols, dtype):
    # gsfi_topk_chunk (one CTA a row) against gsfi_topk_bound, gsfi_topk_dense_candidates and gsfi_topk_bound from
    # the lists, launched one by one on copies of the same lists: the same bounds, counts and lists (as sets of
    # (position, score); their order depends on timing), nothing written past the count (poisoned buffers). Rows
    # that start anywhere against a 16-byte boundary; random rows (finite bounds: the selections and the
    # vectorised pass at work), rows 10-13 with NaN, +-inf and -0.0 logits, row 3 ties everywhere. "first": the
    # call's first bound from a sample of the columns (the whole chunk up to 8,192 columns; the old bounds and
    # counts poisoned, the flag set), row 4 constant (every logit ties at the bound: its list overflows); "next":
    # bounds given (row 0 NaN: skipped, row 1 -inf, row 2 +inf), lists counting on from a nonzero count, row 5
    # from a full list that had overflowed (count above the capacity: nothing is written, the count goes on);
    # "_raise": the bound then raised from the lists. Rows that overflow keep entries that depend on timing: only
    # their counts and the validity of what they hold are compared.
    gen = torch.Generator(device="cuda").manual_seed(cols + len(mode))
    batch, offset, k = 40, 1000, 5
    wide = torch.randn(batch, cols + 11, generator=gen, device="cuda").to(dtype)
    special = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0], device="cuda").to(dtype)
    where = torch.rand(batch, cols + 11, generator=gen, device="cuda") < 0.03
    where[:10] = False
    where[14:] = False
    wide = torch.where(where, special[torch.randint(0, 5, wide.shape, generator=gen, device="cuda")], wide)
    wide[3] = wide[3].round()  # ties everywhere
    first = mode.startswith("first")
    raise_bound = mode.endswith("raise")
    if first:
        wide[4] = 0.25
    logits = wide[:, 3 : 3 + cols]
    z = logits.float()
    blocks, list_blocks = fused.bound_blocks(k), fused.LIST_BLOCKS
    sample = min(cols, 8192) if first else None
    cap = 512
    if first:
        threshold = torch.full((batch,), 3.0, device="cuda")
        start = torch.full((batch,), 77, dtype=torch.int32, device="cuda")
    else:
        passing = (torch.rand(batch, generator=gen, device="cuda") * min(cols, 600)).long()
        threshold = z.nan_to_num(nan=-math.inf).sort(dim=1, descending=True).values.gather(1, passing[:, None])[:, 0]
        threshold = threshold.contiguous()
        threshold[0], threshold[1], threshold[2] = math.nan, -math.inf, math.inf
        start = torch.randint(0, 8, (batch,), generator=gen, device="cuda", dtype=torch.int32)
        start[5] = cap + 3
    score = torch.full((batch, cap), 1234.5, device="cuda")
    position = torch.full((batch, cap), -1, dtype=torch.int32, device="cuda")
    if not first:  # the candidates listed before, in the first min(start[b], cap) slots
        earlier = torch.arange(cap, device="cuda")[None, :] < start[:, None]
        values = torch.randn(batch, cap, generator=gen, device="cuda").to(dtype).float()
        score = torch.where(earlier, values, score)
        position = torch.where(earlier, torch.arange(cap, dtype=torch.int32, device="cuda"), position)
    lists = [(threshold.clone(), start.clone(), score.clone(), position.clone()) for _ in range(2)]
    flags = [torch.ones((), dtype=torch.bool, device="cuda") for _ in range(2)]
    t1, c1, s1, p1 = lists[0]
    kernels.topk.gsfi_topk_chunk(logits, k, t1, c1, s1, p1, offset, blocks=blocks, list_blocks=list_blocks,
                                 sample=sample, reset_flag=flags[0] if first else None, raise_bound=raise_bound)
    t2, c2, s2, p2 = lists[1]
    if first:
        kernels.topk.gsfi_topk_bound(logits[:, :sample], k, t2, blocks, reset_count=c2, reset_flag=flags[1])
    kernels.topk.gsfi_topk_dense_candidates(logits, t2, c2, s2, p2, offset)
    overflowed = c2 > cap
    if raise_bound:
        kernels.topk.gsfi_topk_bound(s2, k, t2, list_blocks, c2, dtype)
    torch.cuda.synchronize()
    assert torch.equal(c1, c2)
    assert bool(flags[0]) == (not first)
    for b in range(batch):
        n = min(int(c1[b]), cap)
        if not overflowed[b] or not raise_bound:
            assert torch.equal(t1[b], t2[b]) or (math.isnan(t1[b]) and math.isnan(t2[b])), b
        got = sorted(zip(p1[b, :n].tolist(), s1[b, :n].nan_to_num(nan=7.0).tolist(), strict=True))
        if not overflowed[b]:
            want = sorted(zip(p2[b, :n].tolist(), s2[b, :n].nan_to_num(nan=7.0).tolist(), strict=True))
            assert got == want, b
        else:  # the kept entries depend on timing: each is a real logit of its position (or an earlier candidate)
            for pos, value in got:
                if pos >= offset:
                    assert value == z[b, pos - offset].nan_to_num(nan=7.0).item(), b
        assert bool((s1[b, n:] == 1234.5).all()) and bool((p1[b, n:] == -1).all()), b
    if first and raise_bound and k <= sample == cols:
        # the raised bound of a random row is its exact k-th best: the list holds every logit at or above the first
        # bound, the row's top k among them, and is shorter than list_blocks
        for b in range(14, batch):
            if not overflowed[b]:
                assert t1[b] == z[b].topk(k).values[-1], b
