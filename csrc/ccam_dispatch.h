// The dtype / head-dim switch of the ops, and what the ops tell a Device about the tensors a
// launch touches (ccam_ops.h). Needs ATen and ccam/params.h.
#pragma once

#include <initializer_list>

namespace ccam {

// A tensor a launch reads (written == false) or writes.
struct Buffer {
  const char* name;
  const at::Tensor& tensor;
  bool written = false;
};

}  // namespace ccam

#define CCAM_DTYPE_SWITCH(DTYPE, CTYPE, ...)                                                   \
  [&] {                                                                                         \
    if ((DTYPE) == at::kHalf) {                                                                 \
      using CTYPE = __half;                                                                     \
      return __VA_ARGS__();                                                                     \
    }                                                                                           \
    TORCH_CHECK_VALUE((DTYPE) == at::kBFloat16,                                                 \
                      "ccam_kernels cuda: q must be float16 or bfloat16, got ", (DTYPE));       \
    using CTYPE = __nv_bfloat16;                                                                \
    return __VA_ARGS__();                                                                       \
  }()

#define CCAM_HEADDIM_SWITCH(HEAD_DIM, DP, ...)                                                 \
  [&] {                                                                                         \
    switch (padded_head_dim(HEAD_DIM)) {                                                        \
      case 32: { constexpr int DP = 32; return __VA_ARGS__(); }                                 \
      case 64: { constexpr int DP = 64; return __VA_ARGS__(); }                                 \
      case 96: { constexpr int DP = 96; return __VA_ARGS__(); }                                 \
      default: { constexpr int DP = 128; return __VA_ARGS__(); }                                \
    }                                                                                           \
  }()

// The ops' schemas (one text for both builds).
#define CCAM_DEFINE_OPS(m) \
  m.def( \
      "cuda_fwd(Tensor q, Tensor k, Tensor v, Tensor frames, Tensor key_start, Tensor first_frame, " \
      "Tensor end_frame, int tokens_per_frame, float scale, int num_splits, Tensor(a!) out, Tensor(b!) lse, " \
      "Tensor? dropout_seed=None, int dropout_threshold=0, float dropout_scale=1.0) -> ()"); \
  m.def( \
      "cuda_bwd_dq(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, Tensor frames, " \
      "Tensor key_start, Tensor first_frame, Tensor end_frame, int tokens_per_frame, float scale, " \
      "Tensor(a!) dq_rows, Tensor? dropout_seed=None, int dropout_threshold=0, float dropout_scale=1.0) -> ()"); \
  m.def( \
      "cuda_bwd_dkdv(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor lse, Tensor delta, Tensor frames, " \
      "Tensor key_start, Tensor first_frame, Tensor end_frame, Tensor tile_sample, Tensor tile_start, " \
      "int tokens_per_frame, float scale, " \
      "Tensor(a!) dk, Tensor(b!) dv, Tensor? dropout_seed=None, int dropout_threshold=0, " \
      "float dropout_scale=1.0) -> ()"); \
  m.def( \
      "cuda_merge(Tensor o_parts, Tensor lse_parts, Tensor(a!) out, Tensor(b!) acc, Tensor(c!) lse) -> ()");
