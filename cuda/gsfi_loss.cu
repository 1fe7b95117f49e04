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

// The per-label functions of the dense part, evaluated once per logit in the epilogues: for binary
// cross-entropy both the loss and its derivative come from e = exp(-|z|), one MUFU exponential and one MUFU
// reciprocal per logit, the logarithm as a polynomial (no MUFU):
//   softplus(z) = max(z, 0) + log1p(e),   sigmoid(z) = 1 / (1 + e) for z >= 0, e / (1 + e) for z < 0.
// log1p(e) = e * Q(e) on [0, 1], Q of degree 8 fitted at Chebyshev nodes: absolute error below 2e-7 (float32
// rounding of a value near 1), relative error below 3e-7, so far from 0 the terms of a loss sum keep their
// precision. __expf and __fdividef are within a few ulp: far below the 16-bit rounding of dZ.
__device__ __forceinline__ float log1p_unit(float e) {
  float q = 0.005186003632843494f;
  q = fmaf(q, e, -0.029210267588496208f);
  q = fmaf(q, e, 0.07754038274288177f);
  q = fmaf(q, e, -0.13583941757678986f);
  q = fmaf(q, e, 0.19055955111980438f);
  q = fmaf(q, e, -0.24825648963451385f);
  q = fmaf(q, e, 0.3331601023674011f);
  q = fmaf(q, e, -0.4999925494194031f);
  q = fmaf(q, e, 0.9999999403953552f);
  return e * q;
}

template <int LOSS> struct DenseLoss;

template <> struct DenseLoss<0> {  // binary cross-entropy with logits: softplus(z), derivative sigmoid(z)
  static __device__ __forceinline__ float loss(float z) {
    return fmaxf(z, 0.f) + log1p_unit(__expf(-fabsf(z)));
  }
  static __device__ __forceinline__ float grad(float z) {
    const float e = __expf(-fabsf(z)), r = __fdividef(1.f, 1.f + e);
    return z >= 0.f ? r : e * r;
  }
  static __device__ __forceinline__ float grad_and_loss(float z, float& loss) {
    const float e = __expf(-fabsf(z)), r = __fdividef(1.f, 1.f + e);
    loss += fmaxf(z, 0.f) + log1p_unit(e);
    return z >= 0.f ? r : e * r;
  }
};

template <> struct DenseLoss<1> {  // squared hinge of a negative: relu(1 + z)^2, derivative 2 relu(1 + z)
  static __device__ __forceinline__ float loss(float z) {
    const float h = fmaxf(1.f + z, 0.f);
    return h * h;
  }
  static __device__ __forceinline__ float grad(float z) { return 2.f * fmaxf(1.f + z, 0.f); }
  static __device__ __forceinline__ float grad_and_loss(float z, float& loss) {
    const float h = fmaxf(1.f + z, 0.f);
    loss += h * h;
    return 2.f * h;
  }
};

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
        if (row < B && j < cols) slice += DenseLoss<LOSS>::loss(add_f32(acc[n][e], bias_v[n][e & 1]));
      }
    total += slice;
  }
};

// Writes the slice's dZ = scale * DenseLoss::grad(z) through the warp's shared tile (store_output_slice), and
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
        const int row = row0 + (lane >> 2) + (e >> 1) * 8, j = n * 8 + 2 * (lane & 3) + (e & 1);
        if (j >= cols) {
          // A padding label: its dZ is 0. The 16-byte stores of aligned rows write the labels from L up to the
          // next multiple of 8, and the gradient kernels read those as dZ: they must hold zeros, not the
          // gradient of a padding label's logit.
          grad[n][e] = 0.f;
        } else if (with_sum && row < B) {
          grad[n][e] = scale * DenseLoss<LOSS>::grad_and_loss(z, slice);
        } else {
          grad[n][e] = scale * DenseLoss<LOSS>::grad(z);
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

// A logit as float32: float32 logits as they are, 16-bit ones (raw bits of the input dtype T) widened.
template <class ZT> struct LogitValue;
template <> struct LogitValue<float> {
  static __device__ __forceinline__ float get(float v) { return v; }
};
template <> struct LogitValue<bf16_t> {
  static __device__ __forceinline__ float get(bf16_t v) { return Ops<bf16_t>::to_float(v.bits); }
};
template <> struct LogitValue<f16_t> {
  static __device__ __forceinline__ float get(f16_t v) { return Ops<f16_t>::to_float(v.bits); }
};

// The dense head's chunk of logits (computed by cuBLAS, float32 or the input dtype, rows of ldz_in elements):
// z = logits + bias, then, like the tail's epilogues, the dense loss into one partial sum per CTA (partial
// not null; partial[blockIdx.y * gridDim.x + blockIdx.x], every slot written) and dZ = scale * its derivative
// in the input dtype (dZ not null). One pass over the chunk instead of a chain of elementwise operations.
// CTA (blockIdx.x, blockIdx.y = row b) takes the row's columns blockIdx.x * 256 + threadIdx.x, stepping by
// gridDim.x * 256.
template <class T, class ZT, int LOSS>
__global__ void __launch_bounds__(256) gsfi_loss_dense(const ZT* __restrict__ logits, long long ldz_in,
                                                      const u16* __restrict__ bias, const float* __restrict__ scale,
                                                      float* __restrict__ partial, u16* __restrict__ dZ,
                                                      long long ldz, int cols) {
  __shared__ float warp_totals[8];
  const int b = blockIdx.y;
  const float s = dZ != nullptr ? *scale : 0.f;
  float total = 0.f;
  for (int j = blockIdx.x * 256 + threadIdx.x; j < cols; j += gridDim.x * 256) {
    float z = LogitValue<ZT>::get(logits[(long long)b * ldz_in + j]);
    if (bias != nullptr) z = add_f32(z, Ops<T>::to_float(bias[j]));
    if (dZ != nullptr) {
      const float d = partial != nullptr ? DenseLoss<LOSS>::grad_and_loss(z, total) : DenseLoss<LOSS>::grad(z);
      dZ[(long long)b * ldz + j] = Ops<T>::from_float(s * d);
    } else {
      total += DenseLoss<LOSS>::loss(z);
    }
  }
  if (partial == nullptr) return;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
  if ((threadIdx.x & 31) == 0) warp_totals[threadIdx.x >> 5] = total;
  __syncthreads();
  if (threadIdx.x == 0) {
    float sum = 0.f;
#pragma unroll
    for (int w = 0; w < 8; ++w) sum += warp_totals[w];
    partial[blockIdx.y * gridDim.x + blockIdx.x] = sum;
  }
}

// float32 product without flushing subnormals (CuPy's -ftz would make a C++ '*' flush).
__device__ __forceinline__ float mul_f32(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}

// data[i] *= *scale for n 16-bit values (16-byte aligned), in float32 and rounded once: the backward of a step
// that computed its gradients with the loss scales them by the incoming gradient. Eight values per 16-byte
// access, a grid-stride loop; the last n % 8 values by the first threads.
template <class T>
__global__ void __launch_bounds__(256) gsfi_scale(u16* __restrict__ data, long long n, const float* __restrict__ scale) {
  const float s = *scale;
  const long long pieces = n / 8, stride = (long long)gridDim.x * 256;
  const long long first = (long long)blockIdx.x * 256 + threadIdx.x;
  for (long long i = first; i < pieces; i += stride) {
    uint4 v = reinterpret_cast<const uint4*>(data)[i];
    unsigned* w = reinterpret_cast<unsigned*>(&v);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float lo = mul_f32(Ops<T>::to_float((u16)(w[k] & 0xffffu)), s);
      const float hi = mul_f32(Ops<T>::to_float((u16)(w[k] >> 16)), s);
      w[k] = Ops<T>::pack(lo, hi);
    }
    reinterpret_cast<uint4*>(data)[i] = v;
  }
  if (first < n - pieces * 8) {
    const long long i = pieces * 8 + first;
    data[i] = Ops<T>::from_float(mul_f32(Ops<T>::to_float(data[i]), s));
  }
}
