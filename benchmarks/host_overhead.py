"""Host (CPU) time of the layer's launches, as an eager training loop pays it.

    PYTHONPATH=. python3 benchmarks/host_overhead.py

Prints the host time per eager forward+backward step (B512-L131K-K128, bf16) with and without waiting
for the GPU, the host time of one call of each kernel launcher and of two torch calls for scale, and a
cProfile of 50 steps.
"""

import cProfile
import io
import pstats
import time

import torch

import lightning_haste as lh
B,H,L,K,G = 512,768,131072,128,32
layer = lh.GroupSharedFanIn(H, L, K, G, device="cuda", dtype=torch.bfloat16)
x = torch.randn(B, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
dz = torch.randn(B, L, device="cuda", dtype=torch.bfloat16)
def step():
    layer.weight.grad = None; layer.bias.grad = None; x.grad = None
    layer(x).backward(dz)
for _ in range(10): step()
torch.cuda.synchronize()
for n in (1, 50):
    t = time.perf_counter()
    for _ in range(n): step()
    host = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    tot = (time.perf_counter() - t) / n
    print(f"{n} steps: host {host*1e3:.3f} ms/step, with GPU {tot*1e3:.3f} ms/step")
# pure host cost of each piece
from lightning_haste import kernels
w, idx, b = layer.weight.detach(), layer.group_index, layer.bias.detach()
xd = x.detach()
def t(name, fn, n=200):
    fn(); torch.cuda.synchronize()
    s = time.perf_counter()
    for _ in range(n): fn()
    h = (time.perf_counter() - s) / n
    torch.cuda.synchronize()
    print(f"  host {name}: {h*1e6:.1f} us")
t("gsfi_forward", lambda: kernels.gsfi_forward(xd, w, idx, b, L))
xt = kernels._launch.transpose_input(xd)
t("gsfi_grad_input", lambda: kernels.gsfi_grad_input(dz, w, idx, H))
gb = torch.empty(L, device="cuda", dtype=torch.bfloat16)
t("gsfi_grad_weight", lambda: kernels.gsfi_grad_weight(dz, xt, idx, w, grad_bias=gb))
t("torch.empty", lambda: torch.empty(B, H, device="cuda"))
t("F.linear small", lambda: torch.nn.functional.linear(xd[:, :K], w[:1024]))
pr = cProfile.Profile()
pr.enable()
for _ in range(50): step()
torch.cuda.synchronize()
pr.disable()
s = io.StringIO()
pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(35)
print(s.getvalue())
