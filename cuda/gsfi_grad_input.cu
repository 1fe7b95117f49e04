// Gradient of the input of the group-shared fixed fan-in layer:
//   dX[b, idx[g, k]] += sum_j dZ[b, g*G + j] * W[g*G + j, k]
//
// One CTA = BT (32, 64 or 128) batch rows x a range of groups, 8 warps; one step = S consecutive groups
// (and one chunk of their K columns), loaded into one pipeline stage. For each group the CTA computes the
// transposed product dXg^T [K x BT] = W_g^T [K x G] * dZ_g^T [G x BT] on tensor cores, so that each
// accumulator pair holds two consecutive batch rows of ONE feature, and adds it into a float32
// transposed copy of the CTA's dX rows in shared memory (SMEM_ACC, [H][BT], the 8-row blocks of row h
// swizzled by h mod 4, so that the rows a warp touches, whose feature ids the bank-interleaved slot
// order makes distinct mod 4, fall into different banks without padding): one 8-byte read-add-write
// per pair. The shared copy is added to the float32 dX in global memory once at the end.
//
// A warp's tiles of a group have distinct features, so within a group no element is added twice; the
// barrier that starts each step orders one step's adds before the next step's. With ROW_OWNED each warp
// owns a set of 8-row batch tiles (columns of the accumulator) for the whole kernel and computes every
// feature of every group for them, so no two warps ever add into the same element: a step can then
// carry S groups (S * G = 64 labels for groups of 16), which spreads the barrier, the copies and the
// loop over several groups. Inside a warp, two groups of one step may share a feature: the warp
// finishes one group's adds (and __syncwarp) before it reads for the next. With 32 rows (4 tiles for
// 8 warps) two warps share a tile and split its features, so S is 1 there.
// Padded feature slots (K not a multiple of 16, or past K in a partial last chunk of K) add into trash
// rows past H (16 per warp) instead of branching (the launcher allocates them only then). Without
// SMEM_ACC (H too large for shared memory) the adds go to global memory as atomics.
// Without ALIGNED_DZ (dZ rows not on 16-byte boundaries: an odd number of labels) a step's dZ tile is
// loaded into registers two or four steps ahead and realigned on its way into the stage (DzStager).
#include "gsfi_common.cuh"

// Weights per pipeline stage: a [G_PAD x K_CHUNK] tile of at most 16 KB, K_CHUNK in [16, 128].
__host__ __device__ constexpr int gsfi_k_chunk(int g_pad, int k_pad) {
  int cap = 8192 / g_pad;
  cap = cap > 128 ? 128 : (cap < 16 ? 16 : cap);
  cap = cap / 16 * 16;
  return k_pad < cap ? k_pad : cap;
}

// Raw rows for grad-input, without the extra 16-byte piece per row of grad-weight's raw tiles (which would
// cost shared memory the grad-input accumulator needs), for a CTA whose batch rows stay the same at every
// step: its [ROWS x LABELS] dZ tiles (a step's labels) travel through registers, DEPTH tiles in flight (a
// slot each; callers index slots with unrolled loop counters so that they stay in registers). load()
// reads each 8-label piece as the two 16-byte pieces from the boundary at or before it (never past the
// last element of dZ); store(), DEPTH steps later when the loads have landed, shifts each piece into place
// in registers and writes it to the shared tile as one aligned 16-byte piece that ldmatrix reads. Rows
// past the batch and labels past the tile's last become zeros. Tiles start at multiples of 8 labels, so a
// piece's offset from its 16-byte boundary is that of its row: it and the row's address are computed once.
template <int ROWS, int LABELS, int NTHREADS, int DEPTH>
struct DzStager {
  static constexpr int PIECES = ROWS * (LABELS / 8), PER_THREAD = (PIECES + NTHREADS - 1) / NTHREADS;
  // Fewer pieces than threads: SPREAD threads share a piece, so that all warps share the work; all of them
  // load it (one request: same addresses) and the first stores it. (Threads that skipped the loads made
  // every warp's load predicate divergent, and the compiler turns predicated loads into branches.)
  static constexpr int SPREAD = PIECES < NTHREADS ? NTHREADS / PIECES : 1;
  static __device__ __forceinline__ int piece(int tid, int i) {
    return SPREAD > 1 ? tid / SPREAD : tid + i * NTHREADS;
  }
  static __device__ __forceinline__ bool stores(int tid, int i) {
    return SPREAD > 1 ? tid % SPREAD == 0 : (PIECES % NTHREADS == 0 || tid + i * NTHREADS < PIECES);
  }
  uint4 raw[DEPTH][PER_THREAD][2];
  int left[DEPTH];               // labels of the slot's tile that belong to a row (the same for the CTA)
  const u16* base[PER_THREAD];   // the 16-byte boundary at or before the piece's first label of group 0
  int meta[PER_THREAD];          // shared tile offset << 5 | last row of dZ << 4 | row in batch << 3 | offset 0..7
  const u16* dz;
  long long end;                 // one past dZ's last element

  // offset(r, c): byte offset in the shared tile of row r's 16-byte piece c (the caller's tile layout).
  template <class Offset>
  __device__ __forceinline__ void init(const u16* __restrict__ dZ, long long ldz, int row0, int B, int L, Offset offset,
                                       int tid) {
    dz = dZ;
    end = (long long)(B - 1) * ldz + L;
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int c = piece(tid, i), r = c / (LABELS / 8), q = (c % (LABELS / 8)) * 8;
      const bool in_batch = c < PIECES && row0 + r < B;
      const long long e = in_batch ? (long long)(row0 + r) * ldz + q : 0;
      base[i] = dZ + (e & ~7LL);
      // Only the last row's pieces can reach past the end (for rows of at least 16 labels): they check.
      const bool last = in_batch && (row0 + r == B - 1 || ldz < 16);
      meta[i] = (offset(r, q / 8) << 5) | (last << 4) | (in_batch << 3) | (int)(e & 7);
    }
  }

  // 32 bytes from global memory, or zeros without a read when !ok: predicated, so that the common path
  // has no branches (a branch per piece cost more than the loads).
  static __device__ __forceinline__ void ldg32_or_zero(uint4 (&v)[2], const u16* p, bool ok) {
    asm("{\n .reg .pred p;\n setp.ne.b32 p, %9, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " mov.b32 %4, 0;\n mov.b32 %5, 0;\n mov.b32 %6, 0;\n mov.b32 %7, 0;\n"
        " @p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%8];\n"
        " @p ld.global.nc.v4.u32 {%4, %5, %6, %7}, [%8 + 16];\n}\n"
        : "=r"(v[0].x), "=r"(v[0].y), "=r"(v[0].z), "=r"(v[0].w), "=r"(v[1].x), "=r"(v[1].y), "=r"(v[1].z),
          "=r"(v[1].w)
        : "l"(p), "r"((int)ok));
  }

  // Labels label0 (a multiple of 8) ..., of which labels_left belong to the row.
  __device__ __forceinline__ void load(int slot, long long label0, int labels_left, int tid) {
    left[slot] = labels_left;
    bool ok[PER_THREAD];   // the piece has labels of its row to read
    bool careful = false;  // a piece of the last row that reaches past the end of dZ
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      ok[i] = (meta[i] & 8) && (piece(tid, i) % (LABELS / 8)) * 8 < labels_left;
      careful |= ((meta[i] & 16) != 0) & ((base[i] + label0 - dz) + 16 > end);
    }
    if (!careful) {
#pragma unroll
      for (int i = 0; i < PER_THREAD; ++i) ldg32_or_zero(raw[slot][i], base[i] + label0, ok[i]);
    } else {  // element by element, none past the end
#pragma unroll
      for (int i = 0; i < PER_THREAD; ++i) {
        const u16* at = base[i] + label0;
        const long long first = at - dz;
        unsigned h[16];
#pragma unroll
        for (int k = 0; k < 16; ++k)
          h[k] = ok[i] && first + k < end ? __ldg(reinterpret_cast<const unsigned short*>(at + k)) : 0u;
        raw[slot][i][0] = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
        raw[slot][i][1] =
            make_uint4(h[8] | (h[9] << 16), h[10] | (h[11] << 16), h[12] | (h[13] << 16), h[14] | (h[15] << 16));
      }
    }
  }

  __device__ __forceinline__ void store(int slot, unsigned char* tile, int tid) const {
    const unsigned tile_addr = smem_addr(tile);
#pragma unroll
    for (int i = 0; i < PER_THREAD; ++i) {
      const int off = meta[i] & 7;
      const uint4 p0 = raw[slot][i][0], p1 = raw[slot][i][1];
      const unsigned w[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
      // The piece's 5 words start at word off / 2: selected in two halvings (registers, no indexing).
      unsigned y[6], x[5], v[4];
#pragma unroll
      for (int k = 0; k < 6; ++k) y[k] = (off & 4) ? w[k + 2] : w[k];
#pragma unroll
      for (int k = 0; k < 5; ++k) x[k] = (off & 2) ? y[k + 1] : y[k];
      const unsigned bits = (off & 1) * 16;  // an odd offset starts in the middle of a word
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = __funnelshift_r(x[k], x[k + 1], bits);
      if (left[slot] < LABELS) {  // the tile reaches past the row's (or the CTA's) labels: zero them
        const int n = left[slot] - (piece(tid, i) % (LABELS / 8)) * 8;
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (2 * k >= n) v[k] = 0u;
          else if (2 * k + 1 >= n) v[k] &= 0xffffu;
        }
      }
      const bool mine = stores(tid, i);
      asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n @p st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n}\n"
                   ::"r"(tile_addr + (meta[i] >> 5)), "r"(v[0]), "r"(v[1]), "r"(v[2]), "r"(v[3]), "r"((int)mine)
                   : "memory");
    }
  }
};

// Dynamic shared memory of gsfi_grad_input: NST pipeline stages, then with SMEM_ACC the float32 accumulator
// [acc_rows(H, K)][BT] (8-row blocks of row h swizzled by h mod 4). A stage holds the step's dZ tile
// [BT][LP] (Z_STAGE bytes), its weight chunk [LP][WPITCH] (at W_OFFSET) and its S * KC indices (at
// IDX_OFFSET). The dZ tile's rows are not padded (16 bytes a row would cost the 2-group stages at 128
// rows): the 16-byte pieces of row r are XOR-swizzled by a function of r (z_offset), so that the 8 rows an
// ldmatrix reads at one piece fall into 8 different 16-byte bank groups. The accumulator has TRASH_ROWS
// rows past H (16 per warp) only when there are padded feature slots, K not a multiple of 16 or a last
// chunk of K that is partial (K = 160 in chunks of 128, say): the kernel's K, not KP, decides.
template <int G, int KP, bool SMEM_ACC, int NST, int BT, int S>
struct GradInputSmem {
  static constexpr int GP = gsfi_pad16(G), LP = S * GP;  // labels of a step's tile
  static constexpr int KC = gsfi_k_chunk(LP, KP), NKC = (KP + KC - 1) / KC;
  static constexpr int ZPITCH = LP * 2, WPITCH = KC * 2 + 16;
  static constexpr int Z_ROWS_PER_128 = ZPITCH >= 128 ? 1 : 128 / ZPITCH;
  static constexpr int Z_SWIZZLE_MASK = (ZPITCH >= 128 ? 128 : ZPITCH) / 16 - 1;
  // Byte offset in the dZ tile of row r's 16-byte piece `piece`.
  static __host__ __device__ constexpr int z_offset(int r, int piece) {
    return r * ZPITCH + ((piece ^ ((r / Z_ROWS_PER_128) & Z_SWIZZLE_MASK)) << 4);
  }
  static constexpr int Z_STAGE = BT * ZPITCH, W_STAGE = LP * WPITCH, IDX_STAGE = S * KC * 4;
  static constexpr int W_OFFSET = Z_STAGE, IDX_OFFSET = Z_STAGE + W_STAGE;  // in a stage
  static constexpr int STAGE = Z_STAGE + W_STAGE + IDX_STAGE;
  static constexpr int ACC_OFFSET = NST * STAGE;  // the accumulator
  static constexpr int TRASH_ROWS = 8 * 16;
  static __host__ __device__ constexpr int acc_rows(int H, int K) { return H + (NKC * KC > K ? TRASH_ROWS : 0); }
  static __host__ __device__ constexpr long long total_bytes(int H, int K) {
    return (long long)ACC_OFFSET + (SMEM_ACC ? (long long)acc_rows(H, K) * BT * 4 : 0LL);
  }
};

template <class T, int G, int KP, bool SMEM_ACC, int NST, int BT, bool ALIGNED_DZ, int S, bool ROW_OWNED,
          bool PARTIALS = false>
__global__ void __launch_bounds__(256, 1) gsfi_grad_input(const u16* __restrict__ dZ, long long ldz,
                                                        const u16* __restrict__ W, const int* __restrict__ idx,
                                                        float* __restrict__ dX, int B, int H, int L, int K,
                                                        int num_groups, int groups_per_cta) {
  using Smem = GradInputSmem<G, KP, SMEM_ACC, NST, BT, S>;
  constexpr int NTHREADS = 256, NN = BT / 8;                     // BT = 32, 64 or 128 batch rows
  constexpr int GP = Smem::GP, LP = Smem::LP;                    // labels of a step's tile
  constexpr int KC = Smem::KC, NKC = Smem::NKC;
  constexpr int MT = KC / 16;                                    // 16-feature tiles per group and step
  // A warp computes MTW feature tiles x NPW batch tiles: NWN warps along the batch tiles, MSPLIT along the
  // features. ROW_OWNED: as many warps along the batch as there are tiles (up to 8), so that a warp owns
  // its tiles' columns of the accumulator. Otherwise each warp takes one feature tile and a power-of-two
  // run of batch tiles, which shares the weight fragments and, for groups of 32 labels or more, reads
  // less shared memory (the ROW_OWNED warps each read all of the group's weights).
  constexpr int TPW_MIN = (MT * NN + 7) / 8;
  constexpr int TPW = TPW_MIN <= 1 ? 1 : (TPW_MIN <= 2 ? 2 : (TPW_MIN <= 4 ? 4 : (TPW_MIN <= 8 ? 8 : 16)));
  constexpr int NWN = ROW_OWNED ? (NN < 8 ? NN : 8) : NN / (TPW < NN ? TPW : NN);
  constexpr int MSPLIT = 8 / NWN, NPW = NN / NWN, MTW = (MT + MSPLIT - 1) / MSPLIT;
  static_assert(S == 1 || (ROW_OWNED && MSPLIT == 1 && GP == G), "several groups per step need whole tiles per warp");
  static_assert((LP & (LP - 1)) == 0, "the dZ tile's swizzle needs rows of a power-of-two size");
  static_assert(!PARTIALS || SMEM_ACC, "per-column partial sums need the shared-memory accumulator");
  // The shared-memory carve-up (GradInputSmem): stages, the swizzled dZ tile, the accumulator.
  constexpr int WPITCH = Smem::WPITCH;
  auto z_offset = [](int r, int piece) { return Smem::z_offset(r, piece); };
  constexpr int W_OFFSET = Smem::W_OFFSET, W_STAGE = Smem::W_STAGE, IDX_OFFSET = Smem::IDX_OFFSET;
  constexpr int STAGE = Smem::STAGE;
  extern __shared__ __align__(16) unsigned char smem[];
  float* acc_s = reinterpret_cast<float*>(smem + Smem::ACC_OFFSET);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int b0 = blockIdx.x * BT;
  const int g_begin = blockIdx.y * groups_per_cta;
  const int g_end = min(num_groups, g_begin + groups_per_cta);
  if (g_begin >= g_end) return;
  const int nsteps = (g_end - g_begin + S - 1) / S * NKC;
  const int warp_n = warp % NWN, warp_m = warp / NWN;
  // Whether the warp's i-th feature tile exists (MT not a multiple of MSPLIT: the last warps have one fewer).
  auto has_tile = [&](int i) { return MTW * MSPLIT == MT || warp_m + i * MSPLIT < MT; };

  if (SMEM_ACC) {
    // Trash rows only when there are padded slots: K not a multiple of 16, or a last chunk of K that is
    // partial (K = 160 in chunks of 128, say).
    const int acc_rows = Smem::acc_rows(H, K);
    for (int i = tid; i < acc_rows * BT; i += NTHREADS) acc_s[i] = 0.f;
  }

  // Each thread copies the same pieces of every step's tiles: their offsets are computed once, and a
  // step only moves them to its groups and chunk of K. Tile column c / row r of group s of the step is
  // label / weight row s * G + c % GP of the step (GP = G, or S = 1): contiguous from the step's first.
  constexpr int Z_CHUNKS = BT * (LP / 8), ZPT = (Z_CHUNKS + NTHREADS - 1) / NTHREADS;
  constexpr int W_CHUNKS = LP * (KC / 8), WPT = (W_CHUNKS + NTHREADS - 1) / NTHREADS;
  long long z_off[ZPT];
  int z_dst[ZPT], z_col[ZPT];
  bool z_ok[ZPT];
#pragma unroll
  for (int i = 0; i < ZPT; ++i) {
    const int c = tid + i * NTHREADS, r = c / (LP / 8), col = (c % (LP / 8)) * 8;
    z_off[i] = (long long)(b0 + r) * ldz + col;
    z_dst[i] = z_offset(r, col / 8);
    z_col[i] = col;
    z_ok[i] = c < Z_CHUNKS && b0 + r < B && col % GP < G;
  }
  int w_off[WPT], w_dst[WPT], w_row[WPT], w_col[WPT];
  bool w_ok[WPT];
#pragma unroll
  for (int i = 0; i < WPT; ++i) {
    const int c = tid + i * NTHREADS, r = c / (KC / 8), col = (c % (KC / 8)) * 8;
    w_off[i] = r * K + col;
    w_dst[i] = W_OFFSET + r * WPITCH + col * 2;
    w_row[i] = r;
    w_col[i] = col;
    w_ok[i] = c < W_CHUNKS && r % GP < G;
  }
  // Labels of the step's groups that are this CTA's (the last step may reach past them; with G = 8 the
  // 16-label tile would reach into the next group).
  auto labels_of = [&](int g0) { return min(L - g0 * G, min(g_end - g0, S) * G); };

  auto issue = [&](int step) {
    const unsigned st = smem_addr(smem + (step % NST) * STAGE);
    const int g0 = g_begin + step / NKC * S, k0 = (step % NKC) * KC;
    // dZ columns of the groups: labels past them (padding of the last group, other CTAs' groups) and
    // rows past B read as 0.
    const u16* zg = dZ + (long long)g0 * G;
    const int labels_left = labels_of(g0);
    if constexpr (ALIGNED_DZ) {
#pragma unroll
      for (int i = 0; i < ZPT; ++i) {
        if (Z_CHUNKS % NTHREADS != 0 && tid + i * NTHREADS >= Z_CHUNKS) continue;
        const bool valid = z_ok[i] && z_col[i] < labels_left;
        cp_async16(st + z_dst[i], valid ? zg + z_off[i] : dZ, valid);
      }
    }
    const u16* wg = W + (long long)g0 * G * K + k0;
    const int rows_left = (g_end - g0) * G;
#pragma unroll
    for (int i = 0; i < WPT; ++i) {
      if (W_CHUNKS % NTHREADS != 0 && tid + i * NTHREADS >= W_CHUNKS) continue;
      const bool valid = w_ok[i] && w_row[i] < rows_left && k0 + w_col[i] < K;
      cp_async16(st + w_dst[i], valid ? wg + w_off[i] : W, valid);
    }
    if (tid < S * KC / 4) {
      const int sub = tid / (KC / 4), kq = tid % (KC / 4) * 4;
      const bool valid = g0 + sub < g_end && k0 + kq < K;
      cp_async16(st + IDX_OFFSET + (sub * KC + kq) * 4, valid ? idx + (long long)(g0 + sub) * K + k0 + kq : idx,
                 valid);
    }
  };

  // Unaligned dZ: a step's tile is loaded into registers DEPTH steps before it is stored into its stage
  // (at step s the tile of step s + NST - 1 is stored and that of step s + NST - 1 + DEPTH loaded into
  // the same slot, slot = step mod DEPTH), so that the global loads get DEPTH steps to land: 4 when a
  // thread holds at most one 8-label piece of a tile (short steps), else 2.
  constexpr int PIECES_PER_THREAD = (BT * (LP / 8) + NTHREADS - 1) / NTHREADS;
  constexpr int DEPTH = ALIGNED_DZ ? 1 : (PIECES_PER_THREAD == 1 ? 4 : 2);
  DzStager<BT, LP, NTHREADS, DEPTH> dz_regs;
  if (!ALIGNED_DZ) dz_regs.init(dZ, ldz, b0, B, L, z_offset, tid);
  auto load_dz = [&](int step, int slot) {
    const int g0 = g_begin + step / NKC * S;
    dz_regs.load(slot, (long long)g0 * G, labels_of(g0), tid);
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

  // Padded feature slots go to the warp's own 16 trash rows (in the last chunk of K every feature tile of
  // a warp may be padding, and warps that share batch tiles would collide in shared rows).
  static_assert(Smem::TRASH_ROWS == NTHREADS / 32 * 16, "16 trash rows per warp");
  const int trash = H + warp * 16 + (lane >> 2);
  const int col_in_tile = 2 * (lane & 3);

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
    if (MSPLIT > MT && warp_m >= MT) continue;

    const unsigned char* zs = smem + (s % NST) * STAGE;
    const unsigned char* ws = zs + W_OFFSET;
    const int* is = reinterpret_cast<const int*>(ws + W_STAGE);
    const int k0 = (s % NKC) * KC;
    // The CTA's last step may have fewer groups (their tiles are zeros, but their feature slots would
    // all read feature 0: lanes of one warp would add into one element).
    const int subs = min(S, g_end - (g_begin + s / NKC * S));

#pragma unroll
    for (int sub = 0; sub < S; ++sub) {
      if (S > 1 && sub >= subs) break;
      // B = dZ_g^T for the warp's batch tiles: rows b of the dZ tile, labels j contiguous; one ldmatrix
      // covers 32 labels (16 labels twice when GP = 16). Loaded once, used by every feature tile.
      unsigned bz[NPW][(GP + 31) / 32][4];
#pragma unroll
      for (int t = 0; t < NPW; ++t)
#pragma unroll
        for (int j32 = 0; j32 < (GP + 31) / 32; ++j32) {
          const int row = (warp_n * NPW + t) * 8 + (lane & 7);
          const int col = j32 * 32 + (lane >> 3) * 8;
          ldsm_x4(bz[t][j32], smem_addr(zs + z_offset(row, (sub * GP + (col < GP ? col : col - 16)) / 8)));
        }

      // All of the warp's products first, then all reads, adds and writes: independent work in flight
      // instead of one product -> read -> add -> write chain per tile. The group's features are distinct,
      // so its tiles never add into one element twice.
      float acc[MTW][NPW][4];
      int f0[MTW], f1[MTW];
#pragma unroll
      for (int i = 0; i < MTW; ++i) {
        if (!has_tile(i)) break;
        const int m = warp_m + i * MSPLIT;
        // A = W_g^T for feature tile m: rows j of the group's weight tile, transposed by ldmatrix.
        unsigned a[GP / 16][4];
#pragma unroll
        for (int j16 = 0; j16 < GP / 16; ++j16) {
          const int row = sub * GP + j16 * 16 + (lane & 7) + (lane >> 4) * 8;
          const int col = m * 16 + ((lane >> 3) & 1) * 8;
          ldsm_x4_trans(a[j16], smem_addr(ws + row * WPITCH + col * 2));
        }
#pragma unroll
        for (int t = 0; t < NPW; ++t) {
          acc[i][t][0] = acc[i][t][1] = acc[i][t][2] = acc[i][t][3] = 0.f;
#pragma unroll
          for (int j16 = 0; j16 < GP / 16; ++j16)
            Ops<T>::mma(acc[i][t], a[j16], bz[t][j16 / 2][(j16 % 2) * 2], bz[t][j16 / 2][(j16 % 2) * 2 + 1]);
        }
        const int kr = m * 16 + (lane >> 2);
        f0[i] = k0 + kr < K ? is[sub * KC + kr] : trash;
        f1[i] = k0 + kr + 8 < K ? is[sub * KC + kr + 8] : trash + 8;
      }
      if (SMEM_ACC) {
        float2 u[MTW][NPW], v[MTW][NPW];
        int p0[MTW][NPW], p1[MTW][NPW];  // float offsets in the accumulator
#pragma unroll
        for (int i = 0; i < MTW; ++i) {
          if (!has_tile(i)) break;
#pragma unroll
          for (int t = 0; t < NPW; ++t) {
            const int n = warp_n * NPW + t;  // 8-row block n of row f sits at block n ^ (f & 3)
            p0[i][t] = f0[i] * BT + ((n ^ (f0[i] & 3)) * 8) + col_in_tile;
            p1[i][t] = f1[i] * BT + ((n ^ (f1[i] & 3)) * 8) + col_in_tile;
            u[i][t] = *reinterpret_cast<const float2*>(acc_s + p0[i][t]);
            v[i][t] = *reinterpret_cast<const float2*>(acc_s + p1[i][t]);
          }
        }
#pragma unroll
        for (int i = 0; i < MTW; ++i) {
          if (!has_tile(i)) break;
#pragma unroll
          for (int t = 0; t < NPW; ++t) {
            u[i][t].x = add_f32(u[i][t].x, acc[i][t][0]);
            u[i][t].y = add_f32(u[i][t].y, acc[i][t][1]);
            v[i][t].x = add_f32(v[i][t].x, acc[i][t][2]);
            v[i][t].y = add_f32(v[i][t].y, acc[i][t][3]);
            *reinterpret_cast<float2*>(acc_s + p0[i][t]) = u[i][t];
            *reinterpret_cast<float2*>(acc_s + p1[i][t]) = v[i][t];
          }
        }
        if (S > 1) __syncwarp();  // the next group's reads see this one's writes (lanes may share a feature)
      } else {
#pragma unroll
        for (int i = 0; i < MTW; ++i) {
          if (!has_tile(i)) break;
          const int kr = (warp_m + i * MSPLIT) * 16 + (lane >> 2);
          const bool v0 = k0 + kr < K, v1 = k0 + kr + 8 < K;
#pragma unroll
          for (int t = 0; t < NPW; ++t) {
            const int b = (warp_n * NPW + t) * 8 + col_in_tile;
            float* base = dX + (long long)(b0 + b) * H;
            const bool r0 = b0 + b < B, r1 = b0 + b + 1 < B;
            if (v0 && r0) atomicAdd(base + f0[i], acc[i][t][0]);
            if (v0 && r1) atomicAdd(base + H + f0[i], acc[i][t][1]);
            if (v1 && r0) atomicAdd(base + f1[i], acc[i][t][2]);
            if (v1 && r1) atomicAdd(base + H + f1[i], acc[i][t][3]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();

  if (SMEM_ACC) {
    __syncthreads();
    const int rows = min(BT, B - b0);
    const bool only_cta = gridDim.y == 1;
    // PARTIALS: each column of CTAs writes its own [B x H] slice (dX + blockIdx.y * B * H), which the
    // launcher sums in a fixed order: no atomics, so the result is the same in every run.
    float* out = PARTIALS ? dX + (long long)blockIdx.y * B * H : dX;
    for (int i = tid; i < rows * H; i += NTHREADS) {
      const int r = i / H, h = i - r * H;
      const float v = acc_s[h * BT + (r ^ ((h & 3) << 3))];
      float* dst = out + (long long)(b0 + r) * H + h;
      if (PARTIALS || only_cta) {
        *dst = v;
      } else if (v != 0.f) {
        atomicAdd(dst, v);
      }
    }
  }
}
