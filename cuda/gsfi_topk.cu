// Top-k candidates of the group-shared fixed fan-in tail, straight from the forward's tensor-core tiles: no
// logits tensor is stored.
//
// The caller knows, per batch row b, a lower bound threshold[b] of the row's k-th best score (the k-th best of
// any k scores of the row is one: the head's, a sample of the tail's). Every tail logit z with z >= threshold[b]
// is a candidate: its value and its position (offset + g * G + j) are appended to the row's list,
//   slot = atomicAdd(&count[b], 1);  if slot < cap: score[b * cap + slot] = z, position[b * cap + slot] = offset + g*G + j.
// gsfi_topk_dense_candidates does the same for a chunk of dense logits (the head's, which cuBLAS computes), into
// the same lists; gsfi_topk_bound raises the bounds from a chunk of logits or from the lists, gsfi_topk_merge sorts
// each list into the row's top-k. The row's top-k is then the top-k of its list (a small merge on the caller's side). count[b] may end above cap: the list overflowed, and the caller retries the row with a
// higher bound (the k-th best of the stored candidates) or falls back. The order of a list depends on the
// order in which the warps reach their tiles; the caller's merge orders by a total order (score, then label id),
// so the result does not.
//
// z is the logit as the forward stores it: bias added in float32, rounded once to the input dtype. Selecting on
// that value makes the top-k equal to a top-k of the forward's output, ties included. A NaN logit is a
// candidate (it never compares below the bound), so the caller can rank NaN as it ranks it elsewhere.
// threshold[b] NaN marks a row that takes no candidates (a retry touches only the rows that overflowed).
// CuPy compiles with -ftz=true, so the comparison may see a subnormal as zero: flushing is monotone, so it can
// only let more logits through (the caller's merge compares exactly), never drop one at or above the bound.
// Rounding and comparing every logit costs the epilogue more than the forward's store: the tail's epilogue first
// screens the unrounded sums against a value just below the bound (screen_bound) and applies the rule above only
// in the lanes where one passes.
//
// The main loop is the forward's, so that a candidate's value is bit for bit the logit the forward stores: forward_tiles
// (mma.sync, cuda/gsfi_forward_tiles.cuh, shared with gsfi_forward and the fused loss) in gsfi_topk_candidates, and
// on Hopper, where the forward runs gsfi_forward_sm90, forward_tiles_sm90 (wgmma, cuda/gsfi_forward_sm90_tiles.cuh)
// in gsfi_topk_candidates_sm90.
#include "gsfi_forward_tiles.cuh"
#include "gsfi_forward_sm90_tiles.cuh"

// The largest finite value of T, as a float: a float rounds to +inf in T only above it.
template <class T> struct LargestFinite;
template <> struct LargestFinite<bf16_t> {
  static __device__ __forceinline__ float value() { return __uint_as_float(0x7f7f0000u); }
};
template <> struct LargestFinite<f16_t> {
  static __device__ __forceinline__ float value() { return 65504.f; }
};

// The screen of a row's bound b: a float s such that every float32 sum whose rounding to T is at or above b is at or
// above s, so that one comparison of the unrounded sum (!(z < s)) finds every lane that may hold a candidate; the
// exact rule then runs only there. Rounding to nearest moves a value by at most half a unit in the last place of T:
// below |b| 2^-8 (bfloat16, 8 significant bits) or |b| 2^-11 (half), and 2^-25 in half's subnormal range; s = b -
// |b| 2^-7 - 2^-24 leaves at least that twice over, more than the float subtraction's own rounding (a few units
// of float's last place) can take back. Under -ftz the comparison sees subnormals as zero on both sides, which keeps
// its order (flushing is monotone). b = +inf: s = T's largest finite value; b = -inf: s = -inf (everything passes);
// b NaN (the row takes no candidates): s = +inf (only +inf and NaN sums pass, and the exact rule drops them).
template <class T>
__device__ __forceinline__ float screen_bound(float b) {
  if (b != b) return __int_as_float(0x7f800000);
  if (b == __int_as_float(0x7f800000)) return LargestFinite<T>::value();
  if (b == -__int_as_float(0x7f800000)) return b;
  // b - |b| 2^-7 - 2^-24 in IEEE arithmetic (CuPy's -ftz=true would make plain float operations flush)
  const float minus_magnitude = __int_as_float(__float_as_int(b) | 0x80000000);
  float s;
  asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(s) : "f"(minus_magnitude), "f"(0.0078125f), "f"(b));
  return add_f32(s, -5.9604645e-8f);
}

// ONE_SITE: how the lanes that pass the screen append. false: a copy of the append (the rule, an atomic and two
// stores) per sum of the slice, unrolled: GP / 2 copies. true: the rule for every sum into a mask (bit 4 n + e),
// then one copy of the atomic and the stores in a loop over the mask's bits, the value picked by selects. The
// copies' code slows the main loop around it even in slices where no lane passes the screen, more so the more
// copies there are, while the loop costs every appending lane a few more instructions; which wins depends on the
// kernel and the group size, and the kernels below take the one measured faster for them
// (benchmarks/candidates.py; benchmarks/RESULTS.md).
template <class T, int GP, bool ONE_SITE>
struct EmitCandidates {
  const float* __restrict__ threshold;
  int* __restrict__ count;
  float* __restrict__ score;
  int* __restrict__ position;
  int cap, B, G, offset;
  // The exact rule: the rounded logit z of column j (of cols real ones) at or above the row's bound; a NaN bound
  // fails bound == bound (the row takes no candidates), a NaN z never compares below it.
  static __device__ __forceinline__ bool taken(float z, float bound, int j, int cols) {
    return bound == bound && j < cols && !(z < bound);
  }
  __device__ __forceinline__ void append(int row, float z, int label) const {
    const int slot = atomicAdd(count + row, 1);
    if (slot < cap) {
      score[(long long)row * cap + slot] = z;
      position[(long long)row * cap + slot] = label;
    }
  }
  __device__ __forceinline__ void operator()(const float (&acc)[GP / 8][4], const float (&bias_v)[GP / 8][2],
                                             unsigned char*, int row0, int g, int cols, int lane) {
    // This lane's two rows of the slice, lane / 4 and lane / 4 + 8; their bounds are read once per slice.
    float bound[2], screen[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + (lane >> 2) + h * 8;
      bound[h] = row < B ? threshold[row] : __int_as_float(0x7fffffff);
      screen[h] = screen_bound<T>(bound[h]);
    }
    if (bound[0] != bound[0] && bound[1] != bound[1]) return;  // both rows take no candidates
    // The screen: one comparison per sum, no rounding, no branch. Few lanes pass it (a bound lets about k of a
    // row's seen labels through), and only they take the exact rule.
    bool maybe = false;
#pragma unroll
    for (int n = 0; n < GP / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) maybe |= !(add_f32(acc[n][e], bias_v[n][e & 1]) < screen[e >> 1]);
    if (!maybe) return;
    if constexpr (ONE_SITE) {
      static_assert(GP / 8 * 4 <= 64, "the mask holds at most 64 sums");
      float z[GP / 8][4];
      unsigned long long listed = 0;
#pragma unroll
      for (int n = 0; n < GP / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1, j = n * 8 + 2 * (lane & 3) + (e & 1);
          z[n][e] = Ops<T>::to_float(Ops<T>::from_float(add_f32(acc[n][e], bias_v[n][e & 1])));
          if (taken(z[n][e], bound[h], j, cols)) listed |= 1ull << (n * 4 + e);
        }
      while (listed != 0) {
        const int i = __ffsll((long long)listed) - 1;
        listed &= listed - 1;
        float value = 0.f;
#pragma unroll
        for (int n = 0; n < GP / 8; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) value = n * 4 + e == i ? z[n][e] : value;
        const int n = i >> 2, e = i & 3;
        const int row = row0 + (lane >> 2) + (e >> 1) * 8, j = n * 8 + 2 * (lane & 3) + (e & 1);
        append(row, value, offset + g * G + j);
      }
    } else {
#pragma unroll
      for (int n = 0; n < GP / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int h = e >> 1, j = n * 8 + 2 * (lane & 3) + (e & 1);
          const float z = Ops<T>::to_float(Ops<T>::from_float(add_f32(acc[n][e], bias_v[n][e & 1])));
          // The copy per sum written out, not through taken() and append(): through them the wgmma kernel's loop
          // at groups of 32 compiled slower (measured; docs/kernel-notes.md, "One copy of the exact rule").
          // (a NaN bound fails bound == bound: the row takes no candidates)
          if (bound[h] != bound[h] || j >= cols || z < bound[h]) continue;
          const int row = row0 + (lane >> 2) + h * 8;
          const int slot = atomicAdd(count + row, 1);
          if (slot < cap) {
            score[(long long)row * cap + slot] = z;
            position[(long long)row * cap + slot] = offset + g * G + j;
          }
        }
    }
  }
};

// MINB: the CTAs per multiprocessor that the registers must leave room for (__launch_bounds__' second argument):
// kernels/topk.py asks for the ones the shared memory allows where the candidate epilogue would otherwise take
// more registers than they leave, and it does not spill.
template <class T, int G, int KP, bool RESIDENT, int MINB, int NW, int NSW>
__global__ void __launch_bounds__(NW * 32, MINB) gsfi_topk_candidates(
    const u16* __restrict__ XT, int ldxt, const u16* __restrict__ W, const int* __restrict__ idx,
    const u16* __restrict__ bias, const float* __restrict__ threshold, int* __restrict__ count,
    float* __restrict__ score, int* __restrict__ position, int cap, int offset, int B, int H, int L, int K,
    int num_groups) {
  // one append site from groups of 32 labels (16 sums a lane per slice) on
  EmitCandidates<T, gsfi_pad16(G), (gsfi_pad16(G) >= 32)> emit{threshold, count, score, position, cap, B, G, offset};
  forward_tiles<T, G, KP, RESIDENT, NW, NSW>(XT, ldxt, W, idx, bias, B, H, L, K, num_groups, emit);
}

// The same candidates from the Hopper forward's main loop (sm_90a only; an empty kernel elsewhere, never picked).
template <class T, int G, int KP, int MINB, int NWG, int NSW>
__global__ void __launch_bounds__(NWG * 128, MINB) gsfi_topk_candidates_sm90(
    const u16* __restrict__ XT, int ldxt, const u16* __restrict__ W, const int* __restrict__ idx,
    const u16* __restrict__ bias, const float* __restrict__ threshold, int* __restrict__ count,
    float* __restrict__ score, int* __restrict__ position, int cap, int offset, int B, int H, int L, int K,
    int num_groups) {
  // one append site from groups of 64 labels on (at 32 the copies measured faster here)
  EmitCandidates<T, G, (G >= 64)> emit{threshold, count, score, position, cap, B, G, offset};
  forward_tiles_sm90<T, G, KP, NWG, NSW>(XT, ldxt, W, idx, bias, B, H, L, K, num_groups, emit);
}

// A row of dense 16-bit logits (raw bits of T) being appended to its list: read in 16-byte vectors of eight logits
// from its first 16-byte boundary on (the row's start moves with ld), the `lead` columns before that boundary and
// the `rest` after the last whole vector one by one. A logit z is a candidate where !(z < bound); its slot comes
// from *listed (the row's count in global memory, or a CTA's shared count of a row it owns), one atomicAdd for all
// the candidates of a vector; slots at and beyond cap are not written.
template <class T>
struct DenseRow {
  const u16* row;
  int cols;
  float* row_score;
  int* row_position;
  int cap, offset;
  int lead, vectors, rest;
  __device__ __forceinline__ DenseRow(const u16* row_, int cols_, float* row_score_, int* row_position_, int cap_,
                                      int offset_)
      : row(row_), cols(cols_), row_score(row_score_), row_position(row_position_), cap(cap_), offset(offset_) {
    lead = min(cols, (int)(((16u - ((unsigned)(size_t)row & 15u)) & 15u) >> 1));
    vectors = (cols - lead) >> 3;
    rest = cols - lead - 8 * vectors;  // both below 8
  }

  __device__ __forceinline__ const uint4* body() const { return reinterpret_cast<const uint4*>(row + lead); }

  // The columns before the first boundary and after the last whole vector, a thread each (threads below lead + rest).
  __device__ __forceinline__ void append_edges(float bound, int* listed) const {
    if (threadIdx.x >= lead + rest) return;
    const int j = threadIdx.x < lead ? threadIdx.x : lead + 8 * vectors + (threadIdx.x - lead);
    const float z = Ops<T>::to_float(row[j]);
    if (z < bound) return;
    const int slot = atomicAdd(listed, 1);
    if (slot < cap) {
      row_score[slot] = z;
      row_position[slot] = offset + j;
    }
  }

  // The candidates of vector v, whose 16 bytes are q.
  __device__ __forceinline__ void append_vector(const uint4& q, int v, float bound, int* listed) const {
    const unsigned words[4] = {q.x, q.y, q.z, q.w};
    float z[8];
    unsigned hits = 0u;
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      z[u] = Ops<T>::to_float((u16)(words[u >> 1] >> (16 * (u & 1))));
      if (!(z[u] < bound)) hits |= 1u << u;
    }
    if (!hits) return;
    int slot = atomicAdd(listed, __popc(hits));
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      if (!((hits >> u) & 1u)) continue;
      if (slot < cap) {
        row_score[slot] = z[u];
        row_position[slot] = offset + lead + 8 * v + u;
      }
      ++slot;
    }
  }
};

// The candidates of a chunk of dense logits [B][ld] (cols columns, rounded values of the input dtype T) at
// position offset + column: the same rule and lists as gsfi_topk_candidates. A row is read in 16-byte vectors of
// eight logits from its first 16-byte boundary on (the row's start moves with ld): CTA (blockIdx.x, blockIdx.y =
// row) takes vectors blockIdx.x * 256 + threadIdx.x, stepping by gridDim.x * 256 (coalesced), and CTA 0 of the row
// also the few columns before the first boundary and after the last whole vector (DenseRow).
template <class T>
__global__ void __launch_bounds__(256) gsfi_topk_dense_candidates(
    const u16* __restrict__ logits, long long ld, int cols, const float* __restrict__ threshold,
    int* __restrict__ count, float* __restrict__ score, int* __restrict__ position, int cap, int offset) {
  const int b = blockIdx.y;
  const float bound = threshold[b];
  if (bound != bound) return;
  const u16* row = logits + (long long)b * ld;
  const DenseRow<T> span{row, cols, score + (long long)b * cap, position + (long long)b * cap, cap, offset};
  if (blockIdx.x == 0) span.append_edges(bound, count + b);
  const uint4* body = span.body();
  for (int v = blockIdx.x * 256 + threadIdx.x; v < span.vectors; v += gridDim.x * 256)
    span.append_vector(body[v], v, bound, count + b);
}

// Sorts v[0, size) of shared memory in descending order (size a power of two; bitonic: log2(size) * (log2(size) +
// 1) / 2 passes of size / 2 compare-exchanges). Every thread of the CTA calls it; it ends with a barrier.
template <class V>
__device__ __forceinline__ void sort_descending(V* v, int size) {
  for (int span = 2; span <= size; span <<= 1) {
    for (int stride = span >> 1; stride > 0; stride >>= 1) {
      for (int i = threadIdx.x; i < size / 2; i += blockDim.x) {
        const int lo = 2 * i - (i & (stride - 1)), hi = lo + stride;
        const bool descending = (lo & span) == 0;
        const V a = v[lo], c = v[hi];
        if ((a < c) == descending) {
          v[lo] = c;
          v[hi] = a;
        }
      }
      __syncthreads();
    }
  }
}

// A float's bits as an unsigned integer of the same order (larger floats, larger keys; -0.0 just below +0.0), and
// back. The keys of the values below are never NaN (callers count a NaN as +inf).
__device__ __forceinline__ unsigned float_order(float v) {
  const unsigned bits = __float_as_uint(v);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float order_float(unsigned key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// A value's key for block maxima: float_order, with NaN as +inf (a NaN ranks above every number, so +inf is still a
// bound).
__device__ __forceinline__ unsigned max_key(float v) {
  return float_order(v != v ? __int_as_float(0x7f800000) : v);
}

// keys[j] for j < m: the key (max_key) of the largest of value(c) over the strided block c = j, j + m, ... < n, each
// an actual value of a distinct entry. Thread t takes blocks t, t + blockDim.x, ...; a block's entries are read in
// batches of eight with no dependence between their loads (taken entry by entry, each load would wait for the one
// before: a row's few thousand entries would cost tens of memory latencies). Every thread of the CTA calls it; it
// ends with a barrier.
template <class Value>
__device__ __forceinline__ void block_maxima(Value value, int n, int m, unsigned* keys) {
  constexpr int BATCH = 8;
  for (int j = threadIdx.x; j < m; j += blockDim.x) {
    unsigned best = float_order(-__int_as_float(0x7f800000));
    for (int c0 = j; c0 < n; c0 += BATCH * m) {
      float v[BATCH];
#pragma unroll
      for (int u = 0; u < BATCH; ++u) {
        const int c = c0 + u * m;
        v[u] = c < n ? value(c) : -__int_as_float(0x7f800000);
      }
#pragma unroll
      for (int u = 0; u < BATCH; ++u) best = max(best, max_key(v[u]));
    }
    keys[j] = best;
  }
  __syncthreads();
}

// The k-th largest of the values whose keys (float_order) are keys[0, n) in shared memory (1 <= k <= n), found by
// radix selection: four passes over 8-bit digits from the top, each a histogram of the keys that share the digits
// chosen so far and a scan of its 256 bins for the one holding the k-th largest; exact, as a sort would give it,
// but 4 passes of n / 256 reads per thread instead of a bitonic sort's log2(n) (log2(n) + 1) / 2 passes. Every
// thread of the CTA (blockDim.x == 256) calls it and gets the value; keys is read only. Ends with a barrier.
__device__ __forceinline__ float kth_largest(const unsigned* keys, int n, int k) {
  __shared__ unsigned histogram[256];
  __shared__ unsigned warp_total[8];
  __shared__ unsigned chosen;
  __shared__ int still;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned prefix = 0, mask = 0;  // the digits chosen so far, and their bits
  int remaining = k;              // the rank of the k-th largest among the values that match prefix
  for (int shift = 24; shift >= 0; shift -= 8) {
    histogram[threadIdx.x] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < n; i += 256) {
      const unsigned key = keys[i];
      if ((key & mask) == prefix) atomicAdd(&histogram[(key >> shift) & 255u], 1u);
    }
    __syncthreads();
    // thread t takes digit 255 - t: its inclusive scan is the count of matching values with a digit >= its own
    const unsigned own = histogram[255 - threadIdx.x];
    unsigned above = own;
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const unsigned other = __shfl_up_sync(0xffffffffu, above, d);
      if (lane >= d) above += other;
    }
    if (lane == 31) warp_total[warp] = above;
    __syncthreads();
    for (int w = 0; w < warp; ++w) above += warp_total[w];
    // the one digit whose values reach rank `remaining`: fewer than that above it, at least that with it
    if (above >= (unsigned)remaining && above - own < (unsigned)remaining) {
      chosen = prefix | ((255u - threadIdx.x) << shift);
      still = remaining - (int)(above - own);
    }
    __syncthreads();
    prefix = chosen;
    remaining = still;
    mask |= 255u << shift;
    __syncthreads();  // chosen and still are read before the next pass writes them
  }
  return order_float(prefix);
}

// The whole first-round work on one chunk of the head's dense logits [B][ld] (cols columns, rounded values of T,
// at positions offset + column), for chunks short enough that one CTA per row reads them (256 threads; the
// caller decides): what gsfi_topk_bound (first), gsfi_topk_dense_candidates and gsfi_topk_bound (from the list)
// do in three launches, in one. With `sample` >= 0, the call's first bound (every row): the bound is the k-th best
// of the maxima of min(sample, blocks) strided blocks of the row's first `sample` columns (-inf where sample < k),
// the row's list starts empty and *reset_flag (where not null) is zeroed; with sample < 0 the row's bound is
// threshold[b] (NaN: the row is skipped) and its list goes on from count[b]. Every logit z with !(z < bound) is then
// appended to the row's list by DenseRow, as gsfi_topk_dense_candidates appends it (the slots from a shared-memory
// count: the CTA owns the row's list). With `raise_bound` != 0, the bound then
// rises to the k-th best of the maxima of min(n, list_blocks) strided blocks of the list's n = min(count, cap)
// scores where n >= k, as gsfi_topk_bound raises it from a list (the list holds every score seen at or above the
// old bound, so its k-th best is that of all of them). threshold[b] and count[b] are written at the end. Dynamic
// shared memory: 4 bytes for each of max(blocks, list_blocks) maxima.
template <class T>
__global__ void __launch_bounds__(256) gsfi_topk_chunk(
    const u16* __restrict__ logits, long long ld, int cols, int sample, int blocks, int k, int list_blocks,
    int raise_bound, float* __restrict__ threshold, int* __restrict__ count, float* __restrict__ score,
    int* __restrict__ position, int cap, int offset, bool* __restrict__ reset_flag) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned* maxima = reinterpret_cast<unsigned*>(smem);
  __shared__ int listed;
  const int b = blockIdx.x;
  const bool reset = sample >= 0;
  if (reset && reset_flag != nullptr && b == 0 && threadIdx.x == 0) *reset_flag = false;
  const u16* row = logits + (long long)b * ld;
  float bound;
  if (reset) {
    bound = -__int_as_float(0x7f800000);
    if (sample >= k) {
      const int m = min(sample, blocks);
      block_maxima([row](int c) { return Ops<T>::to_float(row[c]); }, sample, m, maxima);
      bound = kth_largest(maxima, m, k);
    }
  } else {
    bound = threshold[b];
    if (bound != bound) return;
  }
  if (threadIdx.x == 0) listed = reset ? 0 : count[b];
  __syncthreads();
  const DenseRow<T> span{row, cols, score + (long long)b * cap, position + (long long)b * cap, cap, offset};
  span.append_edges(bound, &listed);
  // Four vectors a thread at a time, loaded before any is looked at: independent loads in flight (a row of tens
  // of thousands of columns would otherwise cost a memory latency per 256 vectors).
  constexpr int BATCH = 4;
  const uint4* body = span.body();
  for (int v0 = threadIdx.x; v0 < span.vectors; v0 += BATCH * 256) {
    uint4 q[BATCH];
#pragma unroll
    for (int u = 0; u < BATCH; ++u)
      q[u] = v0 + u * 256 < span.vectors ? body[v0 + u * 256] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int u = 0; u < BATCH; ++u)
      if (v0 + u * 256 < span.vectors) span.append_vector(q[u], v0 + u * 256, bound, &listed);
  }
  __syncthreads();  // the list's scores, written by this CTA's threads, are visible to all of them
  const int total = listed;
  if (raise_bound) {
    const int n = min(total, cap);
    if (n >= k) {
      const int m = min(n, list_blocks);
      const float* row_score = span.row_score;
      block_maxima([row_score](int c) { return row_score[c]; }, n, m, maxima);
      const float raised = kth_largest(maxima, m, k);
      if (raised > bound) bound = raised;
    }
  }
  if (threadIdx.x == 0) {
    count[b] = total;
    threshold[b] = bound;
  }
}

// The ranking key of a score and a label id, as lightning_haste.ranking.rank_keys makes it: the float32 bits mapped
// to an integer of the same order (negative numbers' magnitude bits flipped; -0.0 as 0.0, every NaN as the
// canonical NaN, which ranks above +inf) in the high 32 bits, 2^32 - 1 - id in the low ones.
__device__ __forceinline__ long long rank_key(float s, long long id) {
  unsigned bits = __float_as_uint(s);
  if (s != s) bits = 0x7fc00000u;
  if (bits == 0x80000000u) bits = 0u;
  const int order = (int)bits < 0 ? (int)(bits ^ 0x7fffffffu) : (int)bits;
  return (long long)order * 4294967296LL + (4294967295LL - id);
}

__device__ __forceinline__ float key_score(long long key) {
  const int order = (int)(key >> 32);  // floor: the low 32 bits are the id part
  const unsigned bits = order < 0 ? ((unsigned)order ^ 0x7fffffffu) : (unsigned)order;
  return __uint_as_float(bits);
}

// The ranked top-k of each row's list: CTA b reads the row's first n = min(count[b], cap, width) slots. A long
// list (n > 2 m, m = the power of two at or above 4 k, at most 512, when m >= 2 k) is first cut down: the k-th best t
// (kth_largest) of the maxima of m strided blocks of its scores is a lower bound of its k-th best (each maximum is a
// score of a distinct slot; NaN counts as +inf), so every slot of the top-k has a score s with !(s < t) (ties, NaN
// and -0.0 against 0.0 included); only those slots are kept (about 2-3 k of them). The kept slots become ranking
// keys (the label id through label_permutation), sorted in shared memory (sort_descending, over the next power of
// two at or above max(kept, k); empty slots hold the lowest key), and the best k are written: out_score [B][k] in
// the input dtype (the scores are values of it), out_id [B][k]. The order in which slots are kept does not matter:
// the keys are distinct (one per label) and sorted. Rows whose threshold is NaN took no candidates in this round
// and are left as they are. With `unresolved` (else null), every row also writes unresolved[b] = count[b] > cap
// (its list overflowed: the merge saw only part of it), and a row that overflowed sets *any_unresolved to 1 (the
// caller zeroed it; a flag the GPU hands to a conditional node, with no reduction launched for it). Dynamic shared
// memory: 8 bytes a key for the next power of two at or above max(width, k) (the m maxima' keys, 4 bytes each, use
// the same space first: a list is cut only when n > 2 m, and n <= width).
template <class T>
__global__ void __launch_bounds__(256) gsfi_topk_merge(
    const int* __restrict__ count, const float* __restrict__ score, const int* __restrict__ position, int cap,
    int width, const long long* __restrict__ label_permutation, const float* __restrict__ threshold, int k,
    u16* __restrict__ out_score, long long* __restrict__ out_id, bool* __restrict__ unresolved,
    bool* __restrict__ any_unresolved) {
  extern __shared__ __align__(16) unsigned char smem[];
  long long* keys = reinterpret_cast<long long*>(smem);
  __shared__ int kept;
  __shared__ float cut;
  const int b = blockIdx.x;
  const int listed = count[b];
  if (unresolved != nullptr && threadIdx.x == 0) {
    unresolved[b] = listed > cap;
    if (listed > cap) *any_unresolved = true;
  }
  const float bound = threshold[b];
  if (bound != bound) return;
  const int n = min(min(listed, cap), width);
  const float* row = score + (long long)b * cap;
  int m = 32;
  while (m < 4 * k && m < 512) m <<= 1;
  if (threadIdx.x == 0) {
    kept = 0;
    cut = -__int_as_float(0x7f800000);
  }
  if (n > 2 * m && m >= 2 * k) {
    unsigned* maxima = reinterpret_cast<unsigned*>(smem);
    block_maxima([row](int c) { return row[c]; }, n, m, maxima);
    const float t = kth_largest(maxima, m, k);
    if (threadIdx.x == 0) cut = t;
  }
  __syncthreads();
  const float t = cut;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float s = row[i];
    if (s < t) continue;
    const int slot = atomicAdd(&kept, 1);
    keys[slot] = rank_key(s, label_permutation[position[(long long)b * cap + i]]);
  }
  __syncthreads();
  const int n_kept = kept;
  int size = 1;
  while (size < max(n_kept, k)) size <<= 1;
  const long long empty = (long long)(-2147483647 - 1) * 4294967296LL;
  for (int i = n_kept + threadIdx.x; i < size; i += blockDim.x) keys[i] = empty;
  __syncthreads();
  sort_descending(keys, size);
  for (int i = threadIdx.x; i < k; i += blockDim.x) {
    const long long key = keys[i];
    out_score[(long long)b * k + i] = Ops<T>::from_float(key_score(key));
    out_id[(long long)b * k + i] = 4294967295LL - (key & 0xffffffffLL);
  }
}

// A value of a row to bound: 16-bit logits (raw bits of T) or float32 list scores.
template <class T, class V> struct BoundValue;
template <class T> struct BoundValue<T, u16> {
  static __device__ __forceinline__ float get(u16 v) { return Ops<T>::to_float(v); }
};
template <class T> struct BoundValue<T, float> {
  static __device__ __forceinline__ float get(float v) { return v; }
};

// A lower bound of each row's k-th best score from `values` [B][ld] (the row's first n = cols, or min(count[b],
// cols) with a count, entries): the n entries fall into m = min(n, blocks) strided blocks (entry c into block
// c % m), each block's maximum is an actual score of a distinct entry, and the k-th best of the m maxima is the
// bound (kth_largest, in shared memory; NaN counts as +inf, which still bounds: a NaN ranks above every number).
// threshold[b] becomes the larger of itself and the bound (a row with n < k keeps its own); rows whose threshold is
// NaN are skipped. With `reset_count` (else null), the call's first bound, before any candidate: threshold[b] is
// not read but set (to the bound, or -inf where n < k), reset_count[b] (the lists' counts) and *reset_flag (where
// not null) are zeroed: the launches that would fill them otherwise. One CTA of 256 threads per row; dynamic shared
// memory: 4 bytes for each of `blocks` maxima.
template <class T, class V>
__global__ void __launch_bounds__(256) gsfi_topk_bound(const V* __restrict__ values, long long ld, int cols,
                                                      const int* __restrict__ count, int blocks, int k,
                                                      float* __restrict__ threshold, int* __restrict__ reset_count,
                                                      bool* __restrict__ reset_flag) {
  extern __shared__ __align__(16) unsigned char smem[];
  unsigned* maxima = reinterpret_cast<unsigned*>(smem);
  const int b = blockIdx.x;
  const bool reset = reset_count != nullptr;
  if (reset && threadIdx.x == 0) {
    reset_count[b] = 0;
    if (reset_flag != nullptr && b == 0) *reset_flag = false;
  }
  const float current = reset ? -__int_as_float(0x7f800000) : threshold[b];
  if (current != current) return;
  const int n = count != nullptr ? min(count[b], cols) : cols;
  if (n < k) {
    if (reset && threadIdx.x == 0) threshold[b] = current;
    return;
  }
  const int m = min(n, blocks);
  const V* row = values + (long long)b * ld;
  block_maxima([row](int c) { return BoundValue<T, V>::get(row[c]); }, n, m, maxima);
  const float bound = kth_largest(maxima, m, k);
  // (Under CuPy's -ftz=true the comparisons here see subnormals as zero, so the bound may be off by a value of
  // that class: the candidate kernels compare in the same way, so every score at or above the true bound passes.)
  if (threadIdx.x == 0 && (reset || bound > current)) threshold[b] = bound > current ? bound : current;
}
