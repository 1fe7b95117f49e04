"""The top-k's tail candidate kernel against the forward whose main loop it runs (a diagnostic of the top-k).

    PYTHONPATH=. python3 benchmarks/candidates.py [--shapes official,B512-L131K-K128] [--k 5] [--json PATH]

The candidate kernel computes the forward's logits tiles and keeps only the logits at or above each row's bound, so
it should never take longer than the forward, which also stores every logit. Per shape (the layers of
benchmarks/topk.py, bf16; CUDA-graph medians over rotating random inputs, each call with its lists' counts zeroed
first, which ``zero`` times alone):

- ``forward``: the tail's forward kernel, logits stored;
- ``bound``: the candidates kernel with each row's bound the k-th best of the tail's first ``head labels`` logits
  (what the top-k's bound from the head lets through: about ``k * tail / head`` candidates per row);
- ``none_pass``: every bound ``+inf`` (every logit compared, none kept);
- ``skipped``: every bound NaN (rows skipped: the main loop alone, the epilogue returns at once);
- ``bound_one_cta``: ``bound`` with the registers not held to the CTAs per multiprocessor that the shared memory
  allows (``TopkTuning(min_ctas=1)``, where :class:`lightning_haste.kernels.tuning.TopkTuning` exists).

Candidates per row (``per_row``) and the plans (kernel, grid, shared memory, registers) are printed with the times.
Run it from another tree's root (``PYTHONPATH=<tree>``) to time that tree's kernel with the same script.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import topk as topk_bench  # noqa: E402 - the layers of the top-k benchmark

from lightning_haste import kernels  # noqa: E402
from lightning_haste.functional import kernel_arguments  # noqa: E402
from lightning_haste.kernels import tuning  # noqa: E402


def run_shape(shape: C.Shape, k: int, sets: int) -> dict:
    B = shape.B
    layer = topk_bench._layer(shape)
    tail = layer.tail
    weight, index, bias = kernel_arguments(tail.weight.detach(), tail.group_index, tail.bias.detach())
    gen = torch.Generator(device="cuda").manual_seed(1)
    xs = [torch.randn(B, shape.H, device="cuda", generator=gen).bfloat16() for _ in range(sets)]
    xts = [kernels.layout.transpose_input(x) for x in xs]
    num_tail, seen = tail.out_features, max(k, layer.num_head_labels)
    row: dict = {"shape": shape.name, "k": k, "B": B, "tail_labels": num_tail, "head_labels": layer.num_head_labels}
    cap = 16384
    count = torch.zeros(B, dtype=torch.int32, device="cuda")
    score = torch.empty(B, cap, device="cuda")
    position = torch.empty(B, cap, dtype=torch.int32, device="cuda")
    with torch.no_grad():
        bounds = []
        for x in xs:
            z = tail(x)
            bounds.append(z[:, :seen].float().topk(k, dim=1).values[:, -1].contiguous())
            z = None  # noqa: F841
        row["forward"] = C.timeit(lambda i: tail(xs[i]), sets)
        row["zero"] = C.timeit(lambda i: count.zero_(), sets)
        thresholds = {
            "bound": bounds,
            "none_pass": [torch.full((B,), math.inf, device="cuda") for _ in xs],
            "skipped": [torch.full((B,), math.nan, device="cuda") for _ in xs],
        }

        def candidates(i: int, threshold: torch.Tensor) -> None:
            count.zero_()
            kernels.topk.gsfi_topk_candidates(xts[i], B, weight, index, bias, num_tail, threshold, count, score,
                                              position, checked=False)

        variants = [("", None)]
        if hasattr(tuning, "TopkTuning"):
            variants += [("_one_cta", tuning.TopkTuning(min_ctas=1))]
        for suffix, own in variants:
            for mode, per_set in thresholds.items():
                if suffix and mode != "bound":
                    continue
                with tuning.use(own) if own is not None else contextlib.nullcontext():
                    row[mode + suffix] = C.timeit(lambda i, t=per_set: candidates(i, t[i]), sets)
                    if mode == "bound":
                        candidates(0, per_set[0])
                        row["per_row" + suffix] = float(count.float().mean())
                        row["plan" + suffix] = _describe_plan(shape, xs[0], weight, index)
        row["bound_over_forward"] = row["bound"] / row["forward"]
    return row


def _describe_plan(shape: C.Shape, x: torch.Tensor, weight: torch.Tensor, index: torch.Tensor) -> str:
    """The plan in force: kernel, grid, block, shared bytes and the kernel's registers and local memory."""
    settings = tuning.current()
    args = ("bf16_t", shape.G, index.shape[1], shape.H, shape.B, index.shape[0], x.device.index, settings.forward)
    p = kernels.topk.plan(*args, settings.topk) if hasattr(settings, "topk") else kernels.topk.plan(*args)
    return (f"{p.kernel} grid {p.grid} block {p.block} shared {p.shared} regs {getattr(p.fn, 'num_regs', '?')} "
            f"local {getattr(p.fn, 'local_size_bytes', '?')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="official,B512-L131K-K128")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--sets", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    print(f"device {torch.cuda.get_device_name()}")
    rows = []
    for shape in C.select_shapes(args.shapes):
        row = run_shape(shape, args.k, args.sets)
        rows.append(row)
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()
    keys = [key for key in ("forward", "bound", "bound_one_cta", "none_pass", "skipped", "zero")
            if any(key in r for r in rows)]
    print("\n| shape | " + " | ".join(keys) + " | bound / forward | candidates per row |")
    print("|---|" + "---|" * (len(keys) + 2))
    for r in rows:
        cells = " | ".join(C.fmt(r.get(key), 0, 4).strip() for key in keys)
        print(f"| {r['shape']} | {cells} | {r['bound_over_forward']:.2f} | {r['per_row']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "commit": C.resolve_commit(),
                                               "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
