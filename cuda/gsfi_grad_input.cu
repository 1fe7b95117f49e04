// Gradient of the input of the group-shared fixed fan-in layer:
//   dX[b, idx[g, k]] += sum_j dZ[b, g*G + j] * W[g*G + j, k]
// A per-group GEMM [32 x G] x [G x K] on tensor cores, then a scatter-add of the [32 x K] result.
// One CTA = 32 batch rows x a range of groups, 4 warps splitting the K columns of one group per step.
// The scatter-add goes into a float32 copy of the CTA's dX rows in shared memory (SMEM_ACC; row pitch
// H + 1 words so that the 8 batch rows of a fragment fall into different banks), which is added to the
// float32 dX in global memory once at the end; without SMEM_ACC (H too large) it adds to global memory
// with atomics. The shared-memory adds need no atomics: the K features of a group are distinct, so
// within a step every (row, feature) target is written by exactly one thread, and the barrier at the
// top of each step orders one group's adds before the next group's.
#include "gsfi_common.cuh"

template <class T, int G, int KP, bool SMEM_ACC, bool ALIGNED_DZ>
__global__ void __launch_bounds__(128) gsfi_grad_input(const u16* __restrict__ dZ, long long ldz,
                                                        const u16* __restrict__ W, const int* __restrict__ idx,
                                                        float* __restrict__ dX, int B, int H, int L, int K,
                                                        int num_groups, int groups_per_cta) {
  constexpr int BT = 32, NST = 3, NWARP = 4;
  constexpr int GP = gsfi_pad16(G), KC = gsfi_k_chunk(GP, KP), NKC = (KP + KC - 1) / KC;
  constexpr int NT = KC / 8, NT_PER_WARP = (NT + NWARP - 1) / NWARP;
  constexpr int ZPITCH = GP * 2 + 16, WPITCH = KC * 2 + 16;
  constexpr int Z_STAGE = BT * ZPITCH, W_STAGE = GP * WPITCH, IDX_STAGE = KC * 4;
  constexpr int STAGE = Z_STAGE + W_STAGE + IDX_STAGE;
  extern __shared__ __align__(16) unsigned char smem[];
  float* acc_s = reinterpret_cast<float*>(smem + NST * STAGE);
  const int apitch = H + 1;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b0 = blockIdx.x * BT;
  const int g_begin = blockIdx.y * groups_per_cta;
  const int g_end = min(num_groups, g_begin + groups_per_cta);
  if (g_begin >= g_end) return;
  const int nsteps = (g_end - g_begin) * NKC;

  if (SMEM_ACC) {
    for (int i = tid; i < BT * apitch; i += blockDim.x) acc_s[i] = 0.f;
  }

  auto issue = [&](int step) {
    unsigned char* st = smem + (step % NST) * STAGE;
    const int g = g_begin + step / NKC, k0 = (step % NKC) * KC;
    // dZ columns of the group: labels past L (padding of the last group) and rows past B read as 0.
    load_tile<ALIGNED_DZ>(st, ZPITCH, dZ + (long long)b0 * ldz + (long long)g * G, ldz, BT, GP, B - b0,
                          min(G, L - g * G), tid, blockDim.x);
    load_tile<true>(st + Z_STAGE, WPITCH, W + ((long long)g * G) * K + k0, K, GP, KC, G, K - k0, tid,
                    blockDim.x);
    int* is = reinterpret_cast<int*>(st + Z_STAGE + W_STAGE);
    for (int c = tid; c < KC / 4; c += blockDim.x) {
      const bool valid = k0 + c * 4 < K;
      cp_async16(smem_addr(is + c * 4), valid ? idx + (long long)g * K + k0 + c * 4 : idx, valid);
    }
  };

  for (int s = 0; s < NST - 1; ++s) {
    if (s < nsteps) issue(s);
    cp_async_commit();
  }

  for (int s = 0; s < nsteps; ++s) {
    cp_async_wait<NST - 2>();
    __syncthreads();
    if (s + NST - 1 < nsteps) issue(s + NST - 1);
    cp_async_commit();

    const unsigned char* st = smem + (s % NST) * STAGE;
    const unsigned char* zs = st;
    const unsigned char* ws = st + Z_STAGE;
    const int* is = reinterpret_cast<const int*>(st + Z_STAGE + W_STAGE);
    const int k0 = (s % NKC) * KC;

    // A fragments (dZ rows x labels) for both 16-row halves and every 16-label step.
    unsigned a[2][GP / 16][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
      for (int j16 = 0; j16 < GP / 16; ++j16) {
        const int row = m * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        const int col = j16 * 16 + (lane >> 4) * 8;
        ldsm_x4(a[m][j16], smem_addr(zs + row * ZPITCH + col * 2));
      }

#pragma unroll
    for (int t = 0; t < NT_PER_WARP; ++t) {
      const int nt = warp + t * NWARP;
      if (nt >= NT) break;
      float acc[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int j16 = 0; j16 < GP / 16; ++j16) {
        // B[k = label j][n = column k] = W[j][k]: rows j of the weight tile, transposed by ldmatrix.
        unsigned bw[4];
        const int row = j16 * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
        ldsm_x4_trans(bw, smem_addr(ws + row * WPITCH + nt * 16));
        Ops<T>::mma(acc[0], a[0][j16], bw[0], bw[1]);
        Ops<T>::mma(acc[1], a[1][j16], bw[0], bw[1]);
      }
      const int kk = nt * 8 + 2 * (lane & 3);
      const bool v0 = k0 + kk < K, v1 = k0 + kk + 1 < K;
      const int f0 = v0 ? is[kk] : 0, f1 = v1 ? is[kk + 1] : 0;
#pragma unroll
      for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int h8 = 0; h8 < 2; ++h8) {
          const int r = m * 16 + (lane >> 2) + h8 * 8;
          if (SMEM_ACC) {
            if (v0) acc_s[r * apitch + f0] += acc[m][2 * h8];
            if (v1) acc_s[r * apitch + f1] += acc[m][2 * h8 + 1];
          } else if (b0 + r < B) {
            if (v0) atomicAdd(dX + (long long)(b0 + r) * H + f0, acc[m][2 * h8]);
            if (v1) atomicAdd(dX + (long long)(b0 + r) * H + f1, acc[m][2 * h8 + 1]);
          }
        }
    }
  }
  cp_async_wait<0>();

  if (SMEM_ACC) {
    __syncthreads();
    const int rows = min(BT, B - b0);
    const bool only_cta = gridDim.y == 1;
    for (int i = tid; i < rows * H; i += blockDim.x) {
      const int r = i / H, h = i % H;
      const float v = acc_s[r * apitch + h];
      float* dst = dX + (long long)(b0 + r) * H + h;
      if (only_cta) {
        *dst = v;
      } else if (v != 0.f) {
        atomicAdd(dst, v);
      }
    }
  }
}
