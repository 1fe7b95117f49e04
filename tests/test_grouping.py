import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import lightning_haste as lh
from lightning_haste.grouping import LabelGrouping, group_labels, label_embeddings_from_features, split_head_tail


def planted(num_clusters, group_size, dim=48, noise=0.05, seed=0, extra=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_clusters, dim))
    labels_cluster = np.repeat(np.arange(num_clusters), group_size)
    emb = centers[labels_cluster] + noise * rng.standard_normal((labels_cluster.size, dim))
    if extra:
        emb = np.vstack([emb, rng.standard_normal((extra, dim))])
        labels_cluster = np.r_[labels_cluster, -1 - np.arange(extra)]
    perm = rng.permutation(emb.shape[0])
    return emb[perm].astype(np.float32), labels_cluster[perm]


def _check_partition(grouping, num_labels, group_size):
    ids = grouping.group_ids
    assert ids.shape == (num_labels,)
    sizes = np.bincount(ids)
    assert np.all(sizes[:-1] == group_size) and 1 <= sizes[-1] <= group_size
    assert sizes.sum() == num_labels
    assert grouping.num_groups == -(-num_labels // group_size)


@pytest.mark.parametrize("method", ["faiss-greedy", "balanced-kmeans", "random"])
def test_partition_is_valid_and_deterministic(method):
    emb, _ = planted(20, 8, extra=5)  # 165 labels: last group short
    a = group_labels(emb, 8, method=method, seed=3, progress=False)
    _check_partition(a, 165, 8)
    b = group_labels(emb, 8, method=method, seed=3, progress=False)
    assert np.array_equal(a.group_ids, b.group_ids)
    assert sorted(a.order.tolist()) == list(range(165))


@pytest.mark.parametrize("method", ["faiss-greedy", "balanced-kmeans"])
def test_planted_clusters_are_recovered(method):
    emb, truth = planted(64, 16)
    grouping = group_labels(emb, 16, method=method, seed=1, progress=False)
    recovered = sum(len(set(truth[grouping.group_ids == g])) == 1 for g in range(grouping.num_groups))
    assert recovered >= 0.9 * 64
    random = group_labels(emb, 16, method="random", seed=1, progress=False)
    assert grouping.cohesion(emb) > 0.9 and random.cohesion(emb) < 0.2


def test_faiss_greedy_on_an_ivf_index():
    emb, truth = planted(1600, 16, dim=32)  # 25,600 labels: the inverted-file index path
    grouping = group_labels(emb, 16, method="faiss-greedy", seed=0, progress=False)
    _check_partition(grouping, 25_600, 16)
    recovered = sum(len(set(truth[grouping.group_ids == g])) == 1 for g in range(grouping.num_groups))
    assert recovered >= 0.9 * 1600


def test_cohesion_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((23, 5))
    grouping = group_labels(emb, 4, method="random", seed=0, progress=False)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    means = []
    for g in range(grouping.num_groups):
        members = unit[grouping.group_ids == g]
        if len(members) < 2:
            continue
        sims = members @ members.T
        means.append((sims.sum() - len(members)) / (len(members) * (len(members) - 1)))
    assert grouping.cohesion(emb) == pytest.approx(np.mean(means), rel=1e-5)


@pytest.mark.parametrize("sparse_x", [False, True])
def test_pifa_matches_brute_force(sparse_x):
    rng = np.random.default_rng(1)
    x = rng.random((30, 12)) * (rng.random((30, 12)) < 0.5)
    y = sp.csr_matrix((rng.random((30, 9)) < 0.3).astype(np.float32))
    y[:, 4] = 0  # a label without positives
    y.eliminate_zeros()
    emb = label_embeddings_from_features(sp.csr_matrix(x) if sparse_x else x, y, seed=5)
    dense = emb.toarray() if sparse_x else emb
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    for label in range(9):
        rows = y[:, label].nonzero()[0]
        if rows.size == 0:
            assert np.linalg.norm(dense[label]) == pytest.approx(1.0, rel=1e-5)
            continue
        v = xn[rows].sum(0)
        np.testing.assert_allclose(dense[label], v / np.linalg.norm(v), rtol=1e-5, atol=1e-6)
    again = label_embeddings_from_features(sp.csr_matrix(x) if sparse_x else x, y, seed=5)
    assert np.allclose(dense, again.toarray() if sparse_x else again)


def test_sparse_embeddings_are_grouped_through_a_projection():
    emb, truth = planted(16, 8, dim=400, noise=0.01)
    sparse_emb = sp.csr_matrix(emb * (np.abs(emb) > 1.0))
    grouping = group_labels(sparse_emb, 8, method="faiss-greedy", progress=False)
    _check_partition(grouping, 128, 8)


def test_split_head_tail():
    freq = np.array([5, 1, 9, 9, 0, 3, 7, 2, 8, 4])
    head, tail = split_head_tail(freq, 0.25, 2)  # ceil(2.5) = 3 -> 4
    assert head.tolist() == [2, 3, 8, 6]
    assert tail.tolist() == [0, 9, 5, 7, 1, 4]
    assert split_head_tail(freq, 0.0, 4)[0].size == 0
    assert split_head_tail(freq, 1.0, 4)[0].size == 10
    assert split_head_tail(freq, 1e-12, 4)[0].size == 4  # a positive ratio keeps a group, however small
    assert split_head_tail(np.ones(100), 0.07, 1)[0].size == 7  # 0.07 * 100 = 7.000000000000001: no 8th label


def test_grouping_feeds_head_tail_output_and_round_trips():
    freq = np.random.default_rng(2).integers(1, 50, size=200)
    head, tail = split_head_tail(freq, 0.1, 8)  # 24 head labels, 176 tail labels = 22 groups
    emb, _ = planted(22, 8)  # embedding i belongs to tail label tail[i]
    grouping = group_labels(emb, 8, method="balanced-kmeans", progress=False)
    label_groups = grouping.for_labels(tail, 200)
    assert np.all(label_groups[head] == -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # groups built on the tail line up: no "mix labels" warning
        layer = lh.HeadTailOutput(16, freq, head_ratio=0.1, fan_in=4, group_size=8, label_groups=label_groups)
    blocks = label_groups[layer.label_permutation[head.size :].numpy()].reshape(-1, 8)
    assert np.all(blocks == blocks[:, :1])
    state = grouping.state_dict()
    assert isinstance(state["group_ids"], torch.Tensor)
    again = LabelGrouping.from_state_dict(state)
    assert np.array_equal(again.group_ids, grouping.group_ids) and again.group_size == 8
    assert np.array_equal(np.asarray(grouping), grouping.group_ids)


def test_bad_inputs():
    emb, _ = planted(4, 4)
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        group_labels(emb, 0)
    with pytest.raises(TypeError, match="group_size must be an integer"):
        group_labels(emb, 2.5)
    bad = emb.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        group_labels(bad, 4)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        group_labels(np.zeros((0, 4)), 4)
    with pytest.raises(ValueError, match="method must be"):
        group_labels(emb, 4, method="hnsw")
    with pytest.raises(RuntimeError, match="no GPU"):
        group_labels(np.random.default_rng(0).standard_normal((30_000, 8)), 4, use_gpu=True, progress=False)
    with pytest.raises(TypeError, match="Y must be a scipy.sparse"):
        label_embeddings_from_features(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="rows but Y has"):
        label_embeddings_from_features(np.ones((3, 2)), sp.csr_matrix(np.ones((4, 2))))
    with pytest.raises(ValueError, match="head_ratio"):
        split_head_tail([1, 2], 2.0, 1)
