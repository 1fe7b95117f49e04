"""The ranking order of top-k results (score descending, then the smaller label id) and the chunked top-k of the
output layer on CPU."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_haste as lh
from lightning_haste.ranking import (
    PACKED_DTYPES,
    _ranked_topk_by_keys,
    _ranked_topk_by_value,
    rank_keys,
    ranked_merge,
    ranked_topk,
)


def _brute_force(scores: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Python's sort of (score, id) pairs per row, NaN above +inf and -0.0 as 0.0."""
    out_scores, out_ids = [], []
    for row_scores, row_ids in zip(scores.tolist(), ids.expand_as(scores).tolist(), strict=True):
        pairs = sorted(zip(row_scores, row_ids, strict=True),
                       key=lambda p: (not math.isnan(p[0]), -p[0] if not math.isnan(p[0]) else 0.0, p[1]))[:k]
        out_scores.append([p[0] for p in pairs])
        out_ids.append([p[1] for p in pairs])
    return torch.tensor(out_scores, dtype=torch.float64), torch.tensor(out_ids)


SPECIAL = [0.0, -0.0, 1.0, -1.0, math.inf, -math.inf, math.nan, 1e-40, -1e-40, 3.0e38]


@settings(max_examples=200, deadline=None)
@given(
    rows=st.integers(1, 4), n=st.integers(1, 40), k=st.integers(1, 45),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    values=st.lists(st.sampled_from(SPECIAL) | st.integers(-3, 3).map(float), min_size=160, max_size=160),
    seed=st.integers(0, 2**31 - 1), per_row_ids=st.booleans(),
)
def test_ranked_topk_equals_brute_force(rows, n, k, dtype, values, seed, per_row_ids):
    # few distinct values: many ties; the specials: NaN, infinities, signed zeros, subnormals
    scores = torch.tensor(values[: rows * n], dtype=torch.float64).reshape(rows, n).to(dtype)
    gen = torch.Generator().manual_seed(seed)
    ids = (torch.stack([torch.randperm(1000, generator=gen)[:n] for _ in range(rows)]) if per_row_ids
           else torch.randperm(1000, generator=gen)[:n])
    got_scores, got_ids = ranked_topk(scores, ids, k)
    want_scores, want_ids = _brute_force(scores.double(), ids, k)
    assert torch.equal(got_ids, want_ids)
    assert torch.equal(got_scores.double().nan_to_num(nan=7.0), want_scores.nan_to_num(nan=7.0))
    assert got_scores.dtype == dtype
    if dtype in PACKED_DTYPES and k < n:
        # the two ways to a packed-dtype top-k (keys of every entry; torch.topk of the values and keys of a few)
        # return the same entries, to the bit (a zero's sign, a NaN's payload)
        full = ids.expand_as(scores)
        by_keys, by_value = _ranked_topk_by_keys(scores, full, k), _ranked_topk_by_value(scores, full, k)
        assert torch.equal(by_keys[1], by_value[1])
        bits = torch.int16 if dtype != torch.float32 else torch.int32
        assert torch.equal(by_keys[0].view(bits), by_value[0].view(bits))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_ranked_merge_of_chunks_equals_one_topk(dtype):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-4, 5, (6, 300), generator=gen).to(dtype)  # heavy ties
    ids = torch.randperm(300, generator=gen)
    whole = ranked_topk(scores, ids, 17)
    best = None
    for c0 in range(0, 300, 23):
        best = ranked_merge(best, scores[:, c0 : c0 + 23], ids[c0 : c0 + 23], 17)
    assert torch.equal(best[0], whole[0]) and torch.equal(best[1], whole[1])


def test_rank_keys_order_matches_float_order():
    values = torch.tensor([-math.inf, -3.0e38, -1.0, -1e-40, -0.0, 0.0, 1e-40, 1.0, 3.0e38, math.inf, math.nan])
    keys = rank_keys(values, torch.zeros(values.numel(), dtype=torch.long))
    assert torch.all(keys[1:] >= keys[:-1])  # non-decreasing
    assert keys[4] == keys[5]  # -0.0 ties with 0.0
    assert keys[-1] > keys[-2]  # NaN ranks above +inf
    assert rank_keys(torch.tensor([-math.nan]), torch.zeros(1, dtype=torch.long)) == keys[-1]  # any NaN
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        rank_keys(values.double(), torch.zeros(values.numel(), dtype=torch.long))


def _layer(num_labels: int, dtype=torch.float32, head_ratio=0.1, seed=0) -> lh.HeadTailOutput:
    freq = np.random.default_rng(seed).integers(1, 100, num_labels)
    return lh.HeadTailOutput(24, freq, head_ratio=head_ratio, fan_in=8, group_size=8, dtype=dtype,
                             generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("budget", [None, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layer_topk_follows_the_ranking_order_with_ties(budget, dtype):
    layer = _layer(203, dtype)
    if budget is not None:
        layer.memory_budget = budget
    with torch.no_grad():  # integer weights and inputs: many equal logits
        for p in layer.parameters():
            p.copy_(torch.randint(-1, 2, p.shape, generator=torch.Generator().manual_seed(1)).to(dtype))
    x = torch.randint(-1, 2, (9, 24), generator=torch.Generator().manual_seed(2)).to(dtype)
    scores, ids = layer.topk(x, 11)
    want_scores, want_ids = _brute_force(layer(x).double(), torch.arange(203), 11)
    assert torch.equal(ids, want_ids)
    assert torch.equal(scores.double(), want_scores)


def test_layer_topk_all_scores_equal_gives_the_smallest_ids():
    layer = _layer(100)
    with torch.no_grad():
        for p in layer.parameters():
            p.zero_()
    scores, ids = layer.topk(torch.randn(3, 24), 7)
    assert torch.equal(ids, torch.arange(7).expand(3, 7))
    assert torch.equal(scores, torch.zeros(3, 7))
