"""Every kernel source compiles with nvcc for sm_80 and sm_90a (CI has nvcc but no GPU)."""

import itertools
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
GROUP_SIZES = (8, 16, 32, 64, 128)
K_PADS = (16, 128, 512)


def _instantiations():
    lines = []
    flags = (True, False)
    for dtype, g, kp, flag_a, flag_b in itertools.product(("bf16_t", "f16_t"), GROUP_SIZES, K_PADS, flags, flags):
        a, b = str(flag_a).lower(), str(flag_b).lower()
        lines.append(f"(void*)&gsfi_forward<{dtype}, {g}, {kp}, {a}, {b}, 8, 3>,")
        # flag_a: shared-memory accumulation / aligned dZ rows (and grad-input warps owning batch tiles);
        # flag_b: the second flag of each kernel
        lines.append(f"(void*)&gsfi_grad_input<{dtype}, {g}, {kp}, {a}, 3, {32 if flag_a else 64}, {b}, 1, {a}>,")
        if flag_a:
            lines.append(f"(void*)&gsfi_grad_weight<{dtype}, {g}, {kp}, {2 if flag_b else 3}, {b}>,")
    lines += [f"(void*)&gsfi_forward<bf16_t, 32, 128, true, true, {w}, {n}>,"
              for w, n in ((12, 3), (8, 4), (4, 2), (2, 3), (1, 2))]
    lines += [f"(void*)&gsfi_forward<f16_t, {g}, {kp}, {a}, true, 12, 3>,"
              for g, kp, a in ((8, 16, "true"), (16, 128, "false"), (32, 512, "true"))]
    lines += [f"(void*)&gsfi_grad_input<bf16_t, 32, 128, true, {n}, {r}, {a}, 1, {o}>,"
              for n in (2, 8) for r in (32, 64, 128) for a in ("true", "false") for o in ("true", "false")]
    lines += [f"(void*)&gsfi_grad_input<f16_t, {g}, {kp}, true, 2, 128, false, 1, {str(g == 16).lower()}>,"
              for g, kp in ((8, 16), (16, 128), (128, 512))]
    # per-column partial sums (torch.use_deterministic_algorithms)
    lines += [f"(void*)&gsfi_grad_input<bf16_t, {g}, 128, true, 2, {r}, {a}, {s}, {o}, true>,"
              for g, r, s, o in ((16, 128, 2, "true"), (32, 64, 1, "false")) for a in ("true", "false")]
    # several groups per step (64 or 128 rows, shared-memory accumulation, G >= 16, warps owning batch tiles)
    lines += [f"(void*)&gsfi_grad_input<{dtype}, {g}, {kp}, true, 4, {r}, {a}, {s}, true>,"
              for dtype in ("bf16_t", "f16_t") for g, kp, s in ((16, 64, 4), (16, 512, 2), (32, 128, 2), (64, 16, 2))
              for r in (64, 128) for a in ("true", "false")]
    # the Hopper forward (wgmma; an empty body for sm_80): every group size, partial and whole chunks of K
    lines += [f"(void*)&gsfi_forward_sm90<bf16_t, {g}, {kp}, {str(kp != 80).lower()}, {3 if g <= 32 else 2}, 3>,"
              for g in GROUP_SIZES for kp in (16, 80, 512)]
    lines += [f"(void*)&gsfi_forward_sm90<f16_t, {g}, {kp}, true, 6, 4>," for g, kp in ((8, 16), (32, 128), (128, 512))]
    lines += [f"(void*)&gsfi_grad_weight<bf16_t, 32, 128, {n}, true>," for n in (2, 4)]
    lines += [
        f"(void*)&gsfi_grad_weight_warp<{dtype}, {g}, {kp}, {n}, {w}, {a}>,"
        for dtype in ("bf16_t", "f16_t") for g, kp in ((8, 16), (8, 128), (16, 64), (16, 128), (32, 64))
        for n, w in ((3, 8), (3, 6), (2, 4)) for a in ("true", "false")
    ]
    # the fused loss kernels: the forward's main loop (instantiated above) with the loss epilogues; both losses
    # and dtypes, resident and streamed input, aligned and packed dZ rows
    lines += [f"(void*)&gsfi_loss_sum<{dtype}, {g}, {kp}, {r}, 8, 3, {loss}>,"
              for dtype, g, kp, r in (("bf16_t", 16, 64, "true"), ("f16_t", 128, 512, "false")) for loss in (0, 1)]
    lines += [f"(void*)&gsfi_loss_grad<{dtype}, {g}, {kp}, {r}, {a}, 4, 3, {loss}>,"
              for dtype, g, kp, r, a in (("bf16_t", 32, 128, "true", "true"), ("f16_t", 8, 16, "false", "false"))
              for loss in (0, 1)]
    lines += [f"(void*)&gsfi_loss_dense<{dtype}, {z}, {loss}>," for dtype, z in
              (("bf16_t", "float"), ("f16_t", "float"), ("bf16_t", "bf16_t"), ("f16_t", "f16_t")) for loss in (0, 1)]
    lines += ["(void*)&gsfi_scale<bf16_t>,", "(void*)&gsfi_scale<f16_t>,"]
    # the top-k candidates: the forward's main loop with the candidate epilogue; both dtypes, every group size,
    # resident and streamed input
    lines += [f"(void*)&gsfi_topk_candidates<{dtype}, {g}, {kp}, {r}, {b}, {w}, {n}>,"
              for dtype, r in (("bf16_t", "true"), ("f16_t", "false")) for g, kp, b, w, n in
              ((8, 16, 2, 8, 3), (16, 64, 2, 12, 3), (32, 128, 1, 8, 4), (64, 128, 2, 4, 3), (128, 512, 1, 2, 2))]
    lines += [f"(void*)&gsfi_topk_candidates_sm90<{dtype}, {g}, {kp}, 1, {w}, {n}>,"
              for dtype, g, kp, w, n in (("bf16_t", 32, 128, 3, 4), ("f16_t", 64, 80, 2, 3), ("bf16_t", 128, 512, 1, 3),
                                         ("f16_t", 8, 16, 3, 3))]
    lines += [f"(void*)&gsfi_topk_{kernel}<{dtype}>," for kernel in ("dense_candidates", "chunk", "merge")
              for dtype in ("bf16_t", "f16_t")]
    lines += [f"(void*)&gsfi_topk_bound<{dtype}, {v}>," for dtype in ("bf16_t", "f16_t") for v in ("u16", "float")]
    # the value of a CUDA graph's conditional node, from each flag type the launcher takes
    lines += [f"(void*)&graph_set_conditional<{t}>," for t in ("bool", "int", "long long", "unsigned char")]
    return "\n".join(lines)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ["arch=compute_80,code=sm_80", "arch=compute_90a,code=sm_90a"])
def test_kernel_sources_compile(tmp_path, arch):
    source = tmp_path / "all_kernels.cu"
    source.write_text(
        "".join(f'#include "{p.name}"\n' for p in sorted(CUDA_DIR.glob("*.cu")))
        + "void* gsfi_all_kernels[] = {\n" + _instantiations() + "\n};\n"
    )
    result = subprocess.run(
        ["nvcc", "-std=c++17", f"-gencode={arch}", "-I", str(CUDA_DIR), "-Werror", "all-warnings",
         "-c", str(source), "-o", str(tmp_path / "all_kernels.o")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]


# One instantiation of each kernel and of each of its code paths that does float32 arithmetic outside the
# tensor cores (bias, epilogue, accumulation, realignment, raw dZ rows).
_ARITHMETIC_PATHS = """
(void*)&gsfi_forward<bf16_t, 32, 128, true, true, 12, 3>,
(void*)&gsfi_forward<f16_t, 16, 64, false, false, 8, 3>,
(void*)&gsfi_forward_sm90<bf16_t, 64, 128, true, 3, 3>,
(void*)&gsfi_grad_input<bf16_t, 32, 128, true, 2, 64, false, 1, false>,
(void*)&gsfi_grad_input<bf16_t, 16, 128, true, 2, 128, true, 2, true>,
(void*)&gsfi_grad_input<f16_t, 64, 512, false, 3, 32, false, 1, false>,
(void*)&gsfi_grad_input<bf16_t, 32, 128, true, 2, 64, true, 1, false, true>,
(void*)&gsfi_grad_weight<bf16_t, 64, 128, 2, false>,
(void*)&gsfi_grad_weight_warp<bf16_t, 16, 128, 3, 6, false>,
(void*)&gsfi_scale<bf16_t>,
(void*)&gsfi_scale<f16_t>,
(void*)&gsfi_topk_candidates<bf16_t, 32, 128, true, 1, 8, 3>,
(void*)&gsfi_topk_candidates<f16_t, 16, 64, false, 2, 8, 3>,
(void*)&gsfi_topk_candidates_sm90<bf16_t, 64, 128, 1, 3, 3>,
(void*)&gsfi_topk_dense_candidates<bf16_t>,
(void*)&gsfi_topk_chunk<f16_t>,
(void*)&gsfi_topk_merge<f16_t>,
(void*)&gsfi_topk_bound<bf16_t, u16>,
(void*)&gsfi_topk_bound<f16_t, float>,
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_kernels_keep_float32_subnormals_under_cupys_ftz(tmp_path):
    # CuPy compiles every RawModule with -ftz=true, after our options: a plain C++ float addition (or
    # multiplication, conversion, ...) then becomes a .ftz instruction that flushes subnormals to zero. The
    # kernels do their float32 arithmetic with explicit IEEE PTX (add_f32); this keeps new code from
    # bringing a flushing one back. Comparisons (setp.*.ftz) are allowed: the only one is grad-input's
    # `v != 0` before a float32 global atomic, which flushes in hardware anyway.
    source = tmp_path / "arithmetic.cu"
    source.write_text(
        "".join(f'#include "{p.name}"\n' for p in sorted(CUDA_DIR.glob("*.cu")))
        + "void* gsfi_arithmetic_paths[] = {" + _ARITHMETIC_PATHS + "};\n"
    )
    ptx = tmp_path / "arithmetic.ptx"
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_90a", "-ftz=true", "-I", str(CUDA_DIR), "--ptx", str(source), "-o", str(ptx)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    opcodes = re.findall(r"^\s*(?:@!?%\w+\s+)?([a-z][\w.:]*)", ptx.read_text(), flags=re.MULTILINE)
    flushing = sorted({op for op in opcodes if ".ftz" in op and not op.startswith("setp.")})
    assert not flushing, f"float instructions that flush subnormals under CuPy's -ftz=true: {flushing}"
