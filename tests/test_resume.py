"""Exact resume: a fit stopped at any step and resumed from its checkpoint continues as the uninterrupted run."""

import pickle
from types import SimpleNamespace

import pytest
import torch
from fit_helpers import StopAt
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DistributedSampler, IterableDataset, SequentialSampler

import lightning_haste as lh
from lightning_haste.data import ResumableDataLoader, XMCDataModule
from lightning_haste.module import HasteXMCModule

MAX_STEPS = 22  # 540 training rows in batches of 64: 9 batches an epoch, so the runs cross two epoch ends


class EncoderModel(HasteXMCModule, LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)  # the encoder's initial weights: the same in every run
        self.encoder = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        self.configure_haste(in_features=32, fan_in=16, group_size=8, head_ratio=0.1, grouping="random")

    def encode(self, batch):
        return self.encoder(batch["features"])


class RecordBatches(Callback):
    def __init__(self):
        self.rows = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rows.append(batch["index"].tolist())


class Crash(RuntimeError):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            raise Crash(f"crashed after step {trainer.global_step}")


def _dm():
    return XMCDataModule.synthetic(seed=3, num_train=600, num_test=150, num_labels=300, num_features=64,
                                   batch_size=64, shuffle=True)


def _regrowth():
    return lh.SparseRegrowthCallback(interval=3, prune_fraction=0.3, end=0.9, seed=5, log=False)


def _fit(model, callbacks, checkpointing=False, bounds=None, **kw):
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=checkpointing,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=callbacks, **(bounds or {"max_steps": MAX_STEPS}))
    trainer.fit(model, _dm(), **kw)
    return trainer


@pytest.fixture(scope="module")
def uninterrupted():
    model, batches, regrowth = EncoderModel(), RecordBatches(), _regrowth()
    _fit(model, [regrowth, batches])
    assert regrowth.rewires >= 5
    return model, batches.rows


@pytest.mark.parametrize("how,step", [
    ("should_stop", 5),  # mid-epoch, then trainer.save_checkpoint after fit returned
    ("should_stop", 9),  # the last batch of the first epoch
    ("crash", 13),  # ModelCheckpoint every step of the second epoch's middle, then the process dies
])
def test_a_resumed_fit_ends_bit_identical_to_the_uninterrupted_one(tmp_path, uninterrupted, how, step):
    straight, straight_rows = uninterrupted
    first, first_rows = EncoderModel(), RecordBatches()
    if how == "should_stop":
        trainer = _fit(first, [_regrowth(), first_rows, StopAt(step)])
        assert trainer.global_step == step
        path = tmp_path / "stopped.ckpt"
        trainer.save_checkpoint(path)
    else:
        saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
        with pytest.raises(Crash):
            _fit(first, [_regrowth(), first_rows, saver, CrashAt(step + 2)], checkpointing=True)
        path = next(tmp_path.glob(f"*step={step}.ckpt"))
        first_rows.rows = first_rows.rows[:step]  # the batches after the checkpoint are lost with the crash
    torch.manual_seed(123)  # nothing of the continuation may depend on the global random state
    resumed, resumed_rows, regrowth = EncoderModel(), RecordBatches(), _regrowth()
    _fit(resumed, [regrowth, resumed_rows], ckpt_path=path)
    assert first_rows.rows + resumed_rows.rows == straight_rows  # the same batches, in the same order
    expected, got = straight.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for name in expected:  # every parameter and buffer, the group index included, bit for bit
        assert torch.equal(expected[name], got[name]), name
    assert regrowth.last_rewire_step == MAX_STEPS - MAX_STEPS % 3


def _batches(loader, count):
    out = []
    while len(out) < count:
        for batch in loader:
            out.append(batch.tolist())
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("workers", [0, 1])
def test_resumable_loader_continues_from_its_state_dict(workers):
    data = list(range(50))  # 7 batches of 8, the last one short

    def make():
        sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=11)
        return ResumableDataLoader(data, batch_size=8, sampler=sampler, num_workers=workers,
                                   persistent_workers=workers > 0)

    straight = _batches(make(), 3 * 7)
    assert straight[:7] != straight[7:14]  # epochs differ
    assert sorted(sum(straight[7:14], [])) == data  # and each is a permutation
    for stop in (3, 7, 10, 20):
        loader = make()
        head = _batches(loader, stop)
        state = loader.state_dict()
        assert state == {"epoch": (stop - 1) // 7, "batches": stop - 7 * ((stop - 1) // 7)}
        fresh = make()
        fresh.load_state_dict(state)
        assert head + _batches(fresh, 3 * 7 - stop) == straight


def test_resumable_loader_skips_without_collating_and_continues_a_left_epoch():
    collated = []

    def collate(rows):
        collated.append(list(rows))
        return torch.tensor(rows)

    loader = ResumableDataLoader(list(range(20)), batch_size=4, sampler=SequentialSampler(range(20)),
                                 collate_fn=collate)
    loader.load_state_dict({"epoch": 0, "batches": 3})
    assert [b.tolist() for b in loader] == [[12, 13, 14, 15], [16, 17, 18, 19]]
    assert collated == [[12, 13, 14, 15], [16, 17, 18, 19]]  # the skipped batches were never read
    first = next(iter(loader))  # a new epoch; left after one batch ...
    assert first.tolist() == [0, 1, 2, 3] and loader.state_dict() == {"epoch": 1, "batches": 1}
    assert next(iter(loader)).tolist() == [4, 5, 6, 7]  # ... and continued by the next iteration
    assert len(loader) == 5


def test_a_pickled_loader_resumes_where_it_was():
    loader = ResumableDataLoader(list(range(20)), batch_size=4, shuffle=False)
    iterator = iter(loader)
    next(iterator), next(iterator)
    copy = pickle.loads(pickle.dumps(loader))  # as DDP spawn does with what the trainer holds
    assert [b.tolist() for b in copy] == [[8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    assert [b.tolist() for b in iterator] == [[8, 9, 10, 11], [12, 13, 14, 15], [16, 17, 18, 19]]
    done = pickle.loads(pickle.dumps(loader))  # after the epoch's last batch: the next epoch
    assert done.state_dict() == {"epoch": 1, "batches": 0}


def test_resumable_loader_rejects_what_it_cannot_resume():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="map-style"):
        ResumableDataLoader(Stream())
    with pytest.raises(ValueError, match="first_epoch"):
        ResumableDataLoader([1, 2], first_epoch=-1)
    loader = ResumableDataLoader([1, 2, 3])
    for state in ({"batches": 1}, {"epoch": "x", "batches": 1}, None):
        with pytest.raises(ValueError, match="not a ResumableDataLoader state"):
            loader.load_state_dict(state)
    with pytest.raises(ValueError, match="expected >= 0"):
        loader.load_state_dict({"epoch": 0, "batches": -1})


def test_the_datamodule_order_is_seeded(monkeypatch):
    def order(dm):
        return [b["index"].tolist() for b in dm.train_dataloader()]

    dm = _dm()
    assert order(dm) == order(_dm())
    assert order(XMCDataModule(dm.train_data, val_fraction=0, batch_size=64, shuffle_seed=1)) != order(
        XMCDataModule(dm.train_data, val_fraction=0, batch_size=64, shuffle_seed=2))
    monkeypatch.setenv("PL_GLOBAL_SEED", "2")  # lightning.seed_everything(2)
    assert order(XMCDataModule(dm.train_data, val_fraction=0, batch_size=64)) == order(
        XMCDataModule(dm.train_data, val_fraction=0, batch_size=64, shuffle_seed=2))
    unshuffled = XMCDataModule(dm.train_data, val_fraction=0, batch_size=64, shuffle=False)
    assert sum(order(unshuffled), []) == list(range(len(dm.train_data)))
    with pytest.raises(TypeError, match="shuffle_seed"):
        XMCDataModule(dm.train_data, shuffle_seed=1.5)


def test_the_datamodule_deals_each_epoch_out_to_the_ddp_processes():
    dm = _dm()
    shares = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, current_epoch=0)
        loader = dm.train_dataloader()
        assert isinstance(loader.sampler, DistributedSampler)  # Lightning keeps it (no second sampler around it)
        shares.append(sum((b["index"].tolist() for b in loader), []))
    assert len(shares[0]) == len(shares[1]) == len(dm.train_data) // 2
    assert sorted(shares[0] + shares[1]) == list(range(len(dm.train_data)))


@pytest.mark.parametrize("bounds", [{"max_epochs": 3}, {"max_epochs": 10, "max_steps": MAX_STEPS}])
def test_a_fit_bounded_by_epochs_resumes_mid_epoch_bit_identical(tmp_path, bounds):
    # With max_epochs, Lightning counts the training steps (for the learning-rate schedule) by building the
    # training loader: built before the checkpoint's loop state is restored, the loader would start the resumed
    # epoch over (more batches of it, a shorter fit).
    straight, straight_rows = EncoderModel(), RecordBatches()
    _fit(straight, [_regrowth(), straight_rows], bounds=bounds)
    first, first_rows = EncoderModel(), RecordBatches()
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=-1)
    with pytest.raises(Crash):
        _fit(first, [_regrowth(), first_rows, saver, CrashAt(6)], checkpointing=True, bounds=bounds)
    path = next(tmp_path.glob("*step=4.ckpt"))
    resumed, resumed_rows = EncoderModel(), RecordBatches()
    _fit(resumed, [_regrowth(), resumed_rows], bounds=bounds, ckpt_path=path)
    assert first_rows.rows[:4] + resumed_rows.rows == straight_rows.rows
    expected, got = straight.state_dict(), resumed.state_dict()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
