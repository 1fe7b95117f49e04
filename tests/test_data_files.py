"""The data-file readers and writer on good and malformed input: exact round trips, compressed and non-UTF-8
files, non-finite values, duplicates, byte-order marks and blank lines, one rule in every reader."""

import gzip
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_haste import HeadTailOutput
from lightning_haste import data as lh_data
from lightning_haste.data import (
    XMCData,
    XMCDataModule,
    XMCFormatError,
    hashed_bag_of_words,
    read_bow,
    read_filter_labels,
    read_label_matrix,
    read_texts,
    synthetic_xmc,
    write_bow,
)


def _data(rng, rows=7, features=11, labels=5, dtype=np.float32):
    x = sp.random(rows, features, density=0.4, random_state=rng, dtype=np.float64)
    x.data = (rng.standard_normal(x.nnz) * 10.0 ** rng.integers(-20, 20, x.nnz)).astype(dtype)
    y = sp.random(rows, labels, density=0.3, random_state=rng)
    y.data[:] = 1
    return XMCData(sp.csr_matrix(x.astype(dtype)), sp.csr_matrix(y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_write_bow_round_trips_exactly(tmp_path, dtype):
    data = _data(np.random.default_rng(1), dtype=dtype)
    data.features[0, 0] = dtype(123456.789)
    write_bow(tmp_path / "d.txt", data)
    back = read_bow(tmp_path / "d.txt", dtype=dtype)
    assert back.features.dtype == dtype
    assert np.array_equal(back.features.toarray(), data.features.toarray())
    assert (back.labels != data.labels).nnz == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False).filter(lambda v: v != 0), min_size=1,
                max_size=20))
def test_write_bow_round_trips_any_float32(tmp_path_factory, values):
    path = tmp_path_factory.mktemp("rt") / "d.txt"
    x = sp.csr_matrix(np.asarray([values], dtype=np.float32))
    write_bow(path, XMCData(x, sp.csr_matrix((1, 2))))
    assert np.array_equal(read_bow(path).features.toarray(), x.toarray())


def test_write_bow_keeps_only_non_zero_labels_and_takes_any_sparse_format(tmp_path):
    x = sp.coo_matrix(np.array([[1.5, 0.0], [0.0, 2.0]], dtype=np.float32))
    y = sp.coo_matrix((np.array([1.0, 0.0, 1.0]), (np.array([0, 0, 1]), np.array([0, 1, 2]))), shape=(2, 3))
    write_bow(tmp_path / "d.txt", XMCData(x, y))
    back = read_bow(tmp_path / "d.txt")
    assert back.labels.toarray().tolist() == [[1, 0, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="non-finite"):
        write_bow(tmp_path / "e.txt", XMCData(sp.csr_matrix(np.array([[np.nan]], np.float32)), sp.csr_matrix((1, 1))))


def test_write_bow_leaves_the_callers_arrays_alone_and_takes_dense_float16(tmp_path):
    # a non-canonical CSR (a duplicate entry, a stored zero): written summed, its arrays untouched
    data, indices = np.array([2.0, 1.0, 2.0, 5.0, 0.0], np.float32), np.array([2, 0, 2, 1, 3])
    indptr = np.array([0, 3, 5])
    x = sp.csr_matrix((data, indices, indptr), shape=(2, 4))
    saved = data.copy(), indices.copy(), indptr.copy()
    write_bow(tmp_path / "d.txt", XMCData(x, sp.csr_matrix(np.eye(2, 3))))
    assert all(np.array_equal(a, b) for a, b in zip((data, indices, indptr), saved, strict=True))
    assert read_bow(tmp_path / "d.txt").features.toarray().tolist() == [[1, 0, 4, 0], [0, 5, 0, 0]]
    half = np.array([[0.1, 0.0], [0.0, 65504.0]], dtype=np.float16)
    write_bow(tmp_path / "h.txt", XMCData(half, sp.csr_matrix(np.eye(2))))
    assert np.array_equal(read_bow(tmp_path / "h.txt").features.toarray(), half.astype(np.float32))


def test_texts_must_match_the_rows():
    y = sp.csr_matrix(np.eye(2))
    for texts in (["header", "a", "b"], ["a"]):
        with pytest.raises(ValueError, match="texts must hold one text per row"):
            XMCData(np.zeros((2, 1), np.float32), y, texts)


def test_compressed_files_read_as_they_are(tmp_path):
    text = "2 4 3\n0,2 3:0.5 1:1\n 0:2\n"
    (tmp_path / "d.txt").write_text(text)
    with gzip.open(tmp_path / "d.txt.gz", "wt") as fh:
        fh.write(text)
    plain, packed = read_bow(tmp_path / "d.txt"), read_bow(tmp_path / "d.txt.gz")
    assert np.array_equal(plain.features.toarray(), packed.features.toarray())
    assert plain.features.has_canonical_format  # ids sorted within each row
    with gzip.open(tmp_path / "y.gz", "wt") as fh:
        fh.write("2 3\n0:1 2:1\n\n")
    assert read_label_matrix(tmp_path / "y.gz").toarray().tolist() == [[1, 0, 1], [0, 0, 0]]
    with gzip.open(tmp_path / "t.gz", "wt", encoding="utf-8") as fh:
        fh.write("\ufeffalpha\r\nbeta\n")
    assert read_texts(tmp_path / "t.gz") == ["alpha", "beta"]
    (tmp_path / "broken.gz").write_bytes(gzip.compress(text.encode())[:-12])
    with pytest.raises(XMCFormatError, match="broken.gz"):
        read_bow(tmp_path / "broken.gz")


@pytest.mark.parametrize(
    "body, match",
    [
        ("1 4 3\n0 1:nan\n", ":2: feature 1 has a non-finite value"),
        ("1 4 3\n0 1:inf\n", ":2: feature 1 has a non-finite value"),
        ("1 4 3\n0 1:1e400\n", ":2: feature 1 has a non-finite value"),
        ("1 4 3\n0 1:1 1:2\n", ":2: feature id 1 appears more than once"),
        ("1 4 3\n0 1:1\n0 1:1\n", ":3: more rows than the header's 1"),
        ("1 4 3\n0 1:1e39\n", "exceeds the float32 range"),
        ("", ":1: the file is empty"),
    ],
)
def test_malformed_bow_files_name_file_and_line(tmp_path, body, match):
    (tmp_path / "bad.txt").write_text(body)
    with pytest.raises(XMCFormatError, match=match) as info:
        read_bow(tmp_path / "bad.txt")
    assert "bad.txt" in str(info.value)


def test_non_utf8_files_name_file_and_line(tmp_path):
    (tmp_path / "latin.txt").write_bytes("2 3\n0:1\n1:1 caf\xe9\n".encode("latin-1"))
    with pytest.raises(XMCFormatError, match=r"latin.txt:3: not UTF-8"):
        read_label_matrix(tmp_path / "latin.txt")
    (tmp_path / "texts.txt").write_bytes(b"ok\n\xff\xfe broken\n")
    with pytest.raises(XMCFormatError, match=r"texts.txt:2: not UTF-8"):
        read_texts(tmp_path / "texts.txt")


def test_every_reader_treats_bom_and_trailing_blank_lines_alike(tmp_path):
    (tmp_path / "b.txt").write_text("\ufeff1 2 2\n1 0:1\n\n\n", encoding="utf-8")
    assert read_bow(tmp_path / "b.txt").labels.toarray().tolist() == [[0, 1]]
    (tmp_path / "y.txt").write_text("\ufeff2 2\n0:1\n\n\n\n", encoding="utf-8")  # the second row has no labels
    assert read_label_matrix(tmp_path / "y.txt").toarray().tolist() == [[1, 0], [0, 0]]
    (tmp_path / "f.txt").write_text("\ufeff0 0\n\n")
    assert read_filter_labels(tmp_path / "f.txt", sp.csr_matrix(np.eye(2))).toarray().tolist() == [[0, 0], [0, 1]]
    (tmp_path / "z.txt").write_text("1 3\n0:1 1:0 2:1\n")  # a listed 0 is not a positive
    assert read_label_matrix(tmp_path / "z.txt").toarray().tolist() == [[1, 0, 1]]


def test_hashed_bag_of_words_needs_a_positive_width():
    with pytest.raises(ValueError, match="num_features"):
        hashed_bag_of_words(["a b"], 0)


def _reference_bow(text):
    """A brute-force reading of the documented format (or None where it must raise)."""
    lines = text.split("\n")
    if lines[-1] == "":  # the text after a final newline is not a line
        lines.pop()
    head = lines[0].split() if lines else []
    if len(head) != 3 or not all(p.isdigit() for p in head):
        return None
    n, f, m = map(int, head)
    body = lines[1:]
    rows = body[:n]
    if any(line.strip() for line in body[n:]) or len(rows) < n:
        return None
    x, y = np.zeros((n, f)), np.zeros((n, m))
    for i, line in enumerate(rows):
        tokens = line.split()
        labels, pairs = ("", tokens) if not tokens or ":" in tokens[0] else (tokens[0], tokens[1:])
        for token in filter(None, labels.split(",")):
            if not token.isdigit() or int(token) >= m:
                return None
            y[i, int(token)] = 1
        seen = set()
        for token in pairs:
            key, sep, value = token.partition(":")
            try:
                j, v = int(key), float(value)
            except ValueError:
                return None
            if not sep or not 0 <= j < f or j in seen or not math.isfinite(v) or abs(v) >= 3.4028235677973366e38:
                return None
            seen.add(j)
            x[i, j] = np.float32(v)
    return x, y


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_bow_reader_on_random_malformed_input_raises_cleanly_or_reads_right(tmp_path_factory, data):
    n = data.draw(st.integers(0, 3))
    token = st.one_of(
        st.tuples(st.integers(-1, 5), st.sampled_from(["1", "0.5", "-2e3", "nan", "inf", "x", "", "1e400"]))
        .map(lambda t: f"{t[0]}:{t[1]}"),
        st.sampled_from(["0,1", "3", "1,,2", "a", "9"]),
    )
    rows = [" ".join(data.draw(st.lists(token, max_size=4))) for _ in range(data.draw(st.integers(0, n + 1)))]
    text = f"{n} 4 3\n" + "\n".join(rows) + data.draw(st.sampled_from(["", "\n", "\n\n", "\nx\n"]))
    path = tmp_path_factory.mktemp("fuzz") / "d.txt"
    path.write_text(text)
    expected = _reference_bow(text)
    try:
        got = read_bow(path)
    except XMCFormatError:
        assert expected is None, text
        return
    assert expected is not None, text
    assert np.array_equal(got.features.toarray(), expected[0]) and np.array_equal(got.labels.toarray(), expected[1])


def test_every_split_must_have_the_training_label_count():
    train, test = synthetic_xmc(40, 10, 12, 6, seed=1)
    other, _ = synthetic_xmc(10, 2, 13, 6, seed=2)
    with pytest.raises(ValueError, match="val has 13 labels, train 12"):
        XMCDataModule(train, val=other, test=test)
    with pytest.raises(ValueError, match="test has 13 labels, train 12"):
        XMCDataModule(train, test=other)


def test_logits_for_no_labels_is_an_empty_result():
    layer = HeadTailOutput(8, np.arange(20), head_ratio=0.2, fan_in=4, group_size=4)
    x = torch.randn(3, 8)
    assert layer.logits_for(x, []).shape == (3, 0)
    assert layer.logits_for(x, torch.zeros(0, dtype=torch.long)).shape == (3, 0)
    with pytest.raises(TypeError, match="integer"):
        layer.logits_for(x, [1.5])


def _reference_label_matrix(raw):
    """A brute-force reading of a sparse label file's bytes by the documented rules (or None where it must raise)."""
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    head = lines[0].split() if lines else []
    if len(head) != 2 or not all(p.isdigit() for p in head):
        return None
    n, m = map(int, head)
    rows, rest = lines[1 : n + 1], lines[n + 1 :]
    if len(rows) < n or any(line.strip() for line in rest):
        return None
    y = np.zeros((n, m))
    for i, line in enumerate(rows):
        seen = set()
        for token in line.split():
            key, sep, value = token.partition(":")
            try:
                j, v = int(key), float(value)
            except ValueError:
                return None
            if not sep or not 0 <= j < m or j in seen or not math.isfinite(v):
                return None
            seen.add(j)
            y[i, j] = v != 0
    return y


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_label_reader_on_random_malformed_bytes_raises_cleanly_or_reads_right(tmp_path_factory, data):
    """Malformed headers, tokens, row counts, trailing lines, a byte-order mark, gzip and non-UTF-8 bytes: the
    reader raises XMCFormatError (naming the file) exactly where the documented rules say, else reads them right."""
    n = data.draw(st.integers(0, 3))
    header = data.draw(st.sampled_from([f"{n} 5", f"{n}", "x 5", f"{n} 5 1", "-1 5", f" {n}  5 "]))
    token = st.one_of(
        st.tuples(st.integers(-1, 6), st.sampled_from(["1", "0", "-0", "2.5", "nan", "inf", "x", "", "1e400"]))
        .map(lambda t: f"{t[0]}:{t[1]}"),
        st.sampled_from(["a", "3", "1:1:1", ":1"]),
    )
    rows = [" ".join(data.draw(st.lists(token, max_size=3))) for _ in range(data.draw(st.integers(0, n + 1)))]
    text = header + "\n" + "\n".join(rows) + data.draw(st.sampled_from(["", "\n", "\n\n", "\n \n", "\nx\n"]))
    raw = text.encode("utf-8")
    if data.draw(st.booleans()):
        raw = b"\xef\xbb\xbf" + raw
    if data.draw(st.integers(0, 4)) == 0:  # a byte that is not UTF-8, somewhere
        at = data.draw(st.integers(0, len(raw)))
        raw = raw[:at] + data.draw(st.sampled_from([b"\xff", b"\xe9", b"\xc3"])) + raw[at:]
    if data.draw(st.booleans()):
        raw = gzip.compress(raw)
    path = tmp_path_factory.mktemp("fuzz") / "y.txt"
    path.write_bytes(raw)
    expected = _reference_label_matrix(raw)
    try:
        got = read_label_matrix(path)
    except XMCFormatError as error:
        assert expected is None, text
        assert "y.txt" in str(error)
        return
    assert expected is not None, text
    assert got.shape == expected.shape and np.array_equal(got.toarray(), expected)
    assert got.has_canonical_format and np.all(got.data == 1)


def test_write_bow_keeps_integer_features_exact(tmp_path):
    x = np.array([[2**24 + 1, 0, 3], [0, -(2**40) - 7, 1]], dtype=np.int64)
    y = sp.csr_matrix(np.array([[1, 0], [0, 1]]))
    write_bow(tmp_path / "i.txt", XMCData(sp.csr_matrix(x), y))
    assert "0:16777217" in (tmp_path / "i.txt").read_text()
    assert np.array_equal(read_bow(tmp_path / "i.txt", dtype=np.float64).features.toarray(), x.astype(np.float64))
    write_bow(tmp_path / "b.txt", XMCData(sp.csr_matrix(x != 0), y))
    assert np.array_equal(read_bow(tmp_path / "b.txt").features.toarray(), (x != 0).astype(np.float32))


@pytest.mark.parametrize("token", ["+1:1", "1_0:1", "\u00b2:1", "1:1_0", "0:\u0661"])
def test_bow_ids_and_values_are_plain_ascii_numbers(tmp_path, token):
    (tmp_path / "d.txt").write_text(f"1 20 3\n0 {token}\n", encoding="utf-8")
    with pytest.raises(XMCFormatError, match="d.txt:2"):
        read_bow(tmp_path / "d.txt")
    (tmp_path / "y.txt").write_text(f"1 20\n{token}\n", encoding="utf-8")
    with pytest.raises(XMCFormatError, match="y.txt:2"):
        read_label_matrix(tmp_path / "y.txt")


def test_xmc_data_takes_0_1_labels_and_counts_what_the_targets_hold():
    features = np.zeros((3, 4), np.float32)
    with pytest.raises(TypeError, match="SciPy sparse"):
        XMCData(features, np.eye(3, 5))
    with pytest.raises(ValueError, match="0/1"):
        XMCData(features, sp.csr_matrix(np.array([[2, 0], [0, 1], [1, 1]])))
    # a stored 0 is no positive and a label stored twice one: counts, targets and the caller's matrix agree
    labels = sp.csr_matrix((np.array([1.0, 0.0, 1.0, 1.0]), np.array([0, 1, 1, 1]), np.array([0, 2, 4, 4])),
                           shape=(3, 2))
    data = XMCData(features, labels)
    assert data.label_frequencies().tolist() == [1, 1]
    assert data.labels.toarray().tolist() == [[1, 0], [0, 1], [0, 0]]
    assert labels.nnz == 4  # not changed in place
    assert lh_data.targets_csr(data.labels).to_dense().tolist() == [[1, 0], [0, 1], [0, 0]]


def test_every_split_must_have_the_training_feature_count():
    train, test = synthetic_xmc(40, 10, 12, 6, seed=1)
    _, other = synthetic_xmc(10, 5, 12, 7, seed=2)
    with pytest.raises(ValueError, match="test has 7 features, train 6"):
        XMCDataModule(train, test=other)


def test_floating_features_come_in_float32_or_kept_in_float64_on_request():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((12, 5)) * 1e-3 + 1.0  # float64 values that float32 rounds
    y = sp.csr_matrix((rng.random((12, 3)) < 0.5).astype(np.float32))
    for sparse in (False, True):
        features = sp.csr_matrix(x) if sparse else x
        kept = XMCDataModule(XMCData(features, y), val_fraction=0, batch_size=12, features_dtype=torch.float64,
                             shuffle=False)
        batch = next(iter(kept.train_dataloader()))["features"]
        assert batch.dtype == torch.float64
        np.testing.assert_array_equal(batch.numpy(), x)
        rounded = XMCDataModule(XMCData(features, y), val_fraction=0, batch_size=12, shuffle=False)
        batch = next(iter(rounded.train_dataloader()))["features"]
        assert batch.dtype == torch.float32
        np.testing.assert_array_equal(batch.numpy(), x.astype(np.float32))
    with pytest.raises(TypeError, match="features_dtype"):
        XMCDataModule(XMCData(x, y), features_dtype=torch.float16)
