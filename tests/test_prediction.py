"""TopKPredictionWriter: trainer.predict's top-k streamed to .npz and text files, single process and DDP."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from lightning.pytorch import LightningModule, Trainer

from lightning_haste import TopKPredictionWriter, prediction
from lightning_haste.data import XMCDataModule, read_label_matrix
from lightning_haste.module import HasteXMCModule
from lightning_haste.prediction import read_predictions


class BowModel(HasteXMCModule, LightningModule):
    def __init__(self, **kw):
        super().__init__()
        self.configure_haste(**kw)


def _dm():
    return XMCDataModule.synthetic(seed=4, num_train=300, num_test=77, num_labels=90, num_features=24,
                                   batch_size=16)


def _fit():
    dm = _dm()
    model = BowModel(fan_in=8, group_size=8, head_ratio=0.1, grouping=None, k=(1, 3))
    Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0).fit(model, dm)
    return model, dm


def _expected(model, dm):
    model.eval()
    with torch.no_grad():
        scores, ids = model.output.topk(torch.from_numpy(dm.test_data.features), 3)
    return scores.numpy(), ids.numpy()


def test_writer_streams_the_top_k_in_row_order_to_npz_and_text(tmp_path, monkeypatch):
    monkeypatch.setattr(prediction, "_CHUNK_ROWS", 10)  # several chunks
    model, dm = _fit()
    writer = TopKPredictionWriter(tmp_path / "out" / "predictions.npz")
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer])
    assert trainer.predict(model, dm, return_predictions=False) is None
    scores, ids = _expected(model, dm)
    got_scores, got_ids = read_predictions(tmp_path / "out" / "predictions.npz")
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_array_equal(got_scores, scores)
    matrix = sp.load_npz(tmp_path / "out" / "predictions.npz")
    assert matrix.shape == (77, 90)
    text = read_label_matrix(tmp_path / "out" / "predictions.txt")
    assert text.shape == (77, 90)
    for row in range(77):
        assert set(text[row].indices) == set(ids[row])
    assert not (tmp_path / "out" / ".predictions.parts").exists()
    assert sorted(p.name for p in writer.written) == ["predictions.npz", "predictions.txt"]


def test_writer_under_ddp_writes_every_row_once_in_order(tmp_path):
    model, dm = _fit()
    writer = TopKPredictionWriter(tmp_path / "ddp", formats="npz")
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
                      callbacks=[writer])
    trainer.predict(model, dm, return_predictions=False)
    scores, ids = _expected(model, dm)
    got_scores, got_ids = read_predictions(tmp_path / "ddp.npz")
    assert got_ids.shape == (77, 3)  # 77 rows on 2 processes: the sampler repeats one, written once
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6, atol=1e-6)


def test_writer_validates_its_arguments():
    with pytest.raises(ValueError, match="formats"):
        TopKPredictionWriter("x", formats=("csv",))
    with pytest.raises(ValueError, match="formats"):
        TopKPredictionWriter("x", formats=())


class _Fixed(LightningModule):
    """A module whose predict_step returns the given (scores, ids) for every batch."""

    def __init__(self, scores, ids, num_labels=10):
        super().__init__()
        self.output = torch.nn.Module()
        self.output.num_labels = num_labels
        self.scores, self.ids = scores, ids

    def predict_step(self, batch, batch_idx):
        return self.scores, self.ids


def _predict(tmp_path, scores, ids, formats=prediction.FORMATS):
    data = torch.utils.data.DataLoader(torch.zeros(scores.shape[0], 1), batch_size=scores.shape[0])
    writer = TopKPredictionWriter(tmp_path / "p", formats=formats)
    Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer]).predict(
        _Fixed(scores, ids), data, return_predictions=False)
    return writer


@pytest.mark.parametrize("ids, error, match", [
    (torch.tensor([[3, 10]]), ValueError, r"\[0, 10\)"),
    (torch.tensor([[3, -1]]), ValueError, r"\[0, 10\)"),
    (torch.tensor([[3.7, 1.0]]), TypeError, "integers"),
    (torch.tensor([[True, False]]), TypeError, "integers"),
    (torch.tensor([[4, 4]]), ValueError, "distinct"),
    (torch.zeros(1, 0, dtype=torch.long), ValueError, "k >= 1"),
    (torch.tensor([[1, 2, 3]]), ValueError, "one shape"),
])
def test_writer_rejects_ids_that_would_make_a_corrupt_matrix(tmp_path, ids, error, match):
    scores = torch.randn(1, 2) if ids.shape != (1, 0) else torch.zeros(1, 0)
    with pytest.raises(error, match=match):
        _predict(tmp_path, scores, ids)
    assert not (tmp_path / "p.npz").exists() and not (tmp_path / "p.txt").exists()


class _TwoLoaders(_Fixed):
    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        return self.scores, self.ids


def test_writer_refuses_a_second_dataloader_and_a_module_without_an_output(tmp_path):
    # a second loader's rows (numbered from 0 again) would overwrite the first's; without output.num_labels the
    # ids cannot be checked: both refused before anything is written
    scores, ids = torch.randn(2, 2), torch.tensor([[0, 1], [2, 3]])
    loaders = [torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=2) for _ in range(2)]
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                      callbacks=[TopKPredictionWriter(tmp_path / "p")])
    with pytest.raises(ValueError, match="dataloader 1"):
        trainer.predict(_TwoLoaders(scores, ids), loaders, return_predictions=False)
    plain = _Fixed(scores, ids)
    del plain.output
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                      callbacks=[TopKPredictionWriter(tmp_path / "q")])
    with pytest.raises(TypeError, match="output.num_labels"):
        trainer.predict(plain, loaders[0], return_predictions=False)
    assert not any(tmp_path.glob("*.npz")) and not (tmp_path / ".q.parts").exists()


def test_writer_rejects_integer_scores(tmp_path):
    with pytest.raises(TypeError, match="floating"):
        _predict(tmp_path, torch.tensor([[2, 1]]), torch.tensor([[0, 1]]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_writer_keeps_every_score_exactly_in_both_formats(tmp_path, dtype):
    generator = torch.Generator().manual_seed(11)
    scores = (torch.randn(6, 4, dtype=torch.float64, generator=generator) * 1e3).to(dtype)
    scores = scores.sort(dim=1, descending=True).values
    scores[0, 0] = 1e300 if dtype == torch.float64 else scores[0, 0]  # beyond float32: kept in float64
    ids = torch.stack([torch.randperm(10, generator=generator)[:4] for _ in range(6)])
    _predict(tmp_path, scores, ids)
    expected = scores.to(torch.float64).numpy()
    got_scores, got_ids = read_predictions(tmp_path / "p.npz")
    assert got_scores.dtype == (np.float64 if dtype == torch.float64 else np.float32)
    np.testing.assert_array_equal(got_ids, ids.numpy())
    np.testing.assert_array_equal(got_scores.astype(np.float64), expected)
    lines = (tmp_path / "p.txt").read_text().splitlines()
    assert lines[0] == "6 10"
    for row, line in enumerate(lines[1:]):
        pairs = [pair.split(":") for pair in line.split()]
        assert [int(i) for i, _ in pairs] == ids[row].tolist()
        text_scores = np.array([float(v) for _, v in pairs])
        if dtype != torch.float64:
            text_scores = text_scores.astype(np.float32).astype(np.float64)
        np.testing.assert_array_equal(text_scores, expected[row])


def test_read_predictions_takes_the_writers_path_and_either_format(tmp_path):
    generator = torch.Generator().manual_seed(12)
    scores = torch.randn(5, 3, generator=generator).sort(dim=1, descending=True).values
    ids = torch.stack([torch.randperm(10, generator=generator)[:3] for _ in range(5)])
    _predict(tmp_path, scores, ids)
    for path in (tmp_path / "p", tmp_path / "p.npz", tmp_path / "p.txt"):
        got_scores, got_ids = read_predictions(path)  # the order of topk: (scores, ids)
        np.testing.assert_array_equal(got_ids, ids.numpy())
        np.testing.assert_array_equal(got_scores.astype(np.float32), scores.numpy())
    (tmp_path / "p.npz").unlink()
    np.testing.assert_array_equal(read_predictions(tmp_path / "p")[1], ids.numpy())  # the .txt, then
    with pytest.raises(FileNotFoundError, match="neither"):
        read_predictions(tmp_path / "q")
    (tmp_path / "bad.txt").write_text("2 10\n1:0.5\n3:x\n")
    with pytest.raises(ValueError, match="bad.txt:3"):
        read_predictions(tmp_path / "bad.txt")


def test_writer_appends_its_suffixes_to_a_dotted_path(tmp_path):
    scores, ids = torch.tensor([[2.0, 1.0]]), torch.tensor([[3, 4]])
    data = torch.utils.data.DataLoader(torch.zeros(1, 1), batch_size=1)
    for name in ("model.best", "model.last"):  # two writers that must not overwrite each other's files
        writer = TopKPredictionWriter(tmp_path / name, formats="npz")
        Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[writer]).predict(
            _Fixed(scores, ids), data, return_predictions=False)
        assert [p.name for p in writer.written] == [f"{name}.npz"]
        np.testing.assert_array_equal(read_predictions(tmp_path / name)[1], ids.numpy())
