"""Shared pieces of the benchmark scripts: the benchmark shapes, CUDA timing helpers, the copy bandwidth and
the history file. Not a script; the scripts import it with

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _common as C

Timing: :func:`bench` is the median of CUDA-event timings of one call, over rotating input sets (never
zeros, so no all-zero shortcut); :func:`bench_graph` captures one call per input set in a CUDA graph and
times the replays (GPU time without the host's launch gaps); :func:`timeit` is the graph time, or the
eager time where the work cannot be captured.

History: :func:`append_history` appends ``date,commit,device,script,shape,metric,ms`` rows to a CSV file
(``benchmarks/results/history.csv`` by default), writing the header only when the file is new or empty.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple, Optional

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
HISTORY = BENCH_DIR / "results" / "history.csv"
HISTORY_FIELDS = ("date", "commit", "device", "script", "shape", "metric", "ms")


class Shape(NamedTuple):
    """One benchmark shape: batch B, input width H, labels L, fan-in K, group size G."""

    name: str
    B: int
    H: int
    L: int
    K: int
    G: int


SHAPES = [
    Shape("B512-L131K-K64", 512, 768, 131072, 64, 32),
    Shape("B512-L131K-K128", 512, 768, 131072, 128, 32),
    Shape("B512-L670K-K64", 512, 768, 670208, 64, 32),
    Shape("B512-L670K-K128", 512, 768, 670208, 128, 32),
    Shape("Amazon-670K", 64, 384, 670091, 64, 16),
    Shape("AmazonTitles-670K", 256, 384, 670091, 128, 16),
    Shape("Amazon-3M", 128, 768, 2812281, 128, 64),
    Shape("LF-Paper2Keywords-8.6M", 128, 384, 8623847, 64, 32),
]
OFFICIAL = ("Amazon-670K", "AmazonTitles-670K", "Amazon-3M", "LF-Paper2Keywords-8.6M")
QUICK = ("B512-L131K-K128", "Amazon-670K")


def hide_benchmarks_from_imports() -> None:
    """Take this folder off ``sys.path`` once a script has imported what it needs from it: it holds ``kernels.py``
    (the kernel benchmark), and transformers imports the Hugging Face ``kernels`` package by that name (Python puts
    a script's own folder first on the path)."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]


def select_shapes(spec: str, extra: Iterable[Shape] = ()) -> list[Shape]:
    """Comma-separated shape names (of SHAPES and ``extra``) or groups: ``all``, ``quick``, ``official``,
    ``b512``; e.g. ``official,B512-L131K-K128``. In the order given, without repeats."""
    known = list(SHAPES) + list(extra)
    groups = {
        "all": tuple(s.name for s in SHAPES), "quick": QUICK, "official": OFFICIAL,
        "b512": tuple(s.name for s in SHAPES if s.B == 512),
    }
    wanted: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        for name in groups.get(part, (part,) if part else ()):
            if name not in wanted:
                wanted.append(name)
    by_name = {s.name: s for s in known}
    unknown = [name for name in wanted if name not in by_name]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known: {[s.name for s in known]} and {list(groups)}")
    return [by_name[name] for name in wanted]


def round_up(value: int, multiple: int) -> int:
    return (value + multiple - 1) // multiple * multiple


def bench(
    fn: Callable[[int], object], sets: int, max_ms: float = 300.0, min_reps: int = 5, max_reps: int = 200
) -> float:
    """Median milliseconds of ``fn(i)`` over rotating input sets ``i``, timed with CUDA events (two warm-up
    calls; at least ``min_reps`` timings, more until ``max_ms`` of wall time or ``max_reps``)."""
    for i in range(2):
        fn(i % sets)
    torch.cuda.synchronize()
    times: list[float] = []
    start_wall = time.perf_counter()
    i = 0
    while len(times) < max_reps and (len(times) < min_reps or (time.perf_counter() - start_wall) * 1e3 < max_ms):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn(i % sets)
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
        i += 1
    return statistics.median(times)


def bench_pipelined(fn: Callable[[int], object], sets: int, reps: int = 100) -> float:
    """Median milliseconds between CUDA events recorded around each of ``reps`` calls of ``fn(i)`` issued back to
    back, with one synchronisation at the end (``triton.testing.do_bench``'s way): where the calls do not wait for
    the GPU, the host queues the next call while the GPU runs this one, as in a validation loop, and a call's time
    is its GPU time (and the host's where the host is the slower)."""
    for i in range(2):
        fn(i % sets)
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for i, (begin, end) in enumerate(events):
        begin.record()
        fn(i % sets)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(begin.elapsed_time(end) for begin, end in events)


def host_ms(fn: Callable[[], object], reps: int = 200) -> float:
    """Mean host milliseconds of one ``fn()`` over ``reps`` calls, without waiting for the GPU in between (what the
    host spends issuing the work); the GPU is drained before and after."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    elapsed = (time.perf_counter() - start) / reps * 1e3
    torch.cuda.synchronize()
    return elapsed


def bench_graph(fn: Callable[[int], object], sets: int, **kw: float) -> float:
    """Median milliseconds of one ``fn(i)`` call, captured in a CUDA graph per input set: GPU time without
    the host's launch gaps (which dominate eager timings of sub-millisecond Python-launched work)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(sets):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for i in range(sets):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(i)
        graphs.append(graph)
    return bench(lambda i: graphs[i].replay(), sets, **kw)


def timeit(fn: Callable[[int], object], sets: int, **kw: float) -> float:
    """Graph-captured time; eager time (with a note on stderr) where the work cannot be captured. Out of
    memory is raised, not retried eagerly."""
    try:
        return bench_graph(fn, sets, **kw)
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as exc:
        torch.cuda.synchronize()
        print(f"note: CUDA-graph capture failed, timed eagerly instead ({str(exc).splitlines()[0][:100]})",
              file=sys.stderr)
        return bench(fn, sets, **kw)


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written), from a 1 GiB copy."""
    numel = 256 * 2**20
    src = torch.randn(numel, device="cuda", dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), 1, max_ms=200)
    return 2 * numel * 4 / (ms * 1e-3)


def device_short_name(index: int = 0) -> str:
    """``H200`` for "NVIDIA H200", ``H100`` for "NVIDIA H100 80GB HBM3": the history file's device column."""
    name = torch.cuda.get_device_name(index).replace("NVIDIA", "").strip()
    return name.split()[0] if name else "unknown"


def resolve_commit(explicit: Optional[str] = None, repo_dir: Optional[Path] = None) -> str:
    """The measured commit: ``explicit`` (a ``--commit`` argument), else $HASTE_COMMIT, else
    ``git rev-parse --short HEAD`` of ``repo_dir`` (default: this tree; ``-dirty`` appended when tracked
    files differ from it), else ``unknown`` (the device machine's copy of the tree has no .git: pass it in)."""
    if explicit:
        return explicit
    if os.environ.get("HASTE_COMMIT"):
        return os.environ["HASTE_COMMIT"]
    cwd = repo_dir or REPO_DIR
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0 or not head.stdout.strip():
            return "unknown"
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def today() -> str:
    return datetime.date.today().isoformat()


def append_history(
    path: Optional[str | Path],
    rows: Iterable[tuple[str, str, Optional[float]]],
    *,
    script: str,
    device: str,
    commit: str,
    date: Optional[str] = None,
) -> int:
    """Append one ``date,commit,device,script,shape,metric,ms`` row per ``(shape, metric, ms)`` (rows with
    ``ms`` None are skipped) to the CSV file ``path``; an empty or None path writes nothing. Returns the
    number of rows written."""
    if not path:
        return 0
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    date = date or today()
    written = 0
    with path.open("a", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        if new:
            writer.writerow(HISTORY_FIELDS)
        for shape, metric, ms in rows:
            if ms is None:
                continue
            writer.writerow((date, commit, device, script, shape, metric, f"{ms:.6g}"))
            written += 1
    return written


def report_row(row: dict, path: Optional[str | Path], hidden: tuple[str, ...] = ()) -> None:
    """Print one result row as JSON (without the ``hidden`` keys) and append it, whole, to the JSON-lines file
    ``path`` (none if empty or None)."""
    print(json.dumps({k: v for k, v in row.items() if k not in hidden}), flush=True)
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps(row) + "\n")


def fmt(value: Optional[float], width: int = 8, digits: int = 3) -> str:
    """``value`` right-aligned in ``width`` with ``digits`` decimals; ``-`` for None."""
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"
