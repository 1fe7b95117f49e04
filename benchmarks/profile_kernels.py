"""Run each GSFI kernel a few times on one shape, for Nsight Compute:

    ncu --kernel-name regex:gsfi_ --launch-skip 3 --launch-count 3 --section SpeedOfLight \\
        --section WarpStateStats --section Occupancy \\
        python3 benchmarks/profile_kernels.py [B H L K G] [kernel.field=value ...] [pad_dz=1]

(with ``PYTHONPATH=.``). The shape defaults to B512-L131K-K128 (512 768 131072 128 32). Trailing
``kernel.field=value`` items force kernel variants through ``lightning_haste.kernels.tuning.parse`` and
``tuning.use`` (e.g. ``grad_input.rows=64 forward.kernel=mma``); ``pad_dz=1`` hands the gradient kernels a
padded copy of dZ (aligned rows) instead of the raw [B, L] tensor. Each of the three kernels runs ``--reps``
times (default 3), in the order forward, grad-input, grad-weight.
"""

from __future__ import annotations

import argparse

import torch

import lightning_haste as lh
from lightning_haste import kernels
from lightning_haste.kernels import tuning


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", help="B H L K G, then kernel.field=value items and pad_dz=0|1")
    parser.add_argument("--reps", type=int, default=3, help="calls of each kernel")
    args = parser.parse_args()
    numbers = [item for item in args.items if item.isdigit()]
    settings = [item for item in args.items if not item.isdigit()]
    if numbers and len(numbers) != 5:
        parser.error(f"give all of B H L K G or none, got {numbers}")
    B, H, L, K, G = (int(v) for v in numbers) if numbers else (512, 768, 131072, 128, 32)
    pad_dz = False
    items = []
    for item in settings:
        key, _, value = item.partition("=")
        if key.strip() == "pad_dz":
            pad_dz = value.strip().lower() in ("1", "true", "yes")
        else:
            items.append(item)
    chosen = tuning.parse(items)

    dev, dtype = "cuda", torch.bfloat16
    layer = lh.GroupSharedFanIn(H, L, K, G, device=dev, dtype=dtype, backend="cuda")
    x = torch.randn(B, H, device=dev, dtype=dtype)
    dz = torch.randn(B, L, device=dev, dtype=dtype)
    if pad_dz:
        dz = kernels.padded_rows(dz)
    w, idx, bias = layer.weight.detach(), layer.group_index, layer.bias.detach()
    grad_bias = torch.empty(L, device=dev, dtype=dtype)
    with tuning.use(chosen):
        for _ in range(args.reps):
            out, xt = kernels.gsfi_forward(x, w, idx, bias, L)
            kernels.gsfi_grad_input(dz, w, idx, H)
            kernels.gsfi_grad_weight(dz, xt, idx, w, grad_bias=grad_bias)
    torch.cuda.synchronize()
    print(f"done: B={B} H={H} L={L} K={K} G={G} pad_dz={int(pad_dz)} {chosen}")


if __name__ == "__main__":
    main()
