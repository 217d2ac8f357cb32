// Launch a kernel with the geometry its constexpr helper computed (fwd_geometry,
// dq_geometry, dkdv_geometry): on the GPU, or, with CCAM_EMULATE, on the CPU emulator
// (csrc/emu), so both builds launch from the same numbers.
#pragma once

#include "params.h"

#ifdef CCAM_EMULATE
#include "../emu/launch.h"
#else
namespace ccam {

template <typename Params>
cudaError_t launch(void (*kernel)(Params), const Geometry& g, cudaStream_t stream, const Params& p) {
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, g.smem_bytes);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(g.grid_x, g.grid_y, g.grid_z), g.threads, g.smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ccam
#endif
