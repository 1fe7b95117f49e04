"""The label-sharded output layer (CPU, gloo): on N ranks it computes what the whole layer computes on one."""

import atexit
import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_haste as lh
from lightning_haste import dst
from lightning_haste.data import XMCDataModule, synthetic_xmc
from lightning_haste.metrics import NDCGAtK, PrecisionAtK
from lightning_haste.module import HasteXMCModule
from lightning_haste.sharded import ShardedHeadTailOutput, merge_topk, partition_labels, shard_output

TOL = dict(rtol=1e-12, atol=1e-12)
IN_FEATURES = 24


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _whole_layer(seed: int, num_labels: int = 203, dtype=torch.float64, **kw) -> lh.HeadTailOutput:
    freq = np.random.default_rng(seed).integers(0, 60, num_labels)
    kw = {"head_ratio": 0.2, "fan_in": 6, "group_size": 4, **kw}
    layer = lh.HeadTailOutput(IN_FEATURES, freq, generator=torch.Generator().manual_seed(seed), dtype=dtype, **kw)
    with torch.no_grad():  # biases and weights of every size, so that no two scores tie
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=dtype))
        layer.tail.zero_padding_()
    return layer


def _batch(seed: int, rows: int, num_labels: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, IN_FEATURES, generator=gen, dtype=torch.float64)
    targets = [torch.randperm(num_labels, generator=gen)[: int(torch.randint(0, 6, (1,), generator=gen))]
               for _ in range(rows)]
    return x, targets


def _rows_per_rank(world: int) -> list[int]:
    return [3 + 2 * r for r in range(world)]  # unequal row counts: the collectives pad


def _perturb_(layer, step: int) -> None:
    """A deterministic change of the whole layer's tail weights between rewires (stands in for training)."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1000 + step)
        layer.weight.add_(torch.randn(layer.weight.shape, generator=gen, dtype=layer.weight.dtype))
        layer.zero_padding_()


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        _check_rank(rank, world, folder)
    finally:
        dist.destroy_process_group()


def _check_rank(rank: int, world: int, folder: str) -> None:
    whole = _whole_layer(7)
    sharded = shard_output(whole)
    counts = _rows_per_rank(world)
    x, targets = _batch(11, sum(counts), whole.num_labels)
    r0, r1 = sum(counts[:rank]), sum(counts[: rank + 1])

    # loss, dX and every gradient, both reductions and both losses
    for loss, reduction in (("bce", "sum"), ("squared_hinge", "batchmean")):
        whole.zero_grad()
        sharded.zero_grad()
        x_all = x.clone().requires_grad_(True)
        expected = whole.loss(x_all, targets, loss=loss, reduction=reduction)
        expected.backward()
        x_mine = x[r0:r1].clone().requires_grad_(True)
        got = sharded.loss(x_mine, targets[r0:r1], loss=loss, reduction=reduction)
        got.backward()
        torch.testing.assert_close(got, expected, **TOL)
        torch.testing.assert_close(x_mine.grad, x_all.grad[r0:r1], **TOL)
        part = sharded.partition
        for name in ("head.weight", "head.bias", "tail.weight", "tail.bias"):
            a, b = part.rows(name, rank)
            grad = sharded.shard.get_parameter(name).grad
            torch.testing.assert_close(grad, whole.get_parameter(name).grad[a:b], **TOL)
        # the compensation of DDP's average multiplies the input gradient by the world size, nothing else
        x_mine.grad = None
        sharded.loss(x_mine, targets[r0:r1], loss=loss, reduction=reduction, compensate_ddp_average=True).backward()
        torch.testing.assert_close(x_mine.grad, world * x_all.grad[r0:r1], **TOL)

    # top-k and the full logits
    with torch.no_grad():
        expected_scores, expected_ids = whole.topk(x, 7)
        scores, ids = sharded.topk(x[r0:r1], 7)
        assert torch.equal(ids, expected_ids[r0:r1])
        torch.testing.assert_close(scores, expected_scores[r0:r1], **TOL)
    x_mine = x[r0:r1].clone().requires_grad_(True)
    logits = sharded(x_mine)
    torch.testing.assert_close(logits, whole(x[r0:r1]), **TOL)

    # the logits of some labels (head and tail, every rank's, in any order, one repeated): values and gradients
    labels = torch.tensor([whole.num_labels - 1, 0, 17, 3, 17, 40, 2, whole.num_labels // 2])
    weights = torch.randn(x.shape[0], labels.numel(), generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    whole.zero_grad()
    sharded.zero_grad()
    x_all = x.clone().requires_grad_(True)
    expected = whole.logits_for(x_all, labels)
    (expected * weights).sum().backward()  # the sum of every rank's loss
    x_mine = x[r0:r1].clone().requires_grad_(True)
    got = sharded.logits_for(x_mine, labels.tolist())
    torch.testing.assert_close(got, expected[r0:r1].detach(), **TOL)
    (got * weights[r0:r1]).sum().backward()  # this rank's loss
    torch.testing.assert_close(x_mine.grad, x_all.grad[r0:r1], **TOL)
    for name in ("head.weight", "head.bias", "tail.weight", "tail.bias"):
        a, b = sharded.partition.rows(name, rank)
        param = sharded.shard.get_parameter(name)
        grad = param.grad if param.grad is not None else torch.zeros_like(param)  # none of its labels: no gradient
        torch.testing.assert_close(grad, whole.get_parameter(name).grad[a:b], **TOL)
    assert sharded.logits_for(x[r0:r1], []).shape == (r1 - r0, 0)
    with pytest.raises(ValueError, match="same labels on every rank"):
        sharded.logits_for(x[r0:r1], [rank])
    with pytest.raises(ValueError, match="lie in"):
        sharded.logits_for(x[r0:r1], [whole.num_labels])

    # rewiring: the shards' topology and weights after several keyed rewires are the whole layer's
    reference = copy.deepcopy(whole)
    for step in range(1, 4):
        _perturb_(reference.tail, step)
        reference.tail.rewire(0.5, seed=step, init="uniform", init_scale=0.1)
        with torch.no_grad():  # the same perturbation, this rank's rows of it
            gen = torch.Generator().manual_seed(1000 + step)
            noise = torch.randn(reference.tail.weight.shape, generator=gen, dtype=torch.float64)
            a, b = sharded.partition.rows("tail.weight", rank)
            sharded.shard.tail.weight.add_(noise[a:b])
            sharded.shard.tail.zero_padding_()
        sharded.shard.tail.rewire(0.5, seed=step, init="uniform", init_scale=0.1)
    state = sharded.state_dict()
    expected_state = reference.state_dict()
    assert sorted(state) == sorted(expected_state)
    for key, value in expected_state.items():
        assert torch.equal(state[key], value), key

    # an optimizer's state dict holds the whole layer's state; it loads back on this rank's slice
    optimizer = torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9)
    sharded.attach_optimizer(optimizer)
    sharded.zero_grad()
    sharded.loss(x[r0:r1], targets[r0:r1]).backward()
    optimizer.step()
    saved = optimizer.state_dict()
    shapes = {tuple(v["momentum_buffer"].shape) for v in saved["state"].values()}
    assert shapes == {tuple(v.shape) for v in whole.state_dict().values() if v.is_floating_point()}
    fresh = torch.optim.SGD(sharded.parameters(), lr=0.1, momentum=0.9)
    sharded.attach_optimizer(fresh)
    fresh.load_state_dict(saved)
    for param in sharded.parameters():
        assert torch.equal(fresh.state[param]["momentum_buffer"], optimizer.state[param]["momentum_buffer"])

    # a checkpoint written here loads into the whole layer on one process
    if rank == 0:
        torch.save(state, os.path.join(folder, "layer.pt"))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_layer_equals_the_whole_layer(world, tmp_path):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    # the whole layer, rewired on one process the same way, equals what the ranks saved
    whole = _whole_layer(7)
    loaded = lh.HeadTailOutput.from_config(whole.config(), dtype=torch.float64)
    loaded.load_state_dict(torch.load(tmp_path / "layer.pt"))
    x, _ = _batch(12, 9, whole.num_labels)
    scores, ids = loaded.topk(x, 5)
    assert ids.shape == (9, 5) and torch.isfinite(scores).all()


# ------------------------------------------------------------------------------------------------
# Single-process parts.
def test_partition_whole_groups_and_errors():
    part = partition_labels(num_head=44, num_tail=159, group_size=4, world_size=3)
    assert part.head_bounds == (0, 12, 28, 44)
    assert part.group_bounds == (0, 13, 26, 40)
    assert [part.num_labels(r) for r in range(3)] == [64, 68, 71]
    assert np.array_equal(np.sort(np.concatenate([part.positions(r) for r in range(3)])), np.arange(203))
    with pytest.raises(ValueError, match="tail has 2 groups, fewer than the 3 ranks"):
        partition_labels(num_head=40, num_tail=8, group_size=4, world_size=3)
    with pytest.raises(ValueError, match="head has 1 blocks"):
        partition_labels(num_head=4, num_tail=80, group_size=4, world_size=2)
    with pytest.raises(ValueError, match="rank must be"):
        ShardedHeadTailOutput(_whole_layer(0).config(), rank=2, world_size=2)


def test_shards_without_processes_hold_the_whole_layer():
    whole = _whole_layer(3)
    shards = [shard_output(whole, rank=r, world_size=3) for r in range(3)]
    ids = torch.cat([s.shard_label_ids for s in shards])
    assert torch.equal(torch.sort(ids).values, torch.arange(whole.num_labels))
    x, targets = _batch(4, 6, whole.num_labels)
    # each shard's label ids increase with the original ids; the shard's logits are the whole layer's columns
    logits = whole(x)
    for s in shards:
        assert bool((s.shard_label_ids.diff() > 0).all())
        torch.testing.assert_close(s.shard(x), logits[:, s.shard_label_ids], **TOL)
    # a shard built for another rank refuses to run without the process group
    with pytest.raises(RuntimeError, match="torch.distributed must be initialised"):
        shards[1].loss(x, targets)


def test_world_size_one_is_the_whole_layer():
    whole = _whole_layer(5)
    sharded = shard_output(whole)
    x, targets = _batch(6, 8, whole.num_labels)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    whole.loss(xa, targets, reduction="sum").backward()
    sharded.loss(xb, targets, reduction="sum").backward()
    torch.testing.assert_close(xb.grad, xa.grad, **TOL)
    assert torch.equal(sharded.topk(x, 4)[1], whole.topk(x, 4)[1])
    labels = [whole.num_labels - 1, 4, 0, 4]
    torch.testing.assert_close(sharded.logits_for(x, labels), whole.logits_for(x, labels), **TOL)
    assert sharded.logits_for(x, []).shape == (8, 0)
    state, expected = sharded.state_dict(), whole.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items()) and sorted(state) == sorted(expected)
    unsharded = sharded.to_unsharded()
    assert torch.equal(unsharded.topk(x, 4)[1], whole.topk(x, 4)[1])


def test_bad_state_is_refused_before_anything_changes():
    whole = _whole_layer(5)
    sharded = shard_output(whole, rank=1, world_size=2)
    before = {k: v.clone() for k, v in sharded.shard.state_dict().items()}
    state = whole.state_dict()
    state["label_permutation"] = state["label_permutation"].clone()
    state["label_permutation"][0] = state["label_permutation"][1]
    with pytest.raises(ValueError, match="label_permutation"):
        sharded.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in sharded.shard.state_dict().items())
    state = whole.state_dict()
    state["tail.weight"] = state["tail.weight"][:-4]
    with pytest.raises(RuntimeError, match="does not match"):
        sharded.load_state_dict(state)


def test_merge_topk_breaks_ties_by_smaller_label_id():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    ids = torch.tensor([[4, 9, 2, 0, 5]])
    top_scores, top_ids = merge_topk(scores, ids, 4)
    assert top_ids.tolist() == [[2, 5, 9, 0]]
    assert top_scores.tolist() == [[3.0, 3.0, 3.0, 2.0]]


@pytest.mark.parametrize("init", ["zero", "uniform"])
def test_keyed_rewire_of_a_slice_of_groups_is_that_slice_of_the_whole_rewire(init):
    gen = torch.Generator().manual_seed(0)
    whole = lh.GroupSharedFanIn(40, 50, 8, 4, generator=gen, dtype=torch.float64)
    pieces = []
    for g0, g1 in ((0, 5), (5, 6), (6, 13)):
        piece = lh.GroupSharedFanIn(40, min(50, g1 * 4) - g0 * 4, 8, 4, dtype=torch.float64)
        with torch.no_grad():
            piece.weight.copy_(whole.weight[g0 * 4 : g1 * 4])
            piece.group_index.copy_(whole.group_index[g0:g1])
            piece.bias.copy_(whole.bias[g0 * 4 : min(50, g1 * 4)])
        piece.first_group = g0
        pieces.append(piece)
    for step in range(3):
        stats = whole.rewire(0.5, seed=step, init=init, init_scale=0.2)
        for piece in pieces:
            piece.rewire(0.5, seed=step, init=init, init_scale=0.2)
        assert stats.pruned_slots == 13 * 4
    assert torch.equal(torch.cat([p.group_index for p in pieces]), whole.group_index)
    assert torch.equal(torch.cat([p.weight for p in pieces]), whole.weight)
    rows = whole.group_index.sort(dim=1).values
    assert bool((rows.diff(dim=1) > 0).all())  # still distinct features in every row
    other = copy.deepcopy(pieces[0])
    other.rewire(0.5, seed=99, init=init, init_scale=0.2)
    assert not torch.equal(other.group_index, pieces[0].group_index)


def test_keyed_draws_are_uniform_over_the_free_features():
    # every group of 4000 prunes one slot of 8 of 16 features: each of the 8 free features is drawn ~1/8 of the time
    layer = lh.GroupSharedFanIn(16, 4000, 8, 1, generator=torch.Generator().manual_seed(0))
    before = layer.group_index.clone()
    stats = layer.rewire(0.125, seed=5)
    new = layer.group_index[stats.regrown].long()
    assert not bool((new.unsqueeze(1) == before[stats.regrown.any(1)].long()).any())
    counts = torch.bincount(new, minlength=16).double()
    assert counts.sum() == 4000
    # each feature is free in about half of the groups: expected 4000 * 0.5 / 8 = 250 draws each
    assert float(counts.min()) > 150 and float(counts.max()) < 350


def test_rewire_refuses_generator_and_seed_together():
    layer = lh.GroupSharedFanIn(16, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="at most one of generator and seed"):
        layer.rewire(0.25, seed=1, generator=torch.Generator())
    with pytest.raises(TypeError, match="seed must be an integer"):
        dst.rewire_(layer, 0.25, seed=1.5)


def test_keyed_hash_is_the_same_whatever_is_hashed_alongside():
    ids = torch.tensor([0, 1, 2**32 + 1, 2**40 + 7], dtype=torch.long)
    together = dst.keyed_hash32(3, 1, ids)
    alone = torch.stack([dst.keyed_hash32(3, 1, ids[i : i + 1])[0] for i in range(4)])
    assert torch.equal(together, alone)
    assert bool(((together >= 0) & (together < 2**32)).all())
    assert len(set(together.tolist())) == 4
    assert not torch.equal(dst.keyed_hash32(4, 1, ids), together)


# ------------------------------------------------------------------------------------------------
# Lightning: DDP with label sharding trains exactly like one process on the global batch.
class ShardedModel(HasteXMCModule, LightningModule):
    def __init__(self, label_sharding: bool = True):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(32, 16), nn.Tanh())
        self.configure_haste(in_features=16, head_ratio=0.1, fan_in=8, group_size=8, grouping="random",
                             warmup=0.0, lr_schedule="constant", encoder_lr=1e-2, output_lr=0.05,
                             label_sharding=label_sharding)

    def setup(self, stage):
        super().setup(stage)
        # float64 before a checkpoint loads (Lightning restores before the precision plugin converts the model:
        # into the float32 parameters of a fresh model, a float64 checkpoint would be rounded)
        self.double()

    def encode(self, batch):
        return self.encoder(batch["features"].to(self.encoder[0].weight.dtype))


class ConsecutiveRows(XMCDataModule):
    """Rank ``r`` of ``N`` reads rows ``[(N s + r) B, (N s + r + 1) B)`` at step ``s``: the global batch of a step is
    rows ``[N s B, N (s + 1) B)`` in order, the batch of one process reading ``N B`` rows at a time (Lightning's
    distributed sampler would shuffle)."""

    def train_dataloader(self) -> DataLoader:
        loader = super().train_dataloader()
        world, rank, size = self.trainer.world_size, self.trainer.global_rank, self.batch_size
        if world == 1:
            return loader
        rows = [i for start in range(0, len(loader.dataset), world * size)
                for i in range(start + rank * size, min(len(loader.dataset), start + (rank + 1) * size))]
        return DataLoader(loader.dataset, batch_size=size, sampler=rows, collate_fn=loader.collate_fn)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_data, shuffle=False)


def _data_module(batch_size: int) -> XMCDataModule:
    train, test = synthetic_xmc(seed=0, num_train=96, num_test=8, num_labels=300, num_features=32)
    return ConsecutiveRows(train, test=test, batch_size=batch_size, shuffle=False, val_fraction=0.0)


def _fit_trainer(devices: int, max_epochs: int, callbacks, validate: bool = False) -> Trainer:
    return Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", precision="64-true",
        use_distributed_sampler=False,
        max_epochs=max_epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1.0 if validate else 0, num_sanity_val_steps=0,
        callbacks=[lh.SparseRegrowthCallback(interval=2, prune_fraction=0.5, end=1.0, schedule="constant",
                                             log=False), *callbacks],
    )


class SaveAndPredict(Callback):
    """At the end of the fit: a checkpoint (every rank takes part, rank 0 writes) and each rank's top-k of its
    rows of the test features."""

    def __init__(self, folder: str):
        self.folder = folder

    def on_train_end(self, trainer, pl_module):
        trainer.save_checkpoint(os.path.join(self.folder, "fit.ckpt"))
        features = torch.from_numpy(trainer.datamodule.test_data.features)
        rows = np.array_split(np.arange(features.shape[0]), trainer.world_size)[trainer.global_rank]
        with torch.no_grad():
            scores, ids = pl_module.output.topk(pl_module.encode({"features": features[rows]}), 5)
        torch.save((scores, ids), os.path.join(self.folder, f"topk{trainer.global_rank}.pt"))

    def teardown(self, trainer, pl_module, stage):
        # Shut gloo down before the spawned worker exits (left to interpreter exit, its thread is sometimes destroyed
        # unjoined: SIGABRT), but after Lightning has gathered the final state dict (a collective of the sharded
        # layer) to send it to the main process.
        if torch.distributed.is_initialized():
            atexit.register(torch.distributed.destroy_process_group)


def _full_state(module) -> dict:
    return {k: v.clone() for k, v in module.state_dict().items()}


class SaveAfterFirstEpoch(Callback):
    def __init__(self, path: str):
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


def _assert_states_close(got, expected, **tolerance) -> None:
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        got, expected = dict(enumerate(got)), dict(enumerate(expected))
    assert sorted(got, key=str) == sorted(expected, key=str)
    for key, value in expected.items():
        if isinstance(value, (dict, list, tuple)):
            _assert_states_close(got[key], value, **tolerance)
        elif isinstance(value, Tensor) and value.is_floating_point():
            torch.testing.assert_close(got[key], value, **tolerance)
        else:
            assert (torch.equal(got[key], value) if isinstance(value, Tensor) else got[key] == value), key


@pytest.fixture(scope="module")
def two_rank_epoch(tmp_path_factory):
    """A label-sharded fit on two ranks of 16 rows each, one epoch of 3 steps (a rewire at step 2): the folder
    with its checkpoint ``fit.ckpt`` and each rank's top-k ``topk{rank}.pt``."""
    folder = tmp_path_factory.mktemp("two_ranks")
    torch.manual_seed(0)
    trainer = _fit_trainer(2, 1, [SaveAndPredict(str(folder))], validate=True)
    trainer.fit(ShardedModel(), _data_module(16))  # validates the test rows (4 per rank) after the last step
    return folder, {key: float(value) for key, value in trainer.callback_metrics.items() if key.startswith("val/")}


def test_lightning_ddp_label_sharding_equals_one_process_on_the_global_batch(tmp_path, two_rank_epoch):
    # one process, global batch 32, two epochs of 3 steps (rewires at steps 2 and 4); a checkpoint after the first
    torch.manual_seed(0)
    straight = ShardedModel(label_sharding=False)
    _fit_trainer(1, 2, [SaveAfterFirstEpoch(str(tmp_path / "one.ckpt"))]).fit(straight, _data_module(32))

    # two ranks of 16 rows each, label-sharded, one epoch: the same model and optimizer state (whole layer)
    folder, val_metrics = two_rank_epoch
    two = torch.load(folder / "fit.ckpt", weights_only=False)
    one = torch.load(tmp_path / "one.ckpt", weights_only=False)
    _assert_states_close(two["state_dict"], one["state_dict"], **TOL)
    _assert_states_close(two["optimizer_states"], one["optimizer_states"], **TOL)
    assert two["callbacks"] == one["callbacks"]
    assert two["callbacks"]["SparseRegrowthCallback"]["rewires"] == 1  # the topologies compared have been rewired

    # the checkpoint written by 2 ranks predicts on one process what the 2 ranks predicted
    loaded = ShardedModel.load_from_checkpoint(folder / "fit.ckpt").double()
    loaded.load_state_dict(two["state_dict"])  # again, in float64 (the encoder was built in float32)
    assert isinstance(loaded.output, lh.HeadTailOutput)
    features = torch.from_numpy(_data_module(16).test_data.features)
    with torch.no_grad():
        scores, ids = loaded.output.topk(loaded.encode({"features": features}), 5)
    parts = [torch.load(folder / f"topk{r}.pt") for r in range(2)]
    assert torch.equal(ids, torch.cat([p[1] for p in parts]))
    torch.testing.assert_close(scores, torch.cat([p[0] for p in parts]), **TOL)
    # and the metrics the 2 ranks logged are those of the whole test set on one process
    expected_metrics = {}
    for metric in (PrecisionAtK((1, 3, 5)), NDCGAtK((1, 3, 5))):
        metric.update(ids, _data_module(16).test_data.labels)
        expected_metrics.update({f"val/{k}": float(v) for k, v in metric.compute().items()})
    assert {k: val_metrics[k] for k in expected_metrics} == pytest.approx(expected_metrics, rel=1e-12, abs=1e-12)

    # and resumes on one process (the optimizer state of every shard included) as the uninterrupted run went on
    torch.manual_seed(0)
    resumed = ShardedModel(label_sharding=False)
    _fit_trainer(1, 2, []).fit(resumed, _data_module(32), ckpt_path=folder / "fit.ckpt")
    expected, got = _full_state(straight), _full_state(resumed)
    assert torch.equal(got["output.tail.group_index"], expected["output.tail.group_index"])
    assert not torch.equal(got["output.tail.group_index"], two["state_dict"]["output.tail.group_index"])
    _assert_states_close(got, expected, **TOL)


class SaveState(Callback):
    """At the end of the fit, the whole model state (every rank takes part in the gather; rank 0 writes)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        state = _full_state(pl_module)
        optimizer = trainer.optimizers[0].state_dict()
        if trainer.global_rank == 0:
            torch.save({"state_dict": state, "optimizer": optimizer}, self.path)

    def teardown(self, trainer, pl_module, stage):
        if torch.distributed.is_initialized():
            atexit.register(torch.distributed.destroy_process_group)


def test_lightning_label_sharded_resume_on_the_same_world_size_is_exact(tmp_path, two_rank_epoch):
    torch.manual_seed(0)
    _fit_trainer(2, 2, [SaveState(str(tmp_path / "straight.pt"))]).fit(ShardedModel(), _data_module(16))
    torch.manual_seed(0)
    _fit_trainer(2, 2, [SaveState(str(tmp_path / "resumed.pt"))]).fit(
        ShardedModel(), _data_module(16), ckpt_path=two_rank_epoch[0] / "fit.ckpt"
    )
    straight = torch.load(tmp_path / "straight.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed.pt", weights_only=False)
    _assert_states_close(resumed, straight, rtol=0, atol=0)


def test_multi_gpu_benchmark_runs_its_smoke_mode():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "multi_gpu.py"), "--smoke"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [row["mode"] for row in rows] == ["one", "fit_sharded"]
    assert rows[0]["ms_per_step"] > 0 and rows[1]["steps"] > 0
