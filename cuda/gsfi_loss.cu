// Fused loss of the group-shared fixed fan-in tail: the loss of the logits and the logits' gradient straight
// from the forward's tensor-core tiles, without storing the logits Z.
//
// The per-label loss splits into a dense part that depends on z alone (every label scored as if it were a
// negative) and a correction at the positives, which the caller adds on the side (O(positives * K) work):
//   LOSS 0, binary cross-entropy with logits: softplus(z) = log(1 + e^z); a positive adds -z.
//   LOSS 1, squared hinge:                    relu(1 + z)^2;            a positive adds relu(1 - z)^2 - relu(1 + z)^2.
// So these kernels need no lookup of targets:
//   gsfi_loss_sum  adds the dense part over the valid [B x L] entries into one float32 partial sum per warp
//                  (partial[(blockIdx.y * gridDim.x + blockIdx.x) * NW + warp], every slot written, no
//                  atomics: the caller sums the slots in a fixed order, so the result is deterministic);
//   gsfi_loss_grad writes dZ = scale * d(dense part)/dz in the input dtype, rounded once, where scale (a
//                  float32 on the device: the incoming gradient over the batch, so no host round trip) is read
//                  once; the caller overwrites the positives' entries with their full gradient. With a partial
//                  buffer (not null) it also sums the dense part as gsfi_loss_sum does, so that a training step
//                  gets the loss and its gradient from one pass over the weights.
// The main loop is forward_tiles (cuda/gsfi_forward_tiles.cuh), shared with gsfi_forward.
#include "gsfi_forward_tiles.cuh"

template <int LOSS> __device__ __forceinline__ float dense_loss(float z);
template <int LOSS> __device__ __forceinline__ float dense_loss_grad(float z);

// softplus(z) = max(z, 0) + log1p(e^-|z|): no overflow for large |z|, and log1p keeps the small terms.
template <> __device__ __forceinline__ float dense_loss<0>(float z) { return fmaxf(z, 0.f) + log1pf(expf(-fabsf(z))); }
// sigmoid(z); e^-z overflows to inf for z < -88 and the quotient is then 0, the correct limit.
template <> __device__ __forceinline__ float dense_loss_grad<0>(float z) { return 1.f / (1.f + expf(-z)); }
template <> __device__ __forceinline__ float dense_loss<1>(float z) {
  const float h = fmaxf(1.f + z, 0.f);
  return h * h;
}
template <> __device__ __forceinline__ float dense_loss_grad<1>(float z) { return 2.f * fmaxf(1.f + z, 0.f); }

// Sums the dense loss of the slice's valid entries (rows below B, labels below `cols`) into this lane's total.
template <int LOSS, int GP>
struct SumDenseLoss {
  int B;
  float total;
  __device__ __forceinline__ void operator()(const float (&acc)[GP / 8][4], const float (&bias_v)[GP / 8][2],
                                             unsigned char*, int row0, int, int cols, int lane) {
    float slice = 0.f;  // the slice's terms first, then one addition to the running total
#pragma unroll
    for (int n = 0; n < GP / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = row0 + (lane >> 2) + (e >> 1) * 8, j = n * 8 + 2 * (lane & 3) + (e & 1);
        if (row < B && j < cols) slice += dense_loss<LOSS>(add_f32(acc[n][e], bias_v[n][e & 1]));
      }
    total += slice;
  }
};

// Writes the slice's dZ = scale * dense_loss_grad(z) through the warp's shared tile (store_output_slice), and
// with `with_sum` adds the slice's dense loss into this lane's total (as SumDenseLoss).
template <class T, int LOSS, int GP, bool ALIGNED_Z>
struct StoreDenseLossGrad {
  u16* __restrict__ dZ;
  long long ldz;
  int B, G;
  float scale;
  bool with_sum;
  float total;
  __device__ __forceinline__ void operator()(const float (&acc)[GP / 8][4], const float (&bias_v)[GP / 8][2],
                                             unsigned char* o_s, int row0, int g, int cols, int lane) {
    float grad[GP / 8][4];
    float none[GP / 8][2];
    float slice = 0.f;
#pragma unroll
    for (int n = 0; n < GP / 8; ++n) {
      none[n][0] = none[n][1] = 0.f;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float z = add_f32(acc[n][e], bias_v[n][e & 1]);
        grad[n][e] = scale * dense_loss_grad<LOSS>(z);
        if (with_sum) {
          const int row = row0 + (lane >> 2) + (e >> 1) * 8, j = n * 8 + 2 * (lane & 3) + (e & 1);
          if (row < B && j < cols) slice += dense_loss<LOSS>(z);
        }
      }
    }
    total += slice;
    store_output_slice<T, GP / 8, ALIGNED_Z>(grad, none, o_s, dZ, ldz, row0, B, (long long)g * G, cols, lane);
  }
};

// The warp's sum of its lanes' totals into its slot of `partial` (every slot written, so no memset is needed).
__device__ __forceinline__ void store_warp_total(float total, float* __restrict__ partial, int NW) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if ((threadIdx.x & 31) == 0) partial[(blockIdx.y * gridDim.x + blockIdx.x) * NW + (threadIdx.x >> 5)] = total;
}

template <class T, int G, int KP, bool RESIDENT, int NW, int NSW, int LOSS>
__global__ void __launch_bounds__(NW * 32) gsfi_loss_sum(const u16* __restrict__ XT, int ldxt,
                                                         const u16* __restrict__ W, const int* __restrict__ idx,
                                                         const u16* __restrict__ bias, float* __restrict__ partial,
                                                         int B, int H, int L, int K, int num_groups) {
  SumDenseLoss<LOSS, gsfi_pad16(G)> sum{B, 0.f};
  forward_tiles<T, G, KP, RESIDENT, NW, NSW>(XT, ldxt, W, idx, bias, B, H, L, K, num_groups, sum);
  store_warp_total(sum.total, partial, NW);
}

template <class T, int G, int KP, bool RESIDENT, bool ALIGNED_Z, int NW, int NSW, int LOSS>
__global__ void __launch_bounds__(NW * 32) gsfi_loss_grad(const u16* __restrict__ XT, int ldxt,
                                                          const u16* __restrict__ W, const int* __restrict__ idx,
                                                          const u16* __restrict__ bias, const float* __restrict__ scale,
                                                          float* __restrict__ partial, u16* __restrict__ dZ,
                                                          long long ldz, int B, int H, int L, int K, int num_groups) {
  StoreDenseLossGrad<T, LOSS, gsfi_pad16(G), ALIGNED_Z> store{dZ, ldz, B, G, *scale, partial != nullptr, 0.f};
  forward_tiles<T, G, KP, RESIDENT, NW, NSW>(XT, ldxt, W, idx, bias, B, H, L, K, num_groups, store);
  if (partial != nullptr) store_warp_total(store.total, partial, NW);
}
