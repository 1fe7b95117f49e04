"""Time one prune/regrow of a GroupSharedFanIn on the GPU (issue 4 target: < 50 ms at L=670K, K=128, G=32).

    PYTHONPATH=. python3 benchmarks/rewire.py
"""

from __future__ import annotations

import argparse
import statistics

import torch

import lightning_haste as lh
from lightning_haste import dst

# name, H, L, K, G
SHAPES = [
    ("L131K-K128-G32", 768, 131_072, 128, 32),
    ("L670K-K128-G32", 768, 670_208, 128, 32),
    ("Amazon-670K (K64, G16)", 384, 670_091, 64, 16),
    ("Amazon-3M (K128, G64)", 768, 2_812_281, 128, 64),
]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"device: {torch.cuda.get_device_name(0)}; torch {torch.__version__}")
    print(f"{'shape':<26}{'fraction':>9}{'rewire ms (median)':>20}{'+ optimizer reset ms':>22}")
    for name, H, L, K, G in SHAPES:
        layer = lh.GroupSharedFanIn(H, L, K, G, device="cuda", dtype=torch.bfloat16)
        optimizer = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
        layer.weight.grad = torch.randn_like(layer.weight)
        optimizer.step()
        gen = torch.Generator(device="cuda").manual_seed(0)
        for fraction in (0.2,):
            times, with_reset = [], []
            for i in range(7):
                with torch.no_grad():
                    layer.weight.normal_()
                    layer.zero_padding_()
                start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
                torch.cuda.synchronize()
                start.record()
                stats = layer.rewire(fraction, generator=gen)
                mid.record()
                dst.reset_optimizer_state_(optimizer, layer.weight, dst.regrown_weight_mask(layer, stats.regrown))
                end.record()
                end.synchronize()
                if i >= 2:  # warm-up
                    times.append(start.elapsed_time(mid))
                    with_reset.append(start.elapsed_time(end))
            rows = layer.group_index.tolist()[:1000]
            assert all(len(set(r)) == K for r in rows)
            print(f"{name:<26}{fraction:>9.2f}{statistics.median(times):>20.2f}{statistics.median(with_reset):>22.2f}")
        del layer, optimizer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
