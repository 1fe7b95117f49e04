// Gradient of the weight of the group-shared fixed fan-in layer:
//   dW[g*G + j, k] = sum_b dZ[b, g*G + j] * X[b, idx[g, k]]
// One CTA = one [GT x KT] tile of one group's weight gradient (GT <= 64 labels, KT <= 128 columns),
// reduced over the whole batch in steps of 64 rows: a [GT x 64] tile of dZ and the 64-row slices of the
// KT gathered rows of XT go through a 3-stage cp.async pipeline into shared memory, then mma.sync.
// 4 warps split the KT columns. The result is written once, rounded once, in the weight dtype; the
// padding labels of the last group read dZ as zero and so get an exactly-zero gradient.
//
// Both kernels also give the bias gradient dB[l] = sum_b dZ[b, l] when dB is not null: one more
// tensor-core product of the dZ^T fragments they already hold with a column of ones, so that the bias
// costs no separate pass over dZ (which is as large as the output).
#include "gsfi_common.cuh"

// Copy a [rows x cols] tile of 16-bit values (cols a multiple of 8) from global memory into shared
// memory with row pitch `spitch` bytes, 16 bytes per cp.async. The global rows must start on 16-byte
// boundaries (ld a multiple of 8, aligned base; the launcher pads rows that are not). Element (r, c)
// is valid when r < row_limit and c < col_limit, checked per 8-element piece; invalid pieces become 0.
__device__ __forceinline__ void load_tile(unsigned char* smem, int spitch, const u16* g, long long ld, int rows,
                                          int cols, int row_limit, int col_limit, int tid, int nthreads) {
  const int chunks_per_row = cols / 8;
  for (int c = tid; c < rows * chunks_per_row; c += nthreads) {
    const int r = c / chunks_per_row, col = (c % chunks_per_row) * 8;
    const bool valid = r < row_limit && col < col_limit;
    cp_async16(smem_addr(smem + r * spitch + col * 2), valid ? (const void*)(g + (long long)r * ld + col) : (const void*)g,
               valid);
  }
}

// A fragments of dZ^T for the grad-weight product, one 16-row batch slice: A[m = label j][k = batch b] =
// dZ[b][j], read from a [batch][labels] shared tile (row pitch `pitch` bytes) transposed by ldmatrix;
// MT tiles of 16 labels.
template <int MT>
__device__ __forceinline__ void load_dz_transposed(unsigned (&a)[MT][4], unsigned tile, int pitch, int b16, int lane) {
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    const int row = b16 * 16 + (lane & 7) + (lane >> 4) * 8;
    const int col = m * 16 + ((lane >> 3) & 1) * 8;
    ldsm_x4_trans(a[m], tile + row * pitch + col * 2);
  }
}

// dZ rows that need not start on 16-byte boundaries (ldz not a multiple of 8, e.g. an odd label count), as
// the tile grad-weight reads them (the warp grad-weight reads them through RawDzTile below):
// instead of a padded copy of dZ, a tile row whose first label is element e of dZ is copied raw, in
// 16-byte pieces from the boundary at or before e (one piece more than the tile is wide), and
// realign_dz then shifts it by e mod 8 elements in place into the aligned rows that ldmatrix reads. Elements
// from `end` (one past the last element of dZ) on are not read; rows past the batch read nothing.
__device__ __forceinline__ void cp_async_dz_raw_piece(unsigned dst, const u16* dZ, long long e_row, int piece,
                                                      long long end, bool row_ok) {
  const long long start = (e_row & ~7LL) + piece * 8;
  const long long left = row_ok ? end - start : 0;
  const int bytes = left >= 8 ? 16 : (left > 0 ? (int)left * 2 : 0);
  cp_async16_bytes(dst, bytes ? (const void*)(dZ + start) : (const void*)dZ, bytes);
}

// Raw rows -> the same rows aligned, in place: row r of the tile (pitch `pitch`) holds the raw 16-byte
// pieces from the boundary at or before its first label, element e_row0 + r * ldz; afterwards its first
// GP labels start at its start, and labels from labels_left on are 0 (they are the next row's values).
// An output piece of 8 labels starts at raw element shift + q: it is read as the 5 words around it and
// funnel-shifted by 16 bits when shift is odd (no branch: rows in one warp have different shifts).
// Those words overlap the next piece's output, so each of the NTHREADS threads that share the tile
// reads all of its pieces, `sync()` waits for the others, then it writes: no second tile is needed.
template <int GP, int ROWS, int NTHREADS, class Sync>
__device__ __forceinline__ void realign_dz(unsigned char* tile, int pitch, long long e_row0, long long ldz,
                                           int labels_left, int t, Sync sync) {
  constexpr int PIECES = ROWS * (GP / 8), PER_THREAD = (PIECES + NTHREADS - 1) / NTHREADS;
  uint4 out[PER_THREAD];
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int c = t + i * NTHREADS, r = c / (GP / 8), q = (c % (GP / 8)) * 8;
    if (PIECES % NTHREADS != 0 && c >= PIECES) continue;
    const int shift = (int)((e_row0 + r * ldz) & 7);
    const unsigned* src = reinterpret_cast<const unsigned*>(tile + r * pitch) + ((shift + q) >> 1);
    const unsigned bits = (shift & 1) * 16;
    unsigned w[5], v[4];
#pragma unroll
    for (int k = 0; k < 5; ++k) w[k] = src[k];
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = __funnelshift_r(w[k], w[k + 1], bits);
    if (q + 8 > labels_left) {  // the group's last labels: zero what lies past them
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (q + 2 * k >= labels_left) v[k] = 0u;
        else if (q + 2 * k + 1 >= labels_left) v[k] &= 0xffffu;
      }
    }
    out[i] = make_uint4(v[0], v[1], v[2], v[3]);
  }
  sync();
#pragma unroll
  for (int i = 0; i < PER_THREAD; ++i) {
    const int c = t + i * NTHREADS, r = c / (GP / 8), q = (c % (GP / 8)) * 8;
    if (PIECES % NTHREADS != 0 && c >= PIECES) continue;
    *reinterpret_cast<uint4*>(tile + r * pitch + q * 2) = out[i];
  }
}

// Unaligned dZ rows (an odd number of labels, say) for the grad-weight products, without a padded copy of
// dZ: a tile of ROWS rows x GP labels (GP = 16 * MT) whose first element e0 is a multiple of 8 (tiles
// start at multiples of 8 rows and of 8 labels) is copied raw, row r as the GP / 8 + 1 16-byte pieces from
// the boundary at or before its first label, element e0 + r * ldz. That label then sits (r * ldz) mod 8
// elements into the row at every step, so a thread's copy offsets and fragment addresses are computed
// once, and load_a reads the tensor-core fragments straight from the raw rows, two 16-bit loads per
// register (rows 2t and 2t + 1 of a fragment start 4 or more banks apart at these pitches, and a row's 8
// labels span at most 8 consecutive words: no bank conflicts). A realign_dz pass would add many
// instructions and shared-memory wavefronts (bank conflicts) to the warp grad-weight, which made it
// slower. The tile grad-weight keeps realign_dz: there the direct loads take many more registers, which
// costs a CTA per multiprocessor and made it slower.
template <int GP, int ROWS, int NTHREADS>
struct RawDzTile {
  static constexpr int PIECES = GP / 8 + 1, PITCH = 16 * PIECES;  // raw pieces and bytes per tile row
  static constexpr int COPIES = ROWS * PIECES, CPT = (COPIES + NTHREADS - 1) / NTHREADS;
  long long off[CPT];  // the piece's first element, from e0
  int meta[CPT];       // row << 16 | byte offset in the tile; -1: not this thread's
  int lo, hi;          // byte offsets of label lane / 4 in rows 2 (lane % 4) and 2 (lane % 4) + 1

  __device__ __forceinline__ void init(long long ldz, int t, int lane) {
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      const int c = t + i * NTHREADS, r = c / PIECES, piece = c % PIECES;
      const long long first = (long long)r * ldz;
      off[i] = first - (first & 7) + piece * 8;
      meta[i] = COPIES % NTHREADS != 0 && c >= COPIES ? -1 : (r << 16) | (r * PITCH + piece * 16);
    }
    const int g = lane >> 2, r = 2 * (lane & 3);
    lo = r * PITCH + 2 * ((int)(((long long)r * ldz) & 7) + g);
    hi = (r + 1) * PITCH + 2 * ((int)(((long long)(r + 1) * ldz) & 7) + g);
  }

  // The tile whose row 0's first label is element e0; `rows` of its rows are in the batch, `end` is one past
  // dZ's last element. Rows past the batch and bytes from `end` on become zeros without being read.
  __device__ __forceinline__ void copy(unsigned tile, const u16* dZ, long long e0, int rows, long long end,
                                       long long ldz) const {
    // Every row followed by another row of dZ at least GP + 8 elements on: no piece reaches past the end.
    const bool inside = rows > ROWS && ldz >= GP + 8;
#pragma unroll
    for (int i = 0; i < CPT; ++i) {
      if (COPIES % NTHREADS != 0 && meta[i] < 0) continue;
      const long long start = e0 + off[i];
      if (inside) {
        cp_async16(tile + (meta[i] & 0xffff), dZ + start, true);
      } else {
        const long long left = (meta[i] >> 16) < rows ? end - start : 0;
        const int bytes = left >= 8 ? 16 : (left > 0 ? (int)left * 2 : 0);
        cp_async16_bytes(tile + (meta[i] & 0xffff), bytes ? (const void*)(dZ + start) : (const void*)dZ, bytes);
      }
    }
  }

  // A fragments of dZ^T for batch slice b16, as load_dz_transposed reads them from aligned rows; labels from
  // labels_left on (the next row's values) read as 0.
  template <int MT>
  __device__ __forceinline__ void load_a(unsigned (&a)[MT][4], const unsigned char* tile, int b16, int labels_left,
                                         int lane) const {
    static_assert(MT * 16 == GP, "one fragment row per label of the tile");
    auto pair = [&](int offset) {
      const unsigned char* p = tile + b16 * 16 * PITCH + offset;
      return (unsigned)*reinterpret_cast<const u16*>(p + lo) | ((unsigned)*reinterpret_cast<const u16*>(p + hi) << 16);
    };
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      a[m][0] = pair(m * 32);
      a[m][1] = pair(m * 32 + 16);
      a[m][2] = pair(m * 32 + 8 * PITCH);
      a[m][3] = pair(m * 32 + 8 * PITCH + 16);
    }
    if (labels_left < GP) {  // the last labels of dZ's rows
      const int g = lane >> 2;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m * 16 + g >= labels_left) a[m][0] = a[m][2] = 0u;
        if (m * 16 + g + 8 >= labels_left) a[m][1] = a[m][3] = 0u;
      }
    }
  }
};

// Dynamic shared memory of gsfi_grad_weight: NST pipeline stages, then the tile's KT feature indices (at
// FEAT_OFFSET). A stage holds a 64-row dZ tile [BT][ZPITCH], GT labels and one 16-byte piece more per row
// (unaligned dZ rows arrive raw, from the 16-byte boundary at or before their first label, and are
// realigned in place), then the 64-row slices of the KT gathered rows of XT [KT][XPITCH] (at X_OFFSET).
// After the last step the first stage takes the warps' bias partial sums, [NWARP][GT] floats.
template <int G, int KP, int NST>
struct GradWeightTileSmem {
  static constexpr int BT = 64, NWARP = 4;
  static constexpr int GT = G < 64 ? gsfi_pad16(G) : 64, KT = KP < 128 ? KP : 128;
  static constexpr int ZPITCH = GT * 2 + 16, XPITCH = BT * 2 + 16;
  static constexpr int Z_STAGE = BT * ZPITCH, S_STAGE = KT * XPITCH, STAGE = Z_STAGE + S_STAGE;
  static constexpr int X_OFFSET = Z_STAGE;        // in a stage
  static constexpr int FEAT_OFFSET = NST * STAGE;  // the feature indices
  static_assert(NWARP * GT * 4 <= STAGE, "the bias partial sums fit in the first stage");
  static __host__ __device__ constexpr long long total_bytes() { return (long long)FEAT_OFFSET + KT * 4; }
};

template <class T, int G, int KP, int NST, bool ALIGNED_DZ>
__global__ void __launch_bounds__(128) gsfi_grad_weight(const u16* __restrict__ dZ, long long ldz,
                                                         const u16* __restrict__ XT, int ldxt,
                                                         const int* __restrict__ idx, u16* __restrict__ dW,
                                                         u16* __restrict__ dB, int B, int H, int L, int K,
                                                         int num_groups, int groups_per_cta) {
  using Smem = GradWeightTileSmem<G, KP, NST>;
  constexpr int BT = Smem::BT, NWARP = Smem::NWARP;
  constexpr int GT = Smem::GT, KT = Smem::KT;
  constexpr int NJT = (G + GT - 1) / GT, NKT = (KP + KT - 1) / KT;
  constexpr int MT = GT / 16, NT = KT / 8, NT_PER_WARP = (NT + NWARP - 1) / NWARP;
  constexpr int ZPITCH = Smem::ZPITCH, XPITCH = Smem::XPITCH, X_OFFSET = Smem::X_OFFSET, STAGE = Smem::STAGE;
  extern __shared__ __align__(16) unsigned char smem[];
  int* feat_s = reinterpret_cast<int*>(smem + Smem::FEAT_OFFSET);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = blockIdx.x;
  const int g = tile / (NJT * NKT);
  if (g >= num_groups) return;
  const int jt = (tile / NKT) % NJT, kt = tile % NKT;
  const int j0 = jt * GT, k0 = kt * KT;
  const int label0 = g * G + j0;
  const int jrows = min(GT, G - j0);
  const int kcols = min(KT, K - k0);
  const int nsteps = (B + BT - 1) / BT;

  for (int r = tid; r < KT; r += blockDim.x) feat_s[r] = r < kcols ? idx[(long long)g * K + k0 + r] : -1;
  __syncthreads();

  // The gathered XT rows of this tile are fixed: each thread's global row pointers and shared-memory
  // offsets are computed once; a step only moves them along the batch.
  constexpr int S_CHUNKS = KT * (BT / 8), S_PER_THREAD = (S_CHUNKS + 127) / 128;
  const u16* s_src[S_PER_THREAD];
  int s_dst[S_PER_THREAD], s_col[S_PER_THREAD];
#pragma unroll
  for (int i = 0; i < S_PER_THREAD; ++i) {
    const int c = tid + i * 128;
    const int r = c / (BT / 8), col = (c % (BT / 8)) * 8;
    const int f = c < S_CHUNKS ? feat_s[r] : -1;
    s_src[i] = f >= 0 ? XT + (long long)f * ldxt + col : nullptr;
    s_dst[i] = X_OFFSET + r * XPITCH + col * 2;
    s_col[i] = col;
  }

  auto issue = [&](int step) {
    unsigned char* st = smem + (step % NST) * STAGE;
    const int bs = step * BT;
    if constexpr (ALIGNED_DZ) {
      load_tile(st, ZPITCH, dZ + (long long)bs * ldz + label0, ldz, BT, GT, B - bs, min(jrows, L - label0), tid, 128);
    } else {
      constexpr int PIECES = GT / 8 + 1;
      static_assert(ZPITCH == 16 * PIECES, "a raw dZ row is one 16-byte piece wider than the tile");
      const long long end = (long long)(B - 1) * ldz + L;
      for (int c = tid; c < BT * PIECES; c += 128) {
        const int r = c / PIECES, piece = c % PIECES;
        cp_async_dz_raw_piece(smem_addr(st + r * ZPITCH + piece * 16), dZ, (long long)(bs + r) * ldz + label0, piece,
                              end, bs + r < B);
      }
    }
    const unsigned base = smem_addr(st);
#pragma unroll
    for (int i = 0; i < S_PER_THREAD; ++i) {
      if (S_CHUNKS % 128 != 0 && tid + i * 128 >= S_CHUNKS) continue;
      const bool valid = s_src[i] != nullptr && bs + s_col[i] < ldxt;
      cp_async16(base + s_dst[i], valid ? s_src[i] + bs : XT, valid);
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
  // Bias gradient: the first K tile of each label tile sums its dZ columns; warp w takes the 16-row
  // slices b16 = w (mod 4) of every step, so the extra products are spread evenly over the warps.
  const bool bias_tile = dB != nullptr && kt == 0;
  const unsigned ones = Ops<T>::pack(1.f, 1.f);
  float bacc[MT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m) bacc[m][0] = bacc[m][1] = bacc[m][2] = bacc[m][3] = 0.f;

  for (int s = 0; s < nsteps; ++s) {
    cp_async_wait<NST - 2>();
    __syncthreads();
    if (s + NST - 1 < nsteps) issue(s + NST - 1);
    cp_async_commit();

    unsigned char* stage = smem + (s % NST) * STAGE;
    if constexpr (!ALIGNED_DZ) {  // unaligned dZ rows: raw in the stage, realigned there (see realign_dz)
      realign_dz<GT, BT, 128>(stage, ZPITCH, (long long)s * BT * ldz + label0, ldz, min(jrows, L - label0), tid,
                              [] { __syncthreads(); });
      __syncthreads();
    }
    const unsigned char* xs = stage + X_OFFSET;
#pragma unroll
    for (int b16 = 0; b16 < BT / 16; ++b16) {
      unsigned a[MT][4];
      load_dz_transposed<MT>(a, smem_addr(stage), ZPITCH, b16, lane);
      if (bias_tile && b16 % NWARP == warp) {
#pragma unroll
        for (int m = 0; m < MT; ++m) Ops<T>::mma(bacc[m], a[m], ones, ones);
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
  }
  cp_async_wait<0>();

#pragma unroll
  for (int t = 0; t < NT_PER_WARP; ++t) {
    const int nt = warp + t * NWARP;
    if (nt >= NT) continue;
    const int col = nt * 8 + 2 * (lane & 3);
    if (col >= kcols) continue;  // kcols is a multiple of 8, so col + 1 < kcols too
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int h8 = 0; h8 < 2; ++h8) {
        const int j = m * 16 + (lane >> 2) + h8 * 8;
        if (j >= jrows) continue;
        u16* dst = dW + ((long long)label0 + j) * K + k0 + col;
        *reinterpret_cast<unsigned*>(dst) = Ops<T>::pack(acc[m][t][2 * h8], acc[m][t][2 * h8 + 1]);
      }
  }

  if (bias_tile) {
    // Every column of a ones-product holds the row sum; lane 4r holds rows r and r + 8 of each
    // 16-label tile. The 4 warps' partial sums meet in the (now idle) first pipeline stage.
    __syncthreads();
    float* part = reinterpret_cast<float*>(smem);  // [NWARP][GT] (GradWeightTileSmem)
    if ((lane & 3) == 0) {
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        part[warp * GT + m * 16 + (lane >> 2)] = bacc[m][0];
        part[warp * GT + m * 16 + (lane >> 2) + 8] = bacc[m][2];
      }
    }
    __syncthreads();
    for (int j = tid; j < jrows && label0 + j < L; j += blockDim.x) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < NWARP; ++w) sum = add_f32(sum, part[w * GT + j]);
      dB[label0 + j] = Ops<T>::from_float(sum);
    }
  }
}

// Small groups and a small batch (G_PAD * K_PAD <= 2048, so a group's whole [G x K] gradient fits in
// one warp's registers, 64 floats per lane; and B x H small enough that all of XT fits in shared
// memory): the CTA keeps XT resident and each warp owns whole groups. The gathered operand comes
// straight from the resident XT through ldmatrix row addresses, so the K x B gather of every group
// costs no L2 traffic (that gather dominates the tile kernel above for small groups); only
// the group's dZ columns stream through a warp-private NST-stage ring in steps of 32 rows.
//
// Dynamic shared memory of gsfi_grad_weight_warp: the resident XT [H + 1][x_pitch(B)] (every row the batch
// padded to 32, then 16 bytes; row H zeros), then per warp a ring of NST 32-row dZ tiles [BW][ZPITCH]
// (GP labels and one 16-byte piece more per row: unaligned rows arrive raw, RawDzTile), warp w's from
// x_bytes(H, B) + w * NST * STAGE on.
template <int G, int NST, int NW>
struct GradWeightWarpSmem {
  static constexpr int BW = 32, GP = gsfi_pad16(G);
  static constexpr int ZPITCH = GP * 2 + 16, STAGE = BW * ZPITCH;
  static __host__ __device__ constexpr int bsteps(int B) { return (B + BW - 1) / BW; }
  static __host__ __device__ constexpr int x_pitch(int B) { return bsteps(B) * BW * 2 + 16; }
  static __host__ __device__ constexpr int x_bytes(int H, int B) { return (H + 1) * x_pitch(B); }
  static __host__ __device__ constexpr long long total_bytes(int H, int B) {
    return (long long)x_bytes(H, B) + (long long)NW * NST * STAGE;
  }
};

template <class T, int G, int KP, int NST, int NW, bool ALIGNED_DZ>
__global__ void __launch_bounds__(NW * 32) gsfi_grad_weight_warp(const u16* __restrict__ dZ, long long ldz,
                                                                  const u16* __restrict__ XT, int ldxt,
                                                                  const int* __restrict__ idx,
                                                                  u16* __restrict__ dW, u16* __restrict__ dB,
                                                                  int B, int H, int L, int K, int num_groups,
                                                                  int groups_per_cta) {
  using Smem = GradWeightWarpSmem<G, NST, NW>;
  constexpr int BW = Smem::BW, GP = Smem::GP;
  constexpr int MT = GP / 16, NT = KP / 8;
  static_assert(GP * KP <= 2048, "the group's gradient must fit in the warp's registers");
  constexpr int ZPITCH = Smem::ZPITCH, STAGE = Smem::STAGE;
  static_assert(RawDzTile<GP, BW, 32>::PITCH == ZPITCH, "the ring's tiles hold raw dZ rows");
  constexpr int Z_PER_LANE = (BW * (GP / 8) + 31) / 32;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g_begin = blockIdx.x * groups_per_cta;
  const int g_end = min(num_groups, g_begin + groups_per_cta);
  if (g_begin >= g_end) return;
  const int bsteps = Smem::bsteps(B);
  const int xpitch = Smem::x_pitch(B);  // resident XT row: the batch padded to 32, then 16 bytes
  const unsigned x_addr = smem_addr(smem);
  // Row H of the resident XT is zeros: padded columns k >= K read it.
  const unsigned ring_addr = x_addr + Smem::x_bytes(H, B) + warp * NST * STAGE;

  for (int c = tid; c < (H + 1) * (bsteps * BW / 8); c += NW * 32) {
    const int h = c / (bsteps * BW / 8), col = (c % (bsteps * BW / 8)) * 8;
    const bool valid = h < H && col < ldxt;
    cp_async16(x_addr + h * xpitch + col * 2, valid ? XT + (long long)h * ldxt + col : XT, valid);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();

  const int first = g_begin + warp;
  if (first >= g_end) return;
  const int my_groups = (g_end - first + NW - 1) / NW;
  const int nsteps = my_groups * bsteps;

  // Unaligned dZ rows: copied raw, the fragments read from them (RawDzTile; ZPITCH is its pitch).
  RawDzTile<GP, BW, 32> raw;
  if (!ALIGNED_DZ) raw.init(ldz, lane, lane);
  const long long end = (long long)(B - 1) * ldz + L;

  auto issue = [&](int step) {
    const int g = first + (step / bsteps) * NW, bs = (step % bsteps) * BW;
    const unsigned st = ring_addr + (step % NST) * STAGE;
    const int labels_left = L - g * G;
    if constexpr (ALIGNED_DZ) {
#pragma unroll
      for (int i = 0; i < Z_PER_LANE; ++i) {
        const int c = lane + 32 * i, r = c / (GP / 8), col = (c % (GP / 8)) * 8;
        const bool valid = c < BW * (GP / 8) && bs + r < B && col < G && col < labels_left;
        cp_async16(st + r * ZPITCH + col * 2, valid ? dZ + (long long)(bs + r) * ldz + (long long)g * G + col : dZ,
                   valid);
      }
    } else {
      raw.copy(st, dZ, (long long)bs * ldz + (long long)g * G, B - bs, end, ldz);
    }
  };

  for (int s = 0; s < NST - 1; ++s) {
    if (s < nsteps) issue(s);
    cp_async_commit();
  }

  // This lane's ldmatrix row of each 16-column pair: column n2 * 16 + (lane & 7) + (lane >> 4) * 8.
  int feat_next[NT / 2];
  auto load_features = [&](int g) {
#pragma unroll
    for (int n2 = 0; n2 < NT / 2; ++n2) {
      const int k = n2 * 16 + (lane & 7) + (lane >> 4) * 8;
      feat_next[n2] = (g < g_end && k < K) ? __ldg(idx + (long long)g * K + k) : H;
    }
  };
  load_features(first);

  float acc[MT][NT][4];
  float bacc[MT][4];  // bias gradient: dZ^T times a column of ones
  const unsigned ones = Ops<T>::pack(1.f, 1.f);
  for (int gi = 0, s = 0; gi < my_groups; ++gi) {
    unsigned xrow[NT / 2];
#pragma unroll
    for (int n2 = 0; n2 < NT / 2; ++n2) xrow[n2] = x_addr + feat_next[n2] * xpitch + ((lane >> 3) & 1) * 16;
    load_features(first + (gi + 1) * NW);  // the next group's, while this one computes
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      bacc[m][0] = bacc[m][1] = bacc[m][2] = bacc[m][3] = 0.f;
#pragma unroll
      for (int n = 0; n < NT; ++n) acc[m][n][0] = acc[m][n][1] = acc[m][n][2] = acc[m][n][3] = 0.f;
    }
    for (int b = 0; b < bsteps; ++b, ++s) {
      cp_async_wait<NST - 2>();
      __syncwarp();
      if (s + NST - 1 < nsteps) issue(s + NST - 1);
      cp_async_commit();
      const unsigned zs = ring_addr + (s % NST) * STAGE;
#pragma unroll
      for (int b16 = 0; b16 < BW / 16; ++b16) {
        unsigned a[MT][4];
        if (ALIGNED_DZ) {
          load_dz_transposed<MT>(a, zs, ZPITCH, b16, lane);
        } else {
          raw.template load_a<MT>(a, smem + (zs - x_addr), b16, L - (first + gi * NW) * G, lane);
        }
        if (dB != nullptr) {
#pragma unroll
          for (int m = 0; m < MT; ++m) Ops<T>::mma(bacc[m], a[m], ones, ones);
        }
        const int boff = (b * BW + b16 * 16) * 2;
#pragma unroll
        for (int n2 = 0; n2 < NT / 2; ++n2) {
          // Two 8-column tiles of B[k = batch][n = column] = XT[idx[column]][batch] per ldmatrix,
          // read from the resident XT at the columns' feature rows.
          unsigned bx[4];
          ldsm_x4(bx, xrow[n2] + boff);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            Ops<T>::mma(acc[m][2 * n2], a[m], bx[0], bx[1]);
            Ops<T>::mma(acc[m][2 * n2 + 1], a[m], bx[2], bx[3]);
          }
        }
      }
    }
    const long long label0 = (long long)(first + gi * NW) * G;
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int h8 = 0; h8 < 2; ++h8) {
          const int j = m * 16 + (lane >> 2) + h8 * 8, col = n * 8 + 2 * (lane & 3);
          if (j < G && col < K) {  // K is a multiple of 8, so col + 1 < K too
            *reinterpret_cast<unsigned*>(dW + (label0 + j) * K + col) =
                Ops<T>::pack(acc[m][n][2 * h8], acc[m][n][2 * h8 + 1]);
          }
        }
    if (dB != nullptr && (lane & 3) == 0) {
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int h8 = 0; h8 < 2; ++h8) {
          const int j = m * 16 + (lane >> 2) + h8 * 8;
          if (j < G && label0 + j < L) dB[label0 + j] = Ops<T>::from_float(bacc[m][2 * h8]);
        }
    }
  }
  cp_async_wait<0>();
}
