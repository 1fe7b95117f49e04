"""Time the forward kernel's warp/stage variants on the large-label shapes (CUDA-graph medians, ms):

    PYTHONPATH=. python3 benchmarks/forward_variants.py

"auto" is the launcher's own choice; (warps, stages) pairs are forced through the `forward_warps` and
`forward_stages` overrides of `kernels._launch.TUNING`; each is timed twice, interleaved, to show the noise.
Variants that do not fit in shared memory print "no fit".
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402 - the timing helpers of benchmarks/kernels.py
import lightning_haste as lh  # noqa: E402
from lightning_haste import kernels  # noqa: E402

K_ = kernels._launch
VARIANTS = [None, (12, 3), (8, 3), None, (12, 3), (8, 3)]
EXTRA_SHAPES = [("2M-G16", 128, 384, 2_000_001, 64, 16), ("2M-G16-B64", 64, 384, 2_000_001, 64, 16)]
for name, B, H, L, K, G in kb.SHAPES + EXTRA_SHAPES:
    if name not in ("LF-Paper2Keywords-8.6M", "Amazon-3M", "2M-G16", "2M-G16-B64"):
        continue
    layer = lh.GroupSharedFanIn(H, L, K, G, device="cuda", dtype=torch.bfloat16)
    w, idx, b = layer.weight.detach(), layer.group_index, layer.bias.detach()
    xs = [torch.randn(B, H, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    results = []
    for variant in VARIANTS:
        K_.TUNING.clear()
        if variant:
            K_.TUNING.update(forward_warps=variant[0], forward_stages=variant[1])
        label = "auto" if variant is None else f"{variant[0]}x{variant[1]}"
        try:
            results.append(f"{label}={kb.timeit(lambda i: kernels.gsfi_forward(xs[i], w, idx, b, L), 2):.3f}")
        except ValueError:
            results.append(f"{label}=no fit")
    print(name, "  ".join(results), flush=True)
    del layer, w, idx, b, xs
    torch.cuda.empty_cache()
K_.TUNING.clear()
