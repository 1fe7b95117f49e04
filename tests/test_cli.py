"""The console script and the examples run as a user runs them (subprocesses, small sizes)."""

import subprocess
import sys
from pathlib import Path

import numpy as np

from lightning_haste.data import read_label_matrix, synthetic_xmc, write_bow
from lightning_haste.prediction import read_predictions

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd):
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_cli_fits_and_tests_with_the_shipped_config(tmp_path):
    config = ROOT / "examples" / "configs" / "synthetic.yaml"
    small = ["--trainer.max_steps=12", "--trainer.val_check_interval=6", "--trainer.enable_progress_bar=false",
             "--data.init_args.num_train=400", "--data.init_args.num_test=100", "--data.init_args.num_labels=200",
             "--data.init_args.num_features=64", "--data.init_args.batch_size=32", "--model.hidden=32",
             "--model.fan_in=16", f"--trainer.default_root_dir={tmp_path}"]
    out = _run(["-m", "lightning_haste.cli", "fit", f"--config={config}", *small], tmp_path)
    assert "final validation metrics (step 12):" in out and "P@1" in out
    stale = [a if a != "--trainer.val_check_interval=6" else "--trainer.val_check_interval=5" for a in small]
    out = _run(["-m", "lightning_haste.cli", "fit", f"--config={config}", *stale,
                f"--trainer.default_root_dir={tmp_path / 'stale'}"], tmp_path)
    assert "final validation metrics (validated at step 10; training ended at 12):" in out
    ckpt = next(tmp_path.rglob("*.ckpt"))
    _run(["-m", "lightning_haste.cli", "test", f"--config={config}", *small, f"--ckpt_path={ckpt}"], tmp_path)
    out = _run(["-m", "lightning_haste.cli", "predict", f"--config={config}", *small, f"--ckpt_path={ckpt}",
                f"--predictions={tmp_path / 'pred'}"], tmp_path)
    assert "pred.npz" in out
    scores, ids = read_predictions(tmp_path / "pred.npz")
    assert ids.shape == (100, 5) and (np.diff(scores, axis=1) <= 0).all()
    assert read_label_matrix(tmp_path / "pred.txt").shape == (100, 200)


def test_train_bow_example_on_written_files(tmp_path):
    train, test = synthetic_xmc(300, 80, 120, 40, seed=5)
    write_bow(tmp_path / "train.txt", train)
    write_bow(tmp_path / "test.txt", test)
    (tmp_path / "filter_labels_test.txt").write_text(f"0 {test.labels[0].indices[0]}\n")
    out = _run([str(ROOT / "examples" / "train_bow.py"), str(tmp_path), "--steps", "10", "--fan-in", "8",
                "--group-size", "8", "--accelerator", "cpu"], tmp_path)
    assert "P@1=" in out and "PSP@5=" in out


def test_cli_reports_bad_data_in_one_line(tmp_path):
    config = ROOT / "examples" / "configs" / "bow.yaml"
    result = subprocess.run([sys.executable, "-m", "lightning_haste.cli", "fit", f"--config={config}",
                             f"--data.init_args.directory={tmp_path / 'missing'}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1
    assert "haste-xmc: data directory" in result.stderr and "Traceback" not in result.stderr
    (tmp_path / "bad").mkdir()
    for name in ("train.txt", "test.txt"):
        (tmp_path / "bad" / name).write_text("1 4 3\n0 1:nan\n")
    result = subprocess.run([sys.executable, "-m", "lightning_haste.cli", "fit", f"--config={config}",
                             f"--data.init_args.directory={tmp_path / 'bad'}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "train.txt:2: feature 1 has a non-finite value" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_predict_streams_without_lightning_keeping_every_batch(tmp_path, monkeypatch):
    # the writer streams the top-k to disk; Lightning's return_predictions (on by default in one process) would keep
    # every batch's predictions in memory besides
    from lightning_haste import prediction  # noqa: PLC0415
    from lightning_haste.cli import main  # noqa: PLC0415

    held = []
    original = prediction.TopKPredictionWriter.on_predict_epoch_end

    def spy(self, trainer, pl_module):
        held.append((trainer.predict_loop.return_predictions, sum(len(p) for p in trainer.predict_loop._predictions)))
        return original(self, trainer, pl_module)

    monkeypatch.setattr(prediction.TopKPredictionWriter, "on_predict_epoch_end", spy)
    config = ROOT / "examples" / "configs" / "synthetic.yaml"
    main(["predict", f"--config={config}", "--trainer.enable_progress_bar=false", "--data.init_args.num_train=200",
          "--data.init_args.num_test=50", "--data.init_args.num_labels=100", "--data.init_args.num_features=32",
          "--model.hidden=16", "--model.fan_in=8", f"--trainer.default_root_dir={tmp_path}",
          f"--predictions={tmp_path / 'pred'}"])
    assert held == [(False, 0)]
    assert read_predictions(tmp_path / "pred.npz")[1].shape == (50, 5)
