"""One kernel (or the layer's step) at the benchmark shapes under kernel tuning variants (CUDA-graph medians, ms).

    PYTHONPATH=. python3 benchmarks/variants.py [--kernel fwd|gradX|gradW|step] [--shapes all|NAME,...]
        [--repeat N] [--history PATH] [NAME:kernel.field=value,... ...]

Each ``NAME:settings`` argument is one variant: comma-separated ``kernel.field=value`` items for
``lightning_haste.kernels.tuning.parse`` (e.g. ``rows64:grad_input.rows=64``,
``w6s3:grad_weight.kernel=warp,grad_weight.warp_warps=6,grad_weight.warp_stages=3``,
``mma:forward.kernel=mma``); ``default:`` (no items) is the automatic choice; a ``deterministic=1`` item runs
the variant under ``torch.use_deterministic_algorithms(True)``. Without variants: ``default:``.

Per shape it prints each variant's median; for the gradients and the step at label counts that are not a
multiple of 8 as ``raw/padded``: raw = dZ [B, L] as a loss hands it over (rows off 16-byte boundaries),
padded = the same values in aligned rows (``kernels.padded_rows``). gradW includes the fused bias gradient,
as the layer's backward runs it; step = ``layer(x).backward(dz)``. A variant that does not fit the shape (a
ValueError from the launcher) prints n/a. ``--repeat 2`` runs the variant list twice, interleaved, to show
the noise. To compare two trees of the new API on one machine, run each tree's copy:
``PYTHONPATH=<tree> python3 <tree>/benchmarks/variants.py ...``.

``--history PATH`` appends ``kernel:variant:raw|padded`` metrics to a history CSV (default: none).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Optional

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic variants, should cuBLAS run

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402 - the shared timing helpers, shapes and history file

import lightning_haste as lh  # noqa: E402
from lightning_haste import kernels  # noqa: E402
from lightning_haste.kernels import tuning  # noqa: E402

# Not among the benchmark shapes; named with --shapes (e.g. the label counts where the forward's warp choice flips).
EXTRA_SHAPES = [
    C.Shape("2M-G16", 128, 384, 2_000_001, 64, 16),
    C.Shape("2M-G16-B64", 64, 384, 2_000_001, 64, 16),
]


class Variant:
    """A named tuning variant: the settings for ``tuning.use`` and whether it runs deterministically."""

    def __init__(self, text: str) -> None:
        name, sep, spec = text.partition(":")
        if not sep or not name:
            raise SystemExit(f"variant {text!r} is not NAME:kernel.field=value,... (use 'default:' for none)")
        items = [item.strip() for item in spec.split(",") if item.strip()]
        self.name = name
        self.deterministic = False
        rest = []
        for item in items:
            key, _, value = item.partition("=")
            if key.strip() == "deterministic":
                self.deterministic = value.strip().lower() in ("1", "true", "yes")
            else:
                rest.append(item)
        try:
            self.settings = tuning.parse(rest)
        except (TypeError, ValueError) as exc:
            raise SystemExit(f"variant {text!r}: {exc}") from None


def time_variant(variant: Variant, fn: Callable[[int], object], sets: int) -> Optional[float]:
    """Graph median of ``fn`` under the variant's settings; None when the variant does not fit (ValueError) or,
    under ``deterministic=1``, has no deterministic kernel (torch's RuntimeError)."""
    torch.use_deterministic_algorithms(variant.deterministic)
    try:
        with tuning.use(variant.settings):
            return C.timeit(fn, sets)
    except ValueError:
        torch.cuda.synchronize()
        return None
    except RuntimeError as exc:
        if not (variant.deterministic and "determinis" in str(exc)) or isinstance(exc, torch.OutOfMemoryError):
            raise
        torch.cuda.synchronize()
        return None
    finally:
        torch.use_deterministic_algorithms(False)


def measure_shape(
    shape: C.Shape, kernel: str, variants: list[Variant], sets: int, dtype: torch.dtype = torch.bfloat16
) -> tuple[list[str], list[tuple[str, str, Optional[float]]]]:
    """``(printed cells, history rows)`` of every variant at one shape."""
    name, B, H, L, K, G = shape
    dev = "cuda"
    gen = torch.Generator(device=dev).manual_seed(0)
    layer = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, generator=gen, backend="cuda")
    w, idx, bias = layer.weight.detach(), layer.group_index, layer.bias.detach()
    xs = [torch.randn(B, H, device=dev, dtype=dtype) for _ in range(sets)]
    layouts: dict[str, Optional[list[torch.Tensor]]] = {"raw": None}
    if kernel != "fwd":  # the forward reads no dZ
        layouts = {"raw": [torch.randn(B, L, device=dev, dtype=dtype) for _ in range(sets)]}
        if L % 8:
            layouts["padded"] = [kernels.padded_rows(d) for d in layouts["raw"]]
    xts = [kernels.layout.transpose_input(x) for x in xs] if kernel == "gradW" else None
    grad_bias = torch.empty(L, device=dev, dtype=dtype)
    x_req = [x.clone().requires_grad_(True) for x in xs]

    def call(dz: Optional[list[torch.Tensor]], i: int) -> object:
        if kernel == "fwd":
            return kernels.gsfi_forward(xs[i], w, idx, bias, L)
        if kernel == "gradX":
            return kernels.gsfi_grad_input(dz[i], w, idx, H)
        if kernel == "gradW":
            return kernels.gsfi_grad_weight(dz[i], xts[i], idx, w, grad_bias=grad_bias)
        layer.weight.grad = None
        layer.bias.grad = None
        x_req[i].grad = None
        layer(x_req[i]).backward(dz[i])
        return None

    cells, history = [], []
    for variant in variants:
        times = []
        for layout, dz in layouts.items():
            ms = time_variant(variant, lambda i: call(dz, i), sets)
            times.append("n/a" if ms is None else f"{ms:.3f}")
            history.append((name, f"{kernel}:{variant.name}:{layout}", ms))
        cells.append(f"{variant.name}={'n/a' if set(times) == {'n/a'} else '/'.join(times)}")
    return cells, history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=("fwd", "gradX", "gradW", "step"), default="gradX")
    parser.add_argument("--shapes", default="all", help="all, quick, official, b512, or comma-separated names "
                        f"(also {', '.join(s.name for s in EXTRA_SHAPES)})")
    parser.add_argument("--sets", type=int, default=2, help="input sets to rotate")
    parser.add_argument("--repeat", type=int, default=1, help="run the variant list this many times, interleaved")
    parser.add_argument("--history", default="", help="CSV file to append the times to (default: none)")
    parser.add_argument("--commit", default=None, help="commit measured (default: $HASTE_COMMIT, else git)")
    parser.add_argument("variants", nargs="*", default=["default:"], help="NAME:kernel.field=value,...")
    args = parser.parse_args()
    variants = [Variant(v) for v in args.variants] * args.repeat
    shapes = C.select_shapes(args.shapes, EXTRA_SHAPES)
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; kernel {args.kernel}; "
          f"ms, CUDA-graph medians" + ("; raw/padded dZ where L % 8 != 0" if args.kernel != "fwd" else ""), flush=True)
    history: list[tuple[str, str, Optional[float]]] = []
    for shape in shapes:
        cells, rows = measure_shape(shape, args.kernel, variants, args.sets)
        print(f"{shape.name:24s}", "  ".join(cells), flush=True)
        history += rows
        torch.cuda.empty_cache()
    if args.history:
        written = C.append_history(args.history, history, script="variants.py", device=C.device_short_name(),
                                   commit=C.resolve_commit(args.commit))
        print(f"appended {written} rows to {args.history}")


if __name__ == "__main__":
    main()
