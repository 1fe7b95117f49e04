// Gradient of the weight of the group-shared fixed fan-in layer:
//   dW[g*G + j, k] = sum_b dZ[b, g*G + j] * X[b, idx[g, k]]
// Work is cut into tiles: one [GT x KT] block of one group's weight gradient (GT <= 64 labels,
// KT <= 128 columns), reduced over the whole batch in steps of 64 rows. A CTA takes a contiguous range
// of tiles and runs ONE cp.async pipeline (NST stages) through all their steps, so the gathers of the
// next tile are in flight while the current one finishes (small batches have one step per tile).
// Per step: a [GT x 64] tile of dZ and the 64-row slices of the tile's KT gathered rows of XT go to
// shared memory, then mma.sync; 4 warps split the KT columns. The result is written once, rounded
// once, in the weight dtype; the padding labels of the last group read dZ as zero and so get an
// exactly-zero gradient.
#include "gsfi_common.cuh"

template <class T, int G, int KP, int NST>
__global__ void __launch_bounds__(128) gsfi_grad_weight(const u16* __restrict__ dZ, long long ldz,
                                                         const u16* __restrict__ XT, int ldxt,
                                                         const int* __restrict__ idx, u16* __restrict__ dW,
                                                         int B, int L, int K, int num_groups, int tiles_per_cta) {
  constexpr int BT = 64, NWARP = 4, NTHREADS = 128;
  constexpr int GT = G < 64 ? gsfi_pad16(G) : 64, KT = KP < 128 ? KP : 128;
  constexpr int NJT = (G + GT - 1) / GT, NKT = (KP + KT - 1) / KT;
  constexpr int MT = GT / 16, NT = KT / 8, NT_PER_WARP = (NT + NWARP - 1) / NWARP;
  constexpr int ZPITCH = GT * 2 + 16, XPITCH = BT * 2 + 16;
  constexpr int Z_STAGE = BT * ZPITCH, S_STAGE = KT * XPITCH, STAGE = Z_STAGE + S_STAGE;
  constexpr int Z_CHUNKS = BT * (GT / 8), ZPT = (Z_CHUNKS + NTHREADS - 1) / NTHREADS;
  constexpr int S_CHUNKS = KT * (BT / 8), SPT = S_CHUNKS / NTHREADS;  // KT * 8 is a multiple of 128
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int num_tiles = num_groups * NJT * NKT;
  const int t_begin = blockIdx.x * tiles_per_cta;
  const int t_end = min(num_tiles, t_begin + tiles_per_cta);
  if (t_begin >= t_end) return;
  const int bsteps = (B + BT - 1) / BT;
  const int nsteps = (t_end - t_begin) * bsteps;

  // Each thread copies the same pieces of every step: row/column offsets computed once.
  int z_row[ZPT], z_col[ZPT];
#pragma unroll
  for (int i = 0; i < ZPT; ++i) {
    const int c = tid + i * NTHREADS;
    z_row[i] = c < Z_CHUNKS ? c / (GT / 8) : BT;  // BT: never valid
    z_col[i] = (c % (GT / 8)) * 8;
  }
  int s_row[SPT], s_col[SPT];
  const u16* s_src[SPT];  // gathered row of XT for the tile being issued (nullptr: padded column)
#pragma unroll
  for (int i = 0; i < SPT; ++i) {
    const int c = tid + i * NTHREADS;
    s_row[i] = c / (BT / 8);
    s_col[i] = (c % (BT / 8)) * 8;
    s_src[i] = nullptr;
  }
  int issued_tile = -1;

  auto issue = [&](int step) {
    const unsigned st = smem_addr(smem + (step % NST) * STAGE);
    const int tile = t_begin + step / bsteps, bs = (step % bsteps) * BT;
    const int g = tile / (NJT * NKT), jt = (tile / NKT) % NJT, kt = tile % NKT;
    const int label0 = g * G + jt * GT, k0 = kt * KT;
    const int jrows = min(GT, G - jt * GT), labels_left = L - label0;
    if (tile != issued_tile) {  // steps are issued in order: refresh the gathered rows once per tile
      issued_tile = tile;
#pragma unroll
      for (int i = 0; i < SPT; ++i) {
        const int k = k0 + s_row[i];
        s_src[i] = k < K ? XT + (long long)idx[(long long)g * K + k] * ldxt + s_col[i] : nullptr;
      }
    }
#pragma unroll
    for (int i = 0; i < ZPT; ++i) {
      if (Z_CHUNKS % NTHREADS != 0 && z_row[i] >= BT) continue;  // no piece for this thread
      const bool valid = bs + z_row[i] < B && z_col[i] < jrows && z_col[i] < labels_left;
      cp_async16(st + z_row[i] * ZPITCH + z_col[i] * 2,
                 valid ? dZ + (long long)(bs + z_row[i]) * ldz + label0 + z_col[i] : dZ, valid);
    }
#pragma unroll
    for (int i = 0; i < SPT; ++i) {
      const bool valid = s_src[i] != nullptr && bs + s_col[i] < ldxt;
      cp_async16(st + Z_STAGE + s_row[i] * XPITCH + s_col[i] * 2, valid ? s_src[i] + bs : XT, valid);
    }
  };

  for (int s = 0; s < NST - 1; ++s) {
    if (s < nsteps) issue(s);
    cp_async_commit();
  }

  float acc[MT][NT_PER_WARP][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int t = 0; t < NT_PER_WARP; ++t) acc[m][t][0] = acc[m][t][1] = acc[m][t][2] = acc[m][t][3] = 0.f;

  for (int s = 0; s < nsteps; ++s) {
    cp_async_wait<NST - 2>();
    __syncthreads();
    if (s + NST - 1 < nsteps) issue(s + NST - 1);
    cp_async_commit();

    const unsigned char* zs = smem + (s % NST) * STAGE;
    const unsigned char* xs = zs + Z_STAGE;
#pragma unroll
    for (int b16 = 0; b16 < BT / 16; ++b16) {
      // A[m = label j][k = batch b] = dZ[b][j]: rows b of the dZ tile, transposed by ldmatrix.
      unsigned a[MT][4];
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        const int row = b16 * 16 + (lane & 7) + (lane >> 4) * 8;
        const int col = m * 16 + ((lane >> 3) & 1) * 8;
        ldsm_x4_trans(a[m], smem_addr(zs + row * ZPITCH + col * 2));
      }
#pragma unroll
      for (int t = 0; t < NT_PER_WARP; ++t) {
        const int nt = warp + t * NWARP;
        if (nt < NT) {
          // B[k = batch b][n = column k] = XT[idx[k]][b]: gathered rows, batch contiguous.
          unsigned bx[4];
          const int row = nt * 8 + (lane & 7);
          const int col = b16 * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4(bx, smem_addr(xs + row * XPITCH + col * 2));
#pragma unroll
          for (int m = 0; m < MT; ++m) Ops<T>::mma(acc[m][t], a[m], bx[0], bx[1]);
        }
      }
    }

    if (s % bsteps == bsteps - 1) {
      const int tile = t_begin + s / bsteps;
      const int g = tile / (NJT * NKT), jt = (tile / NKT) % NJT, kt = tile % NKT;
      const int label0 = g * G + jt * GT, k0 = kt * KT;
      const int jrows = min(GT, G - jt * GT), kcols = min(KT, K - k0);
#pragma unroll
      for (int t = 0; t < NT_PER_WARP; ++t) {
        const int nt = warp + t * NWARP;
        const int col = nt * 8 + 2 * (lane & 3);
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int h8 = 0; h8 < 2; ++h8) {
            const int j = m * 16 + (lane >> 2) + h8 * 8;
            // kcols is a multiple of 8, so col + 1 < kcols too
            if (nt < NT && col < kcols && j < jrows) {
              u16* dst = dW + ((long long)label0 + j) * K + k0 + col;
              *reinterpret_cast<unsigned*>(dst) = Ops<T>::pack(acc[m][t][2 * h8], acc[m][t][2 * h8 + 1]);
            }
            acc[m][t][2 * h8] = acc[m][t][2 * h8 + 1] = 0.f;
          }
      }
    }
  }
  cp_async_wait<0>();
}
