"""Time the GSFI layer and kernels against honest torch baselines measured in the same run.

    PYTHONPATH=. python3 benchmarks/kernels.py [--shapes all|quick|official|NAME,...] [--json PATH]
        [--history PATH] [--commit HASH]

Per shape (bf16; medians of CUDA-event timings over rotating random input sets, never zeros):

- ours: the layer's training step ``layer(x).backward(dz)`` (forward, grad-input, grad-weight with the fused
  bias gradient, as Lightning runs it), eager (launched from Python) and as CUDA-graph replays; the forward,
  grad-input and grad-weight kernels alone (graph); the peak memory of one eager step
  (``torch.cuda.max_memory_allocated`` above what was allocated before it);
- the cuBLAS FLOPs-matched bottleneck ``F.linear(X[B,K], W[L,K])``, forward and forward+backward (gradients
  of both operands from a given dZ of the matching shape), at the exact L and at L16 = L rounded up to a
  multiple of 16 (rows of an odd [B, L] output are not 16-byte aligned, which slows cuBLAS down); every
  ratio uses the faster of the two ("bn best", taken separately for eager and graph times);
- the full dense layer ``F.linear(X[B,H], W[L,H])`` the same way (None where it does not fit in memory);
- our pure-PyTorch path (``backend="torch"``) forward and forward+backward, and torch.sparse CSR's forward
  with the same fan-in;
- the forward byte floor ``(B*L + L*K) * 2 bytes / measured copy bandwidth``.

``--json`` writes every row; ``--history`` (default benchmarks/results/history.csv; '' for none) appends one
``date,commit,device,script,shape,metric,ms`` row per time measured. The commit is ``--commit``, else
$HASTE_COMMIT, else ``git rev-parse --short HEAD`` (the device machine's copy of the tree has no .git: pass it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared timing helpers, shapes and history file

import lightning_haste as lh  # noqa: E402
from lightning_haste import functional as LF  # noqa: E402
from lightning_haste import kernels  # noqa: E402

HOST_OVERHEAD_TARGET = 1.15  # ours eager / graph: the host's launch cost on top of the GPU time

# The times appended to the history file (graph unless named eager), in the order of the JSON rows.
HISTORY_METRICS = (
    "ours_fwd", "ours_grad_input", "ours_grad_weight", "ours_fwd_bwd", "ours_fwd_bwd_eager",
    "bottleneck_fwd", "bottleneck_fwd_bwd", "bottleneck_fwd_bwd_eager",
    "bottleneck_l16_fwd", "bottleneck_l16_fwd_bwd", "bottleneck_l16_fwd_bwd_eager",
    "bottleneck_best_fwd", "bottleneck_best_fwd_bwd", "bottleneck_best_fwd_bwd_eager",
    "dense_fwd", "dense_fwd_bwd", "dense_fwd_bwd_eager",
    "dense_l16_fwd", "dense_l16_fwd_bwd", "dense_l16_fwd_bwd_eager",
    "dense_best_fwd", "dense_best_fwd_bwd", "dense_best_fwd_bwd_eager",
    "csr_fwd", "torch_path_fwd", "torch_path_fwd_bwd", "fwd_byte_floor",
)


def _min(*values: Optional[float]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return min(present) if present else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def linear_baseline(
    B: int, in_dim: int, L: int, sets: int, dtype: torch.dtype, xs: Optional[list[torch.Tensor]] = None
) -> dict[str, Optional[float]]:
    """``F.linear(X[B, in_dim], W[L, in_dim])``: forward (graph), forward+backward (graph and eager), with
    a dZ [B, L] of random values and gradients for both operands. None entries where it does not fit."""
    dev = "cuda"
    result: dict[str, Optional[float]] = {"fwd": None, "fwd_bwd": None, "fwd_bwd_eager": None}
    try:
        w = torch.randn(L, in_dim, device=dev, dtype=dtype, requires_grad=True)
        if xs is None:
            x_in = [torch.randn(B, in_dim, device=dev, dtype=dtype, requires_grad=True) for _ in range(sets)]
        else:
            x_in = [x.detach().clone().requires_grad_(True) for x in xs]
        dzs = [torch.randn(B, L, device=dev, dtype=dtype) for _ in range(sets)]

        def fwd_bwd(i: int) -> None:
            w.grad = None
            x_in[i].grad = None
            F.linear(x_in[i], w).backward(dzs[i])

        result["fwd"] = C.timeit(lambda i: F.linear(x_in[i], w), sets)
        result["fwd_bwd_eager"] = C.bench(fwd_bwd, sets)
        result["fwd_bwd"] = C.timeit(fwd_bwd, sets)
    except torch.OutOfMemoryError:
        pass
    finally:
        w = x_in = dzs = None  # noqa: F841 - free before the next baseline allocates
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return result


def peak_step_bytes(step: Callable[[int], None], clear: Callable[[], None]) -> int:
    """Peak bytes one eager step allocates above what is allocated before it (gradients cleared first)."""
    clear()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step(0)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run_shape(
    shape: C.Shape, sets: int, bandwidth: float, dtype: torch.dtype = torch.bfloat16, index: str = "balanced"
) -> dict:
    name, B, H, L, K, G = shape
    dev = "cuda"
    L16 = C.round_up(L, 16)
    row: dict = {"shape": name, "B": B, "H": H, "L": L, "L16": L16, "K": K, "G": G, "index": index}
    gen = torch.Generator(device=dev).manual_seed(0)
    layer = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, generator=gen, backend="cuda")
    with torch.no_grad():
        if index == "uniform":  # uniform rows (some residue classes short), bank-interleaved order
            layer.group_index.copy_(lh.sample_group_index(layer.num_groups, H, K, balanced=False, generator=gen))
        elif index == "sorted":  # ascending rows instead of the bank-interleaved order
            layer.group_index.copy_(layer.group_index.sort(dim=1).values)
    xs = [torch.randn(B, H, device=dev, dtype=dtype) for _ in range(sets)]
    dzs = [torch.randn(B, L, device=dev, dtype=dtype) for _ in range(sets)]
    w, idx, b = layer.weight.detach(), layer.group_index, layer.bias.detach()

    # correctness spot check against the pure-PyTorch path (same bf16 inputs, fp32 accumulation)
    ours = kernels.gsfi_forward(xs[0], w, idx, b, L)[0]
    ref = LF.group_shared_fanin(xs[0], w, idx, b, L, backend="torch", check_index=False)
    row["fwd_rel_err_vs_torch_path"] = ((ours.float() - ref.float()).norm() / ref.float().norm()).item()
    del ours, ref

    # our kernels alone (grad-weight with the bias gradient, which the layer's backward fuses into it)
    xts = [kernels.layout.transpose_input(x) for x in xs]
    bias_grad = torch.empty(L, device=dev, dtype=dtype)
    row["ours_fwd"] = C.timeit(lambda i: kernels.gsfi_forward(xs[i], w, idx, b, L), sets)
    row["ours_grad_input"] = C.timeit(lambda i: kernels.gsfi_grad_input(dzs[i], w, idx, H), sets)
    row["ours_grad_weight"] = C.timeit(
        lambda i: kernels.gsfi_grad_weight(dzs[i], xts[i], idx, w, grad_bias=bias_grad), sets
    )
    xts = bias_grad = None  # freed before the step allocates

    # our training step, as Lightning runs it
    x_req = [x.clone().requires_grad_(True) for x in xs]

    def clear_ours() -> None:
        layer.weight.grad = None
        layer.bias.grad = None
        for x in x_req:
            x.grad = None

    def ours_fwd_bwd(i: int) -> None:
        layer.weight.grad = None
        layer.bias.grad = None
        x_req[i].grad = None
        layer(x_req[i]).backward(dzs[i])

    row["ours_fwd_bwd_eager"] = C.bench(ours_fwd_bwd, sets)
    row["ours_fwd_bwd"] = C.timeit(ours_fwd_bwd, sets)
    row["ours_fwd_bwd_peak_bytes"] = peak_step_bytes(ours_fwd_bwd, clear_ours)
    clear_ours()
    torch.cuda.empty_cache()

    # cuBLAS FLOPs-matched bottleneck [B, K] x [L, K]^T, and the full dense layer [B, H] x [L, H]^T, each at
    # the exact L and at L16 (the same measurement where L is a multiple of 16)
    for prefix, in_dim, inputs in (("bottleneck", K, None), ("dense", H, xs)):
        exact = linear_baseline(B, in_dim, L, sets, dtype, inputs)
        padded = exact if L16 == L else linear_baseline(B, in_dim, L16, sets, dtype, inputs)
        for key in ("fwd", "fwd_bwd", "fwd_bwd_eager"):
            row[f"{prefix}_{key}"] = exact[key]
            row[f"{prefix}_l16_{key}"] = padded[key]
            row[f"{prefix}_best_{key}"] = _min(exact[key], padded[key])

    # torch.sparse CSR with the same fan-in: Z^T = W_csr [L, H] @ X^T [H, B]
    try:
        crow = torch.arange(0, L * K + 1, K, device=dev, dtype=torch.int64)
        col = idx.long().repeat_interleave(G, dim=0)[:L].reshape(-1)
        csr = torch.sparse_csr_tensor(crow, col, w[:L].reshape(-1), size=(L, H), check_invariants=False)
        xts_dense = [x.t().contiguous() for x in xs]
        row["csr_fwd"] = C.timeit(lambda i: torch.sparse.mm(csr, xts_dense[i]), sets)
        csr = crow = col = xts_dense = None
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        row["csr_fwd"] = None
        row["csr_error"] = str(exc).splitlines()[0][:120]
    torch.cuda.empty_cache()

    # our pure-PyTorch path (bf16 inputs, fp32 accumulation)
    row["torch_path_fwd"] = C.timeit(
        lambda i: LF.group_shared_fanin(xs[i], w, idx, b, L, backend="torch", check_index=False), sets, max_ms=100
    )
    tl = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, backend="torch")
    tl.load_state_dict(layer.state_dict())

    def torch_fwd_bwd(i: int) -> None:
        tl.weight.grad = None
        tl.bias.grad = None
        x_req[i].grad = None
        tl(x_req[i]).backward(dzs[i])

    row["torch_path_fwd_bwd"] = C.timeit(torch_fwd_bwd, sets, max_ms=100)

    itemsize = torch.finfo(dtype).bits // 8
    floor_bytes = (B * L + L * K) * itemsize
    row["fwd_byte_floor"] = floor_bytes / bandwidth * 1e3
    row["fwd_vs_floor"] = row["ours_fwd"] / row["fwd_byte_floor"]
    row["fwd_achieved_TBps"] = floor_bytes / (row["ours_fwd"] * 1e-3) / 1e12
    row["fwd_vs_bottleneck_best"] = _ratio(row["ours_fwd"], row["bottleneck_best_fwd"])
    row["fwd_bwd_vs_bottleneck_best"] = _ratio(row["ours_fwd_bwd"], row["bottleneck_best_fwd_bwd"])
    row["fwd_bwd_vs_bottleneck_best_eager"] = _ratio(row["ours_fwd_bwd_eager"], row["bottleneck_best_fwd_bwd_eager"])
    row["fwd_bwd_vs_dense_best"] = _ratio(row["ours_fwd_bwd"], row["dense_best_fwd_bwd"])
    row["fwd_bwd_eager_vs_graph"] = row["ours_fwd_bwd_eager"] / row["ours_fwd_bwd"]
    return row


def print_tables(rows: list[dict], index: str) -> None:
    print()
    print(f"ms, bf16, group_index rows: {index}. G = CUDA-graph replay (GPU time), E = eager (launched from Python,")
    print("as an eager training step runs). bn = cuBLAS F.linear(X[B,K], W[L,K]) at the exact L and at L16 (L rounded")
    print("up to 16); best = the faster of the two, which every ratio uses. dense = F.linear(X[B,H], W[L,H]), best.")
    print(f"E/G = our step's eager time over its graph time (host overhead; target <= {HOST_OVERHEAD_TARGET}).")
    print()
    print(f"{'shape':<24}{'ours E':>8}{'ours G':>8}{'E/G':>7}|{'bn exG':>8}{'bn 16G':>8}{'best E':>8}{'best G':>8} |"
          f"{'G/bnG':>7}{'E/bnE':>7} |{'dnsE':>8}{'dnsG':>8}{'G/dnsG':>7}")
    for r in rows:
        flag = "*" if r["fwd_bwd_eager_vs_graph"] > HOST_OVERHEAD_TARGET else " "
        print(
            f"{r['shape']:<24}{C.fmt(r['ours_fwd_bwd_eager'])}{C.fmt(r['ours_fwd_bwd'])}"
            f"{C.fmt(r['fwd_bwd_eager_vs_graph'], 6, 2)}{flag}|"
            f"{C.fmt(r['bottleneck_fwd_bwd'])}{C.fmt(r['bottleneck_l16_fwd_bwd'])}"
            f"{C.fmt(r['bottleneck_best_fwd_bwd_eager'])}{C.fmt(r['bottleneck_best_fwd_bwd'])} |"
            f"{C.fmt(r['fwd_bwd_vs_bottleneck_best'], 7, 2)}{C.fmt(r['fwd_bwd_vs_bottleneck_best_eager'], 7, 2)} |"
            f"{C.fmt(r['dense_best_fwd_bwd_eager'])}{C.fmt(r['dense_best_fwd_bwd'])}"
            f"{C.fmt(r['fwd_bwd_vs_dense_best'], 7, 2)}"
        )
    print("(* : E/G above the target)")
    print()
    print("kernels alone (graph, ms); bn f = bottleneck forward, best of exact/L16; floor = forward byte floor;")
    print("torch = our pure-PyTorch path; csr = torch.sparse CSR forward; peak = our eager step's peak memory (MiB)")
    print(f"{'shape':<24}{'fwd':>7}{'gradX':>7}{'gradW':>7} |{'bn f':>7}{'f/bn':>6} |{'floor':>7}{'f/flr':>6}"
          f"{'TB/s':>6} |{'torch f':>8}{'torch fb':>9}{'csr f':>8} |{'peak':>8}")
    for r in rows:
        print(
            f"{r['shape']:<24}{C.fmt(r['ours_fwd'], 7)}{C.fmt(r['ours_grad_input'], 7)}"
            f"{C.fmt(r['ours_grad_weight'], 7)} |{C.fmt(r['bottleneck_best_fwd'], 7)}"
            f"{C.fmt(r['fwd_vs_bottleneck_best'], 6, 2)} |{C.fmt(r['fwd_byte_floor'], 7)}"
            f"{C.fmt(r['fwd_vs_floor'], 6, 2)}{C.fmt(r['fwd_achieved_TBps'], 6, 2)} |"
            f"{C.fmt(r['torch_path_fwd'])}{C.fmt(r['torch_path_fwd_bwd'], 9)}{C.fmt(r['csr_fwd'])} |"
            f"{C.fmt(r['ours_fwd_bwd_peak_bytes'] / 2**20, 8, 1)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="all", help="comma-separated names or groups: all, quick, official, b512")
    parser.add_argument("--sets", type=int, default=2, help="input sets to rotate")
    parser.add_argument("--json", default=None, help="write all rows to this JSON file")
    parser.add_argument("--history", default=str(C.HISTORY), help="CSV file to append the times to ('' for none)")
    parser.add_argument("--commit", default=None, help="commit measured (default: $HASTE_COMMIT, else git)")
    parser.add_argument("--index", choices=("balanced", "uniform", "sorted"), default="balanced",
                        help="group_index rows as new layers draw them (balanced over residues mod 8, "
                        "bank-interleaved), uniform draws (interleaved), or uniform draws sorted ascending")
    args = parser.parse_args()
    shapes = C.select_shapes(args.shapes)
    commit = C.resolve_commit(args.commit)

    props = torch.cuda.get_device_properties(0)
    bandwidth = C.copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write); commit {commit}; {C.today()}", flush=True)
    rows = []
    for shape in shapes:
        t0 = time.perf_counter()
        try:
            rows.append(run_shape(shape, sets=args.sets, bandwidth=bandwidth, index=args.index))
            torch.cuda.empty_cache()
        except torch.OutOfMemoryError as exc:
            print(f"{shape.name}: out of memory ({exc})", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        print(f"  {shape.name} done in {time.perf_counter() - t0:.1f} s: {json.dumps(rows[-1])}", flush=True)

    print_tables(rows, args.index)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": props.name, "copy_bandwidth": bandwidth, "torch": torch.__version__,
                       "commit": commit, "date": C.today(), "index": args.index, "rows": rows}, fh, indent=1)
    if args.index == "balanced":  # the history tracks the default layout only
        items = [(r["shape"], metric, r.get(metric)) for r in rows for metric in HISTORY_METRICS]
        written = C.append_history(args.history, items, script="kernels.py", device=C.device_short_name(),
                                   commit=commit)
        if written:
            print(f"\nappended {written} rows to {args.history}")


if __name__ == "__main__":
    main()
