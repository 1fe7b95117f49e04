import numpy as np
import pytest
import torch

import lightning_haste as lh
from lightning_haste import HeadTailOutput

from reference import masked_dense_weight


def _frequencies(num_labels, seed):
    rng = np.random.default_rng(seed)
    return rng.zipf(1.5, size=num_labels).clip(max=10_000)


def _make(num_labels=203, in_features=24, seed=0, **kw):
    kw.setdefault("head_ratio", 0.1)
    kw.setdefault("fan_in", 5)
    kw.setdefault("group_size", 8)
    return lh.HeadTailOutput(
        in_features, _frequencies(num_labels, seed), dtype=torch.float64,
        generator=torch.Generator().manual_seed(seed), **kw,
    )


def _dense_reference(layer):
    """Full [num_labels, in_features] weight and bias in ORIGINAL label order, built by hand."""
    weight = torch.zeros(layer.num_labels, layer.in_features, dtype=torch.float64)
    bias = torch.zeros(layer.num_labels, dtype=torch.float64)
    perm = layer.label_permutation
    h0, h1 = layer.head_slice
    t0, t1 = layer.tail_slice
    for i in range(layer.num_head_labels):
        weight[perm[i], h0:h1] = layer.head.weight[i].detach()
        bias[perm[i]] = layer.head.bias[i].detach()
    tail = layer.tail
    tail_dense = masked_dense_weight(tail.weight, tail.group_index, tail.out_features, tail.in_features)
    for i in range(layer.num_tail_labels):
        weight[perm[layer.num_head_labels + i], t0:t1] = tail_dense[i]
        bias[perm[layer.num_head_labels + i]] = tail.bias[i].detach()
    return weight, bias


def test_head_is_most_frequent_and_rounded_to_group_size():
    freq = _frequencies(203, 0)
    layer = _make()
    assert layer.num_head_labels == 24  # ceil(20.3) = 21 -> next multiple of 8
    assert layer.num_tail_labels == 203 - 24
    head = layer.label_permutation[:24].numpy()
    tail = layer.label_permutation[24:].numpy()
    assert freq[head].min() >= freq[tail].max()
    assert sorted(np.concatenate([head, tail]).tolist()) == list(range(203))
    assert torch.equal(layer.label_position[layer.label_permutation], torch.arange(203))
    # tail in frequency order (ties by id) when no groups are given
    assert np.all(np.diff(freq[tail]) <= 0)


@pytest.mark.parametrize(
    "slices",
    [
        dict(),
        dict(tail_features=(0, 14), head_features=(14, 24)),
        dict(tail_features=slice(4, 24), head_features=slice(0, 4)),
    ],
)
def test_logits_in_original_order_match_dense_reference(slices):
    layer = _make(**slices)
    x = torch.randn(3, 2, 24, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (3, 2, 203)
    weight, bias = _dense_reference(layer)
    torch.testing.assert_close(out.detach(), x.detach() @ weight.T + bias, rtol=0, atol=1e-10)
    # Permute back by hand: internal column i is original label perm[i].
    x2 = x.detach().reshape(-1, 24)
    internal = torch.cat(
        [layer.head(x2[:, slice(*layer.head_slice)]), layer.tail(x2[:, slice(*layer.tail_slice)])], dim=1
    )
    original = out.detach().reshape(-1, 203)
    torch.testing.assert_close(original[:, layer.label_permutation], internal.detach(), rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    torch.testing.assert_close(x.grad, grad @ weight, rtol=0, atol=1e-10)


def test_head_only_and_tail_only():
    head_only = _make(num_labels=16, head_ratio=1.0)
    assert head_only.tail is None and head_only.num_head_labels == 16
    tail_only = _make(num_labels=16, head_ratio=0.0)
    assert tail_only.head is None and tail_only.num_tail_labels == 16
    x = torch.randn(2, 24, dtype=torch.float64)
    for layer in (head_only, tail_only):
        weight, bias = _dense_reference(layer) if layer.tail is not None else (None, None)
        out = layer(x)
        assert out.shape == (2, 16)
        if weight is not None:
            torch.testing.assert_close(out, x @ weight.T + bias, rtol=0, atol=1e-10)
        scores, ids = layer.topk(x, 16)
        torch.testing.assert_close(scores, out.gather(1, ids), rtol=0, atol=0)


def test_label_groups_make_tail_groups_contiguous():
    num_labels, group_size = 100, 4
    freq = _frequencies(num_labels, 1)
    order = np.lexsort((np.arange(num_labels), -freq))
    tail_ids = order[12:]  # head_ratio 0.1 -> 10 -> 12
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(tail_ids)
    groups = np.full(num_labels, -1)
    groups[shuffled] = np.arange(tail_ids.size) // group_size
    layer = lh.HeadTailOutput(16, freq, head_ratio=0.1, fan_in=3, group_size=group_size, label_groups=groups)
    tail_perm = layer.label_permutation[12:].numpy()
    tail_groups = groups[tail_perm].reshape(-1, group_size)
    assert np.all(tail_groups == tail_groups[:, :1])
    assert np.all(np.diff(tail_groups[:, 0]) > 0)


def test_misaligned_label_groups_warn():
    freq = _frequencies(50, 2)
    groups = np.arange(50) % 3
    with pytest.warns(UserWarning, match="mix labels"):
        lh.HeadTailOutput(16, freq, head_ratio=0.0, fan_in=3, group_size=4, label_groups=groups)


def test_logits_for_selected_labels_matches_forward_and_backpropagates():
    layer = _make()
    x = torch.randn(5, 24, dtype=torch.float64, requires_grad=True)
    perm = layer.label_permutation
    labels = torch.stack([perm[200], perm[0], perm[5], perm[5], perm[30], perm[23], perm[24], torch.tensor(3)])
    full = layer(x)
    sub = layer.logits_for(x, labels)
    torch.testing.assert_close(sub, full[:, labels], rtol=0, atol=1e-12)
    grad = torch.randn_like(sub)
    gx, gw, gh = torch.autograd.grad(sub, (x, layer.tail.weight, layer.head.weight), grad)
    rx, rw, rh = torch.autograd.grad(full[:, labels], (x, layer.tail.weight, layer.head.weight), grad)
    for got, ref in [(gx, rx), (gw, rw), (gh, rh)]:
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-12)
    assert layer.logits_for(x, torch.tensor([], dtype=torch.long)).shape == (5, 0)


@pytest.mark.parametrize("budget", [None, 2048])
def test_topk_matches_full_logits(budget):
    kw = {} if budget is None else {"memory_budget": budget}
    layer = _make(**kw)
    x = torch.randn(2, 3, 24, dtype=torch.float64)
    scores, ids = layer.topk(x, 7)
    assert scores.shape == ids.shape == (2, 3, 7)
    ref = layer(x).topk(7, dim=-1)
    torch.testing.assert_close(scores, ref.values, rtol=0, atol=1e-12)
    assert torch.equal(ids, ref.indices)


def test_state_dict_round_trip():
    a = _make(seed=0)
    b = lh.HeadTailOutput(24, _frequencies(203, 5), head_ratio=0.1, fan_in=5, group_size=8, dtype=torch.float64)
    x = torch.randn(4, 24, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.topk(x, 5)[1], b.topk(x, 5)[1])


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(head_ratio=1.5), ValueError, "head_ratio"),
        (dict(head_ratio="0.1"), TypeError, "head_ratio"),
        (dict(fan_in=25), ValueError, "fan_in"),
        (dict(fan_in=6, tail_features=(0, 5)), ValueError, "tail input width 5"),
        (dict(head_features=(10, 5)), ValueError, "head_features"),
        (dict(head_features=(0, 30)), ValueError, "head_features"),
        (dict(tail_features="0:5"), TypeError, "tail_features"),
        (dict(tail_features=slice(0, 10, 2)), ValueError, "step 1"),
        (dict(label_groups=np.zeros(5, dtype=int)), ValueError, "label_groups must have one entry"),
        (dict(label_groups=np.zeros(203)), TypeError, "label_groups must hold integer"),
        (dict(group_size=0), ValueError, "group_size"),
        (dict(backend="bad"), ValueError, "backend must be"),
        (dict(backend="bad", head_ratio=1.0), ValueError, "backend must be"),  # no tail to take it: still checked
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        _make(**kwargs)


def test_frequency_errors():
    with pytest.raises(ValueError, match="label_frequencies must be finite and non-negative"):
        lh.HeadTailOutput(8, [1.0, -1.0], head_ratio=0.5, fan_in=2, group_size=1)
    with pytest.raises(ValueError, match="label_frequencies must not be empty"):
        lh.HeadTailOutput(8, [], head_ratio=0.5, fan_in=2, group_size=1)
    with pytest.raises(ValueError, match="label_frequencies must be 1-D"):
        lh.HeadTailOutput(8, [[1, 2]], head_ratio=0.5, fan_in=2, group_size=1)


def test_call_errors():
    layer = _make()
    x = torch.randn(2, 24, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 203\)"):
        layer.logits_for(x, torch.tensor([0, 203]))
    with pytest.raises(ValueError, match="labels must lie"):
        layer.logits_for(x, [-1])
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        layer.logits_for(x, torch.tensor([0.0]))
    for unsigned in (np.uint16, np.uint32, np.uint64):  # torch has no min/max for these: checked all the same
        torch.testing.assert_close(layer.logits_for(x, np.array([0, 7], dtype=unsigned)), layer.logits_for(x, [0, 7]))
        with pytest.raises(ValueError, match=r"labels must lie in \[0, 203\)"):
            layer.logits_for(x, np.array([203], dtype=unsigned))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 203\)"):
        layer.logits_for(x, np.array([2**63 + 5], dtype=np.uint64))
    with pytest.raises(ValueError, match="k=204 must be <= num_labels=203"):
        layer.topk(x, 204)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.randn(2, 23, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty batch"):
        layer(torch.randn(0, 24, dtype=torch.float64))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 24))


def test_bias_from_the_label_prior_sets_every_label_in_original_order():
    rng = np.random.default_rng(3)
    freq = rng.integers(0, 40, 203)
    layer = HeadTailOutput(24, freq, head_ratio=0.1, fan_in=8, group_size=8, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.head.weight.zero_()
        layer.tail.weight.zero_()
    layer.init_bias_from_prior_(freq, num_instances=100, smoothing=0.5)
    p = (freq + 0.5) / (100 + 1.0)
    expected = torch.from_numpy(np.log(p / (1 - p)))
    torch.testing.assert_close(layer(torch.zeros(2, 24, dtype=torch.float64)), expected.expand(2, -1), rtol=0,
                               atol=1e-12)
    with pytest.raises(ValueError, match="203 labels"):
        layer.init_bias_from_prior_(freq[:5], num_instances=100)
    with pytest.raises(ValueError, match=r"\[0, num_instances=10\]"):
        layer.init_bias_from_prior_(freq, num_instances=10)
    before = [b.clone() for b in (layer.head.bias, layer.tail.bias)]
    for bad in (np.nan, np.inf):
        broken = freq.astype(np.float64)
        broken[7] = bad
        with pytest.raises(ValueError, match="finite"):
            layer.init_bias_from_prior_(broken, num_instances=100)
    for smoothing in (float("inf"), float("nan"), 0.0, -1.0, True):
        with pytest.raises(ValueError, match="smoothing"):
            layer.init_bias_from_prior_(freq, num_instances=100, smoothing=smoothing)
    after = (layer.head.bias, layer.tail.bias)
    assert all(torch.equal(b, c) for b, c in zip(before, after, strict=True))  # nothing was set
    no_bias = HeadTailOutput(24, freq, head_ratio=0.1, fan_in=8, group_size=8, bias=False)
    with pytest.raises(ValueError, match="no biases"):
        no_bias.init_bias_from_prior_(freq, num_instances=100)


def test_a_state_dict_with_a_broken_label_order_is_refused_before_anything_loads():
    layer = HeadTailOutput(16, np.arange(30), head_ratio=0.2, fan_in=4, group_size=4,
                           generator=torch.Generator().manual_seed(0))
    good = {k: v.clone() for k, v in layer.state_dict().items()}
    bad = dict(good)
    bad["label_permutation"] = good["label_permutation"].clone()
    bad["label_permutation"][1] = bad["label_permutation"][0]  # a repeated label
    bad["head.weight"] = torch.zeros_like(good["head.weight"])
    with pytest.raises(ValueError, match="exactly once"):
        layer.load_state_dict(bad)
    for key, value in layer.state_dict().items():
        assert torch.equal(value, good[key]), key  # nothing was copied
    swapped = dict(good)
    swapped["label_position"] = torch.roll(good["label_position"], 1)
    with pytest.raises(ValueError, match="inverse"):
        layer.load_state_dict(swapped)
    layer.load_state_dict(good)


def test_autocast_takes_a_16_bit_encoder_output_with_float32_weights_as_nn_linear_does():
    encoder = torch.nn.Linear(16, 32)
    layer = HeadTailOutput(32, np.arange(40), head_ratio=0.1, fan_in=8, group_size=4,
                           generator=torch.Generator().manual_seed(0))
    x = torch.randn(5, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = encoder(x)
        assert h.dtype == torch.bfloat16
        logits = layer(h)
        loss = layer.loss(h, [torch.tensor([1, 2])] * 5)
        scores, ids = layer.topk(h, 3)
        some = layer.logits_for(h, [0, 5])
    reference = layer(h.detach().float())  # the same products in float32, for the tolerance of bf16
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05)
    torch.testing.assert_close(some.float(), reference[:, [0, 5]], rtol=0.05, atol=0.05)
    assert ids.shape == (5, 3) and scores.dtype == torch.bfloat16
    (logits.float().sum() + loss).backward()
    assert x.grad is not None and layer.tail.weight.grad.dtype == torch.float32
    with pytest.raises(TypeError, match="dtype"):
        layer(h.detach())  # outside autocast the dtypes must agree


def test_autocast_leaves_a_float64_layer_in_float64_as_nn_linear_does():
    generator = torch.Generator().manual_seed(1)
    layer = HeadTailOutput(24, np.arange(40), head_ratio=0.2, fan_in=8, group_size=4, dtype=torch.float64,
                           generator=generator)
    x = torch.randn(5, 24, dtype=torch.float64, generator=generator)
    targets = [torch.tensor([1, 2]), torch.tensor([0]), torch.tensor([39]), torch.tensor([7, 8, 9]), torch.tensor([3])]
    plain = (layer(x), layer.loss(x, targets), *layer.topk(x, 4), layer.logits_for(x, [0, 5]), layer.tail(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = (layer(x), layer.loss(x, targets), *layer.topk(x, 4), layer.logits_for(x, [0, 5]), layer.tail(x))
    for got, expected in zip(under, plain, strict=True):
        assert got.dtype == expected.dtype
        assert torch.equal(got, expected)  # not computed in bfloat16 and cast back: the same float64 values
    assert plain[0].dtype == torch.float64
    # a float64 input to a float32 layer: autocast casts the weights but not the input, so the dtypes disagree
    layer32 = HeadTailOutput(24, np.arange(40), head_ratio=0.2, fan_in=8, group_size=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for call in (lambda: layer32(x), lambda: layer32.loss(x, targets), lambda: layer32.topk(x, 4),
                     lambda: layer32.tail(x)):
            with pytest.raises(TypeError, match="float64"):
                call()
        # and a float32 input to a float64 layer: the input is cast, the float64 weights are not
        with pytest.raises(TypeError, match="float64"):
            layer(x.float())


def test_parameters_replaced_by_ones_of_another_shape_are_rejected_before_use():
    x = torch.randn(3, 24)
    targets = [torch.tensor([1])] * 3
    for part, name, shape in (("tail", "weight", (5, 8)), ("tail", "bias", (7,)), ("head", "weight", (8, 20)),
                              ("head", "bias", (3,))):
        layer = HeadTailOutput(24, np.arange(40), head_ratio=0.2, fan_in=8, group_size=4)
        layer(x)  # checked once: a later replacement is still noticed
        setattr(getattr(layer, part), name, torch.nn.Parameter(torch.randn(shape)))
        for call in (layer, lambda inp: layer.loss(inp, targets), lambda inp: layer.topk(inp, 2)):  # noqa: B023
            with pytest.raises(ValueError, match=f"{name} must have shape"):
                call(x)
    layer = HeadTailOutput(24, np.arange(40), head_ratio=0.2, fan_in=8, group_size=4)
    layer.tail.bias = torch.nn.Parameter(torch.randn(layer.tail.out_features, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias has dtype"):
        layer(x)
    layer = HeadTailOutput(24, np.arange(40), head_ratio=0.2, fan_in=8, group_size=4)
    expected = layer(x)
    layer.double()  # new storages in place of the checked ones: checked again, and they agree
    torch.testing.assert_close(layer(x.double()).float(), expected)  # float32's tolerance: computed in float64
    with pytest.raises(TypeError, match="float64"):
        layer(x)
    with torch.no_grad():
        layer.tail.weight.data = layer.tail.weight.data[:-4]  # the same object, another shape
    with pytest.raises(ValueError, match="weight must have shape"):
        layer(x.double())
