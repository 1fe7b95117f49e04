// Gradient of the input of the group-shared fixed fan-in layer:
//   dX[b, idx[g, k]] += sum_j dZ[b, g*G + j] * W[g*G + j, k]
//
// One CTA = BT (32, 64 or 128) batch rows x a range of groups, 8 warps; one step = one group (and one chunk
// of its K columns). Per step the CTA computes the transposed product dXg^T [K x BT] = W_g^T [K x G] *
// dZ_g^T [G x BT] on tensor cores, so that each accumulator pair holds two consecutive batch rows of ONE
// feature, and adds it into a float32 transposed copy of the CTA's dX rows in shared memory
// (SMEM_ACC, [H][BT], the 8-row blocks of row h swizzled by h mod 4, so that the 4 rows a half-warp
// touches, whose feature ids the bank-interleaved slot order makes distinct mod 4, fall into different
// banks without padding): one 8-byte read-add-write per pair, the feature's row address computed once
// per tile. No atomics are needed there: the K features of a group are distinct, so within a step
// every (feature, row) target belongs to exactly one thread, and the barrier that starts each step
// orders one group's adds before the next group's. The shared copy is added to the float32 dX in
// global memory once at the end. Padded feature slots (K not a multiple of 16) add into private
// trash rows past H instead of branching (the launcher allocates them only then). Without SMEM_ACC (H too large for shared memory) the adds go
// to global memory as atomics.
// Without ALIGNED_DZ (dZ rows not on 16-byte boundaries: an odd number of labels) a step's dZ tile is
// loaded into registers two or four steps ahead and realigned on its way into the stage (DzStager).
#include "gsfi_common.cuh"

template <class T, int G, int KP, bool SMEM_ACC, int NST, int BT, bool ALIGNED_DZ>
__global__ void __launch_bounds__(256) gsfi_grad_input(const u16* __restrict__ dZ, long long ldz,
                                                        const u16* __restrict__ W, const int* __restrict__ idx,
                                                        float* __restrict__ dX, int B, int H, int L, int K,
                                                        int num_groups, int groups_per_cta) {
  constexpr int NTHREADS = 256, NN = BT / 8;                     // BT = 32, 64 or 128 batch rows
  constexpr int GP = gsfi_pad16(G), KC = gsfi_k_chunk(GP, KP), NKC = (KP + KC - 1) / KC;
  constexpr int MT = KC / 16;                                    // 16-feature tiles per step
  // (16-feature, 8-row) tiles per warp: the MT * NN tiles over 8 warps, a power of two <= NN so that
  // each warp's tiles share one feature tile.
  constexpr int TPW_MIN = (MT * NN + 7) / 8;
  constexpr int TPW = TPW_MIN <= 1 ? 1 : (TPW_MIN <= 2 ? 2 : (TPW_MIN <= 4 ? 4 : (TPW_MIN <= 8 ? 8 : 16)));
  constexpr int ZPITCH = GP * 2 + 16, WPITCH = KC * 2 + 16;
  constexpr int Z_STAGE = BT * ZPITCH, W_STAGE = GP * WPITCH, IDX_STAGE = KC * 4;
  constexpr int STAGE = Z_STAGE + W_STAGE + IDX_STAGE;
  extern __shared__ __align__(16) unsigned char smem[];
  float* acc_s = reinterpret_cast<float*>(smem + NST * STAGE);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b0 = blockIdx.x * BT;
  const int g_begin = blockIdx.y * groups_per_cta;
  const int g_end = min(num_groups, g_begin + groups_per_cta);
  if (g_begin >= g_end) return;
  const int nsteps = (g_end - g_begin) * NKC;
  const int m_tile = (warp * TPW) / NN, n_first = (warp * TPW) % NN;
  const bool active = m_tile < MT;

  if (SMEM_ACC) {
    const int acc_rows = H + (K % 16 ? 8 * 16 : 0);  // trash rows only when there are padded slots
    for (int i = tid; i < acc_rows * BT; i += NTHREADS) acc_s[i] = 0.f;
  }

  // Each thread copies the same pieces of every step's tiles: their offsets are computed once, and a
  // step only moves them to its group and chunk of K.
  constexpr int Z_CHUNKS = BT * (GP / 8), ZPT = (Z_CHUNKS + NTHREADS - 1) / NTHREADS;
  constexpr int W_CHUNKS = GP * (KC / 8), WPT = (W_CHUNKS + NTHREADS - 1) / NTHREADS;
  long long z_off[ZPT];
  int z_dst[ZPT], z_col[ZPT];
  bool z_ok[ZPT];
#pragma unroll
  for (int i = 0; i < ZPT; ++i) {
    const int c = tid + i * NTHREADS, r = c / (GP / 8), col = (c % (GP / 8)) * 8;
    z_off[i] = (long long)(b0 + r) * ldz + col;
    z_dst[i] = r * ZPITCH + col * 2;
    z_col[i] = col;
    z_ok[i] = c < Z_CHUNKS && b0 + r < B && col < G;
  }
  int w_off[WPT], w_dst[WPT], w_col[WPT];
  bool w_ok[WPT];
#pragma unroll
  for (int i = 0; i < WPT; ++i) {
    const int c = tid + i * NTHREADS, r = c / (KC / 8), col = (c % (KC / 8)) * 8;
    w_off[i] = r * K + col;
    w_dst[i] = Z_STAGE + r * WPITCH + col * 2;
    w_col[i] = col;
    w_ok[i] = c < W_CHUNKS && r < G;
  }

  auto issue = [&](int step) {
    const unsigned st = smem_addr(smem + (step % NST) * STAGE);
    const int g = g_begin + step / NKC, k0 = (step % NKC) * KC;
    // dZ columns of the group: labels past L (padding of the last group) and rows past B read as 0.
    const u16* zg = dZ + (long long)g * G;
    const int labels_left = L - g * G;
    if constexpr (ALIGNED_DZ) {
#pragma unroll
      for (int i = 0; i < ZPT; ++i) {
        if (Z_CHUNKS % NTHREADS != 0 && tid + i * NTHREADS >= Z_CHUNKS) continue;
        const bool valid = z_ok[i] && z_col[i] < labels_left;
        cp_async16(st + z_dst[i], valid ? zg + z_off[i] : dZ, valid);
      }
    }
    const u16* wg = W + (long long)g * G * K + k0;
#pragma unroll
    for (int i = 0; i < WPT; ++i) {
      if (W_CHUNKS % NTHREADS != 0 && tid + i * NTHREADS >= W_CHUNKS) continue;
      const bool valid = w_ok[i] && k0 + w_col[i] < K;
      cp_async16(st + w_dst[i], valid ? wg + w_off[i] : W, valid);
    }
    if (tid < KC / 4) {
      const bool valid = k0 + tid * 4 < K;
      cp_async16(st + Z_STAGE + W_STAGE + tid * 16, valid ? idx + (long long)g * K + k0 + tid * 4 : idx, valid);
    }
  };

  // Unaligned dZ: a step's tile is loaded into registers DEPTH steps before it is stored into its stage
  // (at step s the tile of step s + NST - 1 is stored and that of step s + NST - 1 + DEPTH loaded into
  // the same slot, slot = step mod DEPTH), so that the global loads get DEPTH steps to land: 4 when a
  // thread holds at most one 8-label piece of a tile (short steps), else 2.
  constexpr int PIECES_PER_THREAD = (BT * (GP / 8) + NTHREADS - 1) / NTHREADS;
  constexpr int DEPTH = ALIGNED_DZ ? 1 : (PIECES_PER_THREAD == 1 ? 4 : 2);
  DzStager<BT, GP, NTHREADS, DEPTH> dz_regs;
  if (!ALIGNED_DZ) dz_regs.init(dZ, ldz, b0, B, L, ZPITCH, tid);
  auto load_dz = [&](int step, int slot) {
    const int g = g_begin + step / NKC;
    dz_regs.load(slot, (long long)g * G, L - g * G, tid);
  };
  auto store_dz = [&](int step, int slot) { dz_regs.store(slot, smem + (step % NST) * STAGE, tid); };

  for (int s = 0; s < NST - 1; ++s) {
    if (s < nsteps) {
      issue(s);
      if constexpr (!ALIGNED_DZ) {
        load_dz(s, 0);
        store_dz(s, 0);
      }
    }
    cp_async_commit();
  }
  if constexpr (!ALIGNED_DZ) {
#pragma unroll
    for (int d = 0; d < DEPTH; ++d)
      if (NST - 1 + d < nsteps) load_dz(NST - 1 + d, (NST - 1 + d) % DEPTH);
  }

  // DEPTH steps per iteration, unrolled, so that the register slots are compile-time indices.
  for (int s_block = 0; s_block < nsteps; s_block += DEPTH)
#pragma unroll
  for (int d = 0; d < DEPTH; ++d) {
    const int s = s_block + d;
    if (s >= nsteps) break;
    cp_async_wait<NST - 2>();
    __syncthreads();
    const int slot = (d + NST - 1) % DEPTH;  // of steps s + NST - 1 and s + NST - 1 + DEPTH
    if (s + NST - 1 < nsteps) {
      issue(s + NST - 1);
      if constexpr (!ALIGNED_DZ) store_dz(s + NST - 1, slot);
    }
    cp_async_commit();
    if (!ALIGNED_DZ && s + NST - 1 + DEPTH < nsteps) load_dz(s + NST - 1 + DEPTH, slot);
    if (!active) continue;

    const unsigned char* zs = smem + (s % NST) * STAGE;
    const unsigned char* ws = zs + Z_STAGE;
    const int* is = reinterpret_cast<const int*>(ws + W_STAGE);
    const int k0 = (s % NKC) * KC;

    // A = W_g^T for this warp's 16 features: rows j of the weight tile, transposed by ldmatrix.
    unsigned a[GP / 16 < 2 ? 2 : GP / 16][4];
#pragma unroll
    for (int j16 = 0; j16 < GP / 16; ++j16) {
      const int row = j16 * 16 + (lane & 7) + (lane >> 4) * 8;
      const int col = m_tile * 16 + ((lane >> 3) & 1) * 8;
      ldsm_x4_trans(a[j16], smem_addr(ws + row * WPITCH + col * 2));
    }
    const int kr = m_tile * 16 + (lane >> 2);
    const bool v0 = k0 + kr < K, v1 = k0 + kr + 8 < K;
    // Feature rows of the two accumulator rows; a padded slot goes to this lane's own trash row.
    const int trash = H + warp * 16 + (lane >> 2);
    const int f0 = v0 ? is[kr] : trash, f1 = v1 ? is[kr + 8] : trash + 8;
    float* row0 = acc_s + f0 * BT + 2 * (lane & 3);
    float* row1 = acc_s + f1 * BT + 2 * (lane & 3);
    const int swz0 = f0 & 3, swz1 = f1 & 3;  // 8-row block n of row f sits at block n ^ (f & 3)

    // All of the warp's products first, then all reads, adds and writes: independent work in flight
    // instead of one product -> read -> add -> write chain per tile.
    float acc[TPW][4];
#pragma unroll
    for (int t = 0; t < TPW; ++t) {
      const int n = n_first + t;
      acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
#pragma unroll
      for (int j32 = 0; j32 < (GP + 31) / 32; ++j32) {
        // B = dZ_g^T: rows b of the dZ tile, labels j contiguous; one ldmatrix covers 32 labels.
        unsigned bz[4];
        const int row = n * 8 + (lane & 7);
        const int col = j32 * 32 + (lane >> 3) * 8;
        ldsm_x4(bz, smem_addr(zs + row * ZPITCH + (col < GP ? col : col - 16) * 2));
        Ops<T>::mma(acc[t], a[2 * j32], bz[0], bz[1]);
        if (2 * j32 + 1 < GP / 16) Ops<T>::mma(acc[t], a[2 * j32 + 1], bz[2], bz[3]);
      }
    }
    if (SMEM_ACC) {
      float2 u[TPW], v[TPW];
#pragma unroll
      for (int t = 0; t < TPW; ++t) {
        u[t] = *reinterpret_cast<const float2*>(row0 + ((n_first + t) ^ swz0) * 8);
        v[t] = *reinterpret_cast<const float2*>(row1 + ((n_first + t) ^ swz1) * 8);
      }
#pragma unroll
      for (int t = 0; t < TPW; ++t) {
        u[t].x += acc[t][0];
        u[t].y += acc[t][1];
        v[t].x += acc[t][2];
        v[t].y += acc[t][3];
        *reinterpret_cast<float2*>(row0 + ((n_first + t) ^ swz0) * 8) = u[t];
        *reinterpret_cast<float2*>(row1 + ((n_first + t) ^ swz1) * 8) = v[t];
      }
    } else {
#pragma unroll
      for (int t = 0; t < TPW; ++t) {
        const int b = (n_first + t) * 8 + 2 * (lane & 3);
        float* base = dX + (long long)(b0 + b) * H;
        const bool r0 = b0 + b < B, r1 = b0 + b + 1 < B;
        if (v0 && r0) atomicAdd(base + f0, acc[t][0]);
        if (v0 && r1) atomicAdd(base + H + f0, acc[t][1]);
        if (v1 && r0) atomicAdd(base + f1, acc[t][2]);
        if (v1 && r1) atomicAdd(base + H + f1, acc[t][3]);
      }
    }
  }
  cp_async_wait<0>();

  if (SMEM_ACC) {
    __syncthreads();
    const int rows = min(BT, B - b0);
    const bool only_cta = gridDim.y == 1;
    for (int i = tid; i < rows * H; i += NTHREADS) {
      const int r = i / H, h = i - r * H;
      const float v = acc_s[h * BT + (r ^ ((h & 3) << 3))];
      float* dst = dX + (long long)(b0 + r) * H + h;
      if (only_cta) {
        *dst = v;
      } else if (v != 0.f) {
        atomicAdd(dst, v);
      }
    }
  }
}
