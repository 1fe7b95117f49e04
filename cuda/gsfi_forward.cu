// Forward of the group-shared fixed fan-in layer:
//   Z[b, g*G + j] = bias[g*G + j] + sum_k X[b, idx[g, k]] * W[g*G + j, k]
// One CTA = 64 batch rows x a range of groups. 8 warps: warps 0-3 take the even group of each pair of
// groups, warps 4-7 the odd one; each warp computes 16 batch rows x G labels.
//
// RESIDENT: the CTA's 64 columns of XT (all H features) sit in shared memory for the whole range of
// groups, and the gather is done by ldmatrix row addresses (feature idx[g,k] -> one smem row), so the
// input is read from L2 once per CTA instead of once per group. Otherwise (H too large for shared
// memory) the K rows of XT a group needs are gathered from global memory with cp.async per step.
#include "gsfi_common.cuh"

template <class T, int G, int KP, bool RESIDENT, bool ALIGNED_Z, int NST>
__global__ void __launch_bounds__(256) gsfi_forward(const u16* __restrict__ XT, int ldxt,
                                                     const u16* __restrict__ W, const int* __restrict__ idx,
                                                     const u16* __restrict__ bias, u16* __restrict__ Z,
                                                     long long ldz, int B, int H, int L, int K, int num_groups,
                                                     int groups_per_cta) {
  constexpr int BT = 64, NGW = 2;
  constexpr int GP = gsfi_pad16(G), KC = gsfi_k_chunk(GP, KP), NKC = (KP + KC - 1) / KC;
  constexpr int XPITCH = BT * 2 + 16, WPITCH = KC * 2 + 16;
  constexpr int W_STAGE = NGW * GP * WPITCH, IDX_STAGE = NGW * KC * 4, S_STAGE = NGW * KC * XPITCH;
  constexpr int OPITCH = GP * 2 + 16, O_WARP = 16 * OPITCH;
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned char* w_s = smem;
  int* idx_s = reinterpret_cast<int*>(smem + NST * W_STAGE);
  unsigned char* o_s = smem + NST * (W_STAGE + IDX_STAGE) + (threadIdx.x >> 5) * O_WARP;
  unsigned char* x_s = smem + NST * (W_STAGE + IDX_STAGE) + 8 * O_WARP;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int half = warp >> 2, wrow = (warp & 3) * 16;
  const int b0 = blockIdx.x * BT;
  const int g_begin = blockIdx.y * groups_per_cta;
  const int g_end = min(num_groups, g_begin + groups_per_cta);
  if (g_begin >= g_end) return;
  const int npairs = (g_end - g_begin + NGW - 1) / NGW;
  const int nsteps = npairs * NKC;

  if (RESIDENT) {
    for (int c = tid; c < H * (BT / 8); c += blockDim.x) {
      const int h = c / (BT / 8), col = (c % (BT / 8)) * 8;
      const bool valid = b0 + col < ldxt;
      cp_async16(smem_addr(x_s + h * XPITCH + col * 2), valid ? XT + (long long)h * ldxt + b0 + col : XT, valid);
    }
    // Row H is all zeros: padded k slots (K not a multiple of 16) read it.
    for (int c = tid; c < BT / 2; c += blockDim.x) reinterpret_cast<unsigned*>(x_s + H * XPITCH)[c] = 0u;
  }

  auto issue = [&](int step) {
    const int stage = step % NST, kc = step % NKC, pair = step / NKC;
    for (int gw = 0; gw < NGW; ++gw) {
      const int g = g_begin + pair * NGW + gw;
      const bool gvalid = g < g_end;
      const int gg = gvalid ? g : g_begin;
      const int k0 = kc * KC;
      load_tile<true>(w_s + stage * W_STAGE + gw * GP * WPITCH, WPITCH, W + ((long long)gg * G) * K + k0, K, GP,
                      KC, gvalid ? G : 0, K - k0, tid, blockDim.x);
      int* is = idx_s + stage * (NGW * KC) + gw * KC;
      for (int c = tid; c < KC / 4; c += blockDim.x) {
        const bool valid = gvalid && k0 + c * 4 < K;
        cp_async16(smem_addr(is + c * 4), valid ? idx + (long long)gg * K + k0 + c * 4 : idx, valid);
      }
      if (!RESIDENT) {
        unsigned char* s = x_s + stage * S_STAGE + gw * KC * XPITCH;
        for (int c = tid; c < KC * (BT / 8); c += blockDim.x) {
          const int r = c / (BT / 8), col = (c % (BT / 8)) * 8;
          const bool rvalid = gvalid && k0 + r < K;
          const int f = rvalid ? idx[(long long)gg * K + k0 + r] : 0;
          const bool valid = rvalid && b0 + col < ldxt;
          cp_async16(smem_addr(s + r * XPITCH + col * 2), valid ? XT + (long long)f * ldxt + b0 + col : XT, valid);
        }
      }
    }
  };

  for (int s = 0; s < NST - 1; ++s) {
    if (s < nsteps) issue(s);
    cp_async_commit();
  }

  float acc[GP / 8][4];
  for (int s = 0; s < nsteps; ++s) {
    cp_async_wait<NST - 2>();
    __syncthreads();
    if (s + NST - 1 < nsteps) issue(s + NST - 1);
    cp_async_commit();

    const int stage = s % NST, kc = s % NKC;
    const int g = g_begin + (s / NKC) * NGW + half;
    if (kc == 0) {
#pragma unroll
      for (int n = 0; n < GP / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;
    }
    if (g < g_end) {
      const unsigned char* ws = w_s + stage * W_STAGE + half * GP * WPITCH;
      const int* is = idx_s + stage * (NGW * KC) + half * KC;
      const unsigned char* ss = x_s + stage * S_STAGE + half * KC * XPITCH;
#pragma unroll
      for (int k16 = 0; k16 < KC / 16; ++k16) {
        const int kk = k16 * 16 + (lane & 7) + ((lane >> 4) << 3);
        const int mo = wrow + ((lane >> 3) & 1) * 8;
        unsigned a[4];
        if (RESIDENT) {
          const int f = kc * KC + kk < K ? is[kk] : H;
          ldsm_x4_trans(a, smem_addr(x_s + f * XPITCH + mo * 2));
        } else {
          ldsm_x4_trans(a, smem_addr(ss + kk * XPITCH + mo * 2));
        }
#pragma unroll
        for (int n2 = 0; n2 < GP / 16; ++n2) {
          unsigned bw[4];
          const int row = n2 * 16 + (lane & 7) + ((lane >> 4) << 3);
          ldsm_x4(bw, smem_addr(ws + row * WPITCH + (k16 * 16 + ((lane >> 3) & 1) * 8) * 2));
          Ops<T>::mma(acc[2 * n2], a, bw[0], bw[1]);
          Ops<T>::mma(acc[2 * n2 + 1], a, bw[2], bw[3]);
        }
      }
      if (kc == NKC - 1) {
        // Bias, round once, then through this warp's shared tile so that every lane writes whole
        // 16-byte pieces of output rows (full 32-byte sectors) instead of scattered 4-byte pairs.
#pragma unroll
        for (int n = 0; n < GP / 8; ++n) {
          const int j = n * 8 + 2 * (lane & 3);
          const int p = g * G + j;
          const float bias0 = (bias != nullptr && j < G && p < L) ? Ops<T>::to_float(bias[p]) : 0.f;
          const float bias1 = (bias != nullptr && j + 1 < G && p + 1 < L) ? Ops<T>::to_float(bias[p + 1]) : 0.f;
#pragma unroll
          for (int h8 = 0; h8 < 2; ++h8) {
            const int r = (lane >> 2) + h8 * 8;
            *reinterpret_cast<unsigned*>(o_s + r * OPITCH + j * 2) =
                Ops<T>::pack(acc[n][2 * h8] + bias0, acc[n][2 * h8 + 1] + bias1);
          }
        }
        __syncwarp();
        const int cols = min(G, L - g * G);
        for (int c = lane; c < 16 * (GP / 8); c += 32) {
          const int r = c / (GP / 8), j = (c % (GP / 8)) * 8;
          const int b = b0 + wrow + r;
          if (b >= B || j >= cols) continue;
          const unsigned char* src = o_s + r * OPITCH + j * 2;
          u16* dst = Z + (long long)b * ldz + (long long)g * G + j;
          if (ALIGNED_Z) {
            // L and G are multiples of 8 here, so a piece is either all inside or all padding.
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
          } else {
            const u16* s16 = reinterpret_cast<const u16*>(src);
            for (int e = 0; e < 8 && j + e < cols; ++e) dst[e] = s16[e];
          }
        }
        __syncwarp();
      }
    }
  }
  cp_async_wait<0>();
}
