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
    got_ids, got_scores = read_predictions(tmp_path / "out" / "predictions.npz")
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
    got_ids, got_scores = read_predictions(tmp_path / "ddp.npz")
    assert got_ids.shape == (77, 3)  # 77 rows on 2 processes: the sampler repeats one, written once
    np.testing.assert_array_equal(got_ids, ids)
    np.testing.assert_allclose(got_scores, scores, rtol=1e-6, atol=1e-6)


def test_writer_validates_its_arguments():
    with pytest.raises(ValueError, match="formats"):
        TopKPredictionWriter("x", formats=("csv",))
    with pytest.raises(ValueError, match="formats"):
        TopKPredictionWriter("x", formats=())
