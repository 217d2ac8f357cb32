// Every hopper.cuh wrapper in one kernel, compiled for sm_90a by
// tests/test_cuda_hopper_emulator.py (nvcc, compile only): the inline PTX assembles and
// ptxas schedules it with no spills.
#include "../../ccam/hopper.cuh"
__global__ void __launch_bounds__(384, 1) hopper_probe(const __grid_constant__ CUtensorMap map, float* out) {
  extern __shared__ __align__(1024) unsigned char smem[];
  auto* bar = reinterpret_cast<uint64_t*>(smem);
  if (threadIdx.x == 0) { ccam::mbarrier_init(bar, 1); ccam::fence_barrier_init(); }
  __syncthreads();
  if (threadIdx.x < 128) {
    ccam::setmaxnreg_dec<24>();
    if (threadIdx.x < 32 && ccam::elect_one()) {
      ccam::mbarrier_arrive_expect_tx(bar, 8192);
      ccam::tma_load_2d(smem + 1024, &map, bar, 0, 0);
    }
  } else {
    ccam::setmaxnreg_inc<240>();
    ccam::mbarrier_wait(bar, 0);
    float acc[32] = {}, acc2[64] = {};
    uint32_t a[4] = {1, 2, 3, 4};
    const uint64_t da = ccam::make_smem_desc(smem + 1024, 16, 1024, 128);
    ccam::wgmma_fence();
    ccam::wgmma_ss<__nv_bfloat16, 64>(acc, da, da, 0);
    ccam::wgmma_ss<__half, 64, false, true>(acc, da, da, 1);
    ccam::wgmma_rs<__nv_bfloat16, 128, true>(acc2, a, da, 1);
    ccam::wgmma_commit();
    ccam::wgmma_wait<0>();
    ccam::fence_proxy_async();
    for (int i = 0; i < 32; ++i) out[threadIdx.x * 96 + i] = acc[i];
    for (int i = 0; i < 64; ++i) out[threadIdx.x * 96 + 32 + i] = acc2[i];
    ccam::mbarrier_arrive(bar);
  }
}
