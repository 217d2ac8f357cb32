// The split-KV forward's merge in one kernel: each split's float32 partial output and LSE read
// once; the output written in the inputs' dtype, the merged LSE and, when the backward keeps it,
// the float32 output. It replaces a chain of PyTorch ops (tiling.merge_splits, which the tests
// hold it to, with float64) that re-read the partials several times.
//
// Per row: m = max_s lse_s, lse = m + log(sum_s exp(lse_s - m)) (shifted by 0 where every split
// is -inf: a row no split saw keeps lse -inf and output 0), out = sum_s exp(lse_s - lse) o_s in
// split order. A NaN LSE in any split makes the row's LSE NaN, so every weight and the output
// NaN (the NaN rule, docs/reference.md §7), as torch.logsumexp does.
#pragma once

#include <math.h>

#include "launch.cuh"
#include "mma.cuh"
#include "params.h"

namespace ccam {

constexpr int kMergeRows = 16;      // rows of one (sample, head) per CTA
constexpr int kMergeThreads = 128;  // 8 threads a row, each on column pairs 2 (t % 8) + 16 i

template <typename T, int DP>
__global__ void __launch_bounds__(kMergeThreads) merge_kernel(const MergeParams p) {
  const int64_t N = p.num_query, H = p.heads, D = p.head_dim;
  const int64_t bh = blockIdx.x, b = bh / H, h = bh % H;
  const int64_t row = int64_t(blockIdx.y) * kMergeRows + threadIdx.x / 8;
  const int pair = threadIdx.x % 8;
  if (row >= N) return;  // no barrier below: a thread past the last row just stops
  const int64_t lse_split = int64_t(gridDim.x) * N;  // one split's (B, H, N)
  const float* lse_row = p.lse_parts + bh * N + row;

  float m = -INFINITY;
  bool nan = false;
  for (int s = 0; s < p.splits; ++s) {
    const float x = load(lse_row + s * lse_split);
    m = fmaxf(m, x);
    nan = nan || x != x;
  }
  const float shift = m == -INFINITY ? 0.f : m;
  float total = 0.f;
  for (int s = 0; s < p.splits; ++s) total += expf(load(lse_row + s * lse_split) - shift);
  float lse = total == 0.f ? -INFINITY : shift + logf(total);
  if (nan) lse = NAN;

  const float w_shift = lse == -INFINITY ? 0.f : lse;
  const int64_t row_offset = ((b * N + row) * H + h) * D;  // (B, N, H, D) contiguous
  const int64_t split_elems = int64_t(p.batch) * N * H * D;
  constexpr int kPairs = DP / 16;  // column pairs of this thread
  float2 acc[kPairs];
#pragma unroll
  for (int i = 0; i < kPairs; ++i) acc[i] = make_float2(0.f, 0.f);
  for (int s = 0; s < p.splits; ++s) {
    const float w = expf(load(lse_row + s * lse_split) - w_shift);
    const float* part = p.o_parts + s * split_elems + row_offset;
#pragma unroll
    for (int i = 0; i < kPairs; ++i) {
      const int col = 2 * (pair + 8 * i);
      if (col >= D) continue;  // D is a multiple of 8: a pair is whole or absent
      const float2 v = load(reinterpret_cast<const float2*>(part + col));
      acc[i].x += w * v.x;
      acc[i].y += w * v.y;
    }
  }
#pragma unroll
  for (int i = 0; i < kPairs; ++i) {
    const int col = 2 * (pair + 8 * i);
    if (col >= D) continue;
    if (p.out) store(reinterpret_cast<uint32_t*>(static_cast<T*>(p.out) + row_offset + col), Mma<T>::pack(acc[i].x, acc[i].y));
    if (p.acc) store(reinterpret_cast<float2*>(p.acc + row_offset + col), acc[i]);
  }
  if (pair == 0) store(p.lse + bh * N + row, lse);
}

template <typename T, int DP>
constexpr Geometry merge_geometry(const MergeParams& p) {
  return {"merge_kernel", unsigned(p.batch * p.heads), unsigned((p.num_query + kMergeRows - 1) / kMergeRows), 1u,
          kMergeThreads, 0};
}

template <typename T, int DP>
cudaError_t launch_merge(const MergeParams& p, cudaStream_t stream) {
  return launch(merge_kernel<T, DP>, merge_geometry<T, DP>(p), stream, p);
}

}  // namespace ccam
