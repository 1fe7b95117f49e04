"""The launchers' shared-memory formulas equal the kernels' own layout structs (CPU only: needs nvcc, no GPU).

Each kernel file in cuda/ defines a layout struct (``ForwardSmem``, ``ForwardSm90Smem``, ``GradInputSmem``,
``GradWeightTileSmem``, ``GradWeightWarpSmem``) that the kernel carves its dynamic shared memory with; its
``total_bytes`` is ``__host__ __device__ constexpr``. One host program, generated here with every template
instantiation spelled out, prints ``total_bytes`` over a grid of shapes, and each line must equal the Python
size function that the launcher passes to the driver.
"""

import itertools
import shutil
import subprocess
from pathlib import Path

import pytest

from lightning_haste.kernels import forward, grad_input, grad_weight

CUDA_DIR = Path(__file__).resolve().parents[1] / "cuda"
GROUP_SIZES = (8, 16, 32, 64, 128)
# Fan-ins (multiples of 8): whole tiles of 16 and K not a multiple of 16, chunks of K whole and partial.
FAN_INS = (16, 24, 64, 72, 128, 136, 160, 200, 512)
K_PADS = sorted({(k + 15) // 16 * 16 for k in FAN_INS})  # 16, 32, 64, 80, 128, 144, 160, 208, 512
IN_FEATURES = (200, 384, 768, 4096)
BATCHES = (1, 31, 32, 33, 64, 100, 256, 500, 512)


def _pad16(v):
    return (v + 15) // 16 * 16


def _cases():
    """(C++ statement printing one struct's totals, {printed key: Python formula's bytes})."""
    hs = ", ".join(map(str, IN_FEATURES))
    for g, kp, resident in itertools.product(GROUP_SIZES, K_PADS, (True, False)):
        for warps, stages in forward.MMA_SHAPES:
            layout = f"ForwardSmem<{g}, {kp}, {str(resident).lower()}, {warps}, {stages}>"
            tag = f"forward {g} {kp} {int(resident)} {warps} {stages}"
            yield (f'for (int h : {{{hs}}}) printf("{tag} %d %lld\\n", h, {layout}::total_bytes(h));',
                   {f"{tag} {h}": forward.mma_shared_bytes(g, kp, h, resident, warps, stages) for h in IN_FEATURES})
    wgmma_shapes = sorted(set(forward.WGMMA_SHAPES) | {(1, 2), (2, 2), (3, 2), (2, 4), (1, 4)})
    for g, (warpgroups, stages) in itertools.product(GROUP_SIZES, wgmma_shapes):
        layout = f"ForwardSm90Smem<{g}, {warpgroups}, {stages}>"
        tag = f"forward_sm90 {g} {warpgroups} {stages}"
        yield (f'for (int h : {{{hs}}}) printf("{tag} %d %lld\\n", h, {layout}::total_bytes(h));',
               {f"{tag} {h}": forward.wgmma_shared_bytes(g, h, warpgroups, stages) for h in IN_FEATURES})
    for g, kp, smem_acc, rows, groups in itertools.product(
        GROUP_SIZES, K_PADS, (True, False), (32, 64, 128), (1, 2, 4)
    ):
        if groups > 1 and (_pad16(g) != g or rows < 64 or not smem_acc):
            continue  # the launcher runs several groups per step only with whole tiles per warp
        fan_ins = [k for k in FAN_INS if _pad16(k) == kp]
        ks = ", ".join(map(str, fan_ins))
        for stages in (2, 3, 4, 8):
            layout = f"GradInputSmem<{g}, {kp}, {str(smem_acc).lower()}, {stages}, {rows}, {groups}>"
            tag = f"grad_input {g} {kp} {int(smem_acc)} {stages} {rows} {groups}"
            yield (
                f'for (int h : {{{hs}}}) for (int k : {{{ks}}}) '
                f'printf("{tag} %d %d %lld\\n", h, k, {layout}::total_bytes(h, k));',
                {
                    f"{tag} {h} {k}": grad_input.shared_bytes(g, k, h, smem_acc, stages, rows, groups)
                    for h in IN_FEATURES for k in fan_ins
                },
            )
    for g, kp, stages in itertools.product(GROUP_SIZES, K_PADS, (2, 3, 4)):
        layout = f"GradWeightTileSmem<{g}, {kp}, {stages}>"
        tag = f"grad_weight {g} {kp} {stages}"
        yield (
            f'printf("{tag} %lld\\n", {layout}::total_bytes());', {tag: grad_weight.tile_shared_bytes(g, kp, stages)}
        )
    bs = ", ".join(map(str, BATCHES))
    warp_shapes = sorted(set(grad_weight.WARP_SHAPES) | {(8, 4), (1, 2)})
    for g, (warps, stages) in itertools.product(GROUP_SIZES, warp_shapes):
        layout = f"GradWeightWarpSmem<{g}, {stages}, {warps}>"
        tag = f"grad_weight_warp {g} {stages} {warps}"
        yield (
            f'for (int h : {{{hs}}}) for (int b : {{{bs}}}) '
            f'printf("{tag} %d %d %lld\\n", h, b, {layout}::total_bytes(h, b));',
            {
                f"{tag} {h} {b}": grad_weight.warp_shared_bytes(g, h, b, stages, warps)
                for h in IN_FEATURES for b in BATCHES
            },
        )


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_layout_structs_match_launcher_formulas(tmp_path):
    cases = list(_cases())
    expected = {}
    for _, values in cases:
        expected.update(values)
    source = tmp_path / "smem_layout.cu"
    source.write_text(
        "#include <cstdio>\n"
        + "".join(f'#include "{p.name}"\n' for p in sorted(CUDA_DIR.glob("*.cu")))
        + "int main() {\n"
        + "".join(f"  {statement}\n" for statement, _ in cases)
        + "  return 0;\n}\n"
    )
    program = tmp_path / "smem_layout"
    build = subprocess.run(
        ["nvcc", "-std=c++17", "-arch=sm_80", "-I", str(CUDA_DIR), "-x", "cu", str(source), "-o", str(program)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(program)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr[-4000:]

    printed = {}
    for line in run.stdout.splitlines():
        key, value = line.rsplit(" ", 1)
        printed[key] = int(value)
    assert printed.keys() == expected.keys()
    mismatches = [
        f"{key}: kernel {printed[key]}, Python {expected[key]}" for key in expected if printed[key] != expected[key]
    ]
    assert not mismatches, f"{len(mismatches)} of {len(expected)} differ:\n" + "\n".join(mismatches[:40])
