"""Which part of a fused loss step breaks a CUDA-graph capture (a diagnostic; each case in a fresh process).

    PYTHONPATH=. python3 benchmarks/capture_check.py
"""

import subprocess
import sys

CASE = r'''
import sys, torch, numpy as np
from lightning_haste import HeadTailOutput, ops, loss as L
case = sys.argv[1]
if "nomm" in case:
    L._MM_FLOAT32["ok"] = False
if "recompute" in case:
    ops.GRADIENTS_WITH_LOSS = False
mode = "thread_local" if "tl" in case else "global"
if case.startswith("mm"):
    a = torch.randn(64, 384, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(384, 5000, device="cuda", dtype=torch.bfloat16)
    fn = lambda: torch.mm(a, b, out_dtype=torch.float32)
else:
    freq = np.random.default_rng(0).integers(0, 100, 5000)
    layer = HeadTailOutput(768, freq, head_ratio=0.0 if "nohead" in case else 0.1, fan_in=64, group_size=16,
                           tail_features=(0, 384),
                           head_features=(384, 768), device="cuda", dtype=torch.bfloat16,
                           backend="torch" if "torchtail" in case else "auto")
    x = torch.randn(64, 768, device="cuda", dtype=torch.bfloat16, requires_grad="nograd" not in case)
    args = layer.loss_arguments(x, [torch.tensor([1, 2])] * 64)[0]
    def fn():
        for p in layer.parameters():
            p.grad = None
        ops.head_tail_loss_2d(*args).backward()
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    fn(); fn()
torch.cuda.current_stream().wait_stream(side)
torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g, capture_error_mode=mode):
        fn()
    g.replay(); torch.cuda.synchronize()
    print(case, "OK")
except Exception as exc:
    print(case, "FAILED", str(exc).splitlines()[0][:150])
'''

CASES = sys.argv[1:] or ("mm", "step", "step-nograd", "step-nohead", "step-torchtail", "step-nohead-recompute",
                         "step-torchtail-nohead")
for case in CASES:
    out = subprocess.run([sys.executable, "-c", CASE, case], capture_output=True, text=True, timeout=120)
    print((out.stdout.strip() or out.stderr.strip().splitlines()[-1])[:300], flush=True)
