// The sm_90a forward for fp16 at padded head dim 64 (one file per instantiation, as
// csrc/instantiations/; written by hand: four files).
#include "../ccam/fwd_sm90.cuh"

template cudaError_t ccam::launch_fwd_sm90<__half, 64>(const ccam::FwdParams&, int64_t, int, cudaStream_t);
