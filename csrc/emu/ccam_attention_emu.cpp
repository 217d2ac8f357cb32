// The ops ccam_kernels::cuda_fwd, ::cuda_bwd_dq and ::cuda_bwd_dkdv for CPU tensors, running the
// kernels of csrc/ccam on the emulator (runtime.h): the same schemas, checks and bodies as the
// GPU build (ccam_ops.h), with a Device that registers every tensor of a launch for the
// emulator's bounds checks, fills the outputs with NaN first, and turns emulator errors into
// Python RuntimeErrors. Built by ccam_kernels.cuda_build.load_emulator (CCAM_CUDA_EMULATE=1).
#include <cstdlib>
#include <string>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../ccam/params.h"  // with CCAM_EMULATE: the shim's device names, after torch's headers
#include "../ccam_dispatch.h"
#include "runtime.h"

namespace ccam {
namespace {

ccam_emu::Region region_of(const Buffer& b) {
  ccam_emu::Region r;
  r.name = b.name;
  r.data = b.tensor.data_ptr();
  r.elem_size = b.tensor.element_size();
  r.sizes = b.tensor.sizes().vec();
  r.strides = b.tensor.strides().vec();
  r.writable = b.written;
  return r;
}

struct Device {
  static constexpr const char* kName = "CPU";
  static bool holds(const at::Tensor& x) { return x.is_cpu(); }
  // The emulator stands for an sm_90 GPU (the forward takes the wgmma + TMA kernel) while
  // CCAM_EMU_SM90=1; CCAM_CUDA_SM90=0 forces the mma.sync kernel there, as on a GPU.
  static bool sm90(const at::Tensor&) {
    const char* env = std::getenv("CCAM_EMU_SM90");
    const char* force = std::getenv("CCAM_CUDA_SM90");
    return env != nullptr && std::string(env) == "1" && !(force != nullptr && std::string(force) == "0");
  }

  template <typename Launch>
  static void launch(const at::Tensor& q, int head_dim, std::initializer_list<Buffer> buffers, Launch launch) {
    std::vector<ccam_emu::Region> regions;
    for (const Buffer& b : buffers) {
      if (b.written) b.tensor.fill_(std::numeric_limits<double>::quiet_NaN());  // outputs start NaN
      regions.push_back(region_of(b));
    }
    try {
      ccam_emu::LaunchScope scope(std::move(regions), ccam_emu::schedule_from_env());
      CCAM_DTYPE_SWITCH(q.scalar_type(), T, [&] {
        return CCAM_HEADDIM_SWITCH(head_dim, DP, [&] { return launch(T{}, std::integral_constant<int, DP>{}, nullptr); });
      });
    } catch (const ccam_emu::Error& e) {
      TORCH_CHECK(false, e.what());
    }
  }
};

#include "../ccam_ops.h"

}  // namespace

TORCH_LIBRARY_FRAGMENT(ccam_kernels, m) { CCAM_DEFINE_OPS(m); }

TORCH_LIBRARY_IMPL(ccam_kernels, CPU, m) {
  m.impl("cuda_fwd", &cuda_fwd);
  m.impl("cuda_bwd_dq", &cuda_bwd_dq);
  m.impl("cuda_bwd_dkdv", &cuda_bwd_dkdv);
  m.impl("cuda_merge", &cuda_merge);
}

}  // namespace ccam
