// The main loop of the Hopper (sm_90a) forward of the group-shared fixed fan-in layer, with warpgroup MMA
// (wgmma), shared by the kernels that consume its logits tiles: gsfi_forward_sm90 (cuda/gsfi_forward_sm90.cu)
// stores them, gsfi_topk_candidates_sm90 (cuda/gsfi_topk.cu) keeps the top-k candidates without storing Z.
//   Z[b, g*G + j] = bias[g*G + j] + sum_k X[b, idx[g, k]] * W[g*G + j, k]
//
// Same work split as gsfi_forward.cu (one CTA = 64 batch rows with the input resident in shared memory,
// groups dealt to CTAs strided), but a warpgroup (4 warps) owns a group instead of a warp: each warp
// gathers the A fragments of its 16 batch rows with ldmatrix (feature idx[g,k] -> one shared-memory row
// of XT, as in the sm_80 kernel), and wgmma m64nNk16 multiplies them by the group's weights straight
// from shared memory. The weights stream through a warpgroup-shared NSW-stage cp.async ring in chunks of
// 64 columns of K, each chunk stored in the 128-byte-swizzled K-major layout that a wgmma descriptor
// reads (the 16-byte piece p of row r lands at piece p ^ (r % 8)). Against mma.sync this removes the
// ldmatrix of every weight fragment and issues one instruction per 64 x N x 16 product per warp
// instead of N / 2 per 16 x N x 16. But each group's copies, barrier, bias loads and output addressing
// now run in four warps: at large batches the kernel executes more instructions than gsfi_forward and is
// slower, so the launcher uses it only for small batches and large groups (B <= 128, G >= 32).
//
// Compiled only for sm_90a (the launcher passes -arch=sm_90a); other targets get an empty main loop that
// the launchers never pick.
//
// The epilogue is called once per group with the warp's 16-row slice of the group's tile: its C fragments
// (fp32 sums without the bias, the mma.sync C layout: acc[n] holds columns n * 8 + 2 * (lane % 4) + {0, 1} of
// rows lane / 4 and lane / 4 + 8), this lane's bias fragment, the warp's 16-row shared tile o_s (pitch
// G * 2 + 16 bytes, free for the epilogue), the slice's first batch row, the group and its number of real labels.
#pragma once
#include "gsfi_common.cuh"

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GSFI_HAS_WGMMA 1
#else
#define GSFI_HAS_WGMMA 0
#endif

// wgmma m64nNk16, float32 accumulators, A (this warp's 16 x 16 slice) from registers, B from the shared
// memory that `desc` describes; N = 8, 16 or 32 (larger groups issue several N = 32 products).
// accumulate = 0 overwrites the accumulators (no instruction has to zero them while products are in flight).
template <class T, int N> struct Wgmma;

#define GSFI_WGMMA_TAIL(PTX) ".f32." PTX "." PTX " "
#define GSFI_DEFINE_WGMMA(TYPE, PTX)                                                                         \
  template <> struct Wgmma<TYPE, 8> {                                                                        \
    static __device__ __forceinline__ void mma(float* d, const unsigned (&a)[4], unsigned long long desc,    \
                                               int accumulate) {                                           \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %9, 0;\n"                                              \
                   "wgmma.mma_async.sync.aligned.m64n8k16" GSFI_WGMMA_TAIL(PTX)                              \
                   "{%0,%1,%2,%3}, {%4,%5,%6,%7}, %8, p, 1, 1, 0;\n}\n"                                      \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                          \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));                  \
    }                                                                                                        \
  };                                                                                                         \
  template <> struct Wgmma<TYPE, 16> {                                                                       \
    static __device__ __forceinline__ void mma(float* d, const unsigned (&a)[4], unsigned long long desc,    \
                                               int accumulate) {                                           \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"                                             \
                   "wgmma.mma_async.sync.aligned.m64n16k16" GSFI_WGMMA_TAIL(PTX)                             \
                   "{%0,%1,%2,%3,%4,%5,%6,%7}, {%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"                       \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
                     "+f"(d[7])                                                                              \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));                  \
    }                                                                                                        \
  };                                                                                                         \
  template <> struct Wgmma<TYPE, 32> {                                                                       \
    static __device__ __forceinline__ void mma(float* d, const unsigned (&a)[4], unsigned long long desc,    \
                                               int accumulate) {                                           \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"                                             \
                   "wgmma.mma_async.sync.aligned.m64n32k16" GSFI_WGMMA_TAIL(PTX)                             \
                   "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, {%16,%17,%18,%19}, %20, p, 1, "  \
                   "1, 0;\n}\n"                                                                              \
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),     \
                     "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), \
                     "+f"(d[14]), "+f"(d[15])                                                                \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));                  \
    }                                                                                                        \
  };

#if GSFI_HAS_WGMMA
GSFI_DEFINE_WGMMA(bf16_t, "bf16")
GSFI_DEFINE_WGMMA(f16_t, "f16")
#endif
#undef GSFI_DEFINE_WGMMA
#undef GSFI_WGMMA_TAIL

// Descriptor of a K-major operand tile in shared memory, 128-byte swizzle: rows of 64 16-bit values
// (128 bytes), 8-row atoms 1024 bytes apart; `addr` may step along K inside the atom in 32-byte units.
__device__ __forceinline__ unsigned long long wgmma_desc_sw128(unsigned addr) {
  return (unsigned long long)((addr & 0x3FFFF) >> 4) | (1ull << 16) | ((unsigned long long)(1024 >> 4) << 32) |
         (1ull << 62);
}

// Pins the accumulators in registers at this point of the program: the compiler must not move reads or
// writes of them across the wgmma fence / wait that surround the asynchronous products.
template <int R>
__device__ __forceinline__ void wgmma_fence_operands(float (&acc)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
    asm volatile("" : "+f"(acc[i][0]), "+f"(acc[i][1]), "+f"(acc[i][2]), "+f"(acc[i][3])::"memory");
}
// The same for A fragments held in registers: wgmma reads them after the instruction has issued.
template <int R>
__device__ __forceinline__ void wgmma_fence_operands(unsigned (&a)[R][4]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
    asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

// Dynamic shared memory of gsfi_forward_sm90, from the first 1024-byte boundary of the allocation (the
// swizzled stages need 1024-byte alignment in the shared window: the swizzle XORs address bits 4-6 with
// bits 7-9; the dynamic allocation is only guaranteed 16, so ALIGN_SLACK bytes of the total let the kernel
// start at the next boundary, align_skip bytes in). In this order: per warpgroup a ring of NSW swizzled
// weight chunks [G][64 values], then per warpgroup a ring of their NSW index chunks, then a 16-row output
// tile [16][OPITCH] per warp, then the resident input [H + 1][XPITCH] (row H zeros).
template <int G, int NWG, int NSW>
struct ForwardSm90Smem {
  static constexpr int BT = 64, KCW = 64;  // batch rows per CTA, columns of K per stage
  static constexpr int XPITCH = BT * 2 + 16, OPITCH = G * 2 + 16;
  static constexpr int W_STAGE = G * KCW * 2, IDX_STAGE = KCW * 4, O_BYTES = 16 * OPITCH;
  static_assert(W_STAGE % 1024 == 0, "swizzled weight stages must stay 1024-byte aligned");
  // Warpgroup wg's weight ring starts at wg * NSW * W_STAGE, its index ring at I_OFFSET + wg * NSW *
  // IDX_STAGE; warp w's output tile at O_OFFSET + w * O_BYTES.
  static constexpr int I_OFFSET = NWG * NSW * W_STAGE;                // the index rings
  static constexpr int O_OFFSET = NWG * NSW * (W_STAGE + IDX_STAGE);  // the output tiles
  static constexpr int X_OFFSET = NWG * NSW * (W_STAGE + IDX_STAGE) + NWG * 4 * O_BYTES;  // the input
  static constexpr int ALIGN_SLACK = 1024;
  // Bytes from the allocation's shared-window address `addr` to the next 1024-byte boundary.
  static __host__ __device__ constexpr unsigned align_skip(unsigned addr) { return (1024 - (addr & 1023)) & 1023; }
  static __host__ __device__ constexpr long long total_bytes(int H) {
    return (long long)X_OFFSET + (long long)(H + 1) * XPITCH + ALIGN_SLACK;
  }
};

template <class T, int G, int KP, int NWG, int NSW, class Epilogue>
__device__ __forceinline__ void forward_tiles_sm90(const u16* __restrict__ XT, int ldxt, const u16* __restrict__ W,
                                                   const int* __restrict__ idx, const u16* __restrict__ bias, int B,
                                                   int H, int L, int K, int num_groups, Epilogue& epilogue) {
#if GSFI_HAS_WGMMA
  using Smem = ForwardSm90Smem<G, NWG, NSW>;
  constexpr int BT = Smem::BT, KCW = Smem::KCW, NKC = (KP + KCW - 1) / KCW;
  constexpr int NN = G < 32 ? G : 32, NPROD = G / NN;  // wgmma width and products per 16 columns of K
  constexpr int XPITCH = Smem::XPITCH, W_STAGE = Smem::W_STAGE, IDX_STAGE = Smem::IDX_STAGE;
  // The layout starts at the allocation's first 1024-byte boundary (ForwardSm90Smem).
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + Smem::align_skip(smem_addr(smem_raw));

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wl = warp & 3, t = tid & 127;  // warpgroup, warp in it, thread in it
  const int b0 = blockIdx.x * BT;
  if (blockIdx.y * NWG >= num_groups) return;
  unsigned char* w_ring = smem + wg * NSW * W_STAGE;
  unsigned char* i_ring = smem + Smem::I_OFFSET + wg * NSW * IDX_STAGE;
  unsigned char* o_s = smem + Smem::O_OFFSET + warp * Smem::O_BYTES;
  unsigned char* x_s = smem + Smem::X_OFFSET;

  for (int c = tid; c < H * (BT / 8); c += NWG * 128) {
    const int h = c / (BT / 8), col = (c % (BT / 8)) * 8;
    const bool valid = b0 + col < ldxt;
    cp_async16(smem_addr(x_s + h * XPITCH + col * 2), valid ? XT + (long long)h * ldxt + b0 + col : XT, valid);
  }
  // Row H is all zeros: feature slots past K (the last chunk of K) read it.
  for (int c = tid; c < BT / 2; c += NWG * 128) reinterpret_cast<unsigned*>(x_s + H * XPITCH)[c] = 0u;
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int first = blockIdx.y * NWG + wg, stride = gridDim.y * NWG;
  const int my_groups = first < num_groups ? (num_groups - first + stride - 1) / stride : 0;
  const int nsteps = my_groups * NKC;
  auto wg_sync = [&]() { asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory"); };

  auto issue = [&](int step) {
    const int stage = step % NSW;
    const unsigned wst = smem_addr(w_ring + stage * W_STAGE);
    const int g = first + (step / NKC) * stride, k0 = (step % NKC) * KCW;
    const u16* wg_ptr = W + (long long)g * G * K + k0;
    constexpr int PIECES = G * (KCW / 8), PER = (PIECES + 127) / 128;
#pragma unroll
    for (int i = 0; i < PER; ++i) {
      const int c = t + i * 128, r = c >> 3, p = c & 7;
      if (PIECES % 128 != 0 && c >= PIECES) continue;
      const bool valid = k0 + p * 8 < K;
      cp_async16(wst + r * 128 + ((p ^ (r & 7)) << 4), valid ? wg_ptr + r * K + p * 8 : W, valid);
    }
    if (t < KCW / 4) {
      const bool valid = k0 + t * 4 < K;
      cp_async16(smem_addr(i_ring + stage * IDX_STAGE + t * 16), valid ? idx + (long long)g * K + k0 + t * 4 : idx,
                 valid);
    }
  };

  for (int s = 0; s < NSW - 1; ++s) {
    if (s < nsteps) issue(s);
    cp_async_commit();
  }

  // This lane's ldmatrix row within a 16-feature slice, and its 8-row half of the warp's 16 batch rows.
  const int lane_k = (lane & 7) + ((lane >> 4) << 3);
  const int lane_b = (wl * 16 + ((lane >> 3) & 1) * 8) * 2;
  int s = 0;  // this warpgroup's pipeline step: (group, chunk of K) in order
  for (int gi = 0; gi < my_groups; ++gi) {
    const int g = first + gi * stride;
    float acc[G / 8][4];
    for (int kc = 0; kc < NKC; ++kc, ++s) {
      cp_async_wait<NSW - 2>();
      // The ring's pieces were written through the generic proxy; wgmma reads through the async proxy.
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      wg_sync();  // this stage has landed everywhere; the products of the previous step are done everywhere
      if (s + NSW - 1 < nsteps) issue(s + NSW - 1);
      cp_async_commit();

      const int stage = s % NSW;
      const int* is = reinterpret_cast<const int*>(i_ring + stage * IDX_STAGE);
      const unsigned wst = smem_addr(w_ring + stage * W_STAGE);
      constexpr int K16 = KCW / 16;
      unsigned a[K16][4];
#pragma unroll
      for (int k16 = 0; k16 < K16; ++k16) {
        if (kc * KCW + k16 * 16 >= KP) break;
        const int kk = k16 * 16 + lane_k;
        const int f = kc * KCW + kk < K ? is[kk] : H;
        ldsm_x4_trans(a[k16], smem_addr(x_s + f * XPITCH) + lane_b);
      }
      // The products of a step complete before the next step's ldmatrix (wait_group 0): ptxas serialises
      // register-A products anyway when the next fragments load while they are in flight, and a version
      // with two fragment sets and two accumulator sets was no faster.
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int k16 = 0; k16 < K16; ++k16) {
        if (kc * KCW + k16 * 16 >= KP) break;
#pragma unroll
        for (int n = 0; n < NPROD; ++n)
          Wgmma<T, NN>::mma(&acc[n * (NN / 8)][0], a[k16], wgmma_desc_sw128(wst + n * NN * 128 + k16 * 32),
                            kc + k16 > 0);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
      wgmma_fence_operands(acc);
      wgmma_fence_operands(a);
    }

    // Accumulator [n][i] of the warp's 16 rows: column n * 8 + 2 * (lane % 4) + i % 2, row lane / 4 + 8 * (i / 2)
    // (the mma.sync C layout, per 8 columns).
    float bias_v[G / 8][2];
    load_bias_fragment<T>(bias_v, bias, g, G, L, lane);
    epilogue(acc, bias_v, o_s, b0 + wl * 16, g, min(G, L - g * G), lane);
  }
  cp_async_wait<0>();
#endif
}
