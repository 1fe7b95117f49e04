"""Launch every kernel once on small cases, for compute-sanitizer:

    compute-sanitizer --tool memcheck python3 tests/sanitize_kernels.py
    compute-sanitizer --tool racecheck python3 tests/sanitize_kernels.py
"""

import torch

import lightning_haste as lh
from lightning_haste import kernels

# (batch, in_features, out_features, group_size, fan_in): shared-memory-resident and streamed input,
# shared-memory and global grad-input accumulation, 32- and 64-row grad-input tiles, warp-per-group and
# CTA-per-tile grad-weight
for case in [(37, 300, 999, 32, 24), (9, 4096, 100, 16, 64), (70, 200, 300, 64, 128)]:
    batch, in_features, out_features, group_size, fan_in = case
    layer = lh.GroupSharedFanIn(in_features, out_features, fan_in, group_size, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
    dz = torch.randn(batch, out_features, device="cuda", dtype=torch.bfloat16)
    w = layer.weight.detach()
    out, xt = kernels.gsfi_forward(x, w, layer.group_index, layer.bias.detach(), out_features)
    gx = kernels.gsfi_grad_input(dz, w, layer.group_index, in_features)
    gw = kernels.gsfi_grad_weight(dz, xt, layer.group_index, w)
    torch.cuda.synchronize()
    print(case, "ok", float(out.float().abs().sum()), float(gx.float().abs().sum()), float(gw.float().abs().sum()))
