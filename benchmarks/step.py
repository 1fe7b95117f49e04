"""The whole output-layer training step (forward + loss + backward) against honest baselines in the same run.

    PYTHONPATH=. python3 benchmarks/step.py [--shapes official,B512-L131K-K128] [--json PATH] [--history PATH]
        [--commit HASH] [--profile]

Per shape (bf16, ``HeadTailOutput`` as the official configurations set it up: the head ratio of the data set,
an encoder 768 wide whose features 0..383 feed the tail and 384..767 the head where the tail reads 384; 5
random positives per row; medians of CUDA-event timings over rotating random inputs, never zeros):

- fused: ``output.loss(x, targets).backward()`` eager as a training step runs it (targets parsed on the host
  every call), and the same op replayed in a CUDA graph on fixed targets (GPU time without the host); also
  the design that recomputes the logits in the backward instead of computing the gradients with the loss
  (``fused_recompute``), and chunks small enough to stay in L2 (``fused_l2``);
- unfused: ``sparse_bce_with_logits(output(x), targets).backward()`` (the full logits, the path before the fused
  loss), eager and graph;
- dense: ``nn.Linear(H, L)`` with the same loss (H the tail's input width), eager and graph;
- bottleneck: cuBLAS ``F.linear(X[B,K], W[L,K])`` forward + backward with a given gradient (no loss at all), at
  the exact L and at L rounded up to a multiple of 16; ratios use the faster;
- the tail layer alone (forward + backward with a given gradient, graph): what the loss adds on top;
- peak memory of one eager step above the parameters and their gradients, against one bf16 [B, L] tensor;
- the physical floor: three GEMMs of 2 B L K flops (head: its width for K) at the bf16 GEMM rate measured here
  (an 8192^3 matmul), or one read of the weights plus one write of their gradient at the copy bandwidth measured
  here, whichever is longer;
- ``--profile``: the CUDA kernels of one fused step by total time (torch.profiler);
- ``--cpu``: the fused and the unfused step on the CPU path instead (float32, wall-clock), no GPU needed.

``--json`` writes every row; ``--history`` (default benchmarks/results/history.csv; '' for none) appends
``date,commit,device,script,shape,metric,ms`` rows. The commit is ``--commit``, else $HASTE_COMMIT, else git.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared timing helpers, shapes and history file

from lightning_haste import HeadTailOutput, ops  # noqa: E402
from lightning_haste.loss import loss_chunks  # noqa: E402
from lightning_haste.module import sparse_bce_with_logits  # noqa: E402

HEAD_RATIO = {"Amazon-670K": 0.10, "AmazonTitles-670K": 0.10, "Amazon-3M": 0.02, "LF-Paper2Keywords-8.6M": 0.05}
ENCODER_WIDTH = 768
POSITIVES = 5
L2_WORKSPACE = 24 * 2**20  # bytes per chunk of the fused loss's L2-resident variant (H100/H200 L2: 50 MB)
HISTORY_METRICS = (
    "fused_eager", "fused_graph", "fused_recompute_eager", "fused_recompute_graph", "fused_l2_eager",
    "fused_l2_graph", "unfused_eager", "unfused_graph",
    "dense_eager", "dense_graph", "bn_best_eager", "bn_best_graph", "tail_layer_graph", "floor",
)


def _free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def peak_above(step: Callable[[int], object], params: list[torch.Tensor]) -> int:
    """Peak bytes of one eager step above what was allocated before it, less the gradients it leaves."""
    for p in params:
        p.grad = None
    _free()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(0)
    torch.cuda.synchronize()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    return torch.cuda.max_memory_allocated() - base - grads


def _bottleneck(B: int, K: int, L: int, sets: int) -> dict[str, Optional[float]]:
    out: dict[str, Optional[float]] = {"eager": None, "graph": None}
    try:
        gen = _cuda_generator(4)
        w = torch.randn(L, K, device="cuda", generator=gen).bfloat16().requires_grad_(True)
        xs = [torch.randn(B, K, device="cuda", generator=gen).bfloat16().requires_grad_(True) for _ in range(sets)]
        dzs = [torch.randn(B, L, device="cuda", generator=gen).bfloat16() for _ in range(sets)]

        def step(i: int) -> None:
            w.grad = None
            xs[i].grad = None
            F.linear(xs[i], w).backward(dzs[i])

        out["eager"] = C.bench(step, sets)
        out["graph"] = C.timeit(step, sets)
    except torch.OutOfMemoryError:
        pass
    finally:
        w = xs = dzs = None  # noqa: F841
        _free()
    return out


def gemm_rate() -> float:
    """bf16 GEMM flop/s of an 8192^3 matmul (random operands)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = C.bench(lambda i: a @ b, 1, max_ms=300)
    return 2 * 8192**3 / (ms * 1e-3)


# Every random draw uses a generator of this script, never torch's default CUDA generator: a failed CUDA-graph
# capture leaves the default generator unusable for the rest of the process, and the other shapes still run.
def _cuda_generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cuda").manual_seed(seed)


def _layer(shape: C.Shape, head_ratio: float) -> HeadTailOutput:
    freq = np.random.default_rng(0).zipf(1.5, shape.L).clip(max=10**6)
    tail = (0, shape.H)
    head = (shape.H, ENCODER_WIDTH) if shape.H < ENCODER_WIDTH else None
    # built on the CPU with a CPU generator (nn.Linear's own initialisation would draw from the default CUDA
    # generator), then moved
    layer = HeadTailOutput(ENCODER_WIDTH, freq, head_ratio=head_ratio, fan_in=shape.K, group_size=shape.G,
                           tail_features=tail, head_features=head, dtype=torch.bfloat16,
                           generator=torch.Generator().manual_seed(0))
    return layer.to("cuda")


def run_shape(shape: C.Shape, sets: int, bandwidth: float, rate: float, profile: bool) -> dict:
    B, L, K = shape.B, shape.L, shape.K
    head_ratio = HEAD_RATIO.get(shape.name, 0.05)
    gen = torch.Generator(device="cuda").manual_seed(1)
    # the encoder's output: it needs its gradient, as in a training step with an encoder
    xs = [torch.randn(B, ENCODER_WIDTH, device="cuda", generator=gen).bfloat16().requires_grad_(True)
          for _ in range(sets)]
    cpu_gen = torch.Generator().manual_seed(2)
    targets = [[torch.randint(0, L, (POSITIVES,), generator=cpu_gen) for _ in range(B)] for _ in range(sets)]
    positives = []
    for t in targets:
        r = torch.repeat_interleave(torch.arange(B), torch.tensor([len(v) for v in t])).cuda()
        positives.append((r, torch.cat(t).cuda()))
    row: dict = {"shape": shape.name, "B": B, "L": L, "K": K, "G": shape.G, "head_ratio": head_ratio}
    _ours(shape, head_ratio, xs, targets, positives, sets, profile, row)
    _free()
    x_tail = [x.detach()[:, : shape.H].contiguous().requires_grad_(True) for x in xs]
    return _dense_and_floor(shape, sets, bandwidth, rate, row, xs, x_tail, targets, positives)


def _ours(shape, head_ratio, xs, targets, positives, sets, profile, row) -> None:
    """The fused and unfused steps and the tail layer alone (the layer is freed on return)."""
    B = shape.B
    layer = _layer(shape, head_ratio)
    params = list(layer.parameters())
    row["head_labels"] = layer.num_head_labels
    gen = torch.Generator(device="cuda").manual_seed(3)

    def zero() -> None:
        for t in (*params, *xs):
            t.grad = None

    def fused_eager(i: int) -> None:
        zero()
        layer.loss(xs[i], targets[i]).backward()

    fused_args = [layer.loss_arguments(xs[i], targets[i])[0] for i in range(sets)]

    def fused_replayable(i: int) -> None:
        zero()
        ops.head_tail_loss_2d(*fused_args[i]).backward()

    row["fused_eager"] = C.bench(fused_eager, sets)
    row["fused_graph"] = C.timeit(fused_replayable, sets)
    row["fused_peak_bytes"] = peak_above(fused_eager, params)
    # the design that computes the loss in the forward and recomputes the logits in the backward
    ops.GRADIENTS_WITH_LOSS = False
    try:
        row["fused_recompute_eager"] = C.bench(fused_eager, sets)
        row["fused_recompute_graph"] = C.timeit(fused_replayable, sets)
        row["fused_recompute_peak_bytes"] = peak_above(fused_eager, params)
    finally:
        ops.GRADIENTS_WITH_LOSS = True
    row["workspace"] = fused_args[0][-1]
    chunks = loss_chunks(B, layer.num_head_labels, layer.num_tail_labels, shape.G, shape.K, torch.bfloat16,
                         fused_args[0][-2], row["workspace"])
    row["head_chunks"], row["tail_chunks"] = len(chunks.head), len(chunks.tail)
    # a chunk of dZ that stays in L2 between the kernel that writes it and the two that read it, at the price
    # of more chunks (more launches)
    if row["workspace"] > L2_WORKSPACE:
        small_args = [layer.loss_arguments(xs[i], targets[i], workspace=L2_WORKSPACE)[0] for i in range(sets)]

        def small_replayable(i: int) -> None:
            zero()
            ops.head_tail_loss_2d(*small_args[i]).backward()

        row["fused_l2_eager"] = C.bench(small_replayable, sets)
        row["fused_l2_graph"] = C.timeit(small_replayable, sets)
        small_args = None
    with torch.no_grad():
        value = layer.loss(xs[0], targets[0]).item()
        reference = sparse_bce_with_logits(layer(xs[0]), targets[0]).item()
    row["loss_rel_diff_vs_unfused"] = abs(value - reference) / abs(reference)
    if profile:
        row["profile"] = _profile(lambda: fused_eager(0))

    # unfused: the full logits and the loss on them (graph: targets as fixed device tensors)
    def unfused_eager(i: int) -> None:
        zero()
        sparse_bce_with_logits(layer(xs[i]), targets[i]).backward()

    def unfused_replayable(i: int) -> None:
        zero()
        z = layer(xs[i])
        rows, cols = positives[i]
        ((F.softplus(z.float()).sum() - z[rows, cols].float().sum()) / B).backward()

    try:
        row["unfused_eager"] = C.bench(unfused_eager, sets)
        row["unfused_graph"] = C.timeit(unfused_replayable, sets)
        row["unfused_peak_bytes"] = peak_above(unfused_eager, params)
    except torch.OutOfMemoryError:
        row["unfused_eager"] = row["unfused_graph"] = row["unfused_peak_bytes"] = None
    zero()
    _free()

    # the tail layer alone
    tail = layer.tail
    x_tail = [x.detach()[:, : shape.H].contiguous().requires_grad_(True) for x in xs]
    dzs = [torch.randn(B, tail.out_features, device="cuda", generator=gen).bfloat16() for _ in range(sets)]

    def tail_step(i: int) -> None:
        tail.weight.grad = tail.bias.grad = x_tail[i].grad = None
        tail(x_tail[i]).backward(dzs[i])

    row["tail_layer_graph"] = C.timeit(tail_step, sets)
    zero()


def _dense_and_floor(shape, sets, bandwidth, rate, row, xs, x_tail, targets, positives) -> dict:
    B, L, K = shape.B, shape.L, shape.K
    # dense layer with the same loss
    try:
        dense = torch.nn.Linear(shape.H, L, device="meta", dtype=torch.bfloat16).to_empty(device="cuda")
        gen = _cuda_generator(5)
        with torch.no_grad():
            dense.weight.uniform_(-(shape.H**-0.5), shape.H**-0.5, generator=gen)
            dense.bias.uniform_(-(shape.H**-0.5), shape.H**-0.5, generator=gen)
        dense_params = list(dense.parameters())

        def dense_eager(i: int) -> None:
            dense.weight.grad = dense.bias.grad = x_tail[i].grad = None
            sparse_bce_with_logits(dense(x_tail[i]), targets[i]).backward()

        def dense_replayable(i: int) -> None:
            dense.weight.grad = dense.bias.grad = x_tail[i].grad = None
            z = dense(x_tail[i])
            rows, cols = positives[i]
            ((F.softplus(z.float()).sum() - z[rows, cols].float().sum()) / B).backward()

        row["dense_eager"] = C.bench(dense_eager, sets)
        row["dense_graph"] = C.timeit(dense_replayable, sets)
        row["dense_peak_bytes"] = peak_above(dense_eager, dense_params)
    except torch.OutOfMemoryError:
        row["dense_eager"] = row["dense_graph"] = row["dense_peak_bytes"] = None
    dense = dense_params = None
    _free()

    exact, aligned = _bottleneck(B, K, L, sets), _bottleneck(B, K, C.round_up(L, 16), sets)
    for mode in ("eager", "graph"):
        row[f"bn_exact_{mode}"], row[f"bn_l16_{mode}"] = exact[mode], aligned[mode]
        present = [v for v in (exact[mode], aligned[mode]) if v is not None]
        row[f"bn_best_{mode}"] = min(present) if present else None

    # physical floor
    num_head, num_tail = row["head_labels"], L - row["head_labels"]
    head_width = ENCODER_WIDTH - shape.H if shape.H < ENCODER_WIDTH else ENCODER_WIDTH
    flops = 3 * 2 * B * (num_tail * K + num_head * head_width)
    weight_bytes = 2 * 2 * (num_tail * K + num_head * head_width)
    row["floor_flops_ms"] = flops / rate * 1e3
    row["floor_bytes_ms"] = weight_bytes / bandwidth * 1e3
    row["floor"] = max(row["floor_flops_ms"], row["floor_bytes_ms"])
    row["logits_bf16_bytes"] = 2 * B * L
    return row


def _warm_capture() -> None:
    """Capture one small fused step in a CUDA graph before any timing: the first capture on torch's capture
    stream sets up cuBLAS state there, which cannot happen inside a capture (the first shape's capture failed
    without this). A failure is printed in full."""
    layer = _layer(C.Shape("warm-up", 64, 384, 5000, 64, 16), 0.1)
    x = torch.randn(64, ENCODER_WIDTH, device="cuda", generator=_cuda_generator(6)).bfloat16().requires_grad_(True)
    args = layer.loss_arguments(x, [torch.tensor([1, 2])] * 64)[0]

    def step(_: int) -> None:
        ops.head_tail_loss_2d(*args).backward()

    try:
        C.bench_graph(step, 1, max_ms=10)
    except RuntimeError:
        traceback.print_exc()
        torch.cuda.synchronize()


def _profile(step: Callable[[], None]) -> list[tuple[str, float, int]]:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    totals: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = event.name.split("<")[0][:60]
            entry = totals.setdefault(name, [0.0, 0])
            entry[0] += event.device_time_total / 1e3
            entry[1] += 1
    return sorted(((n, ms, int(c)) for n, (ms, c) in totals.items()), key=lambda t: -t[1])[:12]


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def print_table(rows: list[dict]) -> None:
    gib = 2**30
    print("\n| shape | fused eager | fused graph | unfused eager | dense eager | bottleneck eager / graph | "
          "fused / bn (eager, graph) | tail layer graph | floor | fused graph / floor | "
          "peak fused / unfused / dense (GiB) | peak fused / bf16 [B,L] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peak = lambda k: "-" if r.get(k) is None else f"{r[k] / gib:.3f}"  # noqa: E731
        print(
            f"| {r['shape']} | {C.fmt(r['fused_eager'], 0)} | {C.fmt(r['fused_graph'], 0)} | "
            f"{C.fmt(r['unfused_eager'], 0)} | {C.fmt(r['dense_eager'], 0)} | "
            f"{C.fmt(r['bn_best_eager'], 0)} / {C.fmt(r['bn_best_graph'], 0)} | "
            f"{C.fmt(_ratio(r['fused_eager'], r['bn_best_eager']), 0, 2)}, "
            f"{C.fmt(_ratio(r['fused_graph'], r['bn_best_graph']), 0, 2)} | {C.fmt(r['tail_layer_graph'], 0)} | "
            f"{C.fmt(r['floor'], 0)} | {C.fmt(_ratio(r['fused_graph'], r['floor']), 0, 1)} | "
            f"{peak('fused_peak_bytes')} / {peak('unfused_peak_bytes')} / {peak('dense_peak_bytes')} | "
            f"{r['fused_peak_bytes'] / r['logits_bf16_bytes']:.3f} |"
        )
    for r in rows:
        if r.get("profile"):
            print(f"\nprofile of one fused eager step, {r['shape']} (kernel, ms, launches):")
            for name, ms, count in r["profile"]:
                print(f"  {ms:8.3f} {count:5d}  {name}")


def cpu_steps(shapes: list[C.Shape], reps: int) -> None:
    """``--cpu``: the same step on the CPU path (float32, the PyTorch implementation), fused and unfused, wall-clock
    medians of ``reps`` steps after one warm-up, and the peak of the process's resident memory growth."""
    print(f"CPU: {torch.get_num_threads()} threads, torch {torch.__version__}")
    print("| shape | fused s | unfused s | unfused / fused |")
    print("|---|---|---|---|")
    for shape in shapes:
        freq = np.random.default_rng(0).zipf(1.5, shape.L).clip(max=10**6)
        head = (shape.H, ENCODER_WIDTH) if shape.H < ENCODER_WIDTH else None
        layer = HeadTailOutput(ENCODER_WIDTH, freq, head_ratio=HEAD_RATIO.get(shape.name, 0.05), fan_in=shape.K,
                               group_size=shape.G, tail_features=(0, shape.H), head_features=head,
                               generator=torch.Generator().manual_seed(0))
        gen = torch.Generator().manual_seed(1)
        x = torch.randn(shape.B, ENCODER_WIDTH, generator=gen).requires_grad_(True)
        targets = [torch.randint(0, shape.L, (POSITIVES,), generator=gen) for _ in range(shape.B)]

        def timed(step: Callable[[], None]) -> float:
            step()
            times = []
            for _ in range(reps):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        fused = timed(lambda: layer.loss(x, targets).backward())
        unfused = timed(lambda: sparse_bce_with_logits(layer(x), targets).backward())
        print(f"| {shape.name} | {fused:.3f} | {unfused:.3f} | {unfused / fused:.2f} |", flush=True)
    print(f"peak resident memory of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="official,B512-L131K-K128")
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--history", default=str(C.HISTORY))
    parser.add_argument("--commit")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="time the CPU path instead (no GPU needed)")
    parser.add_argument("--cpu-reps", type=int, default=3)
    args = parser.parse_args()
    shapes = C.select_shapes(args.shapes)
    if args.cpu:
        cpu_steps(shapes, args.cpu_reps)
        return
    # Autograd nodes keep the stream they first ran on: the eager timings run on the default stream before each
    # capture, and a capture that then reaches such a node fails (pytorch/pytorch#164302). Where torch has
    # the opt-in that redirects those stale streams to the capturing one, use it.
    override = getattr(torch.autograd.graph, "set_override_stale_capture_stream", None)
    if override is not None:
        override(True)
    bandwidth, rate = C.copy_bandwidth(), gemm_rate()
    _warm_capture()
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"bf16 GEMM {rate / 1e12:.0f} TFLOP/s")
    rows = []
    for shape in shapes:
        row = run_shape(shape, args.sets, bandwidth, rate, args.profile)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    print_table(rows)
    commit = C.resolve_commit(args.commit)
    device = C.device_short_name()
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "commit": commit,
                                               "bandwidth": bandwidth, "gemm_rate": rate, "rows": rows}, indent=1))
    written = C.append_history(
        args.history, ((r["shape"], m, r.get(m)) for r in rows for m in HISTORY_METRICS),
        script="step.py", device=device, commit=commit,
    )
    print(f"{written} rows appended to {args.history}" if written else "no history written")


if __name__ == "__main__":
    main()
