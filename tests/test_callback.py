import math

import pytest
import torch
from fit_helpers import StopAt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import TensorDataset

import lightning_haste as lh
from lightning_haste.callbacks import prune_fraction_at
from lightning_haste.data import ResumableDataLoader


class Tiny(LightningModule):
    def __init__(self, sparse: bool = True, lr: float = 0.1):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layer = lh.GroupSharedFanIn(24, 30, 8, 4, generator=gen) if sparse else torch.nn.Linear(24, 30)
        self.lr = lr
        data = torch.Generator().manual_seed(1)
        self.x = torch.randn(96, 24, generator=data)
        self.y = torch.randn(96, 30, generator=data)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self):
        # resumable: a checkpoint taken mid-epoch continues at the next batch
        return ResumableDataLoader(TensorDataset(self.x, self.y), batch_size=8, shuffle=False)


def _trainer(callbacks, max_steps, **kw):
    kw.setdefault("logger", False)
    checkpointing = any(type(c).__name__ == "ModelCheckpoint" for c in callbacks)
    return Trainer(
        max_steps=max_steps, accelerator="cpu", devices=kw.pop("devices", 1), enable_checkpointing=checkpointing,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw,
    )


def test_schedule_values():
    assert prune_fraction_at(0, 100, 0.2, "cosine") == pytest.approx(0.2)
    assert prune_fraction_at(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert prune_fraction_at(25, 100, 0.2, "cosine") == pytest.approx(0.1 * (1 + math.cos(math.pi / 4)))
    assert prune_fraction_at(25, 100, 0.2, "linear") == pytest.approx(0.15)
    assert prune_fraction_at(99, 100, 0.2, "constant") == pytest.approx(0.2)
    assert prune_fraction_at(100, 100, 0.2, "constant") == 0.0
    with pytest.raises(ValueError, match="schedule"):
        prune_fraction_at(1, 10, 0.2, "exp")


def _record_rewires(module):
    calls = []
    original = module.layer.rewire

    def spy(fraction, **kw):
        stats = original(fraction, **kw)
        calls.append((fraction, stats))
        return stats

    module.layer.rewire = spy
    return calls


@pytest.mark.parametrize("accumulate", [1, 3])
def test_rewires_every_interval_until_end_counting_optimizer_steps(accumulate):
    module = Tiny()
    calls = _record_rewires(module)
    callback = lh.SparseRegrowthCallback(interval=4, prune_fraction=0.5, end=0.6, schedule="linear", log=False)
    _trainer([callback], max_steps=30, accumulate_grad_batches=accumulate).fit(module)
    # end = 0.6 * 30 = 18: rewires at optimizer steps 4, 8, 12, 16
    expected = [prune_fraction_at(s, 18.0, 0.5, "linear") for s in (4, 8, 12, 16)]
    assert [c[0] for c in calls] == pytest.approx(expected)
    assert callback.rewires == 4 and callback.last_rewire_step == 28
    for fraction, stats in calls:  # changed slots per group follow the schedule
        assert torch.all(stats.regrown.sum(dim=1) == math.floor(fraction * 8 + 1e-9))
    assert all(len(set(r)) == 8 for r in module.layer.group_index.tolist())


def test_optimizer_state_reset_at_regrown_weights():
    module = Tiny()
    calls = _record_rewires(module)
    states = []

    class Peek(Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if calls and len(states) < len(calls):
                states.append(trainer.optimizers[0].state[pl_module.layer.weight]["momentum_buffer"].clone())

    callback = lh.SparseRegrowthCallback(interval=5, prune_fraction=0.5, end=1.0, log=False)
    _trainer([callback, Peek()], max_steps=12).fit(module)
    assert len(calls) == 2 and len(states) == 2
    for (_, stats), momentum in zip(calls, states, strict=True):
        mask = lh.dst.regrown_weight_mask(module.layer, stats.regrown)
        assert torch.all(momentum[mask] == 0) and torch.count_nonzero(momentum[~mask][:100]) > 0


def test_no_sparse_layer_warns_and_does_nothing():
    with pytest.warns(UserWarning, match="no GroupSharedFanIn"):
        _trainer([lh.SparseRegrowthCallback(interval=2, log=False)], max_steps=4).fit(Tiny(sparse=False))


def test_logs_statistics():
    module = Tiny()
    callback = lh.SparseRegrowthCallback(interval=3, prune_fraction=0.5, end=1.0, schedule="constant")
    trainer = _trainer([callback], max_steps=7, logger=False)
    trainer.fit(module)
    assert "dst/layer/pruned_slots" in trainer.callback_metrics
    assert float(trainer.callback_metrics["dst/layer/changed_fraction"]) == pytest.approx(0.5)
    assert float(trainer.callback_metrics["dst/layer/pruned_slots"]) == 4 * module.layer.num_groups


def test_resume_from_checkpoint_is_identical_to_an_uninterrupted_run(tmp_path):
    make = lambda: lh.SparseRegrowthCallback(interval=4, prune_fraction=0.4, end=0.8, seed=7, log=False)  # noqa: E731
    straight = Tiny()
    _trainer([make()], max_steps=24).fit(straight)

    # An interrupted run: checkpointed at step 8, mid-epoch (12 batches an epoch) and a rewire step too, so the saved
    # state is post-rewire; stopped at 13, resumed from the checkpoint.
    first = Tiny()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=8, save_top_k=-1)
    trainer = _trainer([make(), saver, StopAt(13)], max_steps=24)
    trainer.fit(first)
    ckpt = next(tmp_path.glob("*step=8.ckpt"))
    resumed = Tiny()
    callback = make()
    _trainer([callback], max_steps=24).fit(resumed, ckpt_path=ckpt)
    assert callback.rewires == 4  # steps 4, 8 before the checkpoint, 12, 16 after (end 19.2)
    assert callback.last_rewire_step == 24  # the last interval step it considered (past end: no rewire)
    assert torch.equal(resumed.layer.group_index, straight.layer.group_index)
    assert torch.equal(resumed.layer.weight, straight.layer.weight)
    assert torch.equal(resumed.layer.bias, straight.layer.bias)
    assert not torch.equal(straight.layer.group_index, Tiny().layer.group_index)


class SaveOnEnd(Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        torch.save(
            {"index": pl_module.layer.group_index.clone(), "weight": pl_module.layer.weight.detach().clone()},
            f"{self.folder}/rank{trainer.global_rank}.pt",
        )

    def teardown(self, trainer, pl_module, stage):
        # Shut gloo down before the spawned worker exits: left to interpreter exit, its background thread is
        # sometimes destroyed unjoined ("terminate called without an active exception", SIGABRT).
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_ddp_ranks_end_with_identical_topology_and_weights(tmp_path):
    module = Tiny()
    callback = lh.SparseRegrowthCallback(interval=2, prune_fraction=0.5, end=1.0, log=False)
    trainer = _trainer([callback, SaveOnEnd(str(tmp_path))], max_steps=8, devices=2, strategy="ddp_spawn")
    trainer.fit(module)
    rank0 = torch.load(tmp_path / "rank0.pt")
    rank1 = torch.load(tmp_path / "rank1.pt")
    assert torch.equal(rank0["index"], rank1["index"])
    assert torch.equal(rank0["weight"], rank1["weight"])
    assert not torch.equal(rank0["index"], Tiny().layer.group_index)  # it did rewire


def test_bad_arguments():
    for kw, match in [
        (dict(interval=0), "interval"), (dict(prune_fraction=1.5), "prune_fraction"), (dict(end=2.0), "end"),
        (dict(schedule="step"), "schedule"), (dict(score="median"), "score"), (dict(init="normal"), "init"),
    ]:
        with pytest.raises(ValueError, match=match):
            lh.SparseRegrowthCallback(**kw)


def test_max_epochs_sets_the_schedule_length():
    module = Tiny()
    calls = _record_rewires(module)
    callback = lh.SparseRegrowthCallback(interval=6, prune_fraction=0.5, end=0.5, schedule="linear", log=False)
    trainer = Trainer(
        max_epochs=4, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )
    trainer.fit(module)
    # 4 epochs x 12 batches = 48 steps; end = 24: rewires at steps 6, 12, 18
    assert [c[0] for c in calls] == pytest.approx([prune_fraction_at(s, 24.0, 0.5, "linear") for s in (6, 12, 18)])


class TwoLayers(Tiny):
    def __init__(self, in_features=24, fan_in=8):
        super().__init__()
        gen = torch.Generator().manual_seed(2)
        self.layer = lh.GroupSharedFanIn(24, 30, 8, 4, generator=gen)
        self.second = lh.GroupSharedFanIn(in_features, 30, fan_in, 4, generator=gen)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x) + self.second(x[:, : self.second.in_features]), y)


class CorruptBefore(Callback):
    """Edits the second layer's index through .data (no version bump) just before the step-4 rewire."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == 4:
            self.before = pl_module.layer.group_index.clone()
            pl_module.second.group_index.data[0, 0] = 999


def test_a_rewire_step_checks_every_layer_before_changing_any():
    module = TwoLayers()
    corrupt = CorruptBefore()
    callback = lh.SparseRegrowthCallback(interval=4, prune_fraction=0.5, end=1.0, log=False)
    with pytest.raises(ValueError, match=r"entries must lie in \[0, 24\)"):
        _trainer([corrupt, callback], max_steps=8).fit(module)
    assert torch.equal(module.layer.group_index, corrupt.before) and callback.rewires == 0
    # a prune fraction that cannot fit outside a group of some layer fails when the fit starts
    with pytest.raises(ValueError, match="prunes 4 slots per group of layer 'second', but only 2 features"):
        _trainer([lh.SparseRegrowthCallback(interval=4, prune_fraction=0.5, log=False)], max_steps=8).fit(
            TwoLayers(in_features=10, fan_in=8))
