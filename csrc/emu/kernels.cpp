// The emulation build's instantiations: every launcher for fp16 and bf16 at the padded head
// dims 32..128 (as csrc/instantiations/*.cu for the GPU).
#include "../ccam/bwd.cuh"
#include "../ccam/fwd.cuh"
#include "../ccam/fwd_sm90.cuh"
#include "../ccam/merge.cuh"

#define CCAM_EMU_INSTANTIATE(T, DP)                                                         \
  template cudaError_t ccam::launch_fwd<T, DP>(const ccam::FwdParams&, cudaStream_t);     \
  template cudaError_t ccam::launch_bwd_dq<T, DP>(const ccam::BwdParams&, cudaStream_t);  \
  template cudaError_t ccam::launch_bwd_dkdv<T, DP>(const ccam::BwdParams&, cudaStream_t); \
  template cudaError_t ccam::launch_merge<T, DP>(const ccam::MergeParams&, cudaStream_t);

CCAM_EMU_INSTANTIATE(__half, 32)
CCAM_EMU_INSTANTIATE(__half, 64)
CCAM_EMU_INSTANTIATE(__nv_bfloat16, 32)
CCAM_EMU_INSTANTIATE(__nv_bfloat16, 64)
CCAM_EMU_INSTANTIATE(__half, 96)
CCAM_EMU_INSTANTIATE(__half, 128)
CCAM_EMU_INSTANTIATE(__nv_bfloat16, 96)
CCAM_EMU_INSTANTIATE(__nv_bfloat16, 128)

#define CCAM_EMU_INSTANTIATE_SM90(T, DP) \
  template cudaError_t ccam::launch_fwd_sm90<T, DP>(const ccam::FwdParams&, int64_t, int, cudaStream_t);

CCAM_EMU_INSTANTIATE_SM90(__half, 64)
CCAM_EMU_INSTANTIATE_SM90(__half, 128)
CCAM_EMU_INSTANTIATE_SM90(__nv_bfloat16, 64)
CCAM_EMU_INSTANTIATE_SM90(__nv_bfloat16, 128)
