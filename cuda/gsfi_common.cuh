// Shared device helpers for the group-shared fixed fan-in (GSFI) kernels.
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

// 16-byte global -> shared copy; copies zeros when !valid (the source is not read then).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, bool valid) {
  int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// 16-byte global -> shared copy of which only the first `bytes` (0..16) are read; the rest become 0.
__device__ __forceinline__ void cp_async16_bytes(unsigned dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
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
// labels span at most 8 consecutive words: no bank conflicts). realign_dz's pass had cost the warp
// grad-weight half again its instructions and shared-memory wavefronts (bank conflicts): AmazonTitles-670K
// 0.383 -> 0.360 ms on H200 (benchmarks/RESULTS.md). The tile grad-weight keeps realign_dz: there the
// direct loads took 70 more registers, a CTA per multiprocessor fewer (Amazon-3M 1.02 -> 1.30 ms).
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

// Raw rows for grad-input, without the raw tile's extra piece per row (which
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

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

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

// Weights per pipeline stage: a [G_PAD x K_CHUNK] tile of at most 16 KB, K_CHUNK in [16, 128].
__host__ __device__ constexpr int gsfi_pad16(int v) { return (v + 15) / 16 * 16; }
__host__ __device__ constexpr int gsfi_k_chunk(int g_pad, int k_pad) {
  int cap = 8192 / g_pad;
  cap = cap > 128 ? 128 : (cap < 16 ? 16 : cap);
  cap = cap / 16 * 16;
  return k_pad < cap ? k_pad : cap;
}
