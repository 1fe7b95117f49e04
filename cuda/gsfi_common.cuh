// The primitives that several group-shared fixed fan-in (GSFI) kernel files share: the 16-bit types and
// their tensor-core Ops, IEEE float32 addition, shared-memory addresses, ldmatrix and cp.async wrappers,
// the forward kernels' epilogue and gsfi_pad16. A helper that serves one kernel file lives in that file
// (cuda/README.md): the runtime inlines this header, and only this one, into each kernel source.
//
// The kernels never include the CUDA half/bfloat16 headers: 16-bit values travel as raw bits and are
// converted with PTX, so the sources compile unchanged under NVRTC (CuPy) and nvcc.
//
// Layout conventions (all kernels):
//   XT     [H][ldxt]  the input transposed, batch contiguous, ldxt a multiple of 8, padding columns 0.
//                     A row of XT is the input feature h for every batch row: gathering K rows of XT
//                     gives the [K x batch] operand of a group, 16 contiguous bytes at a time.
//   weight [num_groups * G][K] row-major, K a multiple of 8.
//   idx    [num_groups][K] int32.
//   Z, dZ  [B][ldz] row-major.
// Tensor-core tiles are mma.sync m16n8k16 (sm_80+), fp32 accumulation. Gathers are free: ldmatrix
// takes one shared-memory address per 8x8 row, so a row can be any gathered feature.
// Shared memory: each kernel file defines a layout struct (ForwardSmem, ...) whose offsets the kernel carves
// its dynamic shared memory with and whose total_bytes() the launcher's size formula equals (checked on
// the host by tests/test_smem_layout.py).
#pragma once

typedef unsigned short u16;

struct bf16_t { u16 bits; };
struct f16_t { u16 bits; };

template <class T> struct Ops;

// The two 16-bit types differ only in the PTX type name of their tensor-core product and their
// float32 -> 16-bit conversion, and in how a value widens back to float32 (below).
#define GSFI_DEFINE_OPS(TYPE, PTX)                                                                              \
  template <> struct Ops<TYPE> {                                                                                \
    static __device__ __forceinline__ void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) { \
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX "." PTX                                        \
                   ".f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"                              \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                             \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                             \
    }                                                                                                           \
    static __device__ __forceinline__ unsigned pack(float lo, float hi) {                                       \
      unsigned r;                                                                                               \
      asm("cvt.rn." PTX "x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));                                     \
      return r;                                                                                                 \
    }                                                                                                           \
    static __device__ __forceinline__ u16 from_float(float v) { return (u16)(pack(v, 0.f) & 0xffffu); }         \
    static __device__ __forceinline__ float to_float(u16 v);                                                    \
  };

GSFI_DEFINE_OPS(bf16_t, "bf16")
GSFI_DEFINE_OPS(f16_t, "f16")
#undef GSFI_DEFINE_OPS

__device__ __forceinline__ float Ops<bf16_t>::to_float(u16 v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ float Ops<f16_t>::to_float(u16 v) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
  return f;
}

// float32 addition that keeps subnormal operands and results: CuPy compiles every kernel with -ftz=true
// (appended after the caller's options), which makes the compiler flush them in a C++ '+'; explicit PTX
// without .ftz is IEEE on sm_80+.
__device__ __forceinline__ float add_f32(float a, float b) {
  float r;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// The bias of this lane's output columns of group g in the tensor-core C layout (mma.sync m16n8, and each
// warp's rows of wgmma m64nN): columns n * 8 + 2 * (lane % 4) and the next one; 0 past the group's G
// labels, past L, or without a bias.
template <class T, int N8>
__device__ __forceinline__ void load_bias_fragment(float (&bias_v)[N8][2], const u16* __restrict__ bias, int g,
                                                   int G, int L, int lane) {
#pragma unroll
  for (int n = 0; n < N8; ++n) {
    const int j = n * 8 + 2 * (lane & 3);
    const int p = g * G + j;
    bias_v[n][0] = (bias != nullptr && j < G && p < L) ? Ops<T>::to_float(bias[p]) : 0.f;
    bias_v[n][1] = (bias != nullptr && j + 1 < G && p + 1 < L) ? Ops<T>::to_float(bias[p + 1]) : 0.f;
  }
}

// One 16-row slice of a group's output from its C fragments (acc[n]: columns n * 8 ..., rows lane / 4 and
// lane / 4 + 8): bias added, rounded once, then through the warp's shared tile `o_s` (pitch N8 * 16 + 16
// bytes) so that every lane stores whole 16-byte pieces of output rows (full 32-byte sectors) instead of
// scattered 4-byte pairs. Rows from B on and labels from `cols` on are not written. ALIGNED_Z: rows start
// on 16-byte boundaries and have room up to the next multiple of 8 labels (the launcher pads the storage),
// so a piece that crosses L ends in that padding.
template <class T, int N8, bool ALIGNED_Z>
__device__ __forceinline__ void store_output_slice(const float (&acc)[N8][4], const float (&bias_v)[N8][2],
                                                   unsigned char* o_s, u16* __restrict__ Z, long long ldz,
                                                   int row0, int B, long long col0, int cols, int lane) {
  constexpr int OPITCH = N8 * 16 + 16;
#pragma unroll
  for (int n = 0; n < N8; ++n) {
    const int j = n * 8 + 2 * (lane & 3);
#pragma unroll
    for (int h8 = 0; h8 < 2; ++h8) {
      const int r = (lane >> 2) + h8 * 8;
      *reinterpret_cast<unsigned*>(o_s + r * OPITCH + j * 2) =
          Ops<T>::pack(add_f32(acc[n][2 * h8], bias_v[n][0]), add_f32(acc[n][2 * h8 + 1], bias_v[n][1]));
    }
  }
  __syncwarp();
#pragma unroll
  for (int c = lane; c < 16 * N8; c += 32) {
    const int r = c / N8, j = (c % N8) * 8;
    const int b = row0 + r;
    if (b >= B || j >= cols) continue;
    const unsigned char* src = o_s + r * OPITCH + j * 2;
    u16* dst = Z + (long long)b * ldz + col0 + j;
    if (ALIGNED_Z) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {
      const u16* s16 = reinterpret_cast<const u16*>(src);
      for (int e = 0; e < 8 && j + e < cols; ++e) dst[e] = s16[e];
    }
  }
  __syncwarp();
}

// 16-byte global -> shared copy; copies zeros when !valid (the source is not read then).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// 16-byte global -> shared copy of which only the first `bytes` (0..16) are read; the rest become 0.
__device__ __forceinline__ void cp_async16_bytes(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// v rounded up to a multiple of 16 (the tensor-core tile edge); host and device, for the layout structs.
__host__ __device__ constexpr int gsfi_pad16(int v) { return (v + 15) / 16 * 16; }
