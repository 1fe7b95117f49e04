import math
import subprocess
import sys
import zlib

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader

import lightning_haste as lh
from lightning_haste import module as haste_module
from lightning_haste.cli import HasteXMC
from lightning_haste.data import (
    XMCData,
    XMCDataModule,
    XMCFormatError,
    read_bow,
    read_filter_labels,
    read_label_matrix,
    read_raw_text_dataset,
    synthetic_xmc,
    targets_csr,
    write_bow,
)
from lightning_haste.module import HasteXMCModule, sparse_bce_with_logits, sparse_squared_hinge


class BowModel(HasteXMCModule, LightningModule):
    def __init__(self, **kw):
        super().__init__()
        self.configure_haste(**kw)


class EncoderModel(HasteXMCModule, LightningModule):
    def __init__(self, num_features, **kw):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(num_features, 32), nn.ReLU())
        self.configure_haste(in_features=32, **kw)

    def encode(self, batch):
        return self.encoder(batch["features"])


def _dm(seed=0, **kw):
    return XMCDataModule.synthetic(seed=seed, num_train=600, num_test=150, num_labels=300, num_features=64,
                                   batch_size=64, **kw)


def _trainer(**kw):
    kw.setdefault("max_steps", 20)
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, **kw)


def test_sparse_losses_match_dense_definitions():
    logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    targets = [torch.tensor([0, 3]), torch.tensor([], dtype=torch.long), torch.tensor([8]), torch.tensor([1, 2, 5])]
    y = torch.zeros(4, 9, dtype=torch.float64)
    for i, t in enumerate(targets):
        y[i, t] = 1
    bce = nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum") / 4
    torch.testing.assert_close(sparse_bce_with_logits(logits, targets).double(), bce, rtol=1e-6, atol=1e-6)
    s = 2 * y - 1
    hinge = torch.relu(1 - s * logits).square().sum() / 4
    torch.testing.assert_close(sparse_squared_hinge(logits, targets).double(), hinge, rtol=1e-6, atol=1e-6)


def test_fast_dev_run_and_short_fit_with_regrowth():
    dm = _dm()
    model = BowModel(fan_in=16, group_size=8, head_ratio=0.1)
    _trainer(fast_dev_run=2, max_steps=-1).fit(model, dm)
    model = BowModel(fan_in=16, group_size=8, head_ratio=0.1, grouping="faiss-greedy")
    trainer = _trainer(max_steps=40, val_check_interval=20, check_val_every_n_epoch=None,
                       callbacks=[lh.SparseRegrowthCallback(interval=10, prune_fraction=0.3, log=False)])
    trainer.fit(model, dm)
    results = trainer.validate(model, dm, verbose=False)[0]
    for key in ("val/P@1", "val/P@5", "val/nDCG@3", "val/PSP@5"):
        assert 0.0 <= results[key] <= 1.0
    assert results["val/P@1"] > 0.05  # it learned something on the planted problem


def test_encoder_model_trains_end_to_end_with_combined_optimizer():
    dm = _dm(seed=1)
    model = EncoderModel(64, fan_in=8, group_size=8, head_ratio=0.1, grouping="random")
    trainer = _trainer(max_steps=30, accumulate_grad_batches=2)
    trainer.fit(model, dm)
    assert trainer.global_step == 30
    assert isinstance(trainer.optimizers[0], lh.module.CombinedOptimizer)
    before = model.encoder[0].weight.detach().clone()
    trainer2 = _trainer(max_steps=35)
    trainer2.fit(model, dm)
    assert not torch.equal(before, model.encoder[0].weight)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_on_cuda_the_optimizers_are_fused_and_train(precision):
    # every parameter on CUDA: AdamW and SGD run their fused kernels by default, under both mixed precisions
    # (16-mixed steps them through the gradient scaler)
    dm = _dm(seed=1)
    model = EncoderModel(64, fan_in=8, group_size=8, head_ratio=0.1, grouping="random")
    trainer = Trainer(accelerator="gpu", devices=1, precision=precision, max_steps=10, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0)
    trainer.fit(model, dm)
    parts = trainer.optimizers[0].optimizers
    assert [type(p).__name__ for p in parts] == ["AdamW", "SGD"] and all(p.defaults["fused"] for p in parts)
    assert trainer.global_step == 10
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_predict_returns_original_label_ids():
    dm = _dm(seed=2)
    model = BowModel(fan_in=16, group_size=8, head_ratio=0.1, k=(1, 3))
    trainer = _trainer(max_steps=10)
    trainer.fit(model, dm)
    preds = trainer.predict(model, dm)
    scores, ids = preds[0]
    assert ids.shape == (64, 3) and int(ids.max()) < 300
    batch = next(iter(dm.predict_dataloader()))
    with torch.no_grad():
        full = model.output(batch["features"])
    torch.testing.assert_close(full.gather(1, ids), scores)
    assert torch.equal(full.topk(3, dim=1).indices, ids)


def test_checkpoint_resume_continues_with_identical_metrics(tmp_path):
    dm = _dm(seed=3)
    straight = BowModel(fan_in=16, group_size=8, head_ratio=0.1)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, max_steps=18, limit_val_batches=0).fit(straight, dm)
    first = BowModel(fan_in=16, group_size=8, head_ratio=0.1)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1)
    # the same run (the learning-rate schedule spans its max_steps), checkpointed at step 5 and resumed from there:
    # mid-epoch (540 training rows in batches of 64), where the datamodule's loader resumes at the sixth batch
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            max_steps=18, limit_val_batches=0, callbacks=[saver]).fit(first, dm)
    resumed = BowModel(fan_in=16, group_size=8, head_ratio=0.1)
    Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, max_steps=18, limit_val_batches=0).fit(
        resumed, dm, ckpt_path=next(tmp_path.glob("*step=5.ckpt")))
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
    evaluator = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    a = Trainer(**evaluator).validate(straight, dm, verbose=False)[0]
    b = Trainer(**evaluator).validate(resumed, dm, verbose=False)[0]
    assert a == b


def test_bow_reader_errors_name_file_and_line(tmp_path):
    good = tmp_path / "train.txt"
    good.write_text("2 4 3\n0,2 1:0.5 3:1\n1 0:2\n")
    data = read_bow(good)
    assert data.features.shape == (2, 4) and data.labels.toarray().tolist() == [[1, 0, 1], [0, 1, 0]]
    cases = {
        "2 4\n": "header must be 3",
        "2 4 3\n0 1:0.5\n": "header says 2 instances",
        "1 4 3\n5 1:0.5\n": ":2: label id 5 out of range",
        "1 4 3\n0 9:0.5\n": ":2: feature id 9 out of range",
        "1 4 3\n0 1=0.5\n": ":2: bad token",
        "1 4 3\nx 1:0.5\n": ":2: bad label",
    }
    for text, match in cases.items():
        bad = tmp_path / "bad.txt"
        bad.write_text(text)
        with pytest.raises(XMCFormatError, match=match) as info:
            read_bow(bad)
        assert "bad.txt" in str(info.value)


def test_bow_directory_trains(tmp_path):
    train, test = synthetic_xmc(300, 80, 120, 40, seed=4)
    write_bow(tmp_path / "train.txt", train)
    write_bow(tmp_path / "test.txt", test)
    # the writer and the reader round-trip
    back = read_bow(tmp_path / "train.txt")
    assert (back.labels != train.labels).nnz == 0
    assert np.allclose(back.features.toarray(), train.features, atol=1e-5)
    dm = XMCDataModule.from_bow_directory(tmp_path, batch_size=32)
    assert dm.num_labels == 120 and dm.num_features == 40
    model = BowModel(fan_in=8, group_size=8, head_ratio=0.1)
    _trainer(max_steps=10).fit(model, dm)


def test_bow_directory_takes_the_datamodule_arguments(tmp_path):
    # every XMCDataModule argument through from_bow_directory (float64 files read in float64), and the CLI's
    # plain-argument module with the same settings gives the same split and batches
    from lightning_haste.data import BowXMCDataModule  # noqa: PLC0415

    gen = np.random.default_rng(6)
    train = XMCData(gen.standard_normal((50, 6)) * 1e-3 + 1.0, sp.csr_matrix(gen.random((50, 9)) < 0.3))
    write_bow(tmp_path / "train.txt", train)
    write_bow(tmp_path / "test.txt", train)
    settings = dict(batch_size=8, val_fraction=0.2, val_seed=3, shuffle_seed=5)
    dm = XMCDataModule.from_bow_directory(tmp_path, features_dtype=torch.float64, **settings)
    cli = BowXMCDataModule(str(tmp_path), features_dtype="float64", **settings)
    for module in (dm, cli):
        module.setup("fit")
    batch, same = next(iter(dm.train_dataloader())), next(iter(cli.train_dataloader()))
    assert batch["features"].dtype == torch.float64 and torch.equal(batch["features"], same["features"])
    rows = batch["index"].numpy()
    assert np.array_equal(batch["features"].numpy(), dm.train_data.features[rows].toarray())
    assert dm.train_data.features.dtype == np.float64 and len(dm.val_data) == 10
    with pytest.raises(ValueError, match="features_dtype"):
        BowXMCDataModule(str(tmp_path), features_dtype="float16")


class TextModel(HasteXMCModule, LightningModule):
    """A small text encoder: hashed tokens -> EmbeddingBag -> ReLU."""

    def __init__(self, **kw):
        super().__init__()
        self.buckets = 1024
        self.embed = nn.EmbeddingBag(self.buckets, 32, mode="mean")
        self.configure_haste(in_features=32, **kw)

    def encode(self, batch):
        ids, offsets = [], []
        for text in batch["texts"]:
            offsets.append(len(ids))
            ids += [zlib.crc32(t.encode()) % self.buckets for t in text.split()] or [0]
        return torch.relu(self.embed(torch.tensor(ids), torch.tensor(offsets)))


def _write_text_split(folder, name, data, rng):
    vocab = [f"w{i}" for i in range(500)]
    with open(folder / f"{name}_X.txt", "w") as fh:
        for i in range(len(data)):
            words = [vocab[(7 * label + j) % 500] for label in data.labels[i].indices for j in range(4)]
            words += list(rng.choice(vocab, 3))
            fh.write(" ".join(words) + "\n")
    with open(folder / f"{name}_X_Y.txt", "w") as fh:
        fh.write(f"{len(data)} {data.num_labels}\n")
        for i in range(len(data)):
            fh.write(" ".join(f"{j}:1" for j in data.labels[i].indices) + "\n")


def test_text_encoder_trains_end_to_end_on_raw_text_files(tmp_path):
    rng = np.random.default_rng(0)
    train, test = synthetic_xmc(800, 200, 150, 16, seed=6)
    _write_text_split(tmp_path, "trn", train, rng)
    _write_text_split(tmp_path, "tst", test, rng)
    dm = XMCDataModule(read_raw_text_dataset(tmp_path / "trn_X.txt", tmp_path / "trn_X_Y.txt"),
                       test=read_raw_text_dataset(tmp_path / "tst_X.txt", tmp_path / "tst_X_Y.txt"), batch_size=64)
    model = TextModel(fan_in=16, group_size=8, head_ratio=0.1, encoder_lr=5e-3)
    trainer = _trainer(max_steps=150)
    trainer.fit(model, dm)
    results = trainer.validate(model, dm, verbose=False)[0]
    assert results["val/P@1"] > 0.3  # label words are in the text: it must learn them


def test_user_label_embeddings_drive_the_grouping():
    dm = _dm(seed=7)
    emb = np.random.default_rng(0).standard_normal((dm.num_labels, 8))
    dm.label_embeddings = emb
    model = BowModel(fan_in=16, group_size=8, head_ratio=0.1, grouping="faiss-greedy")
    _trainer(max_steps=2).fit(model, dm)
    dm.label_embeddings = emb[:10]
    with pytest.raises(ValueError, match="label_embeddings has 10 rows"):
        _trainer(max_steps=2).fit(BowModel(fan_in=16, group_size=8, head_ratio=0.1), dm)


def test_label_file_and_filter_errors_name_file_and_line(tmp_path):
    f = tmp_path / "trn_X_Y.txt"
    f.write_text("2 5\n0:1 3:1\n7:1\n")
    with pytest.raises(XMCFormatError, match="trn_X_Y.txt:3: label id 7 out of range"):
        read_label_matrix(f)
    f.write_text("2 5\n0:1 3:1\n4:1\n")
    labels = read_label_matrix(f)
    g = tmp_path / "filter.txt"
    g.write_text("0 3\n1 4\n")
    assert read_filter_labels(g, labels).toarray().tolist() == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0]]
    g.write_text("0 3\n9 9\n")
    with pytest.raises(XMCFormatError, match="filter.txt:2: pair"):
        read_filter_labels(g, labels)


def test_sparse_feature_batches_train():
    train, test = synthetic_xmc(300, 80, 120, 40, seed=8)
    dm = XMCDataModule(XMCData(sp.csr_matrix(train.features), train.labels),
                       test=XMCData(sp.csr_matrix(test.features), test.labels), batch_size=32, sparse_features=True)
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].layout == torch.sparse_csr and batch["targets"].layout == torch.sparse_csr
    model = BowModel(fan_in=8, group_size=8, head_ratio=0.1)
    _trainer(max_steps=5).fit(model, dm)


def test_precomputed_label_groups_are_used_without_regrouping(monkeypatch):
    dm = _dm(seed=3)
    head, tail = lh.grouping.split_head_tail(dm.label_frequencies, 0.1, 8)
    groups = np.zeros(dm.num_labels, dtype=np.int64)
    groups[tail] = (np.arange(tail.size) // 8)[::-1]  # blocks of 8 tail labels, in the reverse of frequency order
    monkeypatch.setattr(haste_module, "group_labels", lambda *a, **k: pytest.fail("setup regrouped"))
    model = BowModel(fan_in=16, group_size=8, head_ratio=0.1, grouping="faiss-greedy", label_groups=groups)
    _trainer(max_steps=2).fit(model, dm)
    order = model.output.label_permutation[model.output.num_head_labels :].numpy()
    assert np.all(np.diff(groups[order]) >= 0)  # the tail is laid out in the given groups' order
    wrong = BowModel(fan_in=16, group_size=8, head_ratio=0.1, label_groups=np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="label_groups has 5 entries"):
        _trainer(max_steps=1).fit(wrong, dm)


def test_an_output_layer_set_by_hand_still_gets_its_metrics():
    dm = _dm(seed=4)
    model = BowModel(fan_in=16, group_size=8, head_ratio=0.1, grouping=None)
    model.output = lh.HeadTailOutput(dm.num_features, dm.label_frequencies, head_ratio=0.2, fan_in=8, group_size=8)
    trainer = _trainer(max_steps=5)
    trainer.fit(model, dm)
    results = trainer.validate(model, dm, verbose=False)[0]
    assert "val/P@1" in results and model.output.fan_in == 8


def test_integer_features_stay_integers_in_batches():
    rng = np.random.default_rng(0)
    ids = rng.integers(2**24, 2**24 + 1000, size=(40, 6), dtype=np.int64)  # token ids float32 cannot hold
    labels = sp.csr_matrix((np.ones(40, dtype=np.float32), (np.arange(40), rng.integers(0, 10, 40))), shape=(40, 10))
    dm = XMCDataModule(XMCData(ids, labels), batch_size=8, shuffle=False)
    batch = next(iter(dm.train_dataloader()))
    assert batch["features"].dtype == torch.int64
    assert torch.equal(batch["features"], torch.from_numpy(ids[:8]))
    assert HasteXMCModule.encode(None, batch).dtype == torch.float32  # the default encoder's input: float32


def test_output_bias_from_the_prior():
    dm = _dm(seed=5)
    model = BowModel(fan_in=16, group_size=8, head_ratio=0.1, grouping=None, output_bias="prior", output_lr=1e-9)
    _trainer(max_steps=1).fit(model, dm)  # one (negligible) step after the initialisation
    freq = dm.label_frequencies
    p = (freq + 1.0) / (dm.num_train + 2.0)
    internal = torch.cat([model.output.head.bias, model.output.tail.bias]).detach()
    prior = torch.from_numpy(np.log(p / (1 - p))).float()[model.output.label_permutation]
    assert (internal - prior).abs().max() < 1e-5
    with pytest.raises(ValueError, match="output_bias"):
        BowModel(output_bias="zero")


def test_trained_model_loads_from_its_checkpoint_alone_in_a_fresh_process(tmp_path):
    """Train, save, load with load_from_checkpoint in another process (no datamodule there), predict the same."""
    dm = _dm(seed=7, shuffle=False)
    model = HasteXMC(hidden=32, head_ratio=0.1, fan_in=16, group_size=8, grouping="random")
    trainer = _trainer(max_steps=6, limit_val_batches=0)
    trainer.fit(model, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    x = torch.from_numpy(dm.test_data.features[:20])
    np.save(tmp_path / "x.npy", x.numpy())
    model.eval()
    scores, ids = model.predict_step({"features": x}, 0)  # by hand: no graph either
    assert not scores.requires_grad and scores.grad_fn is None
    script = (
        "import sys, numpy as np, torch\n"
        "from lightning_haste.cli import HasteXMC\n"
        f"m = HasteXMC.load_from_checkpoint({str(path)!r}, map_location='cpu').eval()\n"
        f"x = torch.from_numpy(np.load({str(tmp_path / 'x.npy')!r}))\n"
        "with torch.no_grad():\n"
        "    s, i = m.predict_step({'features': x}, 0)\n"
        f"np.save({str(tmp_path / 'ids.npy')!r}, i.numpy()); np.save({str(tmp_path / 's.npy')!r}, s.numpy())\n"
        "assert m.haste_metrics is not None and m.output.num_labels == 300\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert np.array_equal(np.load(tmp_path / "ids.npy"), ids.numpy())
    np.testing.assert_array_equal(np.load(tmp_path / "s.npy"), scores.numpy())


def test_output_layer_config_round_trip():
    freq = np.random.default_rng(0).integers(0, 40, 157)
    layer = lh.HeadTailOutput(24, freq, head_ratio=0.2, fan_in=8, group_size=8, tail_features=(4, 24),
                              generator=torch.Generator().manual_seed(0))
    copy = lh.HeadTailOutput.from_config(layer.config())
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(5, 24)
    torch.testing.assert_close(copy(x), layer(x), rtol=0, atol=0)
    assert copy.config() == layer.config()
    with pytest.raises(ValueError, match="lacks"):
        lh.HeadTailOutput.from_config({"in_features": 4})


def _plain_loader(data, batch_size=32, matrix_targets=False):
    """A user's own DataLoader: dense features and, per row, a tensor of label ids (or one CSR matrix)."""

    def collate(rows):
        labels = data.labels[rows]
        targets = targets_csr(labels) if matrix_targets else [torch.from_numpy(r.indices.astype(np.int64))
                                                                for r in labels]
        return {"features": torch.from_numpy(data.features[rows]), "targets": targets}

    return DataLoader(list(range(len(data))), batch_size=batch_size, collate_fn=collate)


def test_fit_from_plain_dataloaders_with_the_label_statistics_given(tmp_path):
    train, val = synthetic_xmc(240, 64, 80, 24, seed=9)
    freq = train.label_frequencies()
    embeddings = np.random.default_rng(0).standard_normal((train.num_labels, 6))
    model = BowModel(in_features=24, fan_in=8, group_size=8, head_ratio=0.1, grouping="balanced-kmeans",
                     label_frequencies=torch.from_numpy(freq), num_train=len(train), label_embeddings=embeddings)
    trainer = _trainer(max_steps=12)
    trainer.fit(model, train_dataloaders=_plain_loader(train), val_dataloaders=_plain_loader(val))
    assert trainer.global_step == 12 and model.output.num_labels == 80
    assert np.array_equal(model.haste_statistics["label_frequencies"], freq)
    results = trainer.validate(model, dataloaders=_plain_loader(val, matrix_targets=True), verbose=False)[0]
    assert 0.0 <= results["val/P@1"] <= 1.0 and "val/PSP@5" in results
    # the checkpoint carries the statistics: it loads without data and predicts the same
    path = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(path)
    loaded = BowModel.load_from_checkpoint(path)
    x = torch.from_numpy(val.features)
    model.eval()
    loaded.eval()
    with torch.no_grad():
        expected, got = model.predict_step({"features": x}, 0), loaded.predict_step({"features": x}, 0)
    assert torch.equal(expected[1], got[1]) and torch.equal(expected[0], got[0])
    assert np.array_equal(loaded.haste_statistics["label_frequencies"], freq)
    # a split of another label count is refused (a matrix by its width, lists of ids by their range)
    wider = sp.hstack([val.labels, sp.csr_matrix((np.ones(1), ([0], [4])), shape=(len(val), 5))]).tocsr()
    other = XMCData(val.features, wider)  # 85 labels, label 84 a positive of row 0
    for targets_as_matrix in (True, False):
        with pytest.raises(ValueError, match="val batch's targets have 85 labels|< 80"):
            _trainer().validate(model, dataloaders=_plain_loader(other, matrix_targets=targets_as_matrix),
                                verbose=False)


def test_without_a_datamodule_or_label_statistics_setup_says_what_to_pass():
    train, _ = synthetic_xmc(100, 10, 40, 16, seed=10)
    with pytest.raises(ValueError, match="pass label_frequencies= and num_train="):
        _trainer(max_steps=2).fit(BowModel(in_features=16, fan_in=8, group_size=8), _plain_loader(train))
    freq = train.label_frequencies()
    with pytest.raises(ValueError, match="pass label_embeddings="):  # no PIFA without train_data
        _trainer(max_steps=2).fit(BowModel(in_features=16, fan_in=8, group_size=8, head_ratio=0.1,
                                           label_frequencies=freq, num_train=100), _plain_loader(train))
    with pytest.raises(ValueError, match="pass in_features="):
        _trainer(max_steps=2).fit(BowModel(fan_in=8, group_size=8, grouping=None, label_frequencies=freq,
                                           num_train=100), _plain_loader(train))
    model = BowModel(in_features=16, fan_in=8, group_size=8, head_ratio=0.1, grouping=None,
                     label_frequencies=freq, num_train=100)
    _trainer(max_steps=2).fit(model, _plain_loader(train))  # frequency order needs no embeddings
    assert model.output.num_labels == 40
    # a datamodule of another label count than the given statistics
    with pytest.raises(ValueError, match="the datamodule has 300 labels, the label statistics 40"):
        _trainer(max_steps=2).fit(BowModel(in_features=64, fan_in=8, group_size=8, grouping=None,
                                           label_frequencies=freq, num_train=100), _dm())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(label_frequencies=[3, 0, 2]), ValueError, "needs num_train"),
    (dict(num_train=10), ValueError, "num_train is given without label_frequencies"),
    (dict(label_frequencies=[3, -1, 2], num_train=10), ValueError, "label_frequencies must be >= 0"),
    (dict(label_frequencies=[3, 0.5, 2], num_train=10), ValueError, "whole counts"),
    (dict(label_frequencies=[3, float("nan")], num_train=10), ValueError, "whole counts"),
    (dict(label_frequencies=[[3, 1]], num_train=10), ValueError, "1-D"),
    (dict(label_frequencies=[], num_train=10), ValueError, "1-D"),
    (dict(label_frequencies=["a", "b"], num_train=10), TypeError, "label_frequencies must hold numbers"),
    (dict(label_frequencies=[3, 0, 2], num_train=2), ValueError, "more than num_train=2"),
    (dict(label_frequencies=[3, 0, 2], num_train=2.5), ValueError, "num_train must be an integer"),
    (dict(label_frequencies=[3, 0, 2], num_train=True), ValueError, "num_train must be an integer"),
    (dict(label_frequencies=[3, 0, 2], num_train=5, label_embeddings=np.ones((2, 4))), ValueError, "2 rows for 3"),
    (dict(label_embeddings=np.ones(4)), ValueError, "2-D"),
    (dict(label_embeddings=np.full((3, 2), np.inf)), ValueError, "finite"),
])
def test_configure_haste_checks_the_given_statistics(kwargs, error, match):
    with pytest.raises(error, match=match):
        BowModel(**kwargs)


def test_cli_model_fits_from_plain_dataloaders_with_num_features():
    train, val = synthetic_xmc(200, 40, 60, 24, seed=3)
    stats = dict(label_frequencies=train.label_frequencies(), num_train=len(train))
    model = HasteXMC(hidden=16, head_ratio=0.1, fan_in=8, group_size=8, grouping="random", **stats)
    with pytest.raises(ValueError, match="num_features="):
        _trainer(max_steps=1).fit(model, train_dataloaders=_plain_loader(train))
    for hidden in (16, None):
        model = HasteXMC(hidden=hidden, head_ratio=0.1, fan_in=8, group_size=8, grouping="random", num_features=24,
                         **stats)
        trainer = _trainer(max_steps=3)
        trainer.fit(model, train_dataloaders=_plain_loader(train), val_dataloaders=_plain_loader(val))
        assert trainer.global_step == 3 and model.output.in_features == (hidden or 24)
    with pytest.raises(ValueError, match="num_features"):
        HasteXMC(num_features=0)


@pytest.mark.parametrize("n, replicas", [(77, 4), (10, 3), (2, 5), (12, 4), (0, 2)])
def test_evaluation_sampler_gives_every_row_once_and_marks_the_repeats(n, replicas):
    rows = range(n)
    drawn = [list(lh.data.EvaluationSampler(rows, num_replicas=replicas, rank=r)) for r in range(replicas)]
    assert len({len(d) for d in drawn}) == 1  # every process runs the same number of rows
    originals = sorted(i for d in drawn for i in d if i < n)
    assert originals == list(range(n))
    assert all(n <= i < 2 * n for d in drawn for i in d if i >= n)  # a repeat is drawn as len + row


def test_metrics_under_ddp_count_each_row_once_and_equal_one_process():
    # 151 test rows on 4 processes: the sampler repeats 1 row to even them out; nothing may count it twice
    dm = XMCDataModule.synthetic(seed=3, num_train=400, num_test=151, num_labels=120, num_features=32,
                                 batch_size=16)
    model = BowModel(fan_in=8, group_size=8, head_ratio=0.1, grouping=None, k=(1, 3, 5))
    _trainer(max_steps=6, limit_val_batches=0).fit(model, dm)
    quiet = dict(logger=False, enable_progress_bar=False, enable_model_summary=False)
    single = Trainer(accelerator="cpu", devices=1, **quiet).test(model, dm, verbose=False)[0]
    ddp = Trainer(accelerator="cpu", devices=4, strategy="ddp_spawn", **quiet).test(model, dm, verbose=False)[0]
    assert sorted(single) == sorted(ddp) and len(single) == 9
    for key in single:
        if key.startswith("test/P@"):
            assert single[key] == ddp[key], key  # whole hit counts: the same to the last bit
        else:  # float64 sums in another order
            assert single[key] == pytest.approx(ddp[key], rel=1e-13, abs=0), key


@pytest.mark.parametrize("kwargs, match", [
    (dict(head_ratio=1.5), "head_ratio must lie in"),
    (dict(head_ratio=float("nan")), "head_ratio must be a finite number"),
    (dict(fan_in=0), "fan_in must be >= 1"),
    (dict(in_features=16, fan_in=32), "fan_in=32 exceeds in_features=16"),
    (dict(group_size=-1), "group_size must be >= 1"),
    (dict(k=(0,)), "k must be a positive integer"),
    (dict(k="5"), "k must be a positive integer"),
    (dict(psp_a=-1), "psp_a must lie in"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(output_momentum=1.0), "output_momentum must lie in"),
    (dict(output_weight_decay=-1e-4), "output_weight_decay must lie in"),
    (dict(output_lr=float("inf")), "output_lr must be a finite number"),
    (dict(encoder_lr=0.0), "encoder_lr must lie in"),
])
def test_configure_haste_rejects_bad_settings_when_the_model_is_made(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        BowModel(**kwargs)


def test_configure_haste_takes_a_single_k():
    model = BowModel(k=5)
    assert model.haste["k"] == (5,)


def test_bf16_true_precision_trains_and_evaluates_with_targets_cast_to_bfloat16():
    # Lightning's bf16-true casts every floating tensor of a batch, the sparse targets' values included: the loss,
    # the metrics and the rows a distributed evaluation repeated read them without NumPy's missing bfloat16
    from lightning_haste.module import _select_rows  # noqa: PLC0415

    dm = _dm()
    model = EncoderModel(dm.num_features, fan_in=16, group_size=8, head_ratio=0.1, encoder_lr=2e-3)
    trainer = _trainer(max_steps=6, precision="bf16-true", num_sanity_val_steps=0, limit_val_batches=2)
    trainer.fit(model, dm)
    assert model.output.tail.weight.dtype == torch.bfloat16
    metrics = trainer.validate(model, dm, verbose=False)[0]
    assert all(math.isfinite(v) for v in metrics.values())
    y = torch.sparse_csr_tensor(torch.tensor([0, 2, 2, 3]), torch.tensor([1, 4, 0]),
                                torch.tensor([1.0, 0.0, 1.0], dtype=torch.bfloat16), size=(3, 5))
    torch.testing.assert_close(sparse_bce_with_logits(torch.zeros(3, 5), y),
                               sparse_bce_with_logits(torch.zeros(3, 5), [torch.tensor([1]), torch.tensor([]),
                                                                          torch.tensor([0])]))
    kept = _select_rows(y, torch.tensor([True, False, True]))
    assert kept.col_indices().tolist() == [1, 4, 0] and kept.crow_indices().tolist() == [0, 2, 3]
    assert kept.values().tolist() == [1.0, 0.0, 1.0]  # the stored zero stays a stored zero: no positive
