import numpy as np
import pytest
import scipy.sparse as sp
import torch

import lightning_haste as lh
from lightning_haste import functional as LF
from lightning_haste.grouping import LabelGrouping, label_embeddings_from_features
from lightning_haste.module import sparse_bce_with_logits, sparse_squared_hinge


def _layer(**kw):
    return lh.GroupSharedFanIn(10, 12, 3, 4, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(in_features=10, out_features=12, fan_in=11), ValueError, "fan_in"),
        (dict(in_features=10, out_features=12, fan_in=0), ValueError, "fan_in"),
        (dict(in_features=10, out_features=0, fan_in=2), ValueError, "out_features"),
        (dict(in_features=10, out_features=12, fan_in=2, group_size=0), ValueError, "group_size"),
        (dict(in_features=10.0, out_features=12, fan_in=2), TypeError, "in_features"),
        (dict(in_features=10, out_features=12, fan_in=2, dtype=torch.int32), TypeError, "dtype"),
        (dict(in_features=10, out_features=12, fan_in=2, memory_budget=0), ValueError, "memory_budget"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        lh.GroupSharedFanIn(**kwargs)


def test_wrong_feature_width():
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., 10\]"):
        _layer()(torch.randn(2, 9))


def test_wrong_dtype_and_device_mix():
    layer = _layer()
    with pytest.raises(TypeError, match="x has dtype torch.float64|weight has dtype"):
        layer(torch.randn(2, 10, dtype=torch.float64))
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        layer(torch.ones(2, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="on meta"):
        layer(torch.randn(2, 10, device="meta"))


def test_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        _layer()(torch.randn(0, 10))


def test_group_index_checks_before_compute():
    layer = _layer()
    x = torch.randn(2, 10)
    with torch.no_grad():
        layer.group_index[1, 2] = 10
    with pytest.raises(ValueError, match=r"group_index entries must lie in \[0, 10\)"):
        layer(x)
    with torch.no_grad():
        layer.group_index[1] = torch.tensor([4, 4, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="group_index row 1 contains duplicate"):
        layer(x)
    with pytest.raises(ValueError, match="duplicate"):
        layer.to_dense()
    with torch.no_grad():
        layer.group_index[1] = torch.tensor([4, 6, 5], dtype=torch.int32)
    layer(x)  # fixed in place: accepted again


def test_group_index_cannot_be_swapped_for_another_layout():
    """A replaced index (another shape, dtype, a strided view, another device) is refused on every use with the layer
    untouched, a replaced index of the right layout is read in full once, and ``force=True`` (which every rewire
    uses) catches an edit through ``.data``, which the cached check cannot see."""
    x = torch.randn(2, 10)
    cases = [
        ("attribute", lambda index: index[:1], ValueError, r"group_index must have shape \(3, 3\)"),  # a one-row view
        ("data", lambda index: index[:1], ValueError, r"group_index must have shape \(3, 3\)"),
        ("attribute", lambda index: index.long().repeat(1, 2)[:, :3], ValueError, "contiguous"),
        ("data", lambda index: index.repeat(1, 2)[:, :3], ValueError, "contiguous"),
        ("attribute", lambda index: index.float(), TypeError, "group_index must have dtype"),
        ("attribute", lambda index: index.to("meta"), ValueError, "group_index is on meta"),
    ]
    for assign, swap, error, match in cases:
        layer = _layer()
        weight = layer.weight.detach().clone()
        replacement = swap(layer.group_index)
        if assign == "attribute":
            layer.group_index = replacement
        else:
            layer.group_index.data = replacement
        for use in (lambda: layer(x), layer.to_dense, lambda: layer.rewire(0.3), layer.check_group_index):  # noqa: B023
            with pytest.raises(error, match=match):
                use()
        assert torch.equal(layer.weight, weight)
    layer = _layer()
    layer(x)
    same_layout = layer.group_index.clone()
    same_layout[0, 0] = 99  # a new tensor of the right layout: its values are read before use
    layer.group_index = same_layout
    with pytest.raises(ValueError, match=r"entries must lie in \[0, 10\)"):
        layer(x)
    layer = _layer()
    layer(x)
    layer.group_index.data[0, 0] = 99  # bypasses the version counter: the cached check does not see it ...
    layer.check_group_index()
    with pytest.raises(ValueError, match=r"entries must lie in \[0, 10\)"):
        layer.check_group_index(force=True)  # ... a forced one does, and every rewire
    weight = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=r"entries must lie in \[0, 10\)"):
        layer.rewire(0.3)
    assert torch.equal(layer.weight, weight) and int(layer.group_index[0, 0]) == 99


def test_functional_argument_errors():
    weight = torch.randn(8, 3)
    idx = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    x = torch.randn(2, 6)
    with pytest.raises(TypeError, match="group_index must have dtype"):
        LF.group_shared_fanin(x, weight, idx.float())
    with pytest.raises(TypeError, match="group_index must be a torch.Tensor"):
        LF.group_shared_fanin(x, weight, [[0, 1, 2]])
    with pytest.raises(ValueError, match="entries must lie in"):
        LF.group_shared_fanin(x, weight, idx - 1)
    with pytest.raises(ValueError, match="duplicate"):
        LF.group_shared_fanin(x, weight, torch.tensor([[0, 1, 1], [3, 4, 5]]))
    with pytest.raises(ValueError, match="fan_in 3 > in_features 2"):
        LF.group_shared_fanin(torch.randn(2, 2), weight, torch.tensor([[0, 1, 1], [0, 1, 1]]))
    with pytest.raises(ValueError, match="out_features=9 does not fit"):
        LF.group_shared_fanin(x, weight, idx, out_features=9)
    with pytest.raises(ValueError, match="out_features=4 does not fit"):
        LF.group_shared_fanin(x, weight, idx, out_features=4)
    with pytest.raises(ValueError, match=r"bias must have shape \(7,\)"):
        LF.group_shared_fanin(x, weight, idx, torch.randn(8), out_features=7)
    with pytest.raises(ValueError, match="not a multiple"):
        LF.group_shared_fanin(x, torch.randn(7, 3), idx)
    with pytest.raises(ValueError, match="weight has 4 columns"):
        LF.group_shared_fanin(x, torch.randn(8, 4), idx)
    with pytest.raises(TypeError, match="bias has dtype"):
        LF.group_shared_fanin(x, weight, idx, torch.randn(8, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        LF.group_shared_fanin(torch.randn(0, 6), weight, idx)
    with pytest.raises(ValueError, match="memory_budget"):
        LF.group_shared_fanin(x, weight, idx, memory_budget=-1)


def test_selected_columns_are_checked_as_the_layer_function_checks():
    layer = _layer()  # 12 labels in groups of 4 over 10 features, fan-in 3
    x = torch.randn(2, 10)
    got = LF.group_shared_fanin_columns(x, layer.weight, layer.group_index, torch.tensor([0, 11, 5]), layer.bias)
    torch.testing.assert_close(got, layer(x)[:, [0, 11, 5]])
    for positions, error, match in ((torch.tensor([12]), ValueError, r"\[0, 12\)"),
                                    (torch.tensor([-1]), ValueError, r"\[0, 12\)"),
                                    (torch.tensor([1.0]), TypeError, "integers"),
                                    (torch.tensor([[1]]), ValueError, "1-D")):
        with pytest.raises(error, match=match):
            LF.group_shared_fanin_columns(x, layer.weight, layer.group_index, positions, layer.bias)
    with pytest.raises(TypeError, match="dtype"):
        LF.group_shared_fanin_columns(x.double(), layer.weight, layer.group_index, torch.tensor([0]), layer.bias)


def test_small_public_helpers_reject_what_they_cannot_use():
    with pytest.raises(TypeError, match="dtype"):
        lh.HeadTailOutput(8, [3, 2, 1, 1], head_ratio=0.5, fan_in=2, group_size=2, dtype=torch.int64)
    layer = _layer()
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(torch.randn(2, 10)).sum().backward()
    optimizer.step()
    for mask in (torch.ones_like(layer.weight), torch.ones_like(layer.weight, dtype=torch.long)):
        with pytest.raises(TypeError, match="bool"):
            lh.reset_optimizer_state_(optimizer, layer.weight, mask)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        lh.dst.regrown_weight_mask(layer, torch.ones(2, 3, dtype=torch.bool))
    assert lh.bank_interleaved_order(torch.zeros(0, 4, dtype=torch.long)).shape == (0, 4)
    with pytest.raises(TypeError, match="int32 or torch.int64"):
        lh.bank_interleaved_order(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="negative"):
        lh.bank_interleaved_order(torch.tensor([[0, -1]]))
    for loss in (sparse_bce_with_logits, sparse_squared_hinge):
        with pytest.raises(TypeError, match="logits"):
            loss(torch.ones(2, 3, dtype=torch.long), [torch.tensor([0])] * 2)


def test_grouping_helpers_check_their_input():
    grouping = LabelGrouping(np.array([0, 0, 1, 1]), 2)
    assert grouping.for_labels(np.array([5, 1, 2, 3]), 6).tolist() == [-1, 0, 1, 1, -1, 0]
    for ids, match in ((np.array([-1, 1, 2, 3]), "integers in"), (np.array([1, 1, 2, 3]), "distinct"),
                       (np.array([1, 2, 3]), "one id per label"), (np.array([0.0, 1, 2, 3]), "integers in")):
        with pytest.raises(ValueError, match=match):
            grouping.for_labels(ids, 6)
    y = sp.csr_matrix(np.array([[1, 0], [0, 1], [1, 1]]))
    x = [[1.0, 2.0], [0.5, 0.0], [3.0, 1.0]]
    assert label_embeddings_from_features(x, y).shape == (2, 2)  # a nested list is taken as an array
    binary = np.array([[True, False], [False, True], [True, True]])  # binary bag-of-words features
    expected = label_embeddings_from_features(binary.astype(np.float32), y)
    np.testing.assert_allclose(label_embeddings_from_features(binary, y), expected, rtol=1e-6)
    np.testing.assert_allclose(label_embeddings_from_features(sp.csr_matrix(binary), y).toarray(), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="NaN or infinite"):
        label_embeddings_from_features(np.array([[np.nan, 1.0], [0, 1], [1, 1]]), y)
    with pytest.raises(ValueError, match="chunk_labels"):
        label_embeddings_from_features(x, y, chunk_labels=0)
    stored_zero = sp.csr_matrix((np.array([1.0, 0.0]), np.array([0, 1]), np.array([0, 2, 2, 2])), shape=(3, 2))
    emb = label_embeddings_from_features(np.eye(3, 2), stored_zero, seed=3)
    fallback = label_embeddings_from_features(np.eye(3, 2), sp.csr_matrix(np.array([[1, 0], [0, 0], [0, 0]])), seed=3)
    assert np.array_equal(emb, fallback)  # a stored 0 is no positive: label 1 has none either way


def test_an_input_on_another_device_type_is_refused_as_such():
    layer = lh.HeadTailOutput(8, [3, 2, 1, 1], head_ratio=0.5, fan_in=2, group_size=2)
    for call in (layer, layer.tail):
        with pytest.raises(ValueError, match="meta"):
            call(torch.empty(2, 8, device="meta"))
