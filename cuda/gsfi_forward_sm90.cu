// Forward of the group-shared fixed fan-in layer on Hopper (sm_90a), with warpgroup MMA (wgmma):
//   Z[b, g*G + j] = bias[g*G + j] + sum_k X[b, idx[g, k]] * W[g*G + j, k]
// The main loop (one CTA = 64 batch rows with the input resident in shared memory, a warpgroup per group, the
// swizzled weight ring) is forward_tiles_sm90 in cuda/gsfi_forward_sm90_tiles.cuh; this kernel's epilogue stores
// each warp's 16-row slice through its shared tile so that each lane stores whole 16-byte pieces.
#include "gsfi_forward_sm90_tiles.cuh"

// Stores a slice with its bias added, rounded once (store_output_slice in gsfi_common.cuh).
template <class T, int G, bool ALIGNED_Z>
struct StoreLogitsSm90 {
  u16* __restrict__ Z;
  long long ldz;
  int B;
  __device__ __forceinline__ void operator()(const float (&acc)[G / 8][4], const float (&bias_v)[G / 8][2],
                                             unsigned char* o_s, int row0, int g, int cols, int lane) {
    store_output_slice<T, G / 8, ALIGNED_Z>(acc, bias_v, o_s, Z, ldz, row0, B, (long long)g * G, cols, lane);
  }
};

template <class T, int G, int KP, bool ALIGNED_Z, int NWG, int NSW>
__global__ void __launch_bounds__(NWG * 128, 1)
    gsfi_forward_sm90(const u16* __restrict__ XT, int ldxt, const u16* __restrict__ W, const int* __restrict__ idx,
                      const u16* __restrict__ bias, u16* __restrict__ Z, long long ldz, int B, int H, int L, int K,
                      int num_groups) {
  StoreLogitsSm90<T, G, ALIGNED_Z> store{Z, ldz, B};
  forward_tiles_sm90<T, G, KP, NWG, NSW>(XT, ldxt, W, idx, bias, B, H, L, K, num_groups, store);
}
