// The sm_90a forward for bf16 at padded head dim 64 (one file per instantiation, as
// csrc/instantiations/; written by hand: four files).
#include "../ccam/fwd_sm90.cuh"

template cudaError_t ccam::launch_fwd_sm90<__nv_bfloat16, 64>(const ccam::FwdParams&, int64_t, int, cudaStream_t);
