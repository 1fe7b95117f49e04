"""Where the backward's time goes for labels counts that are not multiples of 8 (the official shapes):
a padded copy of dZ against the gradient kernels reading dZ rows as they come (realigned on the way).

    PYTHONPATH=. python3 benchmarks/grad_out_layout.py [key=value ...]

Trailing key=value arguments set launcher tuning overrides (kernels._launch.TUNING), e.g.
grad_input_rows=64.

Per shape, CUDA-graph medians in ms: the padded copy alone, the forward, each gradient kernel on padded
and on raw dZ rows, and the layer's forward+backward with and without the input gradient.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels as kb  # noqa: E402 - the timing helpers of benchmarks/kernels.py
import lightning_haste as lh  # noqa: E402
from lightning_haste import kernels  # noqa: E402

K_ = kernels._launch
for setting in sys.argv[1:]:
    key, value = setting.split("=", 1)
    K_.TUNING[key] = int(value) if value.lstrip("-").isdigit() else value
for name, B, H, L, K, G in kb.SHAPES:
    if name not in ("LF-Paper2Keywords-8.6M", "Amazon-3M", "AmazonTitles-670K", "Amazon-670K"):
        continue
    layer = lh.GroupSharedFanIn(H, L, K, G, device="cuda", dtype=torch.bfloat16)
    w, idx, b = layer.weight.detach(), layer.group_index, layer.bias.detach()
    xs = [torch.randn(B, H, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    dzs = [torch.randn(B, L, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    dzp = [K_.padded_rows(d) for d in dzs]
    xts = [K_.transpose_input(x) for x in xs]
    gb = torch.empty(L, device="cuda", dtype=torch.bfloat16)
    r = {}
    r["pad copy"] = kb.timeit(lambda i: K_.padded_rows(dzs[i]), 2)
    r["fwd"] = kb.timeit(lambda i: kernels.gsfi_forward(xs[i], w, idx, b, L), 2)
    r["gradX padded dz"] = kb.timeit(lambda i: kernels.gsfi_grad_input(dzp[i], w, idx, H), 2)
    r["gradX raw dz"] = kb.timeit(lambda i: kernels.gsfi_grad_input(dzs[i], w, idx, H), 2)
    r["gradW padded dz"] = kb.timeit(lambda i: kernels.gsfi_grad_weight(dzp[i], xts[i], idx, w, grad_bias=gb), 2)
    r["gradW raw dz"] = kb.timeit(lambda i: kernels.gsfi_grad_weight(dzs[i], xts[i], idx, w, grad_bias=gb), 2)
    xr = [x.clone().requires_grad_(True) for x in xs]
    def fb(i):
        layer.weight.grad = None; layer.bias.grad = None; xr[i].grad = None
        layer(xr[i]).backward(dzs[i])
    r["f+b"] = kb.timeit(fb, 2)
    def fb_nox(i):
        layer.weight.grad = None; layer.bias.grad = None
        layer(xs[i]).backward(dzs[i])
    r["f+b (x no grad)"] = kb.timeit(fb_nox, 2)
    print(name, "  ".join(f"{k}={v:.3f}" for k, v in r.items()), flush=True)
    del layer, w, idx, b, xs, dzs, dzp, xts, xr
    torch.cuda.empty_cache()
