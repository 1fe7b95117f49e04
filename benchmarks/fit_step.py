"""A whole ``Trainer.fit`` step with a real encoder: how busy the loop keeps the GPU.

    PYTHONPATH=. python3 benchmarks/fit_step.py DATA [--encoder DIR] [--labels real,118000,670000]
        [--outputs dense,haste] [--steps 60] [--json PATH] [--history PATH] [--commit HASH]

DATA is a raw-text data set folder (``benchmarks/debian_packages.py``). The model is ``examples/train_text.py``'s
(all-MiniLM-L6-v2 by default, mean-pooled, the package's recipe, bf16-mixed, batch 256, 32 tokens); ``haste`` is
head 5 %, fan-in 128, groups of 32 (random groups: the grouping does not change the step's cost), ``dense``
every label in the head. ``--labels``: ``real`` keeps the data set's labels; a number draws that many labels
instead (each row keeps its count of positives, ids Zipf-distributed), for the step's cost at that label count.

Per configuration, each in a fresh process (``--same-process``: all in this one):

- ``fit``: optimizer steps per second of ``Trainer.fit`` (the datamodule tokenising in its workers, the default
  logging and progress bar, a synchronisation only at the two ends of the timed window of ``--steps`` steps);
- ``bare``: the same steps in a plain loop on batches already tokenised and on the GPU (forward, fused loss,
  backward, optimizer and scheduler step): the work itself;
- ``overhead`` = 1 - bare / fit: what the loop around the work costs (data, targets, loss glue, logging,
  callbacks, Lightning);
- ``--breakdown``: instead of the torch profile, the host time per step of each of Lightning's actions
  (``SimpleProfiler``: fetching the batch, the training step, backward, the optimizer step, each callback hook)
  over ``--steps`` fit steps after the warm-up, sorted by time (nested actions count in their parents too), and
  the host time of the same pieces of work in the fit and in the bare loop (the encoder, the loss, backward;
  ``log`` in the fit): where a piece takes longer in the fit, the difference is not the loop's own cost;
- ``--no-progress-bar``: every fit with ``enable_progress_bar=False`` (the bar's share of the step);
- ``--compare-optimizers``: instead of the profile, the bare step with torch's for-each optimizers and with the
  fused ones (``configure_haste(fused_optimizers=)``), three times each, alternated;
- from ``torch.profiler`` over 10 fit steps: the host-device synchronisations per step
  (``cudaStreamSynchronize``, ``cudaDeviceSynchronize``, ``cudaEventSynchronize``, device-to-host copies) and the
  GPU's busy fraction (the union of its kernels' and copies' intervals over the window).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch
from lightning.pytorch import Callback, Trainer, seed_everything

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared history file and device description
import train_text  # noqa: E402 - the example's model, datamodule and recipe

C.hide_benchmarks_from_imports()

from lightning_haste.data import XMCData  # noqa: E402

WARMUP_STEPS = 15
SYNC_NAMES = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PartTimer:
    """Host seconds spent in some of a model's methods (wrapped on the instance), while ``counting``: the same
    pieces of a step timed in the fit and in the bare loop, to tell the loop's own cost from the same work running
    slower."""

    def __init__(self, model, names: tuple[str, ...]) -> None:
        self.totals = dict.fromkeys(names, 0.0)
        self.counting = False
        for name in names:
            setattr(model, name, self._wrap(name, getattr(model, name)))

    def _wrap(self, name: str, method):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                if self.counting:
                    self.totals[name] += time.perf_counter() - start
        return timed

    def per_step_ms(self, steps: int) -> dict[str, float]:
        return {name: 1e3 * total / steps for name, total in self.totals.items()}


#: The model's methods a step runs, timed by ``--breakdown`` in the fit and in the bare loop.
TIMED_METHODS = ("encode", "haste_training_loss", "log")


def relabel(data: XMCData, num_labels: int, seed: int) -> XMCData:
    """The same rows and positive counts with label ids drawn Zipf-like (exponent 1.1) from ``num_labels``."""
    rng = np.random.default_rng(seed)
    counts = np.diff(data.labels.indptr)
    popularity = 1.0 / np.arange(1, num_labels + 1) ** 1.1
    popularity = rng.permutation(popularity / popularity.sum())
    counts = np.maximum(1, counts)
    draws = rng.choice(num_labels, size=int(counts.sum()), p=popularity)  # one draw: O(labels + positives)
    idx, ptr = [], [0]
    for row in np.split(draws, np.cumsum(counts)[:-1]):
        row = np.unique(row)
        idx.append(row)
        ptr.append(ptr[-1] + row.size)
    labels = sp.csr_matrix((np.ones(ptr[-1], np.float32), np.concatenate(idx), ptr), shape=(len(data), num_labels))
    return XMCData(data.features, labels, texts=data.texts)


def _trainer(args, callbacks: list, **options) -> Trainer:
    """The measured fits' trainer: one device, no logger, checkpoints or validation, stopped by a callback."""
    return Trainer(accelerator=args.accelerator, devices=1, precision=args.precision, max_epochs=100, logger=False,
                   enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
                   enable_progress_bar=not args.no_progress_bar, callbacks=callbacks, **options)


class StepTimer(Callback):
    """Wall time of optimizer steps ``first`` .. ``first + count`` (a synchronisation at each end only)."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.start = self.stop = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.first and self.start is None:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.first + self.count and self.stop is None:
            _sync()
            self.stop = time.perf_counter()
            trainer.should_stop = True


def _busy_fraction(events, window: tuple[float, float]) -> float:
    intervals = sorted((e.time_range.start, e.time_range.end) for e in events
                       if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, -1.0
    for a, b in intervals:
        a, b = max(a, window[0]), min(b, window[1])
        if b <= a:
            continue
        if a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / max(1e-9, window[1] - window[0])


def profile_fit(args, train, test, steps: int = 10) -> dict:
    """Synchronisations per step and the GPU's busy fraction over ``steps`` fit steps (after a warm-up)."""
    seed_everything(args.seed)
    model, dm, callbacks = train_text.build(args, train, test)
    holder: dict = {}

    class Profile(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == WARMUP_STEPS and "prof" not in holder:
                _sync()
                activities = [torch.profiler.ProfilerActivity.CPU]
                if torch.cuda.is_available():
                    activities.append(torch.profiler.ProfilerActivity.CUDA)
                holder["prof"] = torch.profiler.profile(activities=activities)
                holder["prof"].__enter__()
                holder["t0"] = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == WARMUP_STEPS + steps and "done" not in holder:
                _sync()
                holder["prof"].__exit__(None, None, None)
                holder["done"] = True
                trainer.should_stop = True

    trainer = _trainer(args, [*callbacks, Profile()])
    trainer.fit(model, dm)
    prof = holder["prof"]
    events = prof.events()
    syncs = sum(1 for e in events if e.name in SYNC_NAMES)
    d2h = sum(1 for e in events if "DtoH" in e.name and e.device_type == torch.autograd.DeviceType.CUDA)
    cpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    window = (min(e.time_range.start for e in cpu), max(e.time_range.end for e in cpu))
    top = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return {"syncs_per_step": syncs / steps, "d2h_copies_per_step": d2h / steps,
            "gpu_busy_fraction": _busy_fraction(events, window), "host_table": top}


def breakdown_fit(args, train, test, steps: int) -> dict:
    """Host milliseconds per step of each Lightning action (``SimpleProfiler``) over ``steps`` fit steps after the
    warm-up, largest first."""
    from lightning.pytorch.profilers import SimpleProfiler  # noqa: PLC0415 - only with --breakdown

    seed_everything(args.seed)
    model, dm, callbacks = train_text.build(args, train, test)
    # its summary goes to a file (not to stdout): the table below is the window's
    profiler = SimpleProfiler(dirpath=tempfile.mkdtemp(), filename="simple_profiler", extended=False)
    window: dict = {}
    parts = PartTimer(model, TIMED_METHODS)

    class Window(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == WARMUP_STEPS and "start" not in window:
                _sync()
                window["start"] = {name: len(d) for name, d in profiler.recorded_durations.items()}
                window["t0"] = time.perf_counter()
                parts.counting = True

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == WARMUP_STEPS + steps and "stop" not in window:
                _sync()
                window["wall"] = time.perf_counter() - window["t0"]
                parts.counting = False
                window["stop"] = {name: len(d) for name, d in profiler.recorded_durations.items()}
                trainer.should_stop = True

    trainer = _trainer(args, [*callbacks, Window()], profiler=profiler)
    trainer.fit(model, dm)
    per_step = {}
    for name, stop in window["stop"].items():
        durations = profiler.recorded_durations[name][window["start"].get(name, 0) : stop]
        if durations:
            per_step[name] = 1e3 * sum(durations) / steps
    top = dict(sorted(per_step.items(), key=lambda item: -item[1])[:25])
    fit_parts = parts.per_step_ms(steps)
    fit_parts["wall"] = 1e3 * window["wall"] / steps
    for name, ms in per_step.items():
        if name.startswith("[Strategy]") and name.endswith(".backward"):
            fit_parts["backward"] = ms
    return {"breakdown_wall_ms": 1e3 * window["wall"] / steps, "breakdown_ms": top, "fit_parts_ms": fit_parts}


def bare_loop(model, batches, steps: int, precision: str, parts: Optional[dict] = None) -> float:
    """Seconds per step of forward + fused loss + backward + optimizer step on ready batches. ``parts``: filled with
    the host milliseconds per step of the encoder, the loss, backward and the optimizer and scheduler steps (each
    timed on the host, without waiting for the GPU)."""
    model.train()
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    # Lightning's "bf16-mixed" / "16-mixed": autocast over float32 weights; "32-true" etc.: no autocast
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    totals = dict.fromkeys(("encode", "haste_training_loss", "backward", "optimizer_step"), 0.0)

    def step(batch, timed: bool = False):
        clock = [time.perf_counter()]

        def lap(name: str) -> None:
            now = time.perf_counter()
            if timed:
                totals[name] += now - clock[0]
            clock[0] = now

        with torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            features = model.encode(batch)
            lap("encode")
            loss = model.haste_training_loss(features, batch["targets"])
            lap("haste_training_loss")
        loss.backward()
        lap("backward")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        lap("optimizer_step")

    for i in range(WARMUP_STEPS):
        step(batches[i % len(batches)])
    _sync()
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)], timed=parts is not None)
    _sync()
    if parts is not None:
        parts.update({name: 1e3 * total / steps for name, total in totals.items()})
    return (time.perf_counter() - start) / steps


def run(args, label_spec: str, output: str, steps: int, base_train: XMCData, base_test: XMCData) -> dict:
    args = argparse.Namespace(**vars(args))
    args.output, args.grouping, args.dst, args.label_groups = output, "random", False, None
    args.val_fraction = 0.0  # as measured: the whole training split, no validation
    if label_spec == "real":
        train, test = base_train, base_test
    else:
        train = relabel(base_train, int(label_spec), args.seed)
        test = relabel(base_test, int(label_spec), args.seed + 1)
    seed_everything(args.seed)
    model, dm, callbacks = train_text.build(args, train, test)
    timer = StepTimer(WARMUP_STEPS, steps)
    trainer = _trainer(args, [*callbacks, timer])
    trainer.fit(model, dm)
    fit_step = (timer.stop - timer.start) / steps
    # the same model and recipe on batches made ready beforehand: tokens on the GPU, targets as the collate gives
    model.to("cuda" if torch.cuda.is_available() else "cpu")  # Lightning's teardown moved it to the CPU
    loader = dm.train_dataloader()
    batches = []
    for batch in loader:
        batch = dm.transfer_batch_to_device(batch, model.device, 0)
        batches.append(batch)
        if len(batches) == 8:
            break
    if getattr(args, "compare_optimizers", False):
        # the bare step with torch's for-each optimizers and with the fused ones, alternated in one process
        times: dict = {"foreach": [], "fused": []}
        for setting in (False, True, False, True, False, True):
            model.haste["fused_optimizers"] = setting
            times["fused" if setting else "foreach"].append(bare_loop(model, batches, steps, args.precision))
        model.haste["fused_optimizers"] = None
        return {"labels": label_spec, "num_labels": train.num_labels, "output": output, "steps": steps,
                "fit_ms": fit_step * 1e3, **{f"bare_{k}_ms": [1e3 * t for t in v] for k, v in times.items()},
                "bare_foreach_median_ms": 1e3 * float(np.median(times["foreach"])),
                "bare_fused_median_ms": 1e3 * float(np.median(times["fused"]))}
    bare_parts: dict = {}
    bare_step = bare_loop(model, batches, steps, args.precision, bare_parts if args.breakdown else None)
    if args.breakdown:
        bare_parts["wall"] = 1e3 * bare_step
    profile = breakdown_fit(args, train, test, steps) if args.breakdown else profile_fit(args, train, test)
    return {
        "labels": label_spec, "num_labels": train.num_labels, "output": output, "steps": steps,
        "fit_ms": fit_step * 1e3, "fit_steps_per_s": 1.0 / fit_step, "bare_ms": bare_step * 1e3,
        "overhead": 1.0 - bare_step / fit_step,
        "output_parameters": int(sum(p.numel() for p in model.output.parameters())),
        **({"bare_parts_ms": bare_parts} if bare_parts else {}),
        **{k: v for k, v in profile.items() if k != "host_table"}, "host_table": profile.get("host_table", ""),
    }


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--labels", default="real,118000,670000")
    parser.add_argument("--outputs", default="dense,haste")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--json")
    parser.add_argument("--history", default=str(C.HISTORY))
    parser.add_argument("--commit")
    parser.add_argument("--compare-optimizers", action="store_true",
                        help="after each fit, the bare step with for-each and with fused optimizers, alternated")
    parser.add_argument("--same-process", action="store_true",
                        help="measure every configuration in this process (default: each in a fresh one)")
    parser.add_argument("--breakdown", action="store_true",
                        help="instead of the torch profile, the host time of each Lightning action per step")
    parser.add_argument("--no-progress-bar", action="store_true", help="fit without the progress bar")
    own, rest = parser.parse_known_args()
    args = train_text.arguments(rest)
    args.compare_optimizers, args.breakdown, args.no_progress_bar = (own.compare_optimizers, own.breakdown,
                                                                     own.no_progress_bar)
    torch.set_float32_matmul_precision("high")
    device = C.device_short_name() if torch.cuda.is_available() else "cpu"
    commit = C.resolve_commit(own.commit)
    configurations = [(label_spec, output) for label_spec in own.labels.split(",")
                      for output in own.outputs.split(",")]
    rows = []
    if own.same_process or len(configurations) == 1:
        train, test = train_text.read_splits(args)
        for label_spec, output in configurations:
            row = run(args, label_spec, output, own.steps, train, test)
            rows.append(row)
            C.report_row(row, own.json, hidden=("host_table",))
            if "host_table" in row:
                print(row["host_table"], flush=True)
    else:
        # One process per configuration: in one process the bare loop of a later configuration measured up to
        # 1.7x slower than the same loop in the first one (benchmarks/RESULTS.md), so that "fit - bare" compared
        # configurations measured under different conditions.
        for label_spec, output in configurations:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "row.jsonl"
                command = [sys.executable, __file__, *sys.argv[1:], "--labels", label_spec, "--outputs", output,
                           "--json", str(out), "--history", ""]
                subprocess.run(command, check=True)
                row = json.loads(out.read_text().splitlines()[-1])
            rows.append(row)
            if own.json:
                with open(own.json, "a") as fh:
                    fh.write(json.dumps(row) + "\n")
    if own.compare_optimizers:
        return
    for r in rows:
        if "breakdown_ms" in r:
            print(f"\nhost ms / step of Lightning's actions ({r['output']}, {r['num_labels']:,} labels; wall "
                  f"{r['breakdown_wall_ms']:.2f} ms / step under the profiler):")
            for name, ms in r["breakdown_ms"].items():
                print(f"  {ms:8.3f}  {name}")
            fit_parts, bare_parts = r.get("fit_parts_ms", {}), r.get("bare_parts_ms", {})
            print("host ms / step of the same pieces, fit (in the training step) against the bare loop:")
            for name in sorted(set(fit_parts) | set(bare_parts)):
                print(f"  {name:24s} fit {C.fmt(fit_parts.get(name), 8, 3)}  bare {C.fmt(bare_parts.get(name), 8, 3)}")
    print("\n| labels | output | fit ms / step | steps/s | bare ms / step | overhead | syncs / step | GPU busy |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['num_labels']:,} | {r['output']} | {r['fit_ms']:.2f} | {r['fit_steps_per_s']:.1f} | "
              f"{r['bare_ms']:.2f} | {100 * r['overhead']:.1f} % | {C.fmt(r.get('syncs_per_step'), 0, 1)} | "
              f"{C.fmt(100 * r['gpu_busy_fraction'] if 'gpu_busy_fraction' in r else None, 0, 0)} % |")
    written = C.append_history(
        own.history, [(f"{r['output']}-L{r['num_labels']}", m, r[m]) for r in rows for m in ("fit_ms", "bare_ms")],
        script="fit_step.py", device=device, commit=commit)
    print(f"{written} rows appended to {own.history}" if written else "")


if __name__ == "__main__":
    main()
