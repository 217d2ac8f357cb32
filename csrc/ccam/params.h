// Launch parameters of the block-causal cross-attention kernels, and the launchers' declarations.
//
// Plain C++ (no torch, no CUDA headers beyond the runtime types): the host-side registration
// (ccam_attention.cpp) fills these from tensors, and every instantiation file (one dtype x head
// dim x kernel per .cu) compiles against this header alone, so the kernel files build fast and in
// parallel.
//
// The kernels read the mask rule (rule.cuh) from the per-sample frame counts; key offsets come
// from a second per-sample int64 array, and the frame window [first_frame, end_frame) whose keys
// k/v hold from two more (partial attention; the whole-video op is the window [0, T)).
#pragma once

#include <cstdint>

#ifdef CCAM_EMULATE
#include "../emu/shim.h"  // the CPU emulation build (csrc/emu): device names for g++
#else
#include <cuda_runtime_api.h>
#endif

namespace ccam {

// Strides are in elements. q may be shared by the batch: q_stride_b == 0.
struct AttentionShape {
  const int64_t* frames;     // (B,)  frames T_b of each sample
  const int64_t* key_start;  // (B,)  first key of each sample in the packed (L, Hkv, D) k/v
  const int64_t* first_frame;  // (B,)  f0: k/v hold the keys of frames [f0, f1) of each sample,
  const int64_t* end_frame;    // (B,)  f1  counted from frame f0's first key
  int batch, num_query, heads, group, tokens_per_frame, head_dim;  // B, N, H, H/Hkv, P, D
  int64_t q_stride_b, q_stride_n, q_stride_h;
  int64_t k_stride_l, k_stride_h, v_stride_l, v_stride_h;
  float scale_log2;  // softmax scale * log2(e): the kernels work in the log2 domain
  // Attention dropout (dropout.cuh): off when dropout_threshold == 0 (dropout_seed then unread).
  const int64_t* dropout_seed;  // (1,) int64, read by the kernels (no host copy of the seed)
  uint32_t dropout_threshold;   // ceil(p * 65536)
  float dropout_scale;          // 1 / (1 - p)
};

struct FwdParams : AttentionShape {
  const void *q, *k, *v;
  // out (B, N, H, D) in the inputs' dtype, lse (B, H, N) float32 (natural log); or, when
  // out_partial is set (always for num_splits > 1), out_partial (S, B, N, H, D) float32 and lse
  // (S, B, H, N), merged by the host.
  void* out;
  float* out_partial;
  float* lse;
  int64_t o_stride_b, o_stride_n, o_stride_h;  // of out or of one split of out_partial
  int num_splits;
};

struct BwdParams : AttentionShape {
  const void *q, *k, *v, *dout;
  const float *lse, *delta;  // (B, H, N) float32: natural-log LSE, rowsum(dO * O)
  int64_t do_stride_b, do_stride_n, do_stride_h;
  float scale;
  // dQ pass: dq_rows (S, B, N, H, D) float32 contiguous, one slab per key split and sample:
  // with dq_splits = S > 1 each query tile's key tiles are shared among S CTAs (as the
  // forward's splits), so that one video's 256 query tiles are not one long pole; the host
  // sums the splits in a fixed order (deterministic), and a shared q's samples.
  float* dq_rows;
  int dq_splits;
  // dK/dV pass: one program per (key tile, kv head); tiles listed by the host.
  const int64_t *tile_sample, *tile_start;
  int num_key_tiles;
  void *dk, *dv;
  int64_t dk_stride_l, dk_stride_h, dv_stride_l, dv_stride_h;
};

// The split forward's merge (merge.cuh): S float32 partials and their LSEs -> the output in the
// inputs' dtype (when out is set), the float32 output (when acc is set) and the merged LSE. All
// contiguous: o_parts (S, B, N, H, D), lse_parts (S, B, H, N), out and acc (B, N, H, D), lse
// (B, H, N).
struct MergeParams {
  const float *o_parts, *lse_parts;
  void* out;
  float *acc, *lse;
  int splits, batch, num_query, heads, head_dim;
};

// Head dims run in kernels built for a padded width DP in {32, 64, 96, 128}: the columns
// D..DP-1 are zero-filled on load and never stored.
constexpr int padded_head_dim(int d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : 128; }

// Key-tile width of the forward and dK/dV passes (the host's tile plan uses it too).
constexpr int kFwdBlockN = 64;
constexpr int kBwdKeyTile = 64;

// A kernel's launch: grid, threads per block, dynamic shared memory. Computed by one constexpr
// helper per kernel (fwd_geometry, dq_geometry, dkdv_geometry) that the launchers call in both
// the GPU and the emulation build (launch.cuh), so the two cannot drift.
struct Geometry {
  const char* kernel;
  unsigned grid_x, grid_y, grid_z;
  int threads, smem_bytes;
};

template <typename T, int DP> cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream);
// The sm_90a forward (fwd_sm90.cuh) for padded head dims 64 and 128; num_keys, kv_heads: the
// packed k / v's rows and heads (its tensor maps need them). cudaErrorNotSupported where this
// build or driver cannot run it: the caller then takes launch_fwd.
template <typename T, int DP>
cudaError_t launch_fwd_sm90(const FwdParams& p, int64_t num_keys, int kv_heads, cudaStream_t stream);

// Whether a forward call fits the sm_90a kernel: for its TMA loads a head dim a multiple of 8 up
// to 128 (columns past it read as zeros), every stride a multiple of 8 elements (16 bytes),
// 16-byte aligned tensors.
inline bool sm90_fwd_supported(const FwdParams& p) {
  auto ok = [](int64_t stride) { return stride % 8 == 0; };
  auto aligned = [](const void* x) { return reinterpret_cast<uintptr_t>(x) % 16 == 0; };
  return p.head_dim % 8 == 0 && p.head_dim <= 128 && ok(p.q_stride_b) && ok(p.q_stride_n) && ok(p.q_stride_h) &&
         ok(p.k_stride_l) && ok(p.k_stride_h) && ok(p.v_stride_l) && ok(p.v_stride_h) && aligned(p.q) &&
         aligned(p.k) && aligned(p.v);
}
template <typename T, int DP> cudaError_t launch_bwd_dq(const BwdParams& p, cudaStream_t stream);
template <typename T, int DP> cudaError_t launch_bwd_dkdv(const BwdParams& p, cudaStream_t stream);
template <typename T, int DP> cudaError_t launch_merge(const MergeParams& p, cudaStream_t stream);

}  // namespace ccam
