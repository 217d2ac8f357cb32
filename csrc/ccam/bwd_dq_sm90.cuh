// Hopper (sm_90a) dQ pass: bwd.cuh's dQ math in fwd_sm90.cuh's shape. One CTA per (sample x
// head, 128-row query tile, key split), three warpgroups: the producer (warp 0's elected thread
// loads Q and dO once and streams K and V tiles of 64 keys through a two-stage mbarrier ring by
// TMA; warp 1 is the NaN rule's sanitizer) and two consumers of 64 rows each. Per key tile a
// consumer computes S = Q K^T and dP = dO V^T (wgmma, both operands from 128B-swizzled shared
// memory), P = exp(S scale - LSE) and dS = P (dP - delta) in registers (exactly 0 where the row
// does not see the key: its dP may be NaN from a hidden V), then dQ += dS K with dS as the
// register A operand and K read MN-major; dQ (times the softmax scale) is stored per split in
// float32 as bwd.cuh does. Each consumer stops at its own rows' last key tile (fwd_sm90.cuh).
//
// The NaN rule: dS = 0 times a hidden key's NaN or inf in K is still NaN. S must see the raw K
// (a key a row sees poisons its whole dQ row through S), so the sanitizer does not zero K in
// place: for a straddling tile with a NaN or inf it writes a zeroed copy (one more tile per
// stage) and raises the stage's flag; the consumers then run dS K on the copy and add, from
// the raw tile, the non-finite values their rows see (as bwd.cuh). Dropout is not built yet:
// the host never dispatches this kernel (it is tested under the emulator only).
#pragma once

#include <cfloat>

#include "hopper.cuh"
#include "launch.cuh"
#include "params.h"
#include "rule.cuh"
#include "sm90_tile.cuh"
#include "tile.cuh"

namespace ccam {

struct Sm90DqParams {
  BwdParams p;
  CUtensorMap q, dout, k, v;
};

template <int DP>
struct Sm90DqTiles {
  static_assert(DP == 64 || DP == 128);
  static constexpr int kBlockM = 128, kBlockN = 64, kThreads = 384, kStages = 2;
  static constexpr int kBlocks = DP / 64;  // 64-column (128-byte, one swizzle row) blocks
  static constexpr int kQBytes = kBlockM * DP * 2, kKVBytes = kBlockN * DP * 2, kBarBytes = 1024;
  // Q, dO; per stage K, V and the sanitizer's zeroed copy of K.
  static constexpr int kSmemBytes = kBarBytes + 2 * kQBytes + 3 * kStages * kKVBytes;
  static constexpr int kRegs = 168, kProducerRegs = 24, kConsumerRegs = 240;  // as Sm90FwdTiles
};

template <typename T, int DP>
__global__ void __launch_bounds__(384, 1) bwd_dq_sm90_kernel(const __grid_constant__ Sm90DqParams args) {
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __trap();  // compiled for another arch: never launched there
#else
  using Tiles = Sm90DqTiles<DP>;
  constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN;
  const BwdParams& p = args.p;
  extern __shared__ __align__(1024) unsigned char smem_bytes[];
  auto* bars = reinterpret_cast<uint64_t*>(smem_bytes);
  // Per stage: K landed (tiles every row sees whole), V landed, K and V free again; K landed and
  // K checked (the straddling tiles: a barrier of their own, so that the sanitizer, which waits
  // on those tiles only, never waits a parity two phases behind).
  uint64_t *q_full = bars, *k_full = bars + 1, *v_full = bars + 3, *k_empty = bars + 5, *v_empty = bars + 7;
  uint64_t *k_tma = bars + 9, *k_clean = bars + 11;
  uint32_t* k_flag = reinterpret_cast<uint32_t*>(smem_bytes + 128);  // per stage: K had a NaN or inf
  unsigned char* s_q = smem_bytes + Tiles::kBarBytes;
  unsigned char* s_do = s_q + Tiles::kQBytes;
  unsigned char* s_k = s_do + Tiles::kQBytes;
  unsigned char* s_v = s_k + Tiles::kStages * Tiles::kKVBytes;
  unsigned char* s_kz = s_v + Tiles::kStages * Tiles::kKVBytes;  // zeroed copies of K

  const int wg = threadIdx.x / 128;
  const QueryTile tile = query_tile(p, BM);
  const int bh = tile.bh, b = tile.b, h = tile.h, hk = tile.hk;
  const int64_t N = p.num_query, m0 = tile.m0, lo = tile.lo, hi = tile.hi;
  const KeyTiles range = key_tiles(tile, BN, p.dq_splits);
  const int64_t key_lo = range.key_lo, key_hi = range.key_hi;
  const int n_tiles = range.n_tiles;
  // Tiles [0, n_full) every row sees whole; the rest straddle some row's limit or run past hi.
  const int n_full = range.n_full;

  if (threadIdx.x == 0) {
    mbarrier_init(q_full, 1);
    for (int s = 0; s < Tiles::kStages; ++s) {
      mbarrier_init(k_full + s, 1);
      mbarrier_init(v_full + s, 1);
      mbarrier_init(k_empty + s, 256);
      mbarrier_init(v_empty + s, 256);
      mbarrier_init(k_tma + s, 1);
      mbarrier_init(k_clean + s, 32);
    }
    fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    setmaxnreg_dec<Tiles::kProducerRegs>();
    if (threadIdx.x < 32 && elect_one()) {
      const int64_t key0 = load(p.key_start + b);
      const int qb = p.q_stride_b == 0 ? 0 : b;
      mbarrier_arrive_expect_tx(q_full, 2 * Tiles::kQBytes);
      for (int c = 0; c < Tiles::kBlocks; ++c) {
        tma_load_4d(s_q + c * BM * 128, &args.q, q_full, c * 64, h, static_cast<int>(m0), qb);
        tma_load_4d(s_do + c * BM * 128, &args.dout, q_full, c * 64, h, static_cast<int>(m0), b);
      }
      for (int t = 0; t < n_tiles; ++t) {
        const int s = t % Tiles::kStages;
        const uint32_t free_parity = ((t / Tiles::kStages) & 1) ^ 1;  // the first pass finds stages free
        const int key = static_cast<int>(key0 + key_lo + int64_t(t) * BN);
        mbarrier_wait(k_empty + s, free_parity);
        uint64_t* k_bar = (t < n_full ? k_full : k_tma) + s;
        mbarrier_arrive_expect_tx(k_bar, Tiles::kKVBytes);
        for (int c = 0; c < Tiles::kBlocks; ++c)
          tma_load_3d(s_k + s * Tiles::kKVBytes + c * BN * 128, &args.k, k_bar, c * 64, hk, key);
        mbarrier_wait(v_empty + s, free_parity);
        mbarrier_arrive_expect_tx(v_full + s, Tiles::kKVBytes);
        for (int c = 0; c < Tiles::kBlocks; ++c)
          tma_load_3d(s_v + s * Tiles::kKVBytes + c * BN * 128, &args.v, v_full + s, c * 64, hk, key);
      }
    } else if (threadIdx.x / 32 == 1) {  // the sanitizer: straddling K tiles get a zeroed copy
      const int lane = threadIdx.x % 32;
      constexpr int kChunks = Tiles::kKVBytes / 16 / 32;  // 16-byte chunks per lane
#pragma unroll 1
      for (int t = n_full; t < n_tiles; ++t) {
        const int s = t % Tiles::kStages;
        mbarrier_wait(k_tma + s, ((t - n_full) / Tiles::kStages) & 1);
        const uint4* kt = reinterpret_cast<const uint4*>(s_k + s * Tiles::kKVBytes);
        bool finite = true;
#pragma unroll 1
        for (int i = 0; i < kChunks; ++i) {
          const uint4 x = load(kt + lane + 32 * i);
          finite = finite && finite_part<T>(x.x) == x.x && finite_part<T>(x.y) == x.y &&
                   finite_part<T>(x.z) == x.z && finite_part<T>(x.w) == x.w;
        }
        const bool flagged = warp_any(!finite);
        if (flagged) {  // rare
          uint4* kz = reinterpret_cast<uint4*>(s_kz + s * Tiles::kKVBytes);
#pragma unroll 1
          for (int i = 0; i < kChunks; ++i) {
            const uint4 x = load(kt + lane + 32 * i);
            store(kz + lane + 32 * i,
                  uint4{finite_part<T>(x.x), finite_part<T>(x.y), finite_part<T>(x.z), finite_part<T>(x.w)});
          }
          fence_proxy_async();  // the wgmma (async proxy) reads the copy
        }
        if (lane == 0) store(k_flag + s, uint32_t(flagged));
        mbarrier_arrive(k_clean + s);
      }
    }
    return;
  }

  // consumers: warpgroup cw owns rows m0 + 64 cw .. + 63; warp w of it 16 of them
  setmaxnreg_inc<Tiles::kConsumerRegs>();
  const int cw = wg - 1, w = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  const int64_t strip = m0 + cw * 64 + w * 16, row0 = strip + lane / 4;
  const int64_t limit[2] = {tile.sample.key_limit(row0), tile.sample.key_limit(row0 + 8)};
  const float* lse = p.lse + int64_t(bh) * N;
  const float* delta = p.delta + int64_t(bh) * N;
  // Rows past N: LSE +inf makes their probabilities 0 (bwd.cuh).
  const float lse2[2] = {row0 < N ? load(lse + row0) * 1.4426950408889634f : INFINITY,
                         row0 + 8 < N ? load(lse + row0 + 8) * 1.4426950408889634f : INFINITY};
  const float dlt[2] = {row0 < N ? load(delta + row0) : 0.f, row0 + 8 < N ? load(delta + row0 + 8) : 0.f};
  const int64_t wg_first = m0 + cw * 64, wg_last = min(wg_first + 63, N - 1);
  const int64_t wg_hi = wg_first < N ? min(tile.sample.key_limit(wg_last), key_hi) : key_lo;
  const int n_mine = wg_hi > key_lo ? static_cast<int>(min(int64_t(n_tiles), (wg_hi - key_lo + BN - 1) / BN)) : 0;
  float dq[DP / 8][4];
  zero(dq);
  mbarrier_wait(q_full, 0);
  auto wait_k = [&](int t) {  // K of tile t landed
    const int s = t % Tiles::kStages;
    if (t < n_full) mbarrier_wait(k_full + s, (t / Tiles::kStages) & 1);
    else mbarrier_wait(k_tma + s, ((t - n_full) / Tiles::kStages) & 1);
  };

  for (int t = 0; t < n_mine; ++t) {
    const int s = t % Tiles::kStages;
    const int64_t s0 = key_lo + int64_t(t) * BN;
    const bool masked = t >= n_full;
    float sc[BN / 8][4], dp[BN / 8][4];
    // S = Q K^T and dP = dO V^T, two commit groups on the tensor cores at once.
    wait_k(t);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      const uint64_t da = make_smem_desc(s_q + (kk / 4) * BM * 128 + cw * 64 * 128 + (kk % 4) * 32, 16, 1024, 128);
      const uint64_t db = make_smem_desc(s_k + s * Tiles::kKVBytes + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024, 128);
      wgmma_ss<T, BN>(reinterpret_cast<float(&)[BN / 2]>(sc), da, db, kk > 0);
    }
    wgmma_commit();
    mbarrier_wait(v_full + s, (t / Tiles::kStages) & 1);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < DP / 16; ++kk) {
      const uint64_t da = make_smem_desc(s_do + (kk / 4) * BM * 128 + cw * 64 * 128 + (kk % 4) * 32, 16, 1024, 128);
      const uint64_t db = make_smem_desc(s_v + s * Tiles::kKVBytes + (kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024, 128);
      wgmma_ss<T, BN>(reinterpret_cast<float(&)[BN / 2]>(dp), da, db, kk > 0);
    }
    wgmma_commit();
    wgmma_wait<0>();
    mbarrier_arrive(v_empty + s);

    const int cut[2] = {tile_cut(limit[0], s0, BN), tile_cut(limit[1], s0, BN)};
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int half = e / 2;
        const float pr = exp2_approx(sc[j][e] * p.scale_log2 - lse2[half]);
        const bool hidden = masked && j * 8 + 2 * (lane % 4) + (e & 1) >= cut[half];
        sc[j][e] = hidden ? 0.f : pr * (dp[j][e] - dlt[half]);
      }
    uint32_t pa[BN / 16][4];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = Mma<T>::pack(sc[2 * kk][0], sc[2 * kk][1]), pa[kk][1] = Mma<T>::pack(sc[2 * kk][2], sc[2 * kk][3]);
      pa[kk][2] = Mma<T>::pack(sc[2 * kk + 1][0], sc[2 * kk + 1][1]);
      pa[kk][3] = Mma<T>::pack(sc[2 * kk + 1][2], sc[2 * kk + 1][3]);
    }
    const unsigned char* k_b = s_k + s * Tiles::kKVBytes;  // dS K's B operand: K, or its zeroed copy
    if (masked) {
      mbarrier_wait(k_clean + s, ((t - n_full) / Tiles::kStages) & 1);
      if (load(k_flag + s)) {  // rare: this warp's rows get the NaN and inf of the keys they see
        const int end[2] = {cut[0] < 0 ? 0 : cut[0], cut[1] < 0 ? 0 : cut[1]};
        add_seen_nonfinite_sw128<T, DP, BN>(dq, k_b, end);
        k_b = s_kz + s * Tiles::kKVBytes;
      }
    }
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t dk = make_smem_desc(k_b + kk * 16 * 128, BN * 128, 1024, 128);
      wgmma_rs<T, DP, true>(reinterpret_cast<float(&)[DP / 2]>(dq), pa[kk], dk, 1);
    }
    wgmma_commit();
    wgmma_wait<0>();
    mbarrier_arrive(k_empty + s);
  }
  // The tiles past this warpgroup's rows: wait for each stage as a consumer would, and free it.
  for (int t = n_mine; t < n_tiles; ++t) {
    const int s = t % Tiles::kStages;
    wait_k(t);
    mbarrier_wait(v_full + s, (t / Tiles::kStages) & 1);
    mbarrier_arrive(v_empty + s);
    if (t >= n_full) mbarrier_wait(k_clean + s, ((t - n_full) / Tiles::kStages) & 1);
    mbarrier_arrive(k_empty + s);
  }

  float* out = p.dq_rows + ((int64_t(blockIdx.z) * p.batch + b) * N * p.heads + h) * p.head_dim;
  store_strip<float, DP>(out, int64_t(p.heads) * p.head_dim, strip, N, p.head_dim, dq, p.scale, p.scale);
#endif
}

template <int DP>
constexpr Geometry dq_sm90_geometry(const BwdParams& p) {
  using Tiles = Sm90DqTiles<DP>;
  return {"bwd_dq_sm90_kernel", unsigned(p.batch * p.heads), unsigned((p.num_query + Tiles::kBlockM - 1) / Tiles::kBlockM),
          unsigned(p.dq_splits), Tiles::kThreads, Tiles::kSmemBytes};
}

// Tensor maps as the forward's (make_sm90_fwd_maps), plus dO as (D, H, N, B).
template <int DP>
cudaError_t make_sm90_dq_maps(Sm90DqParams& a, int64_t num_keys, int kv_heads) {
  using Tiles = Sm90DqTiles<DP>;
  const BwdParams& p = a.p;
  const int64_t qb = p.q_stride_b == 0 ? 1 : p.batch;
  const int64_t qdims[4] = {p.head_dim, p.heads, p.num_query, qb};
  const int64_t qstr[3] = {2 * p.q_stride_h, 2 * p.q_stride_n, 2 * (p.q_stride_b ? p.q_stride_b : p.num_query * p.q_stride_n)};
  const int qbox[4] = {64, 1, Tiles::kBlockM, 1};
  cudaError_t err = encode_tensor_map(&a.q, p.q, 2, 4, qdims, qstr, qbox, 128);
  if (err != cudaSuccess) return err;
  const int64_t ddims[4] = {p.head_dim, p.heads, p.num_query, p.batch};
  const int64_t dstr[3] = {2 * p.do_stride_h, 2 * p.do_stride_n, 2 * p.do_stride_b};
  err = encode_tensor_map(&a.dout, p.dout, 2, 4, ddims, dstr, qbox, 128);
  if (err != cudaSuccess) return err;
  return encode_kv_maps(&a.k, &a.v, p, num_keys, kv_heads, Tiles::kBlockN);
}

template <typename T, int DP>
cudaError_t launch_bwd_dq_sm90(const BwdParams& p, int64_t num_keys, int kv_heads, cudaStream_t stream) {
  Sm90DqParams a{};
  a.p = p;
  const cudaError_t err = make_sm90_dq_maps<DP>(a, num_keys, kv_heads);
  if (err != cudaSuccess) return err;
  return launch_sm90(bwd_dq_sm90_kernel<T, DP>, dq_sm90_geometry<DP>(p), Sm90DqTiles<DP>::kRegs, stream, a);
}

}  // namespace ccam
