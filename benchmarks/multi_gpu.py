"""Label-sharded output layer on several GPUs: step time, memory and communication, against one GPU and plain DDP.

    PYTHONPATH=. torchrun --nproc_per_node 2 benchmarks/multi_gpu.py [--shapes LF-Paper2Keywords-8.6M,Amazon-3M]
        [--steps 30] [--fit-steps 300] [--no-fit] [--json PATH] [--smoke]

Per shape (the official configs: LF-Paper2Keywords-8.6M with head 5 %, Amazon-3M with head 2 %; bfloat16 on the
GPU, the recipe's SGD with momentum on the output layer, loss summed), the output layer's training step (fused
loss, its backward to the input and the weights, the optimizer step; the encoder is left out) in three modes:

- ``one``: one GPU with batch B (rank 0 alone; the other ranks wait);
- ``sharded``: every rank with its own B rows (global batch N B), the layer label-sharded
  (:class:`lightning_haste.sharded.ShardedHeadTailOutput`): all-gather of the features, reduce-scatter of their
  gradient, no all-reduce of the layer's gradients;
- ``ddp``: every rank with its own B rows and the whole layer, its gradients all-reduced by
  ``DistributedDataParallel`` (plain data parallelism).

Each row reports the mean step time (the slowest rank's, ``--steps`` steps after warm-up, synchronised at the two
ends), the peak GPU memory during the steps and the output layer's resident state (parameters, gradients, momentum)
per GPU, and the bytes each rank's collectives carried per step: measured by wrapping the sharded layer's
collectives (device: features and their gradients, top-k; host: row counts and targets over gloo) and DDP's
communication hook (gradient buckets): ``bytes_features_all_gather`` (the gathered features),
``bytes_grad_reduce_scatter`` (their gradient, float32), ``bytes_targets_all_gather`` (row counts and targets, on
the host over gloo), ``bytes_grad_all_reduce`` (DDP); ``wire_*`` is what a ring algorithm sends per rank for them
(all-gather and reduce-scatter: (N - 1) / N of the gathered tensor; all-reduce: twice that).

Then, unless ``--no-fit``, an end-to-end ``Trainer.fit`` of ``--fit-steps`` steps at LF-Paper2Keywords-8.6M's
labels on the N GPUs (``strategy="ddp"``, ``configure_haste(label_sharding=True)``, bf16-true): a small encoder
(a 512-feature dense input, one linear layer and tanh to 384) on synthetic Zipf-labelled data; reported: steps
per second after warm-up and the peak memory per GPU.

``--smoke``: a tiny shape on the CPU with gloo (a few steps, a short fit): checks that the script runs, measures
nothing of interest. Without torchrun the script runs as one process (only ``one`` and a one-rank fit).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared shapes and result rows

from lightning_haste import HeadTailOutput  # noqa: E402
from lightning_haste import sharded as sharded_module  # noqa: E402
from lightning_haste.sharded import shard_output  # noqa: E402

HEAD_RATIO = {"LF-Paper2Keywords-8.6M": 0.05, "Amazon-3M": 0.02}
SMOKE = C.Shape("smoke-L5000", 8, 64, 5000, 16, 8)
WARMUP = 5


# ------------------------------------------------------------------------------------------------
# Processes, devices and timing.
def _setup() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _max_over_ranks(value: float, world: int, device: torch.device) -> float:
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_bytes(device: torch.device) -> Optional[int]:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _state_bytes(module: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, gradients and optimizer state of ``module`` (bytes on this rank)."""
    total = 0
    for p in module.parameters():
        total += p.nbytes + (p.grad.nbytes if p.grad is not None else 0)
        for value in optimizer.state.get(p, {}).values():
            if isinstance(value, torch.Tensor):
                total += value.nbytes
    return total


class _Traffic:
    """Bytes the collectives carried on this rank, by kind."""

    def __init__(self) -> None:
        self.bytes: dict[str, float] = {}
        self.wire: dict[str, float] = {}

    def add(self, kind: str, payload: int, wire: float) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + payload
        self.wire[kind] = self.wire.get(kind, 0.0) + wire

    def per_step(self, steps: int) -> dict[str, Any]:
        return {
            **{f"bytes_{k}": int(v / steps) for k, v in self.bytes.items()},
            **{f"wire_{k}": int(v / steps) for k, v in self.wire.items()},
        }


@contextlib.contextmanager
def _count_sharded_collectives(traffic: _Traffic, world: int):
    """Wrap the sharded layer's all-gather and reduce-scatter to count their bytes (device and host separately)."""
    gather, scatter = sharded_module._all_gather_into, sharded_module._reduce_scatter_into

    def counted_gather(out, tensor, group):
        # int64: the row counts and the targets (host tensors over gloo); floating point: the features
        kind = "targets" if out.dtype == torch.int64 else "features"
        traffic.add(f"{kind}_all_gather", out.nbytes, out.nbytes * (world - 1) / world)
        return gather(out, tensor, group)

    def counted_scatter(out, tensor, group):
        traffic.add("grad_reduce_scatter", tensor.nbytes, tensor.nbytes * (world - 1) / world)
        return scatter(out, tensor, group)

    sharded_module._all_gather_into, sharded_module._reduce_scatter_into = counted_gather, counted_scatter
    try:
        yield
    finally:
        sharded_module._all_gather_into, sharded_module._reduce_scatter_into = gather, scatter


# ------------------------------------------------------------------------------------------------
# The output-layer step.
def _targets(rows: int, num_labels: int, seed: int, per_row: int = 5) -> list[torch.Tensor]:
    """``per_row`` positives per row, Zipf-like over the labels (frequent labels are frequent)."""
    rng = np.random.default_rng(seed)
    ranks = np.minimum(rng.zipf(1.1, size=(rows, per_row)) - 1, num_labels - 1)
    return [torch.from_numpy(np.unique(r)) for r in ranks]


def _whole_layer(shape: C.Shape, head_ratio: float, device: torch.device, dtype: torch.dtype) -> HeadTailOutput:
    # frequencies decreasing with the label id: the Zipf targets' frequent labels are the head's
    freq = np.arange(shape.L, 0, -1, dtype=np.float64)
    generator = torch.Generator(device=device).manual_seed(0)
    layer = HeadTailOutput(shape.H, freq, head_ratio=head_ratio, fan_in=shape.K, group_size=shape.G,
                           device=device, generator=generator)
    return layer.to(dtype)


class _LossModule(nn.Module):
    """The whole layer's fused loss as a module's forward (what DDP wraps)."""

    def __init__(self, output: HeadTailOutput) -> None:
        super().__init__()
        self.output = output

    def forward(self, x: torch.Tensor, targets: list) -> torch.Tensor:
        return self.output.loss(x, targets, reduction="sum")


def _time_steps(step, steps: int, device: torch.device, world: int) -> tuple[float, Optional[int]]:
    for i in range(WARMUP):
        step(i)
    _sync(device)
    _barrier(world)
    _reset_peak(device)
    start = time.perf_counter()
    for i in range(steps):
        step(WARMUP + i)
    _sync(device)
    ms = (time.perf_counter() - start) * 1e3 / steps
    return ms, _peak_bytes(device)


def _inputs(shape: C.Shape, device, dtype, rank: int, count: int = 4):
    gen = torch.Generator(device=device).manual_seed(100 + rank)
    xs = [torch.randn(shape.B, shape.H, device=device, dtype=dtype, generator=gen).requires_grad_(True)
          for _ in range(count)]
    targets = [_targets(shape.B, shape.L, 1000 * rank + i) for i in range(count)]
    return xs, targets


def _measure(shape: C.Shape, head_ratio: float, mode: str, args, rank: int, world: int, device: torch.device,
             dtype: torch.dtype) -> Optional[dict[str, Any]]:
    traffic = _Traffic()
    row: dict[str, Any] = {"shape": shape.name, "mode": mode, "ranks": 1 if mode == "one" else world,
                           "batch_per_rank": shape.B, "global_batch": shape.B * (1 if mode == "one" else world),
                           "dtype": str(dtype).replace("torch.", ""), "device": _device_name(device)}
    if mode == "one" and rank != 0:
        _barrier(world)
        return None
    whole = _whole_layer(shape, head_ratio, device, dtype)
    xs, targets = _inputs(shape, device, dtype, rank)
    if mode == "sharded":
        layer: nn.Module = shard_output(whole, rank=rank, world_size=world)
        del whole
        params = layer
    elif mode == "ddp":
        module = _LossModule(whole)
        device_ids = [device.index] if device.type == "cuda" else None
        layer = nn.parallel.DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)

        def counting_hook(state, bucket):
            nbytes = bucket.buffer().nbytes
            traffic.add("grad_all_reduce", nbytes, 2 * nbytes * (world - 1) / world)
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook  # noqa: PLC0415

            return allreduce_hook(state, bucket)

        layer.register_comm_hook(None, counting_hook)
        params = module
    else:
        layer = whole
        params = whole
    _free(device)
    optimizer = torch.optim.SGD(params.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

    def step(i: int) -> None:
        x, t = xs[i % len(xs)], targets[i % len(targets)]
        optimizer.zero_grad(set_to_none=False)
        x.grad = None
        if mode == "sharded":
            loss = layer.loss(x, t, reduction="sum")
        elif mode == "ddp":
            loss = layer(x, t)
        else:
            loss = layer.loss(x, t, reduction="sum")
        loss.backward()
        optimizer.step()

    counting = _count_sharded_collectives(traffic, world) if mode == "sharded" else contextlib.nullcontext()
    with counting:
        ms, peak = _time_steps(step, args.steps, device, 1 if mode == "one" else world)
    total_steps = WARMUP + args.steps
    state = _state_bytes(params, optimizer)
    if mode == "one":
        _barrier(world)
    else:
        ms = _max_over_ranks(ms, world, device)
        peak = int(_max_over_ranks(float(peak or 0), world, device)) or None
        state = int(_max_over_ranks(float(state), world, device))
    row.update(ms_per_step=round(ms, 4), peak_gib=round(peak / 2**30, 3) if peak else None,
               output_state_gib=round(state / 2**30, 3), **traffic.per_step(total_steps))
    return row


def _device_name(device: torch.device) -> str:
    return C.device_short_name(device.index or 0) if device.type == "cuda" else "cpu"


# ------------------------------------------------------------------------------------------------
# End-to-end Lightning fit.
def _fit(shape: C.Shape, head_ratio: float, args, rank: int, world: int, device: torch.device) -> dict[str, Any]:
    from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: PLC0415 - only for this part

    from lightning_haste.data import XMCData, XMCDataModule  # noqa: PLC0415
    from lightning_haste.module import HasteXMCModule  # noqa: PLC0415

    num_features = 64 if args.smoke else 512
    rows = max(256, (args.fit_steps + WARMUP + 1) * shape.B * world)
    rng = np.random.default_rng(0)
    features = rng.standard_normal((rows, num_features), dtype=np.float32)
    per_row = 5
    labels = np.minimum(rng.zipf(1.1, size=(rows, per_row)) - 1, shape.L - 1)
    labels = np.sort(labels, axis=1)
    indptr = np.arange(0, rows * per_row + 1, per_row)
    y = sp.csr_matrix((np.ones(rows * per_row, np.float32), labels.ravel(), indptr), shape=(rows, shape.L))
    y.sum_duplicates()
    y.data[:] = 1.0
    data = XMCDataModule(XMCData(features, y), batch_size=shape.B, val_fraction=0.0, shuffle=True)

    class Model(HasteXMCModule, LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Sequential(nn.Linear(num_features, shape.H), nn.Tanh())
            self.configure_haste(in_features=shape.H, head_ratio=head_ratio, fan_in=shape.K, group_size=shape.G,
                                 grouping="random", encoder_lr=1e-3, label_sharding=True)

        def encode(self, batch):
            return self.encoder(batch["features"].to(self.encoder[0].weight.dtype))

    class Clock(Callback):
        def __init__(self) -> None:
            self.start: Optional[float] = None
            self.steps = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == WARMUP:
                _sync(pl_module.device)
                _reset_peak(pl_module.device)
                self.start = time.perf_counter()

        def on_train_end(self, trainer, pl_module):
            _sync(pl_module.device)
            self.seconds = time.perf_counter() - (self.start or time.perf_counter())
            self.steps = trainer.global_step - WARMUP

    clock = Clock()
    on_gpu = device.type == "cuda"
    trainer = Trainer(
        accelerator="gpu" if on_gpu else "cpu", devices=world, strategy="ddp" if world > 1 else "auto",
        precision="bf16-true" if on_gpu else "32-true", max_steps=args.fit_steps + WARMUP, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[clock],
    )
    trainer.fit(Model(), data)
    steps_per_s = clock.steps / clock.seconds if clock.seconds > 0 else None
    peak = _peak_bytes(device)
    return {"shape": shape.name, "mode": "fit_sharded", "ranks": world, "batch_per_rank": shape.B,
            "global_batch": shape.B * world, "steps": clock.steps,
            "steps_per_s": round(steps_per_s, 3) if steps_per_s else None,
            "peak_gib": round(peak / 2**30, 3) if peak else None, "device": _device_name(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="LF-Paper2Keywords-8.6M,Amazon-3M")
    parser.add_argument("--modes", default="one,sharded,ddp")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--fit-steps", type=int, default=300)
    parser.add_argument("--no-fit", action="store_true")
    parser.add_argument("--json", default="")
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU with gloo")
    args = parser.parse_args()
    if args.smoke:
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
        args.steps, args.fit_steps = min(args.steps, 3), min(args.fit_steps, 4)
    rank, world, device = _setup()
    if not args.smoke and device.type != "cuda":
        raise SystemExit("this benchmark measures GPUs: run it with CUDA, or pass --smoke")
    shapes = [SMOKE] if args.smoke else C.select_shapes(args.shapes)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    modes = [m for m in args.modes.split(",") if m]
    unknown = set(modes) - {"one", "sharded", "ddp"}
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}")
    for shape in shapes:
        head_ratio = HEAD_RATIO.get(shape.name, 0.05)
        for mode in modes:
            if mode != "one" and world == 1:
                continue
            row = _measure(shape, head_ratio, mode, args, rank, world, device, dtype)
            _free(device)  # the mode's layer and optimizer went with _measure's frame
            if row is not None and rank == 0:
                C.report_row(row, args.json)
    if not args.no_fit:
        fit_shape = SMOKE if args.smoke else C.select_shapes("LF-Paper2Keywords-8.6M")[0]
        row = _fit(fit_shape, HEAD_RATIO.get(fit_shape.name, 0.05), args, rank, world, device)
        if rank == 0:
            C.report_row(row, args.json)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
