// Forward kernel: one CTA per (sample x head, query tile[, key split]), 4 warps of 16 query rows.
//
// A query tile's rows see non-decreasing key prefixes: keys below the first row's limit `lo` are
// live for every row (no mask), keys from there to the last row's limit `hi` are masked per row
// from the rule, and nothing past `hi` is loaded. K/V tiles stream through a two-stage cp.async
// pipeline; the scores stay in registers (online softmax in float32, log2 domain) and feed the
// P V product as mma A fragments. With splits, each CTA takes a share of the key tiles and
// writes float32 partials and their LSE, merged by log-sum-exp on the host. Keys are those of
// each sample's frame window (rule.cuh): a partial call is the same kernel over fewer keys.
#pragma once

#include <cfloat>
#include <type_traits>

#include "dropout.cuh"
#include "fwd_epilogue.cuh"
#include "launch.cuh"
#include "params.h"
#include "rule.cuh"
#include "tile.cuh"

namespace ccam {

template <int DP>
struct FwdTiles {
  static constexpr int kBlockM = 64, kBlockN = kFwdBlockN, kThreads = 128;
  static constexpr int kQ = kBlockM * kPitch<DP>, kKV = kBlockN * kPitch<DP>;
  static constexpr int kSmemElems = kQ + 4 * kKV;  // Q, K x 2 stages, V x 2 stages
};

// kDropout: a separate instantiation for dropout, so the loop without it carries none of the
// Philox code (static size, registers, and the runtime test per tile).
template <typename T, int DP, bool kDropout>
__global__ void __launch_bounds__(128, 2) fwd_kernel(const FwdParams p) {
  using Tiles = FwdTiles<DP>;
  constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* s_q = reinterpret_cast<T*>(smem_bytes);
  T* s_k = s_q + Tiles::kQ;
  T* s_v = s_k + 2 * Tiles::kKV;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QueryTile tile = query_tile(p, BM);
  const int bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk;
  const int64_t N = p.num_query, m0 = tile.m0, lo = tile.lo, hi = tile.hi;

  const KeyTiles range = key_tiles(tile, BN, p.num_splits);
  const int64_t key_lo = range.key_lo, key_hi = range.key_hi;
  const int n_tiles = range.n_tiles;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(p.k) + load(p.key_start + b) * p.k_stride_l + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + load(p.key_start + b) * p.v_stride_l + hk * p.v_stride_h;
  const T* safe = static_cast<const T*>(p.q);

  // K and V tiles in order, from key_lo: tile t goes to stage t & 1. Head dims <= 64 stream
  // them (TileStream: addresses kept in registers); 128 has no registers to spare for that.
  constexpr bool kStream = DP <= 64;
  TileStream<BN, kStream ? DP : 64, 128, T> k_stream(k + key_lo * p.k_stride_l, p.k_stride_l, p.head_dim);
  TileStream<BN, kStream ? DP : 64, 128, T> v_stream(v + key_lo * p.v_stride_l, p.v_stride_l, p.head_dim);
  auto load_kv = [&](int t) {
    const int64_t s0 = key_lo + int64_t(t) * BN;
    if constexpr (kStream) {
      k_stream.load_next(s_k + (t & 1) * Tiles::kKV, key_hi - s0);
      v_stream.load_next(s_v + (t & 1) * Tiles::kKV, key_hi - s0);
    } else {
      load_tile<BN, DP, 128>(s_k + (t & 1) * Tiles::kKV, k + s0 * p.k_stride_l, p.k_stride_l, key_hi - s0, p.head_dim, safe);
      load_tile<BN, DP, 128>(s_v + (t & 1) * Tiles::kKV, v + s0 * p.v_stride_l, p.v_stride_l, key_hi - s0, p.head_dim, safe);
    }
  };
  load_tile<BM, DP, 128>(s_q, q + m0 * p.q_stride_n, p.q_stride_n, N - m0, p.head_dim, safe);
  cp_async_commit();  // Q alone: its fragments are read before the loop
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();

  // This thread's two rows (g and g + 8 of its warp's strip) and their visible-key limits.
  const int64_t row0 = m0 + warp * 16 + lane / 4;
  const int64_t limit[2] = {tile.sample.key_limit(row0), tile.sample.key_limit(row0 + 8)};
  // Dropout zeroes P's dropped entries before P V (the row sums l stay those of P) and scales
  // the output by 1 / (1 - p); keys counted from the video's start (the window's first key + s0 + col).
  const Dropout drop = dropout_of(p, kDropout ? load(p.dropout_seed) : 0, b, h,
                                  tile.sample.first_frame * p.tokens_per_frame);
  // Q's fragments stay in registers for the whole loop, except with dropout at head dims > 64:
  // there the Philox state needs those registers (the kernel spilled), and ldmatrix re-reads
  // Q from shared memory per key tile.
  constexpr bool kQInRegs = !(kDropout && DP > 64);
  uint32_t q_frag[kQInRegs ? DP / 16 : 1][4];
  cp_async_wait<1>();
  __syncthreads();
  if (p.scale_log2 < 0.f && !kQInRegs) {  // negate Q in shared memory once (see below)
    for (int i = threadIdx.x; i < BM * kPitch<DP> / 2; i += 128)
      reinterpret_cast<uint32_t*>(s_q)[i] ^= 0x80008000u;
    __syncthreads();
  }
#pragma unroll
  for (int kc = 0; kc < (kQInRegs ? DP / 16 : 0); ++kc) {
    load_a<DP>(q_frag[kc], s_q, warp * 16, kc);
    // A negative scale: negate Q (a sign flip, exact in fp16 and bf16) so the scores are scaled
    // by |scale| and their maximum stays the maximum of the raw scores.
    if (p.scale_log2 < 0.f)
#pragma unroll
      for (int i = 0; i < 4; ++i) q_frag[kc][i] ^= 0x80008000u;
  }
  float o[DP / 8][4];
  zero(o);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};  // m_run: scaled, log2 domain
  // Without dropout the row sums come from the tensor cores (gemm_pb's kRowSum): l_mma[0] is
  // row g's whole sum, l_mma[2] row g + 8's (every lane of the quad holds them). With dropout
  // they are summed per score (l_run, per-thread partials), because P V then takes the dropped P.
  float l_mma[4] = {0.f, 0.f, 0.f, 0.f};
  const float scale2 = fabsf(p.scale_log2);

  // One key tile. The masked instance (tag true) masks a tile that straddles some row's limit
  // (or runs past hi); the unmasked one (tag false) has no mask arithmetic at all and runs the
  // tiles below the tile's lowest limit `lo`; the rest (at most a few frames' worth) run masked.
  auto key_tile = [&](int t, auto masked_tag) {
    if (t + 1 < n_tiles) load_kv(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    const int64_t s0 = key_lo + int64_t(t) * BN;
    // Straddles some row's limit (or runs past hi); never in the unmasked instance.
    const bool masked = decltype(masked_tag)::value && s0 + BN > lo;
    T* vt = s_v + (t & 1) * Tiles::kKV;
    // A NaN or inf value in a masked tile must reach only the rows that see its key (tile.cuh).
    // The unmasked instance needs no check: every row sees every key of its tiles.
    bool nonfinite = false;
    if constexpr (decltype(masked_tag)::value) {
      nonfinite = __syncthreads_or(masked && !own_chunks_finite<BN, DP, 128>(vt));
    } else {
      __syncthreads();
    }
    float s[BN / 8][4];
    zero(s);
    gemm_abt<T, DP, BN>(s, [&](int kc, uint32_t(&a)[4]) {
      if constexpr (kQInRegs) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = q_frag[kc][i];
      } else {
        load_a<DP>(a, s_q, warp * 16, kc);
      }
    }, s_k + (t & 1) * Tiles::kKV);

#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int cut = tile_cut(limit[half], s0, BN);  // this row's first hidden column of the tile
      // The raw scores' maximum, scaled once per row: each probability is then one FFMA and
      // one ex2, exp2(s |scale| log2(e) - m), with no multiply per score before the max.
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          if (masked && j * 8 + 2 * (lane % 4) + (e & 1) >= cut) s[j][e] = -INFINITY;
          mx = fmaxf(mx, s[j][e]);
        }
      const float m_new = fmaxf(m_run[half], quad_max(mx) * scale2);
      // A row with nothing live yet (in a split that does not start at key 0, or a row before
      // its frame window): subtract 0 instead of -inf, so its probabilities and rescale factor
      // are 0, not NaN.
      const float m_use = m_new == -INFINITY ? 0.f : m_new;
      const float alpha = exp2_approx(m_run[half] - m_use);
      m_run[half] = m_new;
      [[maybe_unused]] float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          s[j][e] = exp2_approx(fmaf(s[j][e], scale2, -m_use));
          if constexpr (kDropout) sum += s[j][e];
        }
      if constexpr (kDropout) {
        l_run[half] = l_run[half] * alpha + sum;  // per-thread partial: alpha is uniform per row
      } else {
        l_mma[2 * half] *= alpha;
      }
      if constexpr (kDropout) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e)
            if (!drop.keep(row0 + 8 * half, s0 + j * 8 + 2 * (lane % 4) + (e & 1))) s[j][e] = 0.f;
      }
#pragma unroll
      for (int j = 0; j < DP / 8; ++j) {
        o[j][2 * half] *= alpha;
        o[j][2 * half + 1] *= alpha;
      }
    }
    if (nonfinite) {  // rare: keep a hidden key's NaN or inf out of the rows that do not see it
      const int cut0 = tile_cut(limit[0], s0, BN), cut1 = tile_cut(limit[1], s0, BN);
      add_seen_nonfinite<DP>(o, vt, {0, 0}, {cut0 < 0 ? 0 : cut0, cut1 < 0 ? 0 : cut1});
      __syncthreads();
      zero_own_nonfinite<BN, DP, 128>(vt);
      __syncthreads();
    }
    gemm_pb<T, DP, BN, !kDropout>(o, s, vt, l_mma);
    __syncthreads();  // this stage is refilled by the next iteration's prefetch
  };
  // Tiles [0, n_full) end at or below lo: every row sees them whole. At DP = 128 the two loop
  // instances together spill registers (ptxas, sm_90a): there one loop tests each tile.
  const int n_full = DP < 128 ? range.n_full : 0;
  int t = 0;
  if constexpr (DP < 128) {
    for (; t < n_full; ++t) key_tile(t, std::false_type{});
  }
  for (; t < n_tiles; ++t) key_tile(t, std::true_type{});
  cp_async_wait<0>();

  // A whole video without splits: every row saw key 0, so l > 0. A split, or a frame window
  // after a row's frame, may have seen nothing live for a row: its output is then 0 with LSE
  // -inf (weight 0 in the merge). A row with a NaN score has l = NaN: output and LSE NaN.
  if constexpr (!kDropout) {  // the epilogue sums a quad's partials: one lane holds the whole sum
    l_run[0] = lane % 4 == 0 ? l_mma[0] : 0.f;
    l_run[1] = lane % 4 == 0 ? l_mma[2] : 0.f;
  }
  store_forward_rows<T, DP>(p, b, h, bh, m0 + warp * 16, row0, lane, o, m_run, l_run,
                            kDropout ? p.dropout_scale : 1.f);
}

template <typename T, int DP>
constexpr Geometry fwd_geometry(const FwdParams& p) {
  using Tiles = FwdTiles<DP>;
  return {"fwd_kernel", unsigned(p.batch * p.heads), unsigned((p.num_query + Tiles::kBlockM - 1) / Tiles::kBlockM),
          unsigned(p.num_splits), Tiles::kThreads, int(Tiles::kSmemElems * sizeof(T))};
}

template <typename T, int DP>
cudaError_t launch_fwd(const FwdParams& p, cudaStream_t stream) {
  if (p.dropout_threshold != 0u) return launch(fwd_kernel<T, DP, true>, fwd_geometry<T, DP>(p), stream, p);
  return launch(fwd_kernel<T, DP, false>, fwd_geometry<T, DP>(p), stream, p);
}

}  // namespace ccam
