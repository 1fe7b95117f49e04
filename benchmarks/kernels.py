"""Time the GSFI CUDA kernels against torch baselines measured in the same run.

    PYTHONPATH=. python3 benchmarks/kernels.py [--shapes all|quick] [--json results.json]

For every shape: our forward, grad-input, grad-weight and full forward+backward (through the autograd
op, as training runs it); the cuBLAS FLOPs-matched dense bottleneck F.linear(X[B,K], W[L,K]) forward
and forward+backward; the full dense layer F.linear(X[B,H], W[L,H]); torch.sparse CSR with the same
fan-in (forward); our pure-PyTorch path. Times are medians of CUDA-event timings over rotating input
sets (never zeros). Also prints achieved bandwidth against the measured copy bandwidth and the forward
byte floor (B*L + L*K) * bytes / bandwidth.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import lightning_haste as lh
from lightning_haste import functional as LF
from lightning_haste import kernels

# name, B, H, L, K, G
SHAPES = [
    ("B512-L131K-K64", 512, 768, 131072, 64, 32),
    ("B512-L131K-K128", 512, 768, 131072, 128, 32),
    ("B512-L670K-K64", 512, 768, 670208, 64, 32),
    ("B512-L670K-K128", 512, 768, 670208, 128, 32),
    ("Amazon-670K", 64, 384, 670091, 64, 16),
    ("AmazonTitles-670K", 256, 384, 670091, 128, 16),
    ("Amazon-3M", 128, 768, 2812281, 128, 64),
    ("LF-Paper2Keywords-8.6M", 128, 384, 8623847, 64, 32),
]
QUICK = {"B512-L131K-K128", "Amazon-670K"}


def bench(fn, sets: int, max_ms: float = 300.0, min_reps: int = 5, max_reps: int = 200) -> float:
    """Median milliseconds of fn(i) over rotating input sets i, timed with CUDA events."""
    for i in range(2):
        fn(i % sets)
    torch.cuda.synchronize()
    times = []
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


def bench_graph(fn, sets: int) -> float:
    """Median milliseconds of one fn(i) call, captured in a CUDA graph per input set: GPU time without
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
    ms = bench(lambda i: graphs[i].replay(), sets)
    del graphs
    return ms


def timeit(fn, sets: int, **kw) -> float:
    """Graph-captured time; eager time where the work cannot be captured."""
    try:
        return bench_graph(fn, sets)
    except RuntimeError:
        torch.cuda.synchronize()
        return bench(fn, sets, **kw)


def sweep(B, H, L, K, G, sets=2, dtype=torch.bfloat16):
    """Time each kernel's tile variants (kernels._launch.TUNING) on one shape."""
    dev = "cuda"
    layer = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype)
    xs = [torch.randn(B, H, device=dev, dtype=dtype) for _ in range(sets)]
    dzs = [torch.randn(B, L, device=dev, dtype=dtype) for _ in range(sets)]
    w, idx, b = layer.weight.detach(), layer.group_index, layer.bias.detach()
    xts = [kernels._launch.transpose_input(x) for x in xs]
    tuning = kernels._launch.TUNING
    results = []
    variants = [("forward", {"forward_warps": wv, "forward_stages": sv, "forward_resident": True})
                for wv, sv in ((12, 3), (8, 4), (8, 3), (8, 2), (4, 3))]
    variants += [("forward", {"forward_resident": False})]
    variants += [("grad_input", {"grad_input_rows": r}) for r in (32, 64, 128)]
    variants += [("grad_weight", {"grad_weight_kernel": "cta", "grad_weight_stages": n}) for n in (2, 3)]
    variants += [("grad_weight", {"grad_weight_kernel": "warp"})]
    variants += [("grad_weight+bias", {}), ("grad_weight,bias_sum", {})]
    calls = {
        "forward": lambda i: kernels.gsfi_forward(xs[i], w, idx, b, L),
        "grad_input": lambda i: kernels.gsfi_grad_input(dzs[i], w, idx, H),
        "grad_weight": lambda i: kernels.gsfi_grad_weight(dzs[i], xts[i], idx, w),
        # the bias gradient fused into the grad-weight kernel, against a separate column sum
        "grad_weight+bias": lambda i: kernels.gsfi_grad_weight(dzs[i], xts[i], idx, w, grad_bias=bias_grad),
        "grad_weight,bias_sum": lambda i: (kernels.gsfi_grad_weight(dzs[i], xts[i], idx, w),
                                           dzs[i].sum(0, dtype=torch.float32).to(dtype)),
    }
    bias_grad = torch.empty(L, device=dev, dtype=dtype)
    for kernel, settings in variants:
        tuning.clear()
        tuning.update(settings)
        try:
            ms = timeit(calls[kernel], sets)
        except ValueError as exc:  # variant does not fit
            ms = None
            settings = {**settings, "error": str(exc)[:60]}
        results.append((kernel, settings, ms))
    tuning.clear()
    return results


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written)."""
    src = torch.randn(256 * 2**20, device="cuda", dtype=torch.float32)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda i: dst.copy_(src), 1, max_ms=200)
    return 2 * src.numel() * 4 / (ms * 1e-3)


def run_shape(name, B, H, L, K, G, sets, bandwidth, dtype=torch.bfloat16, index="balanced"):
    dev = "cuda"
    row = {"shape": name, "B": B, "H": H, "L": L, "K": K, "G": G, "index": index}
    gen = torch.Generator(device=dev).manual_seed(0)
    layer = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, generator=gen)
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

    xts = [kernels._launch.transpose_input(x) for x in xs]
    row["ours_fwd"] = timeit(lambda i: kernels.gsfi_forward(xs[i], w, idx, b, L), sets)
    row["ours_grad_input"] = timeit(lambda i: kernels.gsfi_grad_input(dzs[i], w, idx, H), sets)
    bias_grad = torch.empty(L, device=dev, dtype=dtype)
    row["ours_grad_weight"] = timeit(  # with the bias gradient, which the kernel sums as the layer's backward asks
        lambda i: kernels.gsfi_grad_weight(dzs[i], xts[i], idx, w, grad_bias=bias_grad), sets
    )
    x_req = [x.clone().requires_grad_(True) for x in xs]

    def ours_fwd_bwd(i):
        layer.weight.grad = None
        layer.bias.grad = None
        x_req[i].grad = None
        layer(x_req[i]).backward(dzs[i])

    row["ours_fwd_bwd_eager"] = bench(ours_fwd_bwd, sets)
    row["ours_fwd_bwd"] = timeit(ours_fwd_bwd, sets)
    del xts

    def linear_steps(xs_in, w_in):
        """(forward, forward+backward) of F.linear on rotating inputs, gradients for both operands."""

        def fwd_bwd(i):
            w_in.grad = None
            xs_in[i].grad = None
            F.linear(xs_in[i], w_in).backward(dzs[i])

        return (lambda i: F.linear(xs_in[i], w_in)), fwd_bwd

    # cuBLAS FLOPs-matched dense bottleneck: [B, K] x [L, K]^T
    xk = [torch.randn(B, K, device=dev, dtype=dtype, requires_grad=True) for _ in range(sets)]
    wk = torch.randn(L, K, device=dev, dtype=dtype, requires_grad=True)
    fwd, fwd_bwd = linear_steps(xk, wk)
    row["bottleneck_fwd"] = timeit(fwd, sets)
    row["bottleneck_fwd_bwd_eager"] = bench(fwd_bwd, sets)
    row["bottleneck_fwd_bwd"] = timeit(fwd_bwd, sets)
    del xk, wk, fwd, fwd_bwd

    # full dense layer [B, H] x [L, H]^T
    try:
        wh = torch.randn(L, H, device=dev, dtype=dtype, requires_grad=True)
        xh = [x.clone().requires_grad_(True) for x in xs]
        fwd, fwd_bwd = linear_steps(xh, wh)
        row["dense_fwd"] = timeit(fwd, sets)
        row["dense_fwd_bwd"] = timeit(fwd_bwd, sets)
        del wh, xh, fwd, fwd_bwd
    except torch.OutOfMemoryError:
        row["dense_fwd"] = row["dense_fwd_bwd"] = None
    torch.cuda.empty_cache()

    # torch.sparse CSR with the same fan-in: Z^T = W_csr [L, H] @ X^T [H, B]
    try:
        crow = torch.arange(0, L * K + 1, K, device=dev, dtype=torch.int64)
        col = idx.long().repeat_interleave(G, dim=0)[:L].reshape(-1)
        csr = torch.sparse_csr_tensor(crow, col, w[:L].reshape(-1), size=(L, H))
        xts_dense = [x.t().contiguous() for x in xs]
        row["csr_fwd"] = timeit(lambda i: torch.sparse.mm(csr, xts_dense[i]), sets)
        del csr, crow, col, xts_dense
    except (RuntimeError, torch.OutOfMemoryError) as exc:
        row["csr_fwd"] = None
        row["csr_error"] = str(exc).splitlines()[0][:120]
    torch.cuda.empty_cache()

    # our pure-PyTorch path (bf16 inputs, fp32 accumulation)
    row["torch_path_fwd"] = timeit(
        lambda i: LF.group_shared_fanin(xs[i], w, idx, b, L, backend="torch", check_index=False), sets, max_ms=100
    )
    tl = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, backend="torch")
    tl.load_state_dict(layer.state_dict())

    def torch_fwd_bwd(i):
        tl.weight.grad = None
        x_req[i].grad = None
        tl(x_req[i]).backward(dzs[i])

    row["torch_path_fwd_bwd"] = timeit(torch_fwd_bwd, sets, max_ms=100)

    itemsize = torch.finfo(dtype).bits // 8
    floor_bytes = (B * L + L * K) * itemsize
    row["fwd_byte_floor"] = floor_bytes / bandwidth * 1e3
    row["fwd_vs_floor"] = row["ours_fwd"] / row["fwd_byte_floor"]
    row["fwd_achieved_TBps"] = floor_bytes / (row["ours_fwd"] * 1e-3) / 1e12
    row["fwd_bwd_vs_bottleneck"] = row["ours_fwd_bwd"] / row["bottleneck_fwd_bwd"]
    row["fwd_bwd_vs_bottleneck_eager"] = row["ours_fwd_bwd_eager"] / row["bottleneck_fwd_bwd_eager"]
    row["fwd_vs_bottleneck"] = row["ours_fwd"] / row["bottleneck_fwd"]
    del layer, tl, xs, dzs, x_req
    torch.cuda.empty_cache()
    return row


def fmt(v, width=8, digits=3):
    return f"{'-':>{width}}" if v is None else f"{v:{width}.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="all", help="all, quick, or comma-separated names")
    parser.add_argument("--sets", type=int, default=2, help="input sets to rotate")
    parser.add_argument("--json", default=None)
    parser.add_argument("--sweep", action="store_true", help="time tile variants on the chosen shapes and exit")
    parser.add_argument("--index", choices=("balanced", "uniform", "sorted"), default="balanced",
                        help="group_index rows as new layers draw them (balanced over residues mod 8, "
                        "bank-interleaved), uniform draws (interleaved), or uniform draws sorted ascending")
    args = parser.parse_args()
    if args.shapes == "all":
        shapes = SHAPES
    elif args.shapes == "quick":
        shapes = [s for s in SHAPES if s[0] in QUICK]
    else:
        wanted = set(args.shapes.split(","))
        shapes = [s for s in SHAPES if s[0] in wanted]
    if args.sweep:
        print(f"device: {torch.cuda.get_device_properties(0).name}; torch {torch.__version__}", flush=True)
        for name, *shape in shapes:
            for kernel, settings, ms in sweep(*shape):
                print(f"{name:<22} {kernel:<20} {fmt(ms)}  {settings}", flush=True)
        return

    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []
    for shape in shapes:
        t0 = time.perf_counter()
        try:
            rows.append(run_shape(*shape, sets=args.sets, bandwidth=bandwidth, index=args.index))
        except torch.OutOfMemoryError as exc:
            print(f"{shape[0]}: out of memory ({exc})", file=sys.stderr)
            torch.cuda.empty_cache()
            continue
        print(f"  {shape[0]} done in {time.perf_counter() - t0:.1f} s: {json.dumps(rows[-1])}", flush=True)

    print()
    print(f"times in ms (bf16, group_index rows: {args.index}; "
          "medians of CUDA-graph replays: GPU time without host launch gaps;")
    print("  fb eager / bn eager: forward+backward launched from Python, as an eager training step runs)")
    head = (f"{'shape':<24}{'fwd':>7}{'gradX':>7}{'gradW':>7}{'f+b':>7} | {'bn f':>7}{'bn f+b':>7}"
            f"{'dense f':>8}{'dense fb':>9}{'csr f':>8}{'torch f':>8}{'torch fb':>9} | {'f+b/bn':>7}{'f/bn':>6}"
            f"{'fbE/bnE':>8}{'floor':>7}{'f/floor':>8}{'TB/s':>6}")
    print(head)
    for r in rows:
        print(
            f"{r['shape']:<24}{fmt(r['ours_fwd'], 7)}{fmt(r['ours_grad_input'], 7)}{fmt(r['ours_grad_weight'], 7)}"
            f"{fmt(r['ours_fwd_bwd'], 7)} | {fmt(r['bottleneck_fwd'], 7)}{fmt(r['bottleneck_fwd_bwd'], 7)}"
            f"{fmt(r['dense_fwd'])}{fmt(r['dense_fwd_bwd'], 9)}{fmt(r['csr_fwd'])}{fmt(r['torch_path_fwd'])}"
            f"{fmt(r['torch_path_fwd_bwd'], 9)} | {fmt(r['fwd_bwd_vs_bottleneck'], 7, 2)}"
            f"{fmt(r['fwd_vs_bottleneck'], 6, 2)}{fmt(r['fwd_bwd_vs_bottleneck_eager'], 8, 2)}"
            f"{fmt(r['fwd_byte_floor'], 7)}{fmt(r['fwd_vs_floor'], 8, 2)}{fmt(r['fwd_achieved_TBps'], 6, 2)}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": props.name, "copy_bandwidth": bandwidth, "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
