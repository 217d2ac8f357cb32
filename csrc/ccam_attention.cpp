// Host side of the "cuda" backend on the GPU: the CUDA Device (guard, stream, launch errors) for
// the shared checks and op bodies of ccam_ops.h, and the op registrations. The CPU emulation
// build (emu/ccam_attention_emu.cpp) pairs the same ccam_ops.h with an emulated Device.
//
// Registration: TORCH_LIBRARY_FRAGMENT (namespace ccam_kernels, shared with the Python-defined
// ops), not pybind11: the ops go through the dispatcher with a schema, so torch.compile and
// torch.library see them (their fake implementations are registered from Python, in
// ccam_kernels/backends/cuda_backend.py), they are callable from C++ and TorchScript, and the
// same .so serves the setup.py build and the JIT build (torch.ops.load_library).
//
// The ops write into outputs the caller allocates ("Tensor(a!)"): Python owns allocation, the
// tile plan and the split-KV merge, so the C++ side is only checks and launches. Every launch
// runs on the current CUDA stream of the tensors' device.
//
// Checked here: ranks, shapes, dtypes, devices, head dim, H vs Hkv, alignment, output shapes.
// Preconditions left to the caller (they live in device memory; checking them would cost a
// synchronizing copy per call): frames >= 1, 0 <= first_frame <= end_frame <= frames, key_start
// and len(k) consistent with (end_frame - first_frame) * tokens_per_frame, and the key-tile list
// of tiling.window_plan(..., kBwdKeyTile). The Python front ends (ccam_attention,
// ccam_partial_attention) check the frame counts and windows before building them.
#include <cstdlib>
#include <string>
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <type_traits>

#include "ccam/params.h"
#include "ccam_dispatch.h"

namespace ccam {
namespace {

struct Device {
  static constexpr const char* kName = "CUDA";
  static bool holds(const at::Tensor& x) { return x.is_cuda(); }
  // sm_90 exactly (H100, H200): the only GPUs the sm_90a machine code runs on. The forward takes
  // the wgmma + TMA kernel there by default; CCAM_CUDA_SM90=0 forces the mma.sync one (e.g. to
  // compare them, or should the Hopper kernel misbehave on a GPU: none has run it yet).
  static bool sm90(const at::Tensor& q) {
    const char* env = std::getenv("CCAM_CUDA_SM90");
    if (env != nullptr && std::string(env) == "0") return false;
    int major = 0, minor = 0;
    return cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, q.get_device()) == cudaSuccess &&
           cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, q.get_device()) == cudaSuccess &&
           major == 9 && minor == 0;
  }

  // Run launch(T{}, integral_constant<DP>{}, stream) for q's dtype and padded head dim, on q's
  // device and its current stream; a launch error raises.
  template <typename Launch>
  static void launch(const at::Tensor& q, int head_dim, std::initializer_list<Buffer>, Launch launch) {
    const c10::cuda::CUDAGuard guard(q.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const cudaError_t err = CCAM_DTYPE_SWITCH(q.scalar_type(), T, [&] {
      return CCAM_HEADDIM_SWITCH(head_dim, DP, [&] { return launch(T{}, std::integral_constant<int, DP>{}, stream); });
    });
    C10_CUDA_CHECK(err);
  }
};

#include "ccam_ops.h"

}  // namespace

TORCH_LIBRARY_FRAGMENT(ccam_kernels, m) { CCAM_DEFINE_OPS(m); }

TORCH_LIBRARY_IMPL(ccam_kernels, CUDA, m) {
  m.impl("cuda_fwd", &cuda_fwd);
  m.impl("cuda_bwd_dq", &cuda_bwd_dq);
  m.impl("cuda_bwd_dkdv", &cuda_bwd_dkdv);
  m.impl("cuda_merge", &cuda_merge);
}

}  // namespace ccam
