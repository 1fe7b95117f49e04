// Top-k candidates of the group-shared fixed fan-in tail, straight from the forward's tensor-core tiles: no
// logits tensor is stored.
//
// The caller knows, per batch row b, a lower bound threshold[b] of the row's k-th best score (the k-th best of
// any k scores of the row is one: the head's, a sample of the tail's). Every tail logit z with z >= threshold[b]
// is a candidate: its value and its position (offset + g * G + j) are appended to the row's list,
//   slot = atomicAdd(&count[b], 1);  if slot < cap: score[b * cap + slot] = z, position[b * cap + slot] = offset + g*G + j.
// gsfi_topk_dense_candidates does the same for a chunk of dense logits (the head's, which cuBLAS computes), into
// the same lists. The row's top-k is then the top-k of its list (a small merge on the caller's side). count[b] may end above cap: the list overflowed, and the caller retries the row with a
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
//
// The main loop is forward_tiles (cuda/gsfi_forward_tiles.cuh), shared with gsfi_forward and the fused loss.
#include "gsfi_forward_tiles.cuh"

template <class T, int GP>
struct EmitCandidates {
  const float* __restrict__ threshold;
  int* __restrict__ count;
  float* __restrict__ score;
  int* __restrict__ position;
  int cap, B, G, offset;
  __device__ __forceinline__ void operator()(const float (&acc)[GP / 8][4], const float (&bias_v)[GP / 8][2],
                                             unsigned char*, int row0, int g, int cols, int lane) {
    // This lane's two rows of the slice, lane / 4 and lane / 4 + 8; their bounds are read once per slice.
    float bound[2];
    bool active[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + (lane >> 2) + h * 8;
      bound[h] = row < B ? threshold[row] : 0.f;
      active[h] = row < B && bound[h] == bound[h];
    }
    if (!active[0] && !active[1]) return;
#pragma unroll
    for (int n = 0; n < GP / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int h = e >> 1, j = n * 8 + 2 * (lane & 3) + (e & 1);
        const float z = Ops<T>::to_float(Ops<T>::from_float(add_f32(acc[n][e], bias_v[n][e & 1])));
        if (!active[h] || j >= cols || z < bound[h]) continue;
        const int row = row0 + (lane >> 2) + h * 8;
        const int slot = atomicAdd(count + row, 1);
        if (slot < cap) {
          score[(long long)row * cap + slot] = z;
          position[(long long)row * cap + slot] = offset + g * G + j;
        }
      }
  }
};

template <class T, int G, int KP, bool RESIDENT, int NW, int NSW>
__global__ void __launch_bounds__(NW * 32) gsfi_topk_candidates(
    const u16* __restrict__ XT, int ldxt, const u16* __restrict__ W, const int* __restrict__ idx,
    const u16* __restrict__ bias, const float* __restrict__ threshold, int* __restrict__ count,
    float* __restrict__ score, int* __restrict__ position, int cap, int offset, int B, int H, int L, int K,
    int num_groups) {
  EmitCandidates<T, gsfi_pad16(G)> emit{threshold, count, score, position, cap, B, G, offset};
  forward_tiles<T, G, KP, RESIDENT, NW, NSW>(XT, ldxt, W, idx, bias, B, H, L, K, num_groups, emit);
}

// The candidates of a chunk of dense logits [B][ld] (cols columns, rounded values of the input dtype T) at
// position offset + column: the same rule and lists as gsfi_topk_candidates. CTA (blockIdx.x, blockIdx.y = row)
// reads the row's columns blockIdx.x * 256 + threadIdx.x, stepping by gridDim.x * 256 (coalesced).
template <class T>
__global__ void __launch_bounds__(256) gsfi_topk_dense_candidates(
    const u16* __restrict__ logits, long long ld, int cols, const float* __restrict__ threshold,
    int* __restrict__ count, float* __restrict__ score, int* __restrict__ position, int cap, int offset) {
  const int b = blockIdx.y;
  const float bound = threshold[b];
  if (bound != bound) return;
  for (int j = blockIdx.x * 256 + threadIdx.x; j < cols; j += gridDim.x * 256) {
    const float z = Ops<T>::to_float(logits[(long long)b * ld + j]);
    if (z < bound) continue;
    const int slot = atomicAdd(count + b, 1);
    if (slot < cap) {
      score[(long long)b * cap + slot] = z;
      position[(long long)b * cap + slot] = offset + j;
    }
  }
}
