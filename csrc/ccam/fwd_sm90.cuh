// Hopper (sm_90a) forward: warp-specialized, TMA loads into an mbarrier-guarded ring, wgmma.
//
// One CTA per (sample x head, 128-row query tile[, key split]), three warpgroups: warpgroup 0
// is the producer (one elected thread issues every TMA load; the warpgroup gives its registers
// away with setmaxnreg), warpgroups 1 and 2 are consumers of 64 query rows each. Q lands once;
// K and V tiles stream through a two-stage ring, each stage guarded by a "full" barrier (the
// producer's arrive.expect_tx plus the copies' bytes) and an "empty" one (every consumer
// thread arrives once it no longer reads the stage). Operands land 128B-swizzled in 64-column
// (128-byte) blocks; the wgmma descriptors read them in the matching canonical layouts: Q and
// K K-major (a 16-column k-step is +32 bytes inside the swizzle atom), V MN-major (keys are
// the K dimension; the next 64-column block is the leading byte offset). S = Q K^T stays in
// registers; P goes to P V as wgmma's register A operand (the accumulator's 8-column blocks,
// packed in pairs, are the A fragment). The mask, tile bounds, splits, frame windows, dropout
// (dropout.cuh) and the epilogue are fwd.cuh's.
//
// The NaN rule (docs/reference.md §7) as fwd.cuh keeps it: a key tile that straddles the
// rows' limits (or runs past them: TMA loads whole boxes, the next sample's keys included) may
// hold a NaN or inf value that some rows do not see, and their probability 0 times it would
// still be NaN. Warp 1 of the producer warpgroup (the "sanitizer") checks each such V tile
// once it lands; in the rare tile that holds one, it keeps a raw copy, zeroes the non-finite
// values in place for the wgmma and raises the stage's flag, and the consumers add to their
// rows the non-finite values they see, from the raw copy. The tiles every row sees whole go
// straight from TMA to the consumers (v_full); the straddling ones through the sanitizer
// (v_tma, then v_clean).
//
// Intra-warpgroup pipelining overlaps each tile's softmax with the next tile's S GEMM and the
// previous tile's P V GEMM. Not built yet (docs/cuda.md): ping-pong between the consumer
// warpgroups, persistent scheduling, and the backward.
#pragma once

#include <cfloat>

#include "dropout.cuh"
#include "fwd_epilogue.cuh"
#include "hopper.cuh"
#include "sm90_tile.cuh"
#include "launch.cuh"
#include "params.h"
#include "rule.cuh"
#include "tile.cuh"

namespace ccam {

struct Sm90FwdParams {
  FwdParams p;
  CUtensorMap q, k, v;
};

template <int DP>
struct Sm90FwdTiles {
  static_assert(DP == 64 || DP == 128);
  static constexpr int kBlockM = 128, kBlockN = DP == 64 ? 128 : 64, kThreads = 384, kStages = 2;
  static constexpr int kBlocks = DP / 64;  // 64-column (128-byte, one swizzle row) blocks
  static constexpr int kQBytes = kBlockM * DP * 2, kKVBytes = kBlockN * DP * 2, kBarBytes = 1024;
  // Q, K and V stages, and per stage the sanitizer's raw copy of a V tile with a NaN or inf.
  static constexpr int kSmemBytes = kBarBytes + kQBytes + 3 * kStages * kKVBytes;
  // Registers per thread at launch (__launch_bounds__(384, 1): 65536 / 384, rounded down to 8);
  // the producer drops to 24 and the consumers take 240: 128 * 24 + 256 * 240 = 384 * 168.
  static constexpr int kRegs = 168, kProducerRegs = 24, kConsumerRegs = 240;
};

template <typename T, int DP>
__global__ void __launch_bounds__(384, 1) fwd_sm90_kernel(const __grid_constant__ Sm90FwdParams args) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // compiled for another arch: launch_fwd_sm90 refuses before launching this
#else
  using Tiles = Sm90FwdTiles<DP>;
  constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN;
  const FwdParams& p = args.p;
  extern __shared__ __align__(1024) unsigned char smem_bytes[];
  auto* bars = reinterpret_cast<uint64_t*>(smem_bytes);
  // Per stage: K landed; V landed (tiles every row sees whole); V landed for the sanitizer, and
  // sanitized (the straddling tiles); K and V free again.
  uint64_t *q_full = bars, *k_full = bars + 1, *v_full = bars + 3, *k_empty = bars + 5, *v_empty = bars + 7;
  uint64_t *v_tma = bars + 9, *v_clean = bars + 11;
  uint32_t* v_flag = reinterpret_cast<uint32_t*>(smem_bytes + 128);  // per stage: the V tile had a NaN or inf
  unsigned char* s_q = smem_bytes + Tiles::kBarBytes;
  unsigned char* s_k = s_q + Tiles::kQBytes;
  unsigned char* s_v = s_k + Tiles::kStages * Tiles::kKVBytes;
  unsigned char* s_raw = s_v + Tiles::kStages * Tiles::kKVBytes;

  const int wg = threadIdx.x / 128;
  const QueryTile tile = query_tile(p, BM);
  const int bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk;
  const int64_t N = p.num_query, m0 = tile.m0, lo = tile.lo, hi = tile.hi;
  const KeyTiles range = key_tiles(tile, BN, p.num_splits);
  const int64_t key_lo = range.key_lo, key_hi = range.key_hi;
  const int n_tiles = range.n_tiles;
  // Tiles [0, n_full) end at or below lo: every row sees them whole (no mask, no NaN check).
  // The rest straddle some row's limit or run past hi; their uses of a stage are counted from
  // n_full for the parities of v_tma and v_clean.
  const int n_full = range.n_full;

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < Tiles::kStages; ++s) {
      mbarrier_init(k_full + s, 1);
      mbarrier_init(v_full + s, 1);
      mbarrier_init(k_empty + s, 256);
      mbarrier_init(v_empty + s, 256);
      mbarrier_init(v_tma + s, 1);
      mbarrier_init(v_clean + s, 32);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    setmaxnreg_dec<Tiles::kProducerRegs>();
    if (threadIdx.x < 32 && elect_one()) {
      const int64_t key0 = load(p.key_start + b);
      const int qb = p.q_stride_b == 0 ? 0 : b;
      mbarrier_arrive_expect_tx(q_full, Tiles::kQBytes);
      for (int c = 0; c < Tiles::kBlocks; ++c)
        tma_load_4d(s_q + c * BM * 128, &args.q, q_full, c * 64, h, static_cast<int>(m0), qb);
      for (int t = 0; t < n_tiles; ++t) {
        const int s = t % Tiles::kStages;
        const uint32_t free_parity = ((t / Tiles::kStages) & 1) ^ 1;  // the first pass finds stages free
        const int key = static_cast<int>(key0 + key_lo + int64_t(t) * BN);
        mbarrier_wait(k_empty + s, free_parity);
        mbarrier_arrive_expect_tx(k_full + s, Tiles::kKVBytes);
        for (int c = 0; c < Tiles::kBlocks; ++c)
          tma_load_3d(s_k + s * Tiles::kKVBytes + c * BN * 128, &args.k, k_full + s, c * 64, hk, key);
        mbarrier_wait(v_empty + s, free_parity);
        uint64_t* v_bar = (t < n_full ? v_full : v_tma) + s;
        mbarrier_arrive_expect_tx(v_bar, Tiles::kKVBytes);
        for (int c = 0; c < Tiles::kBlocks; ++c)
          tma_load_3d(s_v + s * Tiles::kKVBytes + c * BN * 128, &args.v, v_bar, c * 64, hk, key);
      }
    } else if (threadIdx.x / 32 == 1) {  // the sanitizer: the NaN rule's check of straddling V tiles
      const int lane = threadIdx.x % 32;
      constexpr int kChunks = Tiles::kKVBytes / 16 / 32;  // 16-byte chunks per lane
#pragma unroll 1
      for (int t = n_full; t < n_tiles; ++t) {
        const int s = t % Tiles::kStages;
        mbarrier_wait(v_tma + s, ((t - n_full) / Tiles::kStages) & 1);
        uint4* vt = reinterpret_cast<uint4*>(s_v + s * Tiles::kKVBytes);
        bool finite = true;
#pragma unroll 1
        for (int i = 0; i < kChunks; ++i) {
          const uint4 x = load(vt + lane + 32 * i);
          finite = finite && finite_part<T>(x.x) == x.x && finite_part<T>(x.y) == x.y &&
                   finite_part<T>(x.z) == x.z && finite_part<T>(x.w) == x.w;
        }
        const bool flagged = warp_any(!finite);
        if (flagged) {  // rare: keep the raw tile for the consumers, zero its NaN and inf for the wgmma
          uint4* raw = reinterpret_cast<uint4*>(s_raw + s * Tiles::kKVBytes);
#pragma unroll 1
          for (int i = 0; i < kChunks; ++i) {
            const uint4 x = load(vt + lane + 32 * i);
            store(raw + lane + 32 * i, x);
            const uint4 y = {finite_part<T>(x.x), finite_part<T>(x.y), finite_part<T>(x.z), finite_part<T>(x.w)};
            if (y.x != x.x || y.y != x.y || y.z != x.z || y.w != x.w) store(vt + lane + 32 * i, y);
          }
          fence_proxy_async();  // the wgmma (async proxy) reads the zeroed values
        }
        if (lane == 0) store(v_flag + s, uint32_t(flagged));
        mbarrier_arrive(v_clean + s);
      }
    }
    return;
  }

  // consumers: warpgroup cw owns rows m0 + 64 cw .. + 63; warp w of it 16 of them
  setmaxnreg_inc<Tiles::kConsumerRegs>();
  const int cw = wg - 1, w = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int64_t strip = m0 + cw * 64 + w * 16, row0 = strip + lane / 4;
  const int64_t limit[2] = {tile.sample.key_limit(row0), tile.sample.key_limit(row0 + 8)};
  // As fwd.cuh: P's dropped entries are zeroed after the row sums; keys counted from the video's start.
  const Dropout drop = dropout_of(p, p.dropout_threshold ? load(p.dropout_seed) : 0, b, h,
                                  tile.sample.first_frame * p.tokens_per_frame);
  // This warpgroup's own key tiles: the CTA's up to its last row's limit (rows 64 apart see up
  // to several frames fewer keys than the tile's last row: their GEMMs would be all masked).
  // Past them it only passes the stages on (tail loop below), so the barriers' counts hold.
  const int64_t wg_first = m0 + cw * 64, wg_last = min(wg_first + 63, N - 1);
  const int64_t wg_hi = wg_first < N ? min(tile.sample.key_limit(wg_last), key_hi) : key_lo;
  const int n_mine = wg_hi > key_lo ? static_cast<int>(min(int64_t(n_tiles), (wg_hi - key_lo + BN - 1) / BN)) : 0;
  float o[DP / 8][4];
  zero(o);
  float m_run[2] = {-INFINITY, -INFINITY}, l_run[2] = {0.f, 0.f};
  mbarrier_wait(q_full, 0);

  // S(t) = Q K(t)^T into `into` (scale-d 0 on the first k-step): issued and committed, not waited.
  auto issue_s = [&](float (&into)[BN / 8][4], int t) {
    const int s = t % Tiles::kStages;
    mbarrier_wait(k_full + s, (t / Tiles::kStages) & 1);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      const uint64_t dq = make_smem_desc(s_q + (kk / 4) * BM * 128 + cw * 64 * 128 + (kk % 4) * 32, 16, 1024, 128);
      const uint64_t dk = make_smem_desc(s_k + s * Tiles::kKVBytes + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024, 128);
      wgmma_ss<T, BN>(reinterpret_cast<float(&)[BN / 2]>(into), dq, dk, kk > 0);
    }
    wgmma_commit();
  };

  // Intra-warpgroup pipelining: S(t + 1) runs on the tensor cores while this warpgroup does
  // tile t's softmax, and P(t) V(t) runs while it does tile t + 1's (the O rescale waits for
  // it). Commit order per iteration: [P(t-1) V(t-1)], S(t+1), P(t) V(t).
  float sc[BN / 8][4], sn[BN / 8][4];
  if (n_mine > 0) {
    issue_s(sc, 0);
    wgmma_wait<0>();
    mbarrier_arrive(k_empty + 0);
  }
  for (int t = 0; t < n_mine; ++t) {
    const int s = t % Tiles::kStages;
    const int64_t s0 = key_lo + int64_t(t) * BN;
    const bool next = t + 1 < n_mine;
    if (next) issue_s(sn, t + 1);

    const bool masked = t >= n_full;  // s0 + BN > lo: straddles some row's limit or runs past hi
    float alpha[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int cut = tile_cut(limit[half], s0, BN);
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          float x = sc[j][e] * p.scale_log2;
          if (masked && j * 8 + 2 * (lane % 4) + (e & 1) >= cut) x = -INFINITY;
          sc[j][e] = x;
          mx = fmaxf(mx, x);
        }
      const float m_new = fmaxf(m_run[half], quad_max(mx));
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // as fwd.cuh: no live key yet
      alpha[half] = exp2_approx(m_run[half] - m_use);
      m_run[half] = m_new;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          sc[j][e] = exp2_approx(sc[j][e] - m_use);
          sum += sc[j][e];
        }
      l_run[half] = l_run[half] * alpha[half] + sum;
      if (drop.on()) {
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
          for (int e = 2 * half; e < 2 * half + 2; ++e)
            if (!drop.keep(row0 + 8 * half, s0 + j * 8 + 2 * (lane % 4) + (e & 1))) sc[j][e] = 0.f;
      }
    }

    if (t > 0) {  // P(t-1) V(t-1) must be done before O is rescaled (S(t+1) may still run)
      if (next) wgmma_wait<1>();
      else wgmma_wait<0>();
      mbarrier_arrive(v_empty + (t - 1) % Tiles::kStages);
    }
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      o[j][0] *= alpha[0], o[j][1] *= alpha[0];
      o[j][2] *= alpha[1], o[j][3] *= alpha[1];
    }
    // P as wgmma's register A operand: kept unchanged until its wgmma is waited on.
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = Mma<T>::pack(sc[2 * kk][0], sc[2 * kk][1]), pa[kk][1] = Mma<T>::pack(sc[2 * kk][2], sc[2 * kk][3]);
      pa[kk][2] = Mma<T>::pack(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[kk][3] = Mma<T>::pack(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
    if (masked) {
      mbarrier_wait(v_clean + s, ((t - n_full) / Tiles::kStages) & 1);
      if (load(v_flag + s)) {  // rare: this warp's rows get the NaN and inf they see, from the raw tile
        const int c0 = tile_cut(limit[0], s0, BN), c1 = tile_cut(limit[1], s0, BN);
        const int cut[2] = {c0 < 0 ? 0 : c0, c1 < 0 ? 0 : c1};
        add_seen_nonfinite_sw128<T, DP, BN>(o, s_raw + s * Tiles::kKVBytes, cut);
      }
    } else {
      mbarrier_wait(v_full + s, (t / Tiles::kStages) & 1);
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t dv = make_smem_desc(s_v + s * Tiles::kKVBytes + kk * 16 * 128, BN * 128, 1024, 128);
      wgmma_rs<T, DP, true>(reinterpret_cast<float(&)[DP / 2]>(o), pa[kk], dv, 1);
    }
    wgmma_commit();
    if (next) {  // S(t+1) (committed before P(t) V(t)) lands; K(t+1)'s stage is free
      wgmma_wait<1>();
      mbarrier_arrive(k_empty + (t + 1) % Tiles::kStages);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) sc[j][e] = sn[j][e];
    }
  }
  if (n_mine > 0) {
    wgmma_wait<0>();
    mbarrier_arrive(v_empty + (n_mine - 1) % Tiles::kStages);
  }
  // The tiles past this warpgroup's rows (straddling ones, or any when all its rows are past
  // N): wait for each stage as a consumer would, and free it.
  for (int t = n_mine; t < n_tiles; ++t) {
    const int s = t % Tiles::kStages;
    mbarrier_wait(k_full + s, (t / Tiles::kStages) & 1);
    mbarrier_arrive(k_empty + s);
    if (t < n_full) mbarrier_wait(v_full + s, (t / Tiles::kStages) & 1);
    else mbarrier_wait(v_clean + s, ((t - n_full) / Tiles::kStages) & 1);
    mbarrier_arrive(v_empty + s);
  }

  store_forward_rows<T, DP>(p, b, h, bh, strip, row0, lane, o, m_run, l_run, drop.on() ? p.dropout_scale : 1.f);
#endif
}

template <int DP>
constexpr Geometry fwd_sm90_geometry(const FwdParams& p) {
  using Tiles = Sm90FwdTiles<DP>;
  return {"fwd_sm90_kernel", unsigned(p.batch * p.heads), unsigned((p.num_query + Tiles::kBlockM - 1) / Tiles::kBlockM),
          unsigned(p.num_splits), Tiles::kThreads, Tiles::kSmemBytes};
}

// The tensor maps: Q as (D, H, N, B) (B = 1 for a shared q), K and V as (D, Hkv, L); boxes of
// 64 columns (128 bytes, the swizzle's row) by one head by BM query rows or BN keys.
template <int DP>
cudaError_t make_sm90_fwd_maps(Sm90FwdParams& a, int64_t num_keys, int kv_heads) {
  using Tiles = Sm90FwdTiles<DP>;
  const FwdParams& p = a.p;
  const int64_t qb = p.q_stride_b == 0 ? 1 : p.batch;
  const int64_t qdims[4] = {p.head_dim, p.heads, p.num_query, qb};
  const int64_t qstr[3] = {2 * p.q_stride_h, 2 * p.q_stride_n, 2 * (p.q_stride_b ? p.q_stride_b : p.num_query * p.q_stride_n)};
  const int qbox[4] = {64, 1, Tiles::kBlockM, 1};
  cudaError_t err = encode_tensor_map(&a.q, p.q, 2, 4, qdims, qstr, qbox, 128);
  if (err != cudaSuccess) return err;
  return encode_kv_maps(&a.k, &a.v, p, num_keys, kv_heads, Tiles::kBlockN);
}

// num_keys: rows of the packed k / v (L); kv_heads: their heads.
template <typename T, int DP>
cudaError_t launch_fwd_sm90(const FwdParams& p, int64_t num_keys, int kv_heads, cudaStream_t stream) {
  Sm90FwdParams a{};
  a.p = p;
  const cudaError_t err = make_sm90_fwd_maps<DP>(a, num_keys, kv_heads);
  if (err != cudaSuccess) return err;
  return launch_sm90(fwd_sm90_kernel<T, DP>, fwd_sm90_geometry<DP>(p), Sm90FwdTiles<DP>::kRegs, stream, a);
}

}  // namespace ccam
