import math
import socket

import numpy as np
import pytest
import scipy.sparse as sp
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_haste.metrics import NDCGAtK, PrecisionAtK, PSPrecisionAtK, inverse_propensities


def random_problem(n=60, num_labels=40, seed=0):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((n, num_labels))
    targets = []
    for i in range(n):
        count = rng.integers(0, 7) if i % 5 else 0  # every 5th instance has no positives
        targets.append(np.sort(rng.choice(num_labels, size=count, replace=False)))
    return torch.from_numpy(scores), targets


def brute_force(scores, targets, ks, inv=None):
    top = np.argsort(-scores, axis=1, kind="stable")
    p, ndcg, num, den = {}, {}, {}, {}
    for k in ks:
        pk, nk, nu, de = [], [], [], []
        for row, pos in zip(top, targets, strict=True):
            pos = set(pos.tolist())
            y = [1.0 if label in pos else 0.0 for label in row[:k]]
            pk.append(sum(y) / k)
            dcg = sum(v / math.log2(r + 2) for r, v in enumerate(y))
            depth = min(k, len(pos))
            idcg = sum(1 / math.log2(r + 2) for r in range(depth))
            nk.append(dcg / idcg if depth else 0.0)
            if inv is not None:
                nu.append(sum(inv[label] for label in row[:k] if label in pos))
                de.append(sum(sorted((inv[label] for label in pos), reverse=True)[:k]))
        p[k], ndcg[k] = np.mean(pk), np.mean(nk)
        if inv is not None:
            num[k], den[k] = np.sum(nu), np.sum(de)
    return p, ndcg, {k: num[k] / den[k] for k in num} if inv is not None else None


def test_precision_and_ndcg_match_brute_force_over_batches():
    scores, targets = random_problem()
    p, ndcg, _ = brute_force(scores.numpy(), targets, (1, 3, 5))
    pm, nm = PrecisionAtK((1, 3, 5)), NDCGAtK((1, 3, 5))
    for s in range(0, 60, 25):  # several updates: states are sums
        top = scores[s : s + 25].topk(5, dim=1).indices
        pm.update(top, [torch.from_numpy(t) for t in targets[s : s + 25]])
        nm.update(scores[s : s + 25], targets[s : s + 25])  # a score tensor also works
    got_p, got_n = pm.compute(), nm.compute()
    for k in (1, 3, 5):
        assert float(got_p[f"P@{k}"]) == pytest.approx(p[k], abs=1e-12)
        assert float(got_n[f"nDCG@{k}"]) == pytest.approx(ndcg[k], abs=1e-12)


def test_sparse_targets_scipy_and_torch():
    scores, targets = random_problem(seed=1)
    dense = np.zeros((60, 40))
    for i, t in enumerate(targets):
        dense[i, t] = 1
    ref = PrecisionAtK((1, 5))
    ref.update(scores, targets)
    for fmt in (sp.csr_matrix(dense), torch.from_numpy(dense).to_sparse_csr()):
        m = PrecisionAtK((1, 5))
        m.update(scores, fmt)
        assert {k: float(v) for k, v in m.compute().items()} == {k: float(v) for k, v in ref.compute().items()}


def test_psp_matches_brute_force_and_propensity_formula():
    scores, targets = random_problem(seed=2)
    counts = np.random.default_rng(3).integers(0, 500, size=40)
    inv = inverse_propensities(counts, 10_000, 0.6, 2.6).numpy()
    c = (math.log(10_000) - 1) * (2.6 + 1) ** 0.6
    np.testing.assert_allclose(inv, 1 + c * (counts + 2.6) ** -0.6, rtol=1e-12)
    _, _, psp = brute_force(scores.numpy(), targets, (1, 3, 5), inv)
    m = PSPrecisionAtK((1, 3, 5), label_counts=counts, num_train=10_000, A=0.6, B=2.6)
    m.update(scores[:30], targets[:30])
    m.update(scores[30:].topk(5, dim=1).indices, targets[30:])
    got = m.compute()
    for k in (1, 3, 5):
        assert float(got[f"PSP@{k}"]) == pytest.approx(psp[k], rel=1e-12)


def test_bad_inputs():
    with pytest.raises(ValueError, match="k must be"):
        PrecisionAtK(0)
    m = PrecisionAtK((1, 5))
    with pytest.raises(ValueError, match="fewer than the largest k=5"):
        m.update(torch.zeros(2, 3, dtype=torch.long), [[0], [1]])
    with pytest.raises(ValueError, match="targets describe 1 instances"):
        m.update(torch.arange(5).repeat(2, 1), [[0]])
    with pytest.raises(ValueError, match="label ids must be < 4"):
        PSPrecisionAtK(1, label_counts=[1, 2, 3, 4], num_train=10).update(torch.tensor([[7]]), [[0]])
    with pytest.raises(ValueError, match="num_train"):
        PSPrecisionAtK(1, label_counts=[1, 2], num_train=1)


def _ddp_worker(rank, world, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    scores, targets = random_problem(seed=4)
    counts = np.arange(40)
    metrics = [PrecisionAtK((1, 3)), NDCGAtK((1, 3)), PSPrecisionAtK((1, 3), label_counts=counts, num_train=500)]
    rows = slice(rank * 30, rank * 30 + 30)
    for m in metrics:
        m.update(scores[rows], targets[rows])
    values = {k: float(v) for m in metrics for k, v in m.compute().items()}
    if rank == 0:
        queue.put(values)
    dist.destroy_process_group()


def test_ddp_reduction_equals_single_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, join=True, start_method="spawn")
    distributed = queue.get()
    scores, targets = random_problem(seed=4)
    metrics = [PrecisionAtK((1, 3)), NDCGAtK((1, 3)), PSPrecisionAtK((1, 3), label_counts=np.arange(40), num_train=500)]
    single = {}
    for m in metrics:
        m.update(scores, targets)
        single.update({k: float(v) for k, v in m.compute().items()})
    assert distributed.keys() == single.keys()
    for key in single:
        assert distributed[key] == pytest.approx(single[key], abs=1e-12)


def test_malformed_predictions_and_targets_raise_or_follow_the_documented_rule():
    """The reproducers of the bad-input report: each raises a clean error or gives the documented value."""
    with pytest.raises(ValueError, match="distinct"):
        PrecisionAtK(3).update(torch.tensor([[1, 1, 1]]), [torch.tensor([1, 2])])
    with pytest.raises(ValueError, match="non-negative"):
        PrecisionAtK(1).update(torch.tensor([[-1]]), [torch.tensor([3])])
    with pytest.raises(TypeError, match="integer label ids"):
        PrecisionAtK(1).update(torch.tensor([[1]]), [torch.tensor([1.0])])
    with pytest.raises(TypeError, match="dense"):
        PrecisionAtK(1).update(torch.tensor([[1]]), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="k must be"):
        PrecisionAtK(1.0)
    # a label listed twice in a row is one positive: a perfect ranking has nDCG 1
    ndcg = NDCGAtK(2)
    ndcg.update(torch.tensor([[4, 2]]), [torch.tensor([4, 4, 2])])
    assert float(ndcg.compute()["nDCG@2"]) == pytest.approx(1.0)
    # a stored zero of a sparse target is not a positive
    stored = sp.csr_matrix((np.array([1.0, 0.0]), np.array([0, 1]), np.array([0, 2])), shape=(1, 3))
    p = PrecisionAtK(1)
    p.update(torch.tensor([[1]]), stored)
    assert float(p.compute()["P@1"]) == 0.0
    torch_stored = torch.sparse_csr_tensor(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.tensor([1.0, 0.0]),
                                           size=(1, 3))
    p = PrecisionAtK(1)
    p.update(torch.tensor([[1]]), torch_stored)
    assert float(p.compute()["P@1"]) == 0.0
    for bad in ({"label_counts": [1.0, float("nan")]}, {"label_counts": [1, 2], "A": float("nan")},
                {"label_counts": [1, 2], "B": -3.0}, {"label_counts": [0, 2], "B": 0.0}):
        with pytest.raises(ValueError):
            PSPrecisionAtK(1, num_train=10, **bad)


def test_empty_rows_and_empty_batches():
    """An empty row has no positives whatever its dtype; a batch of no rows changes nothing."""
    p = PrecisionAtK(1)
    p.update(torch.tensor([[1], [2]]), [torch.tensor([]), torch.tensor([2])])  # torch.tensor([]) is float32
    p.update(torch.zeros(0, 1, dtype=torch.long), [])
    assert float(p.compute()["P@1"]) == 0.5
    with pytest.raises(TypeError, match="integer label ids"):
        p.update(torch.tensor([[1]]), [torch.tensor([1.0])])


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_metrics_on_random_malformed_input_raise_cleanly_or_match_brute_force(data):
    rows = data.draw(st.integers(1, 4))
    k = data.draw(st.integers(1, 3))
    top = data.draw(st.lists(st.lists(st.integers(-1, 6), min_size=k, max_size=k), min_size=rows, max_size=rows))
    targets = data.draw(st.lists(st.lists(st.integers(-1, 6), max_size=4), min_size=rows, max_size=rows))
    metric = PrecisionAtK(k)
    valid = all(min(r) >= 0 and len(set(r)) == len(r) for r in top) and all(min(t, default=0) >= 0 for t in targets)
    try:
        metric.update(torch.tensor(top), [torch.tensor(t, dtype=torch.long) for t in targets])
    except ValueError:
        assert not valid
        return
    assert valid
    expected = np.mean([len(set(r) & set(t)) / k for r, t in zip(top, targets, strict=True)])
    assert float(metric.compute()[f"P@{k}"]) == pytest.approx(expected)


NUM_LABELS = 7


def _reference_at_k(top, positives, ks, inv):
    """P@k, nDCG@k and PSP@k of top-k ids per row against sets of positives, by their definitions, in float64
    (PSP@k only for ids within ``inv``)."""
    inv = dict(enumerate(inv))
    out = {}
    for k in ks:
        p, ndcg, gain, ideal = [], [], 0.0, 0.0
        for row, pos in zip(top, positives, strict=True):
            hits = [label in pos for label in row[:k]]
            p.append(sum(hits) / k)
            dcg = sum(1 / math.log2(r + 2) for r, hit in enumerate(hits) if hit)
            idcg = sum(1 / math.log2(r + 2) for r in range(min(k, len(pos))))
            ndcg.append(dcg / idcg if pos else 0.0)
            gain += sum(inv.get(label, math.nan) for label, hit in zip(row[:k], hits, strict=True) if hit)
            ideal += sum(sorted((inv.get(label, math.nan) for label in pos), reverse=True)[:k])
        out[f"P@{k}"], out[f"nDCG@{k}"] = sum(p) / max(1, len(p)), sum(ndcg) / max(1, len(ndcg))  # no rows: 0
        out[f"PSP@{k}"] = gain / max(ideal, 1e-300)
    return out


def _rarely(draw, malformed, wellformed):
    """One draw in six from ``malformed``, else from ``wellformed`` (so that most examples get to the comparison)."""
    return draw(malformed if draw(st.integers(0, 5)) == 0 else wellformed)


@st.composite
def _metric_inputs(draw):
    """Predictions and targets of random shape, format and validity, with the error the documented rules expect
    (None where the input is valid) and, if valid, the top ids and positive sets the reference reads."""
    bad = set()  # what the documented rules refuse: "k", "input" (every metric), "psp" (PSP@k's label range only)
    rows = draw(st.integers(0, 4))
    ks = _rarely(draw, st.sampled_from([[0], [1.0], [True], [2, -1]]), st.lists(st.integers(1, 3), min_size=1,
                                                                                 max_size=3))
    if not all(type(k) is int and k >= 1 for k in ks):
        bad.add("k")
    kmax = max(int(k) for k in ks)
    kind = _rarely(draw, st.sampled_from(["bool", "1-D", "few"]), st.sampled_from(["ids", "scores"]))
    top = None
    if kind in ("ids", "few"):
        width = max(kmax, 1) + draw(st.integers(0, 1)) - (kind == "few")
        ids = []
        for _ in range(rows):
            row = draw(st.permutations(range(NUM_LABELS)))[:width]
            if width and draw(st.integers(0, 5)) == 0:  # a malformed id: negative, a repeat, or past the counts
                row[draw(st.integers(0, width - 1))] = draw(st.sampled_from([-1, row[0], NUM_LABELS]))
            ids.append(row)
        preds = torch.tensor(ids, dtype=draw(st.sampled_from([torch.int64, torch.int32]))).reshape(rows, width)
        if width < kmax:
            bad.add("input")
        else:
            top = [r[:kmax] for r in ids]
            if any(min(r, default=0) < 0 or len(set(r)) < len(r) for r in top):
                bad.add("input")
            elif any(max(r, default=0) >= NUM_LABELS for r in top):
                bad.add("psp")  # P@k and nDCG@k take any id; PSP@k's counts end at NUM_LABELS
    elif kind == "scores":
        width = draw(st.integers(max(kmax - 1, 0), NUM_LABELS))
        preds = torch.tensor([draw(st.permutations(range(width))) for _ in range(rows)], dtype=torch.float64)
        preds = preds.reshape(rows, width)
        if width < kmax:
            bad.add("input")
        else:
            top = [np.argsort(-r.numpy(), kind="stable")[:kmax].tolist() for r in preds]  # distinct scores: no ties
    else:
        preds = torch.zeros(rows, 3, dtype=torch.bool) if kind == "bool" else torch.arange(3)
        bad.add("input")
    described = rows + _rarely(draw, st.sampled_from([1, -1] if rows else [1]), st.just(0))
    if described != rows:
        bad.add("input")
    fmt = _rarely(draw, st.sampled_from(["float lists", "dense"]), st.sampled_from(["lists", "scipy", "torch csr"]))
    positives = []
    if fmt in ("lists", "float lists"):
        label = _rarely(draw, st.sampled_from([-1, NUM_LABELS]), st.integers(0, NUM_LABELS - 1))
        lists = draw(st.lists(st.lists(st.one_of(st.integers(0, NUM_LABELS - 1), st.just(label)), max_size=4),
                              min_size=described, max_size=described))  # repeats included
        dtype = torch.int64 if fmt == "lists" else torch.float32
        targets = [torch.tensor(t, dtype=dtype) for t in lists]
        if fmt == "float lists" and any(lists):  # float ids are refused; an empty row of any dtype has none
            bad.add("input")
        if any(min(t, default=0) < 0 for t in lists):
            bad.add("input")
        positives = [set(t) for t in lists]  # a label listed twice is one positive
    elif fmt in ("scipy", "torch csr"):
        # non-canonical CSR: repeated entries, stored zeros, values that cancel
        entries = [draw(st.lists(st.tuples(st.integers(0, NUM_LABELS), st.sampled_from([1.0, 0.0, -1.0, 2.0])),
                                 max_size=4)) for _ in range(described)]
        indptr = np.cumsum([0] + [len(e) for e in entries])
        indices = np.array([j for e in entries for j, _ in e], dtype=np.int64)
        values = np.array([v for e in entries for _, v in e], dtype=np.float64)
        shape = (described, NUM_LABELS + 1)
        if fmt == "scipy":
            targets = sp.csr_matrix((values, indices, indptr), shape=shape)
        else:
            targets = torch.sparse_csr_tensor(torch.from_numpy(indptr), torch.from_numpy(indices),
                                              torch.from_numpy(values), size=shape)
        positives = [{j for j, v in e if v != 0} for e in entries]  # a stored non-zero makes a positive
    else:
        targets = torch.zeros(described, NUM_LABELS)
        bad.add("input")
    if any(max(p, default=0) >= NUM_LABELS for p in positives):
        bad.add("psp")
    error = next((kind for kind in ("k", "input", "psp") if kind in bad), None)
    return ks, preds, targets, error, top, positives


@settings(max_examples=300, deadline=None)
@given(_metric_inputs(), st.integers(0, 2**32 - 1))
def test_all_metrics_on_random_malformed_input_raise_cleanly_or_match_brute_force(inputs, seed):
    """Every metric, prediction kind (ids, scores, malformed) and target format (lists, float lists, non-canonical
    SciPy and torch CSR, dense): a ValueError/TypeError where the documented rules say so, else the brute force."""
    ks, preds, targets, error, top, positives = inputs
    counts = np.random.default_rng(seed).integers(0, 50, NUM_LABELS)
    inv = inverse_propensities(counts, 100).numpy()
    try:
        metrics = [PrecisionAtK(ks), NDCGAtK(ks), PSPrecisionAtK(ks, label_counts=counts, num_train=100)]
    except (TypeError, ValueError):
        assert error == "k"
        return
    assert error != "k"
    got = {}
    for metric in metrics:
        try:
            metric.update(preds, targets)
        except (TypeError, ValueError):
            assert error is not None and (error != "psp" or isinstance(metric, PSPrecisionAtK)), error
            continue
        assert error is None or (error == "psp" and not isinstance(metric, PSPrecisionAtK)), error
        got.update({key: float(value) for key, value in metric.compute().items()})
    if error is not None and error != "psp":
        assert not got
        return
    expected = _reference_at_k(top, positives, sorted(set(ks)), inv)
    for key, value in got.items():
        assert value == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key


def test_scores_are_ranked_by_the_package_rule_ties_to_the_smaller_label_id():
    rng = np.random.default_rng(5)
    scores = torch.from_numpy(rng.integers(0, 3, size=(50, 30)).astype(np.float64))  # many ties
    scores[3, 17] = float("nan")  # NaN ranks above +inf: label 17 is row 3's first
    scores[4, 20] = float("inf")
    targets = [np.sort(rng.choice(30, size=rng.integers(1, 6), replace=False)) for _ in range(50)]
    order = np.argsort(-np.nan_to_num(scores.numpy(), nan=np.inf, posinf=1e300), axis=1, kind="stable")
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        for metric in (PrecisionAtK((1, 3, 5)), NDCGAtK((1, 3, 5))):
            by_scores, by_ids = metric.clone(), metric.clone()
            by_scores.update(scores.to(dtype), [torch.from_numpy(t) for t in targets])
            by_ids.update(torch.from_numpy(order[:, :5].copy()), [torch.from_numpy(t) for t in targets])
            got, expected = by_scores.compute(), by_ids.compute()
            assert got.keys() == expected.keys()
            for key in got:
                assert torch.equal(got[key], expected[key]), (dtype, key)
    single = PrecisionAtK(1)
    single.update(torch.ones(1, 10), [torch.tensor([8])])  # all tied: the rule picks label 0, not a positive
    assert float(single.compute()["P@1"]) == 0.0
