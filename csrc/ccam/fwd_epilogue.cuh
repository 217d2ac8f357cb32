// The forward's epilogue, shared by the mma.sync kernel (fwd.cuh) and the sm_90a one
// (fwd_sm90.cuh): both hold a thread's two rows of a 16-row strip in the same fragment layout.
#pragma once

#include <cfloat>

#include "params.h"
#include "tile.cuh"

namespace ccam {

// This thread's rows row0 and row0 + 8 of the strip starting at `strip`, normalized by their
// row sums (times out_scale: dropout's 1 / (1 - p), else 1) and stored as the output or, with
// splits, as float32 partials; then their natural-log LSE. A row that saw nothing live (l = 0:
// a split or a frame window that ends before its frame) stores 0 with LSE -inf, weight 0 in
// the merge; a NaN row sum (a NaN score) stays NaN in both (docs/reference.md §7).
template <typename T, int DP>
__device__ __forceinline__ void store_forward_rows(const FwdParams& p, int b, int h, int bh, int64_t strip,
                                                   int64_t row0, int lane, float (&o)[DP / 8][4],
                                                   const float (&m_run)[2], const float (&l_run)[2],
                                                   float out_scale) {
  const int64_t N = p.num_query;
  float inv[2], lse[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = quad_sum(l_run[half]);
    inv[half] = l == 0.f ? 0.f : out_scale / l;
    lse[half] = l == 0.f ? -INFINITY : (m_run[half] + __log2f(l)) * 0.6931471805599453f;
  }
  if (p.out_partial) {
    const int64_t split_elems = int64_t(p.batch) * p.o_stride_b;
    float* out = p.out_partial + blockIdx.z * split_elems + b * p.o_stride_b + h * p.o_stride_h;
    store_strip<float, DP>(out, p.o_stride_n, strip, N, p.head_dim, o, inv[0], inv[1]);
  } else {
    T* out = static_cast<T*>(p.out) + b * p.o_stride_b + h * p.o_stride_h;
    store_strip<T, DP>(out, p.o_stride_n, strip, N, p.head_dim, o, inv[0], inv[1]);
  }
  if (lane % 4 == 0) {
    float* lse_row = p.lse + (int64_t(blockIdx.z) * gridDim.x + bh) * N;
    if (row0 < N) store(lse_row + row0, lse[0]);
    if (row0 + 8 < N) store(lse_row + row0 + 8, lse[1]);
  }
}

}  // namespace ccam
