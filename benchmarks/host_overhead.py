"""Host (CPU) cost of the layer's training step, as an eager training loop pays it.

    PYTHONPATH=. python3 benchmarks/host_overhead.py [--shapes official,B512-L131K-K128] [--steps 50]
        [--profile-shape Amazon-670K] [--profile-steps 200] [--torch-profiler]

Per shape (bf16, one GroupSharedFanIn tail layer, ``layer(x).backward(dz)`` with the gradients cleared to
None first, as Lightning's optimizer step leaves them):

- eager: median CUDA-event time of one step launched from Python; graph: the same step replayed from a CUDA
  graph (GPU time only); eager / graph is the host's share (target <= 1.15);
- host ms/step: ``time.perf_counter`` over ``--steps`` steps without waiting for the GPU (what the host
  spends launching), the same loop to the final ``torch.cuda.synchronize`` (wall per step), and with a
  synchronisation after every step.

Then, at ``--profile-shape``: the host time of one call of each kernel launcher (and of two small torch
calls for scale), and a cProfile of ``--profile-steps`` eager steps (top 25 functions by own time);
``--torch-profiler`` adds a torch.profiler table of 20 steps (CPU and CUDA time per op).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.profiler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared timing helpers and shapes

import lightning_haste as lh  # noqa: E402
from lightning_haste import kernels  # noqa: E402

TARGET = 1.15


def make_step(shape: C.Shape, sets: int = 2) -> tuple[lh.GroupSharedFanIn, Callable[[int], None], list, list]:
    """(layer, step(i), inputs, gradients) for one shape: step(i) is one eager training step on input set i."""
    _, B, H, L, K, G = shape
    dev, dtype = "cuda", torch.bfloat16
    layer = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, backend="cuda",
                                generator=torch.Generator(device=dev).manual_seed(0))
    xs = [torch.randn(B, H, device=dev, dtype=dtype, requires_grad=True) for _ in range(sets)]
    dzs = [torch.randn(B, L, device=dev, dtype=dtype) for _ in range(sets)]

    def step(i: int) -> None:
        layer.weight.grad = None
        layer.bias.grad = None
        xs[i].grad = None
        layer(xs[i]).backward(dzs[i])

    return layer, step, xs, dzs


def host_times(step: Callable[[int], None], steps: int) -> tuple[float, float, float]:
    """(host ms/step without waiting, wall ms/step to one final sync, wall ms/step syncing every step)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        step(i % 2)
    host = (time.perf_counter() - start) / steps
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / steps
    start = time.perf_counter()
    for i in range(steps):
        step(i % 2)
        torch.cuda.synchronize()
    synced = (time.perf_counter() - start) / steps
    return host * 1e3, wall * 1e3, synced * 1e3


def launcher_costs(shape: C.Shape, layer: lh.GroupSharedFanIn, xs: list, dzs: list, n: int = 200) -> None:
    """Host microseconds of one call of each kernel launcher, and of two small torch calls for scale."""
    _, B, H, L, K, _ = shape
    w, idx, b = layer.weight.detach(), layer.group_index, layer.bias.detach()
    xd, dz = xs[0].detach(), dzs[0]
    xt = kernels.layout.transpose_input(xd)
    gb = torch.empty(L, device="cuda", dtype=torch.bfloat16)
    calls = {
        "gsfi_forward": lambda: kernels.gsfi_forward(xd, w, idx, b, L),
        "gsfi_grad_input": lambda: kernels.gsfi_grad_input(dz, w, idx, H),
        "gsfi_grad_weight": lambda: kernels.gsfi_grad_weight(dz, xt, idx, w, grad_bias=gb),
        "torch.empty [B, H]": lambda: torch.empty(B, H, device="cuda"),
        "F.linear [B, K] x [1024, K]": lambda: F.linear(xd[:, :K], w[:1024]),
    }
    print(f"host time of one call at {shape.name} (mean of {n}, no sync):")
    for name, fn in calls.items():
        fn()
        print(f"  {name:<28} {C.host_ms(fn, n) * 1e3:8.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="official,B512-L131K-K128",
                        help="comma-separated names or groups (official, all, quick, b512)")
    parser.add_argument("--steps", type=int, default=50, help="steps per host-time loop")
    parser.add_argument("--profile-shape", default="Amazon-670K", help="shape of the launcher costs and cProfile")
    parser.add_argument("--profile-steps", type=int, default=200, help="eager steps under cProfile")
    parser.add_argument("--torch-profiler", action="store_true", help="also print a torch.profiler table")
    args = parser.parse_args()
    shapes = C.select_shapes(args.shapes)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; bf16; ms per step", flush=True)
    print(f"{'shape':<24}{'eager':>8}{'graph':>8}{'E/G':>7}|{'host':>8}{'wall':>8}{'synced':>8}")
    for shape in shapes:
        layer, step, xs, dzs = make_step(shape)
        eager = C.bench(step, 2)
        graph = C.timeit(step, 2)
        for _ in range(5):
            step(0)
        host, wall, synced = host_times(step, args.steps)
        flag = "*" if eager / graph > TARGET else " "
        print(f"{shape.name:<24}{C.fmt(eager)}{C.fmt(graph)}{C.fmt(eager / graph, 6, 2)}{flag}|"
              f"{C.fmt(host)}{C.fmt(wall)}{C.fmt(synced)}", flush=True)
        del layer, step, xs, dzs
        torch.cuda.empty_cache()
    print(f"(host: launching only; wall: to one final sync; synced: a sync after every step; * E/G above {TARGET})")
    print()

    shape = C.select_shapes(args.profile_shape)[0]
    layer, step, xs, dzs = make_step(shape)
    for _ in range(10):
        step(0)
    torch.cuda.synchronize()
    launcher_costs(shape, layer, xs, dzs)
    print()
    profile = cProfile.Profile()
    profile.enable()
    for i in range(args.profile_steps):
        step(i % 2)
    torch.cuda.synchronize()
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(25)
    print(f"cProfile of {args.profile_steps} eager steps at {shape.name} (top 25 by own time):")
    print(text.getvalue())
    if args.torch_profiler:
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for i in range(20):
                step(i % 2)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
