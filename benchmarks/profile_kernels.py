"""Run each GSFI kernel a few times on one shape, for Nsight Compute:

    ncu --kernel-name regex:gsfi_ --launch-skip 3 --launch-count 3 --section SpeedOfLight \
        --section WarpStateStats --section Occupancy python3 benchmarks/profile_kernels.py [B H L K G [key=value ...]]

pad_dz=1 hands the gradient kernels a padded copy of dZ (aligned rows) instead of the raw [B, L] tensor.
"""

import sys

import torch

import lightning_haste as lh
from lightning_haste import kernels

B, H, L, K, G = (int(v) for v in sys.argv[1:6]) if len(sys.argv) > 5 else (512, 768, 131072, 128, 32)
# Trailing key=value arguments set launcher tuning overrides (kernels._launch.TUNING), e.g. grad_input_rows=32.
for setting in sys.argv[6:]:
    key, value = setting.split("=", 1)
    kernels._launch.TUNING[key] = value if not value.lstrip("-").isdigit() else int(value)
pad_dz = bool(kernels._launch.TUNING.pop("pad_dz", 0))
layer = lh.GroupSharedFanIn(H, L, K, G, device="cuda", dtype=torch.bfloat16)
x = torch.randn(B, H, device="cuda", dtype=torch.bfloat16)
dz = torch.randn(B, L, device="cuda", dtype=torch.bfloat16)
if pad_dz:
    dz = kernels._launch.padded_rows(dz)
w, idx = layer.weight.detach(), layer.group_index
for _ in range(3):
    out, xt = kernels.gsfi_forward(x, w, idx, layer.bias.detach(), L)
    kernels.gsfi_grad_input(dz, w, idx, H)
    kernels.gsfi_grad_weight(dz, xt, idx, w)
torch.cuda.synchronize()
print("done")
