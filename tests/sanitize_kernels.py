"""Launch every kernel once on small cases, for compute-sanitizer:

    compute-sanitizer --tool memcheck python3 tests/sanitize_kernels.py
    compute-sanitizer --tool racecheck python3 tests/sanitize_kernels.py

``SANITIZE_ONLY=topk`` runs the top-k kernels alone.
"""

import itertools
import os

import torch

import lightning_haste as lh
from lightning_haste import kernels
from lightning_haste.kernels import tuning

# (batch, in_features, out_features, group_size, fan_in, tuning): shared-memory-resident and streamed
# input, 8- and 12-warp forward CTAs, the Hopper (wgmma) forward, shared-memory and global grad-input
# accumulation, 32- and 64-row grad-input tiles, one and several groups per grad-input step,
# warp-per-group and CTA-per-tile grad-weight (both with the fused bias gradient), grad-input's per-column
# partial sums (torch.use_deterministic_algorithms)
CASES = [
    (37, 300, 999, 32, 24, ""),
    (9, 4096, 100, 16, 64, ""),
    (70, 200, 300, 64, 128, ""),
    (70, 300, 999, 32, 24, "forward.kernel=mma forward.mma_warps=8 forward.mma_stages=4"),
    (70, 300, 999, 32, 200, "forward.kernel=wgmma"),  # Hopper forward (if sm_90): 4 chunks of K, last partial
    (100, 300, 1000, 64, 64, "forward.kernel=wgmma forward.wgmma_warpgroups=2 forward.wgmma_stages=2"),
    (70, 768, 999, 32, 136, ""),  # 64-row grad-input tiles, two feature chunks (128 + a partial one)
    (150, 300, 999, 16, 24, "grad_input.rows=64"),  # 4 groups per grad-input step, padded slots
    (150, 300, 1000, 32, 64, "grad_input.rows=128 grad_input.groups=2"),  # 2 groups a step, aligned dZ
    (70, 200, 999, 32, 160, ""),  # fan_in % 16 == 0 with a partial last chunk of K: trash rows
    (150, 200, 999, 16, 128, "grad_weight.warp_warps=6 grad_weight.warp_stages=3"),  # 6-warp grad-weight, raw dZ
    (150, 200, 29999, 32, 72, "deterministic"),  # grad-input partial sums per CTA column, raw dZ
]


def run(batch: int, in_features: int, out_features: int, group_size: int, fan_in: int, settings: str) -> None:
    layer = lh.GroupSharedFanIn(in_features, out_features, fan_in, group_size, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
    dz = torch.randn(batch, out_features, device="cuda", dtype=torch.bfloat16)
    w = layer.weight.detach()
    out, xt = kernels.gsfi_forward(x, w, layer.group_index, layer.bias.detach(), out_features)
    gx = kernels.gsfi_grad_input(dz, w, layer.group_index, in_features)
    gb = torch.empty(out_features, device="cuda", dtype=torch.bfloat16)
    gw = kernels.gsfi_grad_weight(dz, xt, layer.group_index, w, grad_bias=gb)
    torch.cuda.synchronize()
    sums = [float(t.float().abs().sum()) for t in (out, gx, gw, gb)]
    print(batch, in_features, out_features, group_size, fan_in, settings or "auto", "ok", sums)


for batch, in_features, out_features, group_size, fan_in, settings in CASES:
    if os.environ.get("SANITIZE_ONLY") == "topk":
        break
    items = settings.split()
    torch.use_deterministic_algorithms("deterministic" in items)
    with tuning.use(tuning.parse([item for item in items if item != "deterministic"])):
        run(batch, in_features, out_features, group_size, fan_in, settings)
torch.use_deterministic_algorithms(False)

# The top-k candidate kernels (head and tail lists, a sample of the tail's first groups, a retried overflow; the
# Hopper main loop at batches of at most 128 rows and groups of 32 or more; the head's chunks in one launch each and
# in three), each shape called three times: eager, captured in a CUDA graph, replayed.
for (batch, num_labels, group_size, fan_in, head_ratio, k), chunk_columns in itertools.product(
        ((37, 3001, 16, 64, 0.1, 5), (70, 2000, 32, 24, 0.0, 100), (128, 5000, 64, 128, 0.05, 20)), (None, 0)):
    output = lh.HeadTailOutput(300, torch.arange(num_labels, 0, -1), head_ratio=head_ratio, fan_in=fan_in,
                               group_size=group_size, device="cuda", dtype=torch.bfloat16)
    features = torch.randn(batch, 300, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), tuning.use(tuning.TopkTuning(chunk_columns=chunk_columns)):
        for _ in range(3):
            top_scores, top_ids = output.topk(features, k)
    torch.cuda.synchronize()
    print("topk", batch, num_labels, group_size, fan_in, head_ratio, k, chunk_columns, "ok",
          float(top_scores.float().sum()))
