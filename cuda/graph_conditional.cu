// The value of a conditional node of a CUDA graph, set on the GPU: a captured graph that holds work which runs
// only where a flag the GPU computed is set (lightning_haste.kernels.graphs) launches this kernel right before
// the conditional node, so the host never reads the flag back.
//
// cudaGraphSetConditional is a device runtime builtin (no device runtime library is linked for it). nvcc declares
// it through the CUDA headers it always includes; NVRTC includes nothing, so the declaration is written here (the
// handle type is cudaGraphConditionalHandle, an unsigned long long).
#ifdef __CUDACC_RTC__
extern "C" __device__ void cudaGraphSetConditional(unsigned long long handle, unsigned int value);
#endif

// One thread: the node runs its body where *flag is nonzero (any integer type or bool).
template <class F>
__global__ void graph_set_conditional(unsigned long long handle, const F* flag) {
  cudaGraphSetConditional(handle, *flag != F(0) ? 1u : 0u);
}
