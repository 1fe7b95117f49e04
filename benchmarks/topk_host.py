"""Where the host's time goes in a replayed ``HeadTailOutput.topk`` call, and what the cached casts save.

    PYTHONPATH=. python3 benchmarks/topk_host.py [--shapes Amazon-670K,B512-L131K-K128,AmazonTitles-670K,Amazon-3M]
        [--cast-shapes Amazon-670K,AmazonTitles-670K] [--profile]

Per shape (bf16 layer as in benchmarks/topk.py, k = 5, inputs rotating over four random sets):

- ``wall``: ``time.perf_counter`` per call over 50 calls of ``layer.topk`` from its third call (the graph replayed),
  up to the GPU's end of the last; ``graph GPU``: the layer's own graph replayed alone (CUDA
  events); ``fallback rows``: rows per call that took the eager rounds after the replay (lists that overflowed);
- the host time of each piece of the replayed call, each timed alone over 200 calls: the input checks, the graph
  key, the index check, the input's copy into the graph, the replay's enqueueing, the copy of the outputs (one
  buffer) and their views, and, where the graph holds one round only (no conditional nodes), the read of its
  overflow flag (which waits for the GPU);
- ``--profile``: a cProfile of 100 calls (top 18 by own time).

Then, per ``--cast-shapes``: the same layer in float32 under ``torch.autocast(bfloat16)`` (``bf16-mixed``
validation), its replayed ``topk`` with the cached 16-bit copies of its parameters, against the bf16 layer's and
against the GPU time of casting the four parameters (what every call paid before the copies were kept).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared timing helpers and shapes
import topk as T  # noqa: E402 - the layers of benchmarks/topk.py

from lightning_haste import topk as fused  # noqa: E402


def host_breakdown(name: str, k: int, profile: bool) -> None:
    shape = C.select_shapes(name)[0]
    layer = T._layer(shape)
    xs = [torch.randn(shape.B, T.ENCODER_WIDTH, device="cuda").bfloat16() for _ in range(4)]
    fallbacks: list[int] = []
    eager = type(layer)._eager_topk

    def counting(self, x2d, kk):  # noqa: ANN001, ANN202
        fallbacks.append(x2d.shape[0])
        return eager(self, x2d, kk)

    type(layer)._eager_topk = counting
    try:
        with torch.no_grad():
            for i in range(3):
                layer.topk(xs[i % 4], k)
            fallbacks.clear()
            calls = 50
            torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(calls):
                layer.topk(xs[i % 4], k)
            torch.cuda.synchronize()  # counted: the calls' rate, whether or not each call waits for the GPU
            wall = (time.perf_counter() - start) / calls * 1e3
            x = xs[0]
            x2d = layer._check_input(x)
            key = layer._topk_graph_key(x2d, k)
            graph, static_x, packed, layout = layer.topk_graphs._graphs[key]
            outputs = fused._unpack(packed, layout)
            parts = {
                "check_input": C.host_ms(lambda: layer._check_input(x)),
                "graph_key": C.host_ms(lambda: layer._topk_graph_key(x2d, k)),
                "check_group_index": C.host_ms(lambda: layer.tail.check_group_index()),
                "copy_in": C.host_ms(lambda: static_x.copy_(x2d)),
                "replay_enqueue": C.host_ms(lambda: graph.replay(), 20),
                "clone_and_views": C.host_ms(lambda: fused._unpack(packed.clone(), layout)),
            }
            if len(outputs) == 4:  # a graph of one round: the host reads its overflow flag
                parts["flag_read"] = C.host_ms(lambda: bool(outputs[3]))
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            times = []
            for _ in range(21):
                begin.record()
                graph.replay()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end))
            graph_ms = sorted(times)[10]
            profiler = cProfile.Profile() if profile else None
            if profiler is not None:
                profiler.enable()
                for i in range(100):
                    layer.topk(xs[i % 4], k)
                torch.cuda.synchronize()
                profiler.disable()
    finally:
        type(layer)._eager_topk = eager
    whole = "every round in the graph" if len(layout) == 2 else "one round in the graph"
    print(f"{name} k={k} ({whole}): wall/call {wall:.3f} ms; graph GPU {graph_ms:.3f} ms; fallback rows/call "
          f"{sum(fallbacks) / calls}; host ms: {({part: round(ms, 4) for part, ms in parts.items()})}", flush=True)
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(18)
        print(out.getvalue())


def cached_casts(name: str, k: int) -> None:
    shape = C.select_shapes(name)[0]
    layer = T._layer(shape).float().eval()
    xs = [torch.randn(shape.B, T.ENCODER_WIDTH, device="cuda") for _ in range(2)]
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        cached = C.bench(lambda i: layer.topk(xs[i], k), 2)
        params = [layer.head.weight, layer.head.bias, layer.tail.weight, layer.tail.bias]
        cast = C.timeit(lambda i: [p.to(torch.bfloat16) for p in params], 2)
        bf16 = T._layer(shape)
        bf16_ms = C.bench(lambda i: bf16.topk(xs[i].bfloat16(), k), 2)
    print(f"{name} k={k}: float32 layer under bf16 autocast, replayed with the cached copies {cached:.3f} ms; "
          f"casting its four parameters {cast:.3f} ms (graph); the bf16 layer {bf16_ms:.3f} ms; copies kept "
          f"{len(layer.topk_casts)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="Amazon-670K,B512-L131K-K128,AmazonTitles-670K,Amazon-3M")
    parser.add_argument("--cast-shapes", default="Amazon-670K,AmazonTitles-670K")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    print(C.device_short_name(), flush=True)
    for name in filter(None, args.shapes.split(",")):
        host_breakdown(name, args.k, args.profile)
        torch.cuda.empty_cache()
    for name in filter(None, args.cast_shapes.split(",")):
        cached_casts(name, args.k)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
