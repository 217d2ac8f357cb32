// The emulation build's ccam::launch (see ccam/launch.cuh): runs every CTA of the grid on the
// CPU emulator, in the launch scope the op wrapper opened (its tensors and schedule).
#pragma once

#include "runtime.h"

namespace ccam {

template <typename Params>
cudaError_t launch(void (*kernel)(Params), const Geometry& g, cudaStream_t, const Params& p) {
  ccam_emu::run_launch({g.kernel, g.grid_x, g.grid_y, g.grid_z, g.threads, g.smem_bytes}, [&] { kernel(p); });
  return cudaSuccess;
}

}  // namespace ccam
