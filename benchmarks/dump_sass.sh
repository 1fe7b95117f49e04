#!/usr/bin/env bash
# Compile each kernel for sm_90a with nvcc and dump its resource usage and SASS (needs nvcc + cuobjdump):
#   bash benchmarks/dump_sass.sh OUTDIR
set -euo pipefail
out=${1:-sass}
mkdir -p "$out"
cat > "$out/inst.cu" <<'CU'
#include "gsfi_forward.cu"
#include "gsfi_grad_input.cu"
#include "gsfi_grad_weight.cu"
void* k[] = {(void*)&gsfi_forward<bf16_t, 32, 128, true, true, 12, 3>,
             (void*)&gsfi_grad_input<bf16_t, 32, 128, true, 2, 64, true>,
             (void*)&gsfi_grad_weight<bf16_t, 32, 128, 2, true>,
             (void*)&gsfi_grad_weight_warp<bf16_t, 16, 128, 2, 8, true>};
CU
nvcc -std=c++17 -gencode=arch=compute_90a,code=sm_90a -I cuda -Xptxas -v -c "$out/inst.cu" -o "$out/inst.o" 2> "$out/ptxas.txt"
cuobjdump -sass "$out/inst.o" > "$out/kernels.sass"
wc -l "$out/kernels.sass"
