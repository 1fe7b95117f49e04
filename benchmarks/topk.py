"""Top-k of the output layer (inference, validation) against honest baselines in the same run.

    PYTHONPATH=. python3 benchmarks/topk.py [--shapes official,B512-L131K-K128,B512-L670K-K128] [--ks 5,100]
        [--json PATH] [--history PATH] [--commit HASH] [--tuning "topk.chunk_columns=0 ..."]

Per shape and k (bf16, ``HeadTailOutput`` set up as in benchmarks/step.py: the data set's head ratio, an encoder
768 wide whose features 0..383 feed the tail and 384..767 the head where the tail reads 384; medians of CUDA-event
timings over rotating random inputs, never zeros):

- fused: ``layer.topk(x, k)`` eager, as validation and prediction call it: from the second call of a shape the
  layer's CUDA graph replayed, which holds the whole exact top-k where graphs take conditional nodes (the rare
  further rounds run only where a list overflowed; no host synchronisation: ``conditional_nodes`` in the row)
  (``fused_eager``); the same with the layer's graphs off, every kernel launched by the host
  (``fused_launched``); and the round alone captured in a CUDA graph by this script (``fused_graph``: GPU time
  without the host);
- ``fused_eager_host_check``: the same with graphs of one round, the host reading the round's overflow flag after
  each replay (``RoundGraphs(conditional=False)``; the layer's way where graphs take no conditional nodes);
  ``fused_pipelined`` and ``fused_pipelined_host_check``: those two with the calls issued back to back and one
  synchronisation at the end (``triton.testing.do_bench``'s way, as a validation loop issues them);
- chunked: the pure-PyTorch path over chunks of labels with a running top-k (the path before the kernels, with
  the ranking order), eager;
- dense: ``F.linear(X[B, H], W[L, H]) + torch.topk`` at the exact L and at L rounded up to a multiple of 16
  (cuBLAS is slow on odd L; ratios use the faster), eager and graph;
- tail_forward: our forward kernel of the tail alone (``layer.tail(x)``, the logits stored), graph: the target is
  fused top-k <= 1.3 x this;
- peak memory of the first three ``topk`` calls of a shape (eager, captured, replayed) above what was allocated
  before, and the memory the layer's graph keeps between calls, each against one bf16 [B, L] tensor;
- ``--profile``: instead of the timings, the CUDA kernels of one ``topk`` per shape and k with the kernels launched
  one by one, by total time, and their count (torch.profiler). A mode of its own: once torch.profiler's CUDA
  activity has run in a process, the replays of graphs with conditional nodes captured after it took 2.2-4.2 ms
  at the shapes here instead of 0.24-1.7 ms (torch 2.11, CUDA 13.0, H100; why was not established), so no timing
  follows it.

``--tuning``: kernel settings for the whole run (:func:`lightning_haste.kernels.tuning.parse` items), named in each
row and in the history's shape (``<shape>/k<k>/<tuning>``).

``--history`` (default benchmarks/results/history.csv; '' for none) appends ``date,commit,device,script,shape,
metric,ms`` rows, the shape named ``<shape>/k<k>``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared timing helpers, shapes and history file

from lightning_haste import HeadTailOutput  # noqa: E402
from lightning_haste.kernels import tuning  # noqa: E402
from lightning_haste.topk import RoundGraphs, conditional_blocks_supported  # noqa: E402

HEAD_RATIO = {"Amazon-670K": 0.10, "AmazonTitles-670K": 0.10, "Amazon-3M": 0.02, "LF-Paper2Keywords-8.6M": 0.05}
ENCODER_WIDTH = 768
HISTORY_METRICS = ("fused_eager", "fused_pipelined", "fused_eager_host_check", "fused_pipelined_host_check",
                   "fused_launched", "fused_graph", "chunked_eager", "dense_best_eager",
                   "dense_best_graph", "tail_forward_graph")


@contextlib.contextmanager
def _graphs_off(layer: HeadTailOutput) -> Iterator[None]:
    """The layer's top-k with every kernel launched by the host (its graphs kept aside, then put back)."""
    graphs, layer.topk_graphs = layer.topk_graphs, RoundGraphs(0)
    try:
        yield
    finally:
        layer.topk_graphs = graphs


def _free() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def _layer(shape: C.Shape) -> HeadTailOutput:
    freq = np.random.default_rng(0).zipf(1.5, shape.L).clip(max=10**6)
    head = (shape.H, ENCODER_WIDTH) if shape.H < ENCODER_WIDTH else None
    layer = HeadTailOutput(ENCODER_WIDTH, freq, head_ratio=HEAD_RATIO.get(shape.name, 0.05), fan_in=shape.K,
                           group_size=shape.G, tail_features=(0, shape.H), head_features=head, dtype=torch.bfloat16,
                           generator=torch.Generator().manual_seed(0))
    return layer.to("cuda")


def _dense(shape: C.Shape, L: int, k: int, xs: list[torch.Tensor], sets: int) -> tuple[Optional[float], ...]:
    try:
        w = torch.randn(L, shape.H, device="cuda", generator=torch.Generator(device="cuda").manual_seed(4))
        w = (w / shape.H**0.5).bfloat16()
        x_tail = [x[:, : shape.H].contiguous() for x in xs]
        step = lambda i: F.linear(x_tail[i], w).topk(k, dim=1)  # noqa: E731
        return C.bench(step, sets), C.timeit(step, sets)
    except torch.OutOfMemoryError:
        return None, None
    finally:
        w = None  # noqa: F841
        _free()


def _profile(layer: HeadTailOutput, x: torch.Tensor, k: int) -> str:
    from torch.profiler import ProfilerActivity, profile  # noqa: PLC0415 - only with --profile

    with _graphs_off(layer):
        layer.topk(x, k)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                layer.topk(x, k)
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    launches = sum(e.count for e in events) / 5
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14)
    return f"{launches:.0f} kernels per call\n{table}"


def profile_shape(shape: C.Shape, k: int) -> None:
    """Print the kernels of one ``topk`` of ``shape`` (``--profile``)."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(shape.B, ENCODER_WIDTH, device="cuda", generator=gen).bfloat16()
    layer = _layer(shape)
    with torch.no_grad():
        print(f"profile {shape.name} k={k}: {_profile(layer, x, k)}", flush=True)
    layer = None  # noqa: F841
    _free()


def run_shape(shape: C.Shape, k: int, sets: int) -> dict:
    B, L = shape.B, shape.L
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(B, ENCODER_WIDTH, device="cuda", generator=gen).bfloat16() for _ in range(sets)]
    row: dict = {"shape": shape.name, "k": k, "B": B, "L": L, "K": shape.K, "G": shape.G}
    layer = _layer(shape)
    row["head_labels"] = layer.num_head_labels
    with torch.no_grad():
        row["fused_eager"] = C.bench(lambda i: layer.topk(xs[i], k), sets)
        row["fused_pipelined"] = C.bench_pipelined(lambda i: layer.topk(xs[i], k), sets)
        row["conditional_nodes"] = layer.topk_graphs.conditional and conditional_blocks_supported(xs[0].device)
        # the graph of one round, the host reading its overflow flag after each replay (the layer's way where
        # graphs take no conditional nodes)
        graphs, layer.topk_graphs = layer.topk_graphs, RoundGraphs(2, conditional=False)
        row["fused_eager_host_check"] = C.bench(lambda i: layer.topk(xs[i], k), sets)
        row["fused_pipelined_host_check"] = C.bench_pipelined(lambda i: layer.topk(xs[i], k), sets)
        ids_host_check = layer.topk(xs[0], k)[1]
        layer.topk_graphs = graphs
        row["ids_equal_host_check"] = float((ids_host_check == layer.topk(xs[0], k)[1]).float().mean())
        with _graphs_off(layer):
            row["fused_launched"] = C.bench(lambda i: layer.topk(xs[i], k), sets)
        # the round the layer's graph replays, captured here by the script
        row["fused_graph"] = C.timeit(lambda i: layer._fused_topk(xs[i], k, synchronize=False), sets)
        row["chunked_eager"] = C.bench(lambda i: layer._chunked_topk(xs[i], k), sets, max_ms=2000, min_reps=3)
        x_tail = [x[:, : shape.H].contiguous() for x in xs]
        row["tail_forward_graph"] = C.timeit(lambda i: layer.tail(x_tail[i]), sets)
        layer.topk_graphs.clear()
        _free()
        base, base_reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        for i in range(3):
            out = layer.topk(xs[i % sets], k)
        torch.cuda.synchronize()
        row["peak_over_bf16_logits"] = (torch.cuda.max_memory_allocated() - base) / (2 * B * L)
        out = None  # noqa: F841
        _free()
        row["graph_kept_over_bf16_logits"] = (torch.cuda.memory_reserved() - base_reserved) / (2 * B * L)
        # the result agrees with the chunked path (the same ranking order; the logits may differ in the last bit
        # where the forward picks another kernel than the candidate kernel's main loop)
        fused_ids = layer.topk(xs[0], k)[1]
        chunked_ids = layer._chunked_topk(xs[0], k)[1]
        row["ids_equal_chunked"] = float((fused_ids == chunked_ids).float().mean())
        with _graphs_off(layer):
            row["ids_equal_launched"] = float((fused_ids == layer.topk(xs[0], k)[1]).float().mean())
    layer = None  # noqa: F841 - frees the layer before the dense baselines
    _free()
    for name, labels in (("dense_exact", L), ("dense_l16", C.round_up(L, 16))):
        row[f"{name}_eager"], row[f"{name}_graph"] = _dense(shape, labels, k, xs, sets)
    for mode in ("eager", "graph"):
        options = [row[f"dense_{n}_{mode}"] for n in ("exact", "l16") if row[f"dense_{n}_{mode}"] is not None]
        row[f"dense_best_{mode}"] = min(options) if options else None
    tail = row["tail_forward_graph"]
    row["fused_eager_over_tail_forward"] = row["fused_eager"] / tail
    for key in ("fused_pipelined", "fused_eager_host_check", "fused_pipelined_host_check"):
        if row.get(key) is not None:
            row[f"{key}_over_tail_forward"] = row[key] / tail
    row["fused_launched_over_tail_forward"] = row["fused_launched"] / tail
    row["fused_graph_over_tail_forward"] = row["fused_graph"] / tail if row["fused_graph"] else None
    if row["dense_best_eager"]:
        row["fused_eager_over_dense_eager"] = row["fused_eager"] / row["dense_best_eager"]
    return row


def _print_markdown(rows: list[dict], columns: list[tuple[str, str, int]]) -> None:
    """A markdown table of ``rows``: shape, k, then one column per ``(header, key, digits)`` ("-" where missing;
    ``digits`` 0: the value as it is)."""
    def cell(row: dict, key: str, digits: int) -> str:
        value = row.get(key)
        return "-" if value is None else str(value) if digits == 0 else f"{value:.{digits}f}"

    print("\n| shape | k | " + " | ".join(header for header, _, _ in columns) + " |")
    print("|---|---|" + "---|" * len(columns))
    for r in rows:
        print(f"| {r['shape']} | {r['k']} | " + " | ".join(cell(r, key, d) for _, key, d in columns) + " |")


def print_table(rows: list[dict]) -> None:
    _print_markdown(rows, [
        ("conditional nodes", "conditional_nodes", 0), ("fused eager", "fused_eager", 3),
        ("fused pipelined", "fused_pipelined", 3), ("host check: eager", "fused_eager_host_check", 3),
        ("host check: pipelined", "fused_pipelined_host_check", 3), ("tail forward", "tail_forward_graph", 3),
        ("eager / forward", "fused_eager_over_tail_forward", 2),
        ("pipelined / forward", "fused_pipelined_over_tail_forward", 2),
        ("host check: eager / forward", "fused_eager_host_check_over_tail_forward", 2),
    ])
    _print_markdown(rows, [
        ("fused eager", "fused_eager", 3), ("fused launched", "fused_launched", 3), ("fused graph", "fused_graph", 3),
        ("chunked eager", "chunked_eager", 3), ("dense+topk eager", "dense_best_eager", 3),
        ("dense+topk graph", "dense_best_graph", 3), ("tail forward", "tail_forward_graph", 3),
        ("fused eager / forward", "fused_eager_over_tail_forward", 2),
        ("fused launched / forward", "fused_launched_over_tail_forward", 2),
        ("fused eager / dense", "fused_eager_over_dense_eager", 2),
        ("peak / bf16 [B,L]", "peak_over_bf16_logits", 3),
        ("graph kept / bf16 [B,L]", "graph_kept_over_bf16_logits", 3),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="official,B512-L131K-K128,B512-L670K-K128")
    parser.add_argument("--ks", default="5,100")
    parser.add_argument("--sets", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--history", default=str(C.HISTORY))
    parser.add_argument("--commit")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--tuning", default="")
    args = parser.parse_args()
    with tuning.use(tuning.parse(args.tuning)):
        _run(args)


def _run(args: argparse.Namespace) -> None:
    shapes = C.select_shapes(args.shapes)
    ks = [int(v) for v in args.ks.split(",")]
    print(f"device {torch.cuda.get_device_name()}")
    if args.profile:
        for shape in shapes:
            for k in ks:
                profile_shape(shape, k)
        return
    rows = []
    for shape in shapes:
        for k in ks:
            row = run_shape(shape, k, args.sets)
            if args.tuning:
                row["tuning"] = args.tuning
            rows.append(row)
            print(json.dumps(row), flush=True)
    print_table(rows)
    commit = C.resolve_commit(args.commit)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "commit": commit,
                                               "rows": rows}, indent=1))
    written = C.append_history(
        args.history, ((f"{r['shape']}/k{r['k']}" + (f"/{args.tuning}" if args.tuning else ""), m, r.get(m))
                       for r in rows for m in HISTORY_METRICS),
        script="topk.py", device=C.device_short_name(), commit=commit,
    )
    print(f"{written} rows appended to {args.history}" if written else "no history written")


if __name__ == "__main__":
    main()
