// Forward of the group-shared fixed fan-in layer (mma.sync, every GPU from sm_80):
//   Z[b, g*G + j] = bias[g*G + j] + sum_k X[b, idx[g, k]] * W[g*G + j, k]
// The main loop (CTA and warp shapes, the weight ring, the resident or gathered input) is forward_tiles in
// cuda/gsfi_forward_tiles.cuh; this kernel's epilogue stores each 16-row slice of logits through the warp's
// shared tile so that each lane stores whole 16-byte pieces.
#include "gsfi_forward_tiles.cuh"

// Stores a slice with its bias added, rounded once (store_output_slice in gsfi_common.cuh).
template <class T, int GP, bool ALIGNED_Z>
struct StoreLogits {
  u16* __restrict__ Z;
  long long ldz;
  int B, G;
  __device__ __forceinline__ void operator()(const float (&acc)[GP / 8][4], const float (&bias_v)[GP / 8][2],
                                             unsigned char* o_s, int row0, int g, int cols, int lane) {
    store_output_slice<T, GP / 8, ALIGNED_Z>(acc, bias_v, o_s, Z, ldz, row0, B, (long long)g * G, cols, lane);
  }
};

template <class T, int G, int KP, bool RESIDENT, bool ALIGNED_Z, int NW, int NSW>
__global__ void __launch_bounds__(NW * 32) gsfi_forward(const u16* __restrict__ XT, int ldxt,
                                                        const u16* __restrict__ W, const int* __restrict__ idx,
                                                        const u16* __restrict__ bias, u16* __restrict__ Z,
                                                        long long ldz, int B, int H, int L, int K, int num_groups) {
  StoreLogits<T, gsfi_pad16(G), ALIGNED_Z> store{Z, ldz, B, G};
  forward_tiles<T, G, KP, RESIDENT, NW, NSW>(XT, ldxt, W, idx, bias, B, H, L, K, num_groups, store);
}
