// The sm_90a dQ pass (bwd_dq_sm90.cuh) for bf16 at padded head dim 64 and fp16 at 128, compiled
// by tests/test_cuda_hopper.py (nvcc, sm_90a, compile only) for its SASS and ptxas report. Not
// in the extension: the host does not dispatch this kernel yet (it runs under the emulator only).
#include "../../ccam/bwd_dq_sm90.cuh"

template cudaError_t ccam::launch_bwd_dq_sm90<__nv_bfloat16, 64>(const ccam::BwdParams&, int64_t, int, cudaStream_t);
template cudaError_t ccam::launch_bwd_dq_sm90<__half, 128>(const ccam::BwdParams&, int64_t, int, cudaStream_t);
