"""The training recipe of HasteXMCModule: loss reduction, learning-rate schedule, prior biases, dropout, and the
data path of a fit step (targets as one CSR left on the host, tokenising in the loader)."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_haste.data import (
    XMCData,
    XMCDataModule,
    XMCFormatError,
    read_raw_text_dataset,
    synthetic_xmc,
    targets_csr,
)
from lightning_haste.module import HasteXMCModule, lr_multiplier


class BowModel(HasteXMCModule, LightningModule):
    def __init__(self, **kw):
        super().__init__()
        self.configure_haste(**kw)


def _dm(**kw):
    return XMCDataModule.synthetic(seed=0, num_train=256, num_test=64, num_labels=120, num_features=32,
                                   batch_size=64, shuffle=False, **kw)


def _trainer(**kw):
    kw.setdefault("max_steps", 4)
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, limit_val_batches=0, **kw)


@settings(max_examples=200, deadline=None)
@given(total=st.integers(1, 5000), warmup=st.floats(0.0, 0.99), schedule=st.sampled_from(["cosine", "linear",
                                                                                            "constant"]),
       data=st.data())
def test_lr_multiplier_rises_then_decays_within_zero_and_one(total, warmup, schedule, data):
    step = data.draw(st.integers(0, total - 1))
    value = lr_multiplier(step, total=total, warmup=warmup, schedule=schedule)
    assert 0.0 <= value <= 1.0
    warm = int(round(warmup * total))
    if step < warm:
        assert value == pytest.approx((step + 1) / warm)
    elif schedule == "constant":
        assert value == 1.0
    if step + 1 < total:
        later = lr_multiplier(step + 1, total=total, warmup=warmup, schedule=schedule)
        assert later >= value if step + 1 < warm else later <= value + 1e-12


def test_lr_multiplier_endpoints():
    assert lr_multiplier(0, total=100, warmup=0.1, schedule="cosine") == pytest.approx(0.1)
    assert lr_multiplier(9, total=100, warmup=0.1, schedule="cosine") == pytest.approx(1.0)
    assert lr_multiplier(10, total=100, warmup=0.1, schedule="cosine") == pytest.approx(1.0)
    assert lr_multiplier(55, total=100, warmup=0.1, schedule="cosine") == pytest.approx(0.5)
    assert lr_multiplier(55, total=100, warmup=0.1, schedule="linear") == pytest.approx(0.5)
    assert lr_multiplier(100, total=100, warmup=0.1, schedule="cosine") == pytest.approx(0.0, abs=1e-12)


class _Encoded(BowModel):
    def __init__(self, **kw):
        super().__init__(in_features=16, **kw)
        self.encoder = torch.nn.Linear(32, 16)

    def encode(self, batch):
        return self.encoder(batch["features"])


def test_the_schedule_drives_both_learning_rates_per_step():
    seen = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    model = _Encoded(fan_in=8, group_size=8, head_ratio=0.1, grouping=None, encoder_lr=1e-3, output_lr=0.05,
                    warmup=0.25, lr_schedule="cosine")
    _trainer(max_steps=8, callbacks=[Record()]).fit(model, _dm())
    assert len(seen) == 8
    for step, lrs in enumerate(seen):
        factor = lr_multiplier(step, total=8, warmup=0.25, schedule="cosine")
        assert lrs == pytest.approx([1e-3 * factor, 0.05 * factor])


def test_sum_reduction_with_lr_over_batch_makes_the_batchmean_step():
    """SGD without momentum or decay: the summed loss at lr / B moves the output layer as the row-mean at lr."""
    finals = []
    for reduction, lr in (("batchmean", 0.05), ("sum", 0.05 / 64)):
        model = BowModel(fan_in=8, group_size=8, head_ratio=0.1, grouping=None, loss_reduction=reduction,
                         output_lr=lr, output_momentum=0.0, output_weight_decay=0.0, warmup=0.0,
                         lr_schedule="constant", output_bias="default")
        _trainer(max_steps=3).fit(model, _dm())
        finals.append([p.detach().clone() for p in model.output.parameters()])
    for a, b in zip(*finals, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_recipe_settings_are_validated_up_front():
    for kw, match in [({"loss_reduction": "mean"}, "reduction"), ({"dropout": 1.0}, "dropout"),
                      ({"warmup": 1.5}, "warmup"), ({"lr_schedule": "step"}, "lr_schedule"),
                      ({"output_lr": 0.0}, "output_lr"), ({"encoder_lr": -1.0}, "encoder_lr"),
                      ({"dropout": None}, "dropout"), ({"warmup": "0.1"}, "warmup")]:
        with pytest.raises(ValueError, match=match):
            BowModel(**kw)
    with pytest.raises(TypeError, match="label_sharding must be True or False"):
        BowModel(label_sharding="false")


@pytest.mark.parametrize("fused", [None, True, False])
def test_fused_optimizers_follow_the_setting_and_the_device(fused):
    # None: fused where every parameter is on CUDA (here on the CPU: torch's default for-each path); True/False
    # as given. Either way the same update rule: one step from the same state gives the same weights.
    results = []
    for setting in (fused, False):
        torch.manual_seed(0)
        model = _Encoded(fan_in=8, group_size=8, head_ratio=0.1, grouping=None, fused_optimizers=setting,
                         warmup=0.0, lr_schedule="constant")
        trainer = _trainer(max_steps=3)
        trainer.fit(model, _dm())
        parts = trainer.optimizers[0].optimizers
        assert [type(p).__name__ for p in parts] == ["AdamW", "SGD"]
        want = bool(setting) if setting is not None else False  # the CPU: not fused by default
        assert all(bool(p.defaults["fused"]) == want for p in parts)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-6)
    with pytest.raises(TypeError, match="fused_optimizers"):
        BowModel(fused_optimizers="yes")


def test_schedule_without_a_step_count_raises():
    model = BowModel(fan_in=8, group_size=8, head_ratio=0.1, grouping=None)
    trainer = Trainer(accelerator="cpu", max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    with pytest.raises(ValueError, match="number of training steps"):
        trainer.fit(model, _dm())


def test_dropout_applies_in_training_only():
    model = BowModel(fan_in=8, group_size=8, head_ratio=0.1, grouping=None, dropout=0.5)
    _trainer(max_steps=1).fit(model, _dm())
    features = torch.ones(4, 32)
    model.train()
    dropped = model.output_dropout(features)
    assert set(dropped.unique().tolist()) <= {0.0, 2.0} and (dropped == 0).any()
    model.eval()
    assert torch.equal(model.output_dropout(features), features)
    assert BowModel(dropout=0.0).output_dropout is None


def test_default_recipe_beats_the_old_one_on_the_synthetic_default():
    """The default (summed BCE, warm-up + cosine, prior biases) against the earlier default (row-mean BCE at the
    same lr, constant, default biases), same budget: the output layer alone on the embedded default data."""
    results = {}
    data = XMCDataModule.synthetic(seed=1, num_train=3000, num_test=500, num_labels=600, num_features=128,
                                   batch_size=128)
    old = dict(loss_reduction="batchmean", warmup=0.0, lr_schedule="constant", output_bias="default")
    for name, kw in (("default", {}), ("old", old)):
        torch.manual_seed(0)
        model = BowModel(fan_in=16, group_size=8, head_ratio=0.1, grouping=None, **kw)
        trainer = Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
        trainer.fit(model, data)
        results[name] = trainer.test(model, data, verbose=False)[0]["test/P@1"]
    assert results["default"] > results["old"] + 0.05, results


def test_batches_carry_targets_as_one_csr_that_stays_on_the_host():
    dm = _dm()
    batch = next(iter(dm.train_dataloader()))
    targets = batch["targets"]
    assert targets.layout == torch.sparse_csr and tuple(targets.shape) == (64, 120)
    expected = dm.train_data.labels[:64]
    assert np.array_equal(targets.crow_indices().numpy(), expected.indptr)
    assert np.array_equal(targets.col_indices().numpy(), expected.indices)
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["features"].device.type == "meta"
    assert moved["targets"] is targets  # left on the host for the loss and the metrics
    assert dm.pin_memory is torch.cuda.is_available() and dm.num_workers == 0


WORKER_BATCHES = """
import warnings
import numpy as np
import scipy.sparse as sp
import torch
from lightning_haste.data import XMCData, XMCDataModule, synthetic_xmc
if __name__ == "__main__":
    dense, _ = synthetic_xmc(200, 10, 40, 16, seed=1)
    train = XMCData(sp.csr_matrix(dense.features), dense.labels)  # sparse features travel as CSR too
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        dm = XMCDataModule(train, batch_size=32, num_workers=1, shuffle=False, sparse_features=True, val_fraction=0.0)
        dm.setup("fit")
        batches = list(dm.train_dataloader())
    labels = dm.train_data.labels
    for i, batch in enumerate(batches):
        rows = labels[32 * i : 32 * (i + 1)]
        t = batch["targets"]
        assert t.layout == torch.sparse_csr and tuple(t.shape) == rows.shape
        assert np.array_equal(t.crow_indices().numpy(), rows.indptr)
        assert np.array_equal(t.col_indices().numpy(), rows.indices)
        assert torch.equal(t.values(), torch.ones(rows.nnz))
        f = batch["features"]
        assert f.layout == torch.sparse_csr
        assert np.allclose(f.to_dense().numpy(), dm.train_data.features[32 * i : 32 * (i + 1)].toarray())
    print(len(batches), [str(w.message)[:80] for w in seen if "parse" in str(w.message)])
"""


def test_batches_from_worker_processes_arrive_whole_and_without_torch_warnings(tmp_path):
    # a batch made in a loader worker (text data sets tokenise there) sends its sparse CSR targets as their parts;
    # torch's own rebuild warned twice in the receiving process (a fresh one: torch warns once per process)
    script = tmp_path / "workers.py"
    script.write_text(WORKER_BATCHES)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["7", "[]"], result.stdout + result.stderr[-2000:]


def test_targets_csr_round_trip():
    _, test = synthetic_xmc(50, 40, 30, 8, seed=2)
    csr = targets_csr(test.labels)
    assert torch.equal(csr.to_dense(), torch.from_numpy(test.labels.toarray()))


def test_text_transform_runs_in_the_collate(tmp_path):
    (tmp_path / "x.txt").write_text("alpha beta\ngamma\ndelta epsilon zeta\n")
    (tmp_path / "y.txt").write_text("3 4\n0:1 2:1\n1:1\n3:1\n")
    data = read_raw_text_dataset(tmp_path / "x.txt", tmp_path / "y.txt")
    calls = []

    def lengths(texts):
        calls.append(len(texts))
        return {"tokens": {"length": torch.tensor([len(t.split()) for t in texts])}}

    dm = XMCDataModule(data, test=data, batch_size=2, shuffle=False, text_transform=lengths, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["tokens"]["length"].tolist() == [2, 1] and batch["texts"] == ["alpha beta", "gamma"]
    assert calls == [2]
    # the features (the texts' hashed bag of words, for the label grouping) stay out of such batches unless asked
    assert "features" not in batch and not dm.batch_features
    with_features = XMCDataModule(data, batch_size=2, shuffle=False, text_transform=lengths, num_workers=0,
                                  batch_features=True)
    assert next(iter(with_features.train_dataloader()))["features"].shape == (2, data.num_features)
    assert "features" in next(iter(XMCDataModule(data, batch_size=2, num_workers=0).train_dataloader()))
    with pytest.raises(TypeError, match="batch_features"):
        XMCDataModule(data, batch_features=1)
    with pytest.raises(KeyError, match="batch_features=True"):
        BowModel.encode(None, batch)
    moved = dm.transfer_batch_to_device(batch, torch.device("meta"), 0)
    assert moved["tokens"]["length"].device.type == "meta"
    assert moved["texts"] is batch["texts"] and moved["targets"] is batch["targets"]  # left on the host
    assert XMCDataModule(data, text_transform=lengths).num_workers >= 0
    with pytest.raises(ValueError, match="raw-text"):
        XMCDataModule(XMCData(data.features, data.labels), text_transform=lengths)
    with pytest.raises(ValueError, match="batch_size"):
        XMCDataModule(data, batch_size=0)


def test_prior_bias_is_the_default_and_matches_the_log_odds():
    dm = _dm()
    model = BowModel(fan_in=8, group_size=8, head_ratio=0.1, grouping=None, output_lr=1e-12, encoder_lr=1e-12)
    _trainer(max_steps=1).fit(model, dm)
    p = (dm.label_frequencies + 1.0) / (dm.num_train + 2.0)
    prior = torch.from_numpy(np.log(p) - np.log1p(-p)).float()[model.output.label_permutation]
    internal = torch.cat([model.output.head.bias, model.output.tail.bias]).detach()
    torch.testing.assert_close(internal, prior, rtol=0, atol=1e-5)
    assert math.isclose(model.haste["encoder_lr"], 1e-12)


def test_validation_holds_out_part_of_train_by_default_never_the_test_split():
    train, test = synthetic_xmc(200, 50, 40, 8, seed=3)
    dm = XMCDataModule(train, test=test, batch_size=16)
    assert len(dm.train_data) == 180 and len(dm.val_data) == 20 and dm.test_data is test
    # the held-out rows are rows of train, disjoint from the training part, and the statistics ignore them
    both = np.vstack([dm.train_data.features, dm.val_data.features])
    assert sorted(map(bytes, both)) == sorted(map(bytes, train.features))
    assert dm.label_frequencies.sum() == dm.train_data.labels.nnz < train.labels.nnz
    again = XMCDataModule(train, test=test, val_seed=0)
    assert np.array_equal(again.val_data.features, dm.val_data.features)  # seeded
    other = XMCDataModule(train, test=test, val_seed=1)
    assert not np.array_equal(other.val_data.features, dm.val_data.features)
    everything = XMCDataModule(train, test=test, val_fraction=0.0)
    assert everything.train_data is train and everything.val_data is None and everything.val_dataloader() == []
    explicit = XMCDataModule(train, val=test, test=test)
    assert explicit.train_data is train and explicit.val_data is test
    with pytest.raises(ValueError, match="val_fraction"):
        XMCDataModule(train, val_fraction=1.0)


def test_raw_text_blank_lines_after_the_last_text_are_not_instances(tmp_path):
    (tmp_path / "y.txt").write_text("3 4\n0:1 2:1\n1:1\n3:1\n")
    (tmp_path / "x.txt").write_text("alpha beta\n\ndelta\n\n\r\n")  # an empty second text, then blank lines
    data = read_raw_text_dataset(tmp_path / "x.txt", tmp_path / "y.txt")
    assert data.texts == ["alpha beta", "", "delta"]
    (tmp_path / "x.txt").write_text("alpha beta\ngamma\n")  # one text short
    with pytest.raises(XMCFormatError, match="2 texts but .* 3 rows"):
        read_raw_text_dataset(tmp_path / "x.txt", tmp_path / "y.txt")
    (tmp_path / "x.txt").write_text("alpha\nbeta\ngamma\ndelta\n")  # one text too many, not blank
    with pytest.raises(XMCFormatError, match="4 texts"):
        read_raw_text_dataset(tmp_path / "x.txt", tmp_path / "y.txt")
