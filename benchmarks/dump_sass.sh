#!/usr/bin/env bash
# Compile one instantiation of each kernel (the variants the launcher picks at the benchmark shapes) with nvcc
# and dump their resource usage (ptxas -v) and, where cuobjdump or nvdisasm is installed, their SASS:
#
#   bash benchmarks/dump_sass.sh [OUTDIR] [ARCH]        # ARCH: sm_90a (default), sm_80, ...; OUTDIR: sass
#
# Writes OUTDIR/inst.cu (the instantiations), OUTDIR/ptxas.txt (registers, spills, shared memory per kernel),
# OUTDIR/inst.cubin and, if a disassembler is found, OUTDIR/kernels.sass. The sources are included from
# cuda/ (-I cuda), every cuda/*.cu file, so helpers moving between those files need no change here; the
# instantiations follow the template heads of cuda/gsfi_forward.cu, gsfi_forward_sm90.cu, gsfi_grad_input.cu
# and gsfi_grad_weight.cu (as tests/test_kernel_sources.py compiles them).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
src=${CUDA_DIR:-$root/cuda}  # CUDA_DIR=<other tree>/cuda dumps another tree's kernels
out=${1:-sass}
arch=${2:-sm_90a}
mkdir -p "$out"
{
  for f in "$src"/*.cu; do echo "#include \"$(basename "$f")\""; done
  cat <<'CU'
void* gsfi_dump_kernels[] = {
    // forward, mma.sync: T, G, KP, RESIDENT, ALIGNED_Z, NW, NSW (B512-L131K-K128: 12 warps x 3 stages)
    (void*)&gsfi_forward<bf16_t, 32, 128, true, true, 12, 3>,
    // forward, mma.sync with groups of 16 (AmazonTitles-670K; the layer's outputs always have aligned rows)
    (void*)&gsfi_forward<bf16_t, 16, 128, true, true, 12, 3>,
    // forward, mma.sync with odd-L output rows (2-byte stores: an unaligned `out` passed to gsfi_forward)
    (void*)&gsfi_forward<bf16_t, 32, 64, true, false, 8, 3>,
    // forward, wgmma (sm_90a; an empty body elsewhere): T, G, KP, ALIGNED_Z, NWG, NSW (Amazon-3M)
    (void*)&gsfi_forward_sm90<bf16_t, 64, 128, true, 3, 3>,
    // grad-input: T, G, KP, SMEM_ACC, NST, BT, ALIGNED_DZ, S, ROW_OWNED[, PARTIALS]
    (void*)&gsfi_grad_input<bf16_t, 32, 128, true, 2, 64, true, 1, false>,
    (void*)&gsfi_grad_input<bf16_t, 16, 128, true, 2, 128, false, 2, true>,
    (void*)&gsfi_grad_input<bf16_t, 32, 128, true, 2, 64, true, 1, false, true>,
    // grad-weight, tile kernel: T, G, KP, NST, ALIGNED_DZ (Amazon-3M, raw dZ)
    (void*)&gsfi_grad_weight<bf16_t, 64, 128, 2, false>,
    // grad-weight, warp kernel: T, G, KP, NST, NW, ALIGNED_DZ (AmazonTitles-670K: 6 warps x 3 stages, raw dZ)
    (void*)&gsfi_grad_weight_warp<bf16_t, 16, 128, 3, 6, false>,
};
CU
} > "$out/inst.cu"
virtual=${arch/sm_/compute_}
nvcc -std=c++17 "-gencode=arch=$virtual,code=$arch" -I "$src" -Xptxas -v -cubin "$out/inst.cu" \
  -o "$out/inst.cubin" 2> "$out/ptxas.txt" || { tail -n 30 "$out/ptxas.txt" >&2; exit 1; }
grep -E "Compiling entry|Used [0-9]+ registers|spill" "$out/ptxas.txt" | sed -E 's/^ptxas info *: //' || true
if command -v cuobjdump > /dev/null; then
  cuobjdump -sass "$out/inst.cubin" > "$out/kernels.sass"
elif command -v nvdisasm > /dev/null; then
  nvdisasm -c "$out/inst.cubin" > "$out/kernels.sass"
else
  echo "no cuobjdump or nvdisasm: SASS not dumped (resource usage in $out/ptxas.txt)" >&2
  exit 0
fi
wc -l "$out/kernels.sass"
