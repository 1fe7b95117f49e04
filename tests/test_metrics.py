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
