// The main loop of the mma.sync forward of the group-shared fixed fan-in layer, shared by the kernels that
// consume its logits tiles: gsfi_forward (cuda/gsfi_forward.cu) stores them, the fused loss kernels
// (cuda/gsfi_loss.cu) reduce them to a loss or turn them into the logits' gradient without storing Z.
//
//   Z[b, g*G + j] = bias[g*G + j] + sum_k X[b, idx[g, k]] * W[g*G + j, k]
//
// One CTA = 64 batch rows x a set of groups; NW warps, and each warp owns whole groups: with C CTAs
// along the groups, warp w of CTA c takes groups c * NW + w + i * C * NW, so warps never wait for each
// other after the start, and the CTAs running at any moment read and write one contiguous band of
// weights and output columns (which runs faster than a contiguous range of groups per CTA). A warp
// computes its group's [64 x G] output tile in passes of MTP 16-row tiles (all 64 rows when G <= 32), with the
// group's weights streamed through a warp-private NSW-stage cp.async ring in chunks of 32 columns of K;
// every weight fragment feeds MTP tensor-core products.
//
// RESIDENT: the CTA's 64 columns of XT (all H features) sit in shared memory for all its groups and
// the gather is done by ldmatrix row addresses (feature idx[g,k] -> one shared-memory row), so the
// input is read from L2 once per CTA instead of once per group. Otherwise (H too large for
// shared memory) the warp gathers the rows of XT its chunk needs into its ring with cp.async.
//
// The epilogue is called once per 16-row slice of a group's tile, with the slice's C fragments (fp32
// sums without the bias: acc[n] holds columns n * 8 + 2 * (lane % 4) + {0, 1} of rows lane / 4 and
// lane / 4 + 8), this lane's bias fragment, the warp's 16-row shared tile o_s (pitch GP * 2 + 16 bytes,
// free for the epilogue), the slice's first batch row, the group and its number of real labels.
#pragma once
#include "gsfi_common.cuh"

// Dynamic shared memory of gsfi_forward, in this order: with RESIDENT the CTA's 64 columns of XT
// [H + 1][XPITCH] (row H zeros), then per warp a ring of NSW stages and a 16-row output tile [16][OPITCH].
// A stage holds a chunk of the group's weights [GP][WPITCH], its KCW indices and, without RESIDENT, the
// KCW gathered rows of XT [KCW][XPITCH]. Rows carry 16 bytes of padding, so the 8 rows an ldmatrix reads
// fall into different banks.
template <int G, int KP, bool RESIDENT, int NW, int NSW>
struct ForwardSmem {
  static constexpr int BT = 64, GP = gsfi_pad16(G);
  static constexpr int KCW = KP < 32 ? KP : 32;  // columns of K per stage
  static constexpr int XPITCH = BT * 2 + 16, WPITCH = KCW * 2 + 16, OPITCH = GP * 2 + 16;
  static constexpr int W_BYTES = GP * WPITCH, IDX_BYTES = KCW * 4, S_BYTES = RESIDENT ? 0 : KCW * XPITCH;
  static constexpr int IDX_OFFSET = W_BYTES, S_OFFSET = W_BYTES + IDX_BYTES;  // in a stage
  static constexpr int STAGE = W_BYTES + IDX_BYTES + S_BYTES, O_BYTES = 16 * OPITCH;
  static constexpr int O_OFFSET = NSW * STAGE;  // the output tile, in a warp's share
  static constexpr int WARP_BYTES = NSW * STAGE + O_BYTES;
  // The resident input; warp w's share (its ring's stage 0) starts x_bytes(H) + w * WARP_BYTES in.
  static __host__ __device__ constexpr int x_bytes(int H) { return RESIDENT ? (H + 1) * XPITCH : 0; }
  static __host__ __device__ constexpr long long total_bytes(int H) {
    return (long long)x_bytes(H) + (long long)NW * WARP_BYTES;
  }
};

template <class T, int G, int KP, bool RESIDENT, int NW, int NSW, class Epilogue>
__device__ __forceinline__ void forward_tiles(const u16* __restrict__ XT, int ldxt, const u16* __restrict__ W,
                                              const int* __restrict__ idx, const u16* __restrict__ bias, int B,
                                              int H, int L, int K, int num_groups, Epilogue& epilogue) {
  using Smem = ForwardSmem<G, KP, RESIDENT, NW, NSW>;
  constexpr int BT = Smem::BT, GP = Smem::GP;
  constexpr int KCW = Smem::KCW, NKC = (KP + KCW - 1) / KCW;
  constexpr int MTP = GP <= 32 ? 4 : (GP == 64 ? 2 : 1), PASSES = 4 / MTP;
  constexpr int XPITCH = Smem::XPITCH, WPITCH = Smem::WPITCH;
  constexpr int IDX_OFFSET = Smem::IDX_OFFSET, S_OFFSET = Smem::S_OFFSET, STAGE = Smem::STAGE;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b0 = blockIdx.x * BT;
  if (blockIdx.y * NW >= num_groups) return;
  unsigned char* x_s = smem;
  unsigned char* ring = smem + Smem::x_bytes(H) + warp * Smem::WARP_BYTES;
  unsigned char* o_s = ring + Smem::O_OFFSET;

  if (RESIDENT) {
    for (int c = tid; c < H * (BT / 8); c += NW * 32) {
      const int h = c / (BT / 8), col = (c % (BT / 8)) * 8;
      const bool valid = b0 + col < ldxt;
      cp_async16(smem_addr(x_s + h * XPITCH + col * 2), valid ? XT + (long long)h * ldxt + b0 + col : XT, valid);
    }
    // Row H is all zeros: padded k slots (K not a multiple of 16) read it.
    for (int c = tid; c < BT / 2; c += NW * 32) reinterpret_cast<unsigned*>(x_s + H * XPITCH)[c] = 0u;
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
  }

  const int first = blockIdx.y * NW + warp, stride = gridDim.y * NW;
  const int my_groups = first < num_groups ? (num_groups - first + stride - 1) / stride : 0;
  const int nsteps = my_groups * PASSES * NKC;

  // The lane copies the same pieces of every weight chunk: rows lane / PPR + i * RPP, column (lane % PPR) * 8.
  // Only the chunk's base moves per step and the stage is passed in, so each piece costs a few
  // instructions (with per-piece offsets and the stage computed per step, ptxas rebuilt them from the
  // thread and block ids every step, a large share of the kernel's instructions).
  constexpr int PPR = KCW / 8, RPP = 32 / PPR, WPL = GP / RPP;
  const int lane_row = lane / PPR, lane_col = (lane % PPR) * 8;
  const int lane_w = lane_row * K + lane_col;
  const unsigned lane_dst = lane_row * WPITCH + lane_col * 2;

  auto issue = [&](int step, int stage) {
    unsigned char* st = ring + stage * STAGE;
    const unsigned sta = smem_addr(st) + lane_dst;
    const int g = first + (step / (NKC * PASSES)) * stride, k0 = (step % NKC) * KCW;
    const bool k_ok = k0 + lane_col < K;
    const u16* wg = k_ok ? W + (long long)g * G * K + k0 + lane_w : W;
#pragma unroll
    for (int i = 0; i < WPL; ++i) {
      const bool row_ok = GP == G || lane_row + i * RPP < G;
      cp_async16(sta + i * RPP * WPITCH, row_ok ? wg + i * RPP * K : W, k_ok && row_ok);
    }
    const int* ig = idx + (long long)g * K + k0;
    if (lane < KCW / 4) {
      const bool valid = k0 + lane * 4 < K;
      cp_async16(smem_addr(st + IDX_OFFSET + lane * 16), valid ? ig + lane * 4 : idx, valid);
    }
    if (!RESIDENT) {
#pragma unroll
      for (int c = lane; c < KCW * (BT / 8); c += 32) {
        const int r = c / (BT / 8), col = (c % (BT / 8)) * 8;
        const bool rvalid = k0 + r < K;
        const int f = rvalid ? ig[r] : 0;
        const bool valid = rvalid && b0 + col < ldxt;
        cp_async16(smem_addr(st + S_OFFSET + r * XPITCH + col * 2),
                   valid ? XT + (long long)f * ldxt + b0 + col : XT, valid);
      }
    }
  };

  for (int s = 0; s < NSW - 1; ++s) {
    if (s < nsteps) issue(s, s);
    cp_async_commit();
  }

  int s = 0;  // this warp's pipeline step: (group, pass, chunk of K) in order
  int stage = 0;  // s % NSW, kept without a division
  for (int gi = 0; gi < my_groups; ++gi) {
    const int g = first + gi * stride;
    // The bias of this lane's output columns (2 registers per 8 labels). Up to 32 labels it is loaded
    // before the group's products, so that the epilogue does not wait on global memory; larger groups
    // have no registers to spare for it (their accumulators spill) and load it in the epilogue.
    constexpr bool EARLY_BIAS = GP <= 32;
    float bias_v[GP / 8][2];
    if (EARLY_BIAS) load_bias_fragment<T>(bias_v, bias, g, G, L, lane);
    for (int pass = 0; pass < PASSES; ++pass) {
      float acc[MTP][GP / 8][4];
#pragma unroll
      for (int m = 0; m < MTP; ++m)
#pragma unroll
        for (int n = 0; n < GP / 8; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;

      for (int kc = 0; kc < NKC; ++kc, ++s) {
        cp_async_wait<NSW - 2>();
        __syncwarp();
        // Step s + NSW - 1 refills the stage that step s - 1 read.
        if (s + NSW - 1 < nsteps) issue(s + NSW - 1, stage == 0 ? NSW - 1 : stage - 1);
        cp_async_commit();

        const unsigned char* st = ring + stage * STAGE;
        stage = stage == NSW - 1 ? 0 : stage + 1;
        const int* is = reinterpret_cast<const int*>(st + IDX_OFFSET);
#pragma unroll
        for (int k16 = 0; k16 < KCW / 16; ++k16) {
          unsigned bw[GP / 16][4];
#pragma unroll
          for (int n2 = 0; n2 < GP / 16; ++n2) {
            const int row = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
            ldsm_x4(bw[n2], smem_addr(st + row * WPITCH + (k16 * 16 + ((lane >> 3) & 1) * 8) * 2));
          }
          const int kk = k16 * 16 + (lane & 7) + ((lane >> 4) << 3);
          const unsigned char* arow;
          if (RESIDENT) {
            const int f = kc * KCW + kk < K ? is[kk] : H;
            arow = x_s + f * XPITCH;
          } else {
            arow = st + S_OFFSET + kk * XPITCH;
          }
          const unsigned abase = smem_addr(arow) + (pass * MTP * 16 + ((lane >> 3) & 1) * 8) * 2;
#pragma unroll
          for (int m = 0; m < MTP; ++m) {
            unsigned a[4];
            ldsm_x4_trans(a, abase + m * 32);
#pragma unroll
            for (int n2 = 0; n2 < GP / 16; ++n2) {
              Ops<T>::mma(acc[m][2 * n2], a, bw[n2][0], bw[n2][1]);
              Ops<T>::mma(acc[m][2 * n2 + 1], a, bw[n2][2], bw[n2][3]);
            }
          }
        }
      }
      // One 16-row slice at a time through the warp's output tile: a quarter of the shared memory of a
      // whole pass, which buys warps.
      const int cols = min(G, L - g * G);
      if (!EARLY_BIAS) load_bias_fragment<T>(bias_v, bias, g, G, L, lane);
#pragma unroll
      for (int m = 0; m < MTP; ++m) epilogue(acc[m], bias_v, o_s, b0 + (pass * MTP + m) * 16, g, cols, lane);
    }
  }
  cp_async_wait<0>();
}
