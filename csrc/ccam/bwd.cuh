// Backward kernels. Recompute P = exp(S*scale - LSE) from the saved per-row LSE; with
// delta = rowsum(dO * O) (precomputed by the host), dS = P * (dP - delta), dP = dO V^T.
//
// dQ pass: one CTA per (sample x head, query tile, key split), 4 warps of 16 rows, walking its
//   split's share of the key tiles the tile sees (as the forward); dQ += dS K, written per split
//   and sample in float32 (the host sums the splits in a fixed order, and a shared q's
//   samples). No atomics.
// dK/dV pass: one CTA per (key tile, kv head), 4 warps of 16 keys, walking only the query rows
//   that see the tile (i >= ceil(f*N/T) for its first frame f), and every head of the GQA group:
//   dV += P^T dO, dK += dS^T Q. Each key belongs to one CTA: no atomics, deterministic.
// Over a frame window (partial attention, rule.cuh) the same kernels run on the window's keys;
// the host passes delta - dlse as delta (the LSE's gradient: d lse / d s = P), and LSE = delta
// = 0 for rows that see nothing of the window (every P of theirs is masked to 0).
#pragma once

#include "dropout.cuh"
#include "launch.cuh"
#include "params.h"
#include "rule.cuh"
#include "tile.cuh"

namespace ccam {

// Key tile of the dQ pass / query tile of the dK/dV pass: narrower at large head dims, where
// the float32 accumulators (16 x DP per warp, two of them in dK/dV) take most registers.
template <int DP>
constexpr int kBwdInner = DP <= 64 ? 64 : 32;

template <int DP>
struct DqTiles {
  static constexpr int kBlockM = 64, kBlockN = kBwdInner<DP>;
  static constexpr int kQ = kBlockM * kPitch<DP>, kKV = kBlockN * kPitch<DP>;
  static constexpr int kSmemElems = 2 * kQ + 4 * kKV;  // Q, dO, K x 2, V x 2
};

template <typename T, int DP>
__global__ void __launch_bounds__(128, 2) bwd_dq_kernel(const BwdParams p) {
  using Tiles = DqTiles<DP>;
  constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* s_q = reinterpret_cast<T*>(smem_bytes);
  T* s_do = s_q + Tiles::kQ;
  T* s_k = s_do + Tiles::kQ;
  T* s_v = s_k + 2 * Tiles::kKV;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const QueryTile tile = query_tile(p, BM);
  const int bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk;
  const int64_t N = p.num_query, m0 = tile.m0, lo = tile.lo, hi = tile.hi;
  // This CTA's key tiles [key_lo, key_hi): all the tile sees, or its split's share.
  const KeyTiles range = key_tiles(tile, BN, p.dq_splits);
  const int64_t key_lo = range.key_lo, key_hi = range.key_hi;
  const int n_tiles = range.n_tiles;

  const T* q = static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h;
  const T* k = static_cast<const T*>(p.k) + load(p.key_start + b) * p.k_stride_l + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(p.v) + load(p.key_start + b) * p.v_stride_l + hk * p.v_stride_h;
  const T* safe = static_cast<const T*>(p.q);

  auto load_kv = [&](int t) {
    const int64_t s0 = key_lo + int64_t(t) * BN;
    load_tile<BN, DP, 128>(s_k + (t & 1) * Tiles::kKV, k + s0 * p.k_stride_l, p.k_stride_l, key_hi - s0, p.head_dim, safe);
    load_tile<BN, DP, 128>(s_v + (t & 1) * Tiles::kKV, v + s0 * p.v_stride_l, p.v_stride_l, key_hi - s0, p.head_dim, safe);
  };
  load_tile<BM, DP, 128>(s_q, q + m0 * p.q_stride_n, p.q_stride_n, N - m0, p.head_dim, safe);
  load_tile<BM, DP, 128>(s_do, dout + m0 * p.do_stride_n, p.do_stride_n, N - m0, p.head_dim, safe);
  if (n_tiles > 0) load_kv(0);
  cp_async_commit();

  const int64_t row0 = m0 + warp * 16 + lane / 4;
  const int64_t limit[2] = {tile.sample.key_limit(row0), tile.sample.key_limit(row0 + 8)};
  // Rows past N: LSE +inf makes their probabilities 0.
  const float* lse = p.lse + int64_t(bh) * N;
  const float* delta = p.delta + int64_t(bh) * N;
  const float lse2[2] = {row0 < N ? load(lse + row0) * 1.4426950408889634f : INFINITY,
                         row0 + 8 < N ? load(lse + row0 + 8) * 1.4426950408889634f : INFINITY};
  const float dlt[2] = {row0 < N ? load(delta + row0) : 0.f, row0 + 8 < N ? load(delta + row0 + 8) : 0.f};
  // Dropout: dO reaches the kept probabilities only, scaled by 1 / (1 - p): dP -> keep * dP / (1 - p).
  const Dropout drop = dropout_of(p, p.dropout_threshold ? load(p.dropout_seed) : 0, b, h,
                                  tile.sample.first_frame * p.tokens_per_frame);

  float dq[DP / 8][4];
  zero(dq);
  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1);
    cp_async_commit();
    cp_async_wait<1>();
    const int64_t s0 = key_lo + int64_t(t) * BN;
    const bool masked = s0 + BN > lo;
    T* kt = s_k + (t & 1) * Tiles::kKV;
    const T* vt = s_v + (t & 1) * Tiles::kKV;
    const bool nonfinite = __syncthreads_or(masked && !own_chunks_finite<BN, DP, 128>(kt));  // tile.cuh
    float s[BN / 8][4], dp[BN / 8][4];
    zero(s);
    zero(dp);
    gemm_abt<T, DP, BN>(s, [&](int kc, uint32_t(&a)[4]) { load_a<DP>(a, s_q, warp * 16, kc); }, kt);
    gemm_abt<T, DP, BN>(dp, [&](int kc, uint32_t(&a)[4]) { load_a<DP>(a, s_do, warp * 16, kc); }, vt);
    const int cut[2] = {tile_cut(limit[0], s0, BN), tile_cut(limit[1], s0, BN)};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2;
        const float pr = exp2_approx(s[j][e] * p.scale_log2 - lse2[half]);
        // dS, exactly 0 where the row does not see the key (its dP may be NaN from a hidden V).
        const bool hidden = masked && j * 8 + 2 * (lane % 4) + (e & 1) >= cut[half];
        float dpv = dp[j][e];
        if (drop.on())
          dpv = drop.keep(row0 + 8 * half, s0 + j * 8 + 2 * (lane % 4) + (e & 1)) ? dpv * p.dropout_scale : 0.f;
        s[j][e] = hidden ? 0.f : pr * (dpv - dlt[half]);
      }
    if (nonfinite) {  // rare: keep a hidden key's NaN or inf out of the rows that do not see it
      add_seen_nonfinite<DP>(dq, kt, {0, 0}, {cut[0] < 0 ? 0 : cut[0], cut[1] < 0 ? 0 : cut[1]});
      __syncthreads();
      zero_own_nonfinite<BN, DP, 128>(kt);
      __syncthreads();
    }
    gemm_pb<T, DP, BN>(dq, s, kt);
    __syncthreads();
  }
  cp_async_wait<0>();
  float* out = p.dq_rows + ((int64_t(blockIdx.z) * p.batch + b) * N * p.heads + h) * p.head_dim;
  store_strip<float, DP>(out, int64_t(p.heads) * p.head_dim, m0 + warp * 16, N, p.head_dim, dq, p.scale, p.scale);
}

template <int DP>
struct DkdvTiles {
  static constexpr int kBlockN = kBwdKeyTile, kBlockM = kBwdInner<DP>;
  static constexpr int kKV = kBlockN * kPitch<DP>, kQ = kBlockM * kPitch<DP>;
  static constexpr int kSmemElems = 2 * kKV + 4 * kQ;  // K, V, Q x 2, dO x 2
  static constexpr int kSmemFloats = 4 * kBlockM;      // LSE x 2, delta x 2
};

template <typename T, int DP>
__global__ void __launch_bounds__(128, 2) bwd_dkdv_kernel(const BwdParams p) {
  using Tiles = DkdvTiles<DP>;
  constexpr int BN = Tiles::kBlockN, BM = Tiles::kBlockM;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  T* s_k = reinterpret_cast<T*>(smem_bytes);
  T* s_v = s_k + Tiles::kKV;
  T* s_q = s_v + Tiles::kKV;
  T* s_do = s_q + 2 * Tiles::kQ;
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * Tiles::kQ);
  float* s_delta = s_lse + 2 * BM;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int b = static_cast<int>(load(p.tile_sample + blockIdx.x)), hk = blockIdx.y;
  const int64_t start = load(p.tile_start + blockIdx.x);  // first key of the tile, within its sample
  const int64_t N = p.num_query;
  const Sample sample = sample_of(p, b);
  const int64_t n_keys = sample.num_keys();
  const int64_t rows_from = sample.first_row(start);
  const int64_t rows_full = sample.first_row(min(start + BN, n_keys) - 1);  // rows >= this see every key
  const int64_t m_begin = rows_from / BM * BM;
  const int n_row_tiles = static_cast<int>((N - m_begin + BM - 1) / BM);

  const int64_t key0 = load(p.key_start + b) + start;
  const T* safe = static_cast<const T*>(p.q);
  load_tile<BN, DP, 128>(s_k, static_cast<const T*>(p.k) + key0 * p.k_stride_l + hk * p.k_stride_h, p.k_stride_l,
                         n_keys - start, p.head_dim, safe);
  load_tile<BN, DP, 128>(s_v, static_cast<const T*>(p.v) + key0 * p.v_stride_l + hk * p.v_stride_h, p.v_stride_l,
                         n_keys - start, p.head_dim, safe);

  // This thread's two keys (rows g and g + 8 of its warp's strip) and the first query row of each.
  const int64_t key_a = start + warp * 16 + lane / 4;
  const int64_t seen_from[2] = {key_a < n_keys ? sample.first_row(key_a) : N,
                                key_a + 8 < n_keys ? sample.first_row(key_a + 8) : N};

  float dk[DP / 8][4], dv[DP / 8][4];
  zero(dk);
  zero(dv);
  const int steps = n_row_tiles * p.group;  // (head of the group, query tile) pairs
  auto load_rows = [&](int step) {
    const int h = hk * p.group + step / n_row_tiles;
    const int64_t m0 = m_begin + int64_t(step % n_row_tiles) * BM;
    const int st = step & 1;
    load_tile<BM, DP, 128>(s_q + st * Tiles::kQ,
                           static_cast<const T*>(p.q) + b * p.q_stride_b + h * p.q_stride_h + m0 * p.q_stride_n,
                           p.q_stride_n, N - m0, p.head_dim, safe);
    load_tile<BM, DP, 128>(s_do + st * Tiles::kQ,
                           static_cast<const T*>(p.dout) + b * p.do_stride_b + h * p.do_stride_h + m0 * p.do_stride_n,
                           p.do_stride_n, N - m0, p.head_dim, safe);
    // Plain loads: visible to every warp after the barrier that precedes their use.
    const int64_t row_base = (int64_t(b) * p.heads + h) * N + m0;
    for (int i = threadIdx.x; i < 2 * BM; i += 128) {
      const int r = i % BM;
      const bool valid = m0 + r < N;
      if (i < BM) {
        store(s_lse + st * BM + r, valid ? load(p.lse + row_base + r) * 1.4426950408889634f : INFINITY);
      } else {
        store(s_delta + st * BM + r, valid ? load(p.delta + row_base + r) : 0.f);
      }
    }
  };
  if (steps > 0) load_rows(0);
  cp_async_commit();

  for (int step = 0; step < steps; ++step) {
    if (step + 1 < steps) load_rows(step + 1);
    cp_async_commit();
    cp_async_wait<1>();
    const int st = step & 1;
    const int64_t m0 = m_begin + int64_t(step % n_row_tiles) * BM;
    const bool masked = m0 < rows_full;
    T* qt = s_q + st * Tiles::kQ;
    T* dot = s_do + st * Tiles::kQ;
    const bool nonfinite = __syncthreads_or(  // tile.cuh
        masked && !(own_chunks_finite<BM, DP, 128>(qt) && own_chunks_finite<BM, DP, 128>(dot)));
    float pt[BM / 8][4], dpt[BM / 8][4];  // P^T and dP^T: keys x query rows
    zero(pt);
    zero(dpt);
    gemm_abt<T, DP, BM>(pt, [&](int kc, uint32_t(&a)[4]) { load_a<DP>(a, s_k, warp * 16, kc); }, qt);
    gemm_abt<T, DP, BM>(dpt, [&](int kc, uint32_t(&a)[4]) { load_a<DP>(a, s_v, warp * 16, kc); }, dot);
    const int cut[2] = {tile_cut(seen_from[0], m0, BM), tile_cut(seen_from[1], m0, BM)};  // first row seeing the key
    // Dropout of this step's head: V and dO meet the kept probabilities only, scaled by 1 / (1 - p).
    const Dropout drop = dropout_of(p, p.dropout_threshold ? load(p.dropout_seed) : 0, b,
                                    hk * p.group + step / n_row_tiles, sample.first_frame * p.tokens_per_frame);
    const int rows = N - m0 < BM ? static_cast<int>(N - m0) : BM;
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = j * 8 + 2 * (lane % 4) + (e & 1);
        const float pr = exp2_approx(pt[j][e] * p.scale_log2 - load(s_lse + st * BM + col));
        // P and dS exactly 0 where the row does not see the key, or is past N (a NaN key
        // makes such a row's score NaN, a NaN row's LSE makes its P NaN).
        const bool hidden = masked && (col < cut[e / 2] || col >= rows);
        float pv = hidden ? 0.f : pr, dpv = dpt[j][e];
        if (drop.on()) {
          const bool kept = drop.keep(m0 + col, key_a + 8 * (e / 2));
          pv = kept ? pv * p.dropout_scale : 0.f;
          dpv = kept ? dpv * p.dropout_scale : 0.f;
        }
        pt[j][e] = pv;
        dpt[j][e] = hidden ? 0.f : pr * (dpv - load(s_delta + st * BM + col));  // dS^T
      }
    if (nonfinite) {  // rare: keep a hidden row's NaN or inf out of the keys it does not see
      const int begin[2] = {cut[0] < 0 ? 0 : cut[0], cut[1] < 0 ? 0 : cut[1]}, end[2] = {rows, rows};
      add_seen_nonfinite<DP>(dv, dot, begin, end);
      add_seen_nonfinite<DP>(dk, qt, begin, end);
      __syncthreads();
      zero_own_nonfinite<BM, DP, 128>(qt);
      zero_own_nonfinite<BM, DP, 128>(dot);
      __syncthreads();
    }
    gemm_pb<T, DP, BM>(dv, pt, dot);
    gemm_pb<T, DP, BM>(dk, dpt, qt);
    __syncthreads();
  }
  cp_async_wait<0>();
  const int64_t strip = start + warp * 16;
  T* dk_out = static_cast<T*>(p.dk) + load(p.key_start + b) * p.dk_stride_l + hk * p.dk_stride_h;
  T* dv_out = static_cast<T*>(p.dv) + load(p.key_start + b) * p.dv_stride_l + hk * p.dv_stride_h;
  store_strip<T, DP>(dk_out, p.dk_stride_l, strip, n_keys, p.head_dim, dk, p.scale, p.scale);
  store_strip<T, DP>(dv_out, p.dv_stride_l, strip, n_keys, p.head_dim, dv, 1.f, 1.f);
}

template <typename T, int DP>
constexpr Geometry dq_geometry(const BwdParams& p) {
  using Tiles = DqTiles<DP>;
  return {"bwd_dq_kernel", unsigned(p.batch * p.heads), unsigned((p.num_query + Tiles::kBlockM - 1) / Tiles::kBlockM),
          unsigned(p.dq_splits), 128, int(Tiles::kSmemElems * sizeof(T))};
}

template <typename T, int DP>
constexpr Geometry dkdv_geometry(const BwdParams& p) {
  using Tiles = DkdvTiles<DP>;
  return {"bwd_dkdv_kernel", unsigned(p.num_key_tiles), unsigned(p.heads / p.group), 1u, 128,
          int(Tiles::kSmemElems * sizeof(T) + Tiles::kSmemFloats * sizeof(float))};
}

template <typename T, int DP>
cudaError_t launch_bwd_dq(const BwdParams& p, cudaStream_t stream) {
  return launch(bwd_dq_kernel<T, DP>, dq_geometry<T, DP>(p), stream, p);
}

template <typename T, int DP>
cudaError_t launch_bwd_dkdv(const BwdParams& p, cudaStream_t stream) {
  return launch(bwd_dkdv_kernel<T, DP>, dkdv_geometry<T, DP>(p), stream, p);
}

}  // namespace ccam
