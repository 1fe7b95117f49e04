"""One kernel at every benchmark shape under launcher tuning variants (the gradients on raw and padded dZ rows).

    PYTHONPATH=. python3 benchmarks/gradient_variants.py [--kernel gradX|gradW|fwd] [NAME:key=value,key=value ...]

Each NAME:settings argument is one variant (kernels._launch.TUNING overrides, e.g.
``rows64:grad_input_rows=64``; ``default:`` for the automatic choices; ``deterministic=1`` runs the variant
under ``torch.use_deterministic_algorithms(True)``). Per shape it prints the
CUDA-graph median in ms of each variant, as ``raw/padded`` where the label count is odd (dZ rows off
16-byte boundaries: the kernels read them raw and realign them; padded: the same dZ in aligned rows; the forward: its own output).
A variant that does not fit prints n/a. To compare two commits, run it from each commit's tree
(``PYTHONPATH=<other tree> python3 <other tree>/benchmarks/gradient_variants.py``) on the same machine.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402 - the timing helpers and shapes of benchmarks/kernels.py
import lightning_haste as lh  # noqa: E402
from lightning_haste import kernels  # noqa: E402

K_ = kernels._launch


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, spec = text.partition(":")
    tuning = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        tuning[key] = int(value) if value.lstrip("-").isdigit() else value
    return name, tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", choices=("gradX", "gradW", "fwd"), default="gradX")
    parser.add_argument("variants", nargs="*", default=["default:"])
    args = parser.parse_args()
    variants = [parse_variant(v) for v in args.variants]
    for name, B, H, L, K, G in kb.SHAPES:
        layer = lh.GroupSharedFanIn(H, L, K, G, device="cuda", dtype=torch.bfloat16)
        w, idx = layer.weight.detach(), layer.group_index
        xs = [torch.randn(B, H, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
        xts = [K_.transpose_input(x) for x in xs]
        grad_bias = torch.empty(L, device="cuda", dtype=torch.bfloat16)
        dzs = dzp = None  # the forward reads no dZ
        if args.kernel != "fwd":
            dzs = [torch.randn(B, L, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
            dzp = [K_.padded_rows(d) for d in dzs] if L % 8 else None

        def run(dz, i):
            if args.kernel == "fwd":
                return kernels.gsfi_forward(xs[i], w, idx, layer.bias.detach(), L)
            if args.kernel == "gradW":
                return kernels.gsfi_grad_weight(dz[i], xts[i], idx, w, grad_bias=grad_bias)
            return kernels.gsfi_grad_input(dz[i], w, idx, H)

        cells = []
        for vname, tuning in variants:
            tuning = dict(tuning)
            torch.use_deterministic_algorithms(bool(tuning.pop("deterministic", 0)))
            K_.TUNING.clear()
            K_.TUNING.update(tuning)
            try:
                cell = f"{kb.timeit(lambda i: run(dzs, i), 2):.3f}"
                if dzp is not None:
                    cell += f"/{kb.timeit(lambda i: run(dzp, i), 2):.3f}"
            except ValueError:  # the variant does not fit this shape
                cell = "n/a"
            finally:
                torch.use_deterministic_algorithms(False)
            cells.append(f"{vname}={cell}")
        K_.TUNING.clear()
        print(f"{name:24s}", "  ".join(cells), flush=True)
        del layer, w, idx, dzs, dzp, xs, xts
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
