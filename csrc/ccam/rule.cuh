// The mask rule (docs/reference.md §2) in the kernels' terms, defined once for every kernel: row i of a
// sample with T frames sees the keys [0, (floor(i*T/N) + 1) * P) of its sample; a key of frame
// f is seen by the rows i >= ceil(f*N/T) (none when that is N: possible when T > N).
#pragma once

#include "mma.cuh"
#include "params.h"

namespace ccam {

// A sample's rule over its frame window [f0, f1): keys are counted from the window's first key
// (frame f0), so a row's limit is the rule's, shifted by f0 * P and clamped to the window's
// keys. It stays non-decreasing in the row, so every tile bound below holds unchanged; a row
// whose frame is before the window sees nothing (limit 0). The window [0, T) is the whole video.
struct Sample {
  int64_t num_query, tokens_per_frame, frames;  // N, P, T
  int64_t first_frame, end_frame;               // f0, f1

  __device__ __forceinline__ int64_t key_limit(int64_t row) const {
    const int64_t limit = (row * frames / num_query + 1 - first_frame) * tokens_per_frame;
    return limit < 0 ? 0 : limit > num_keys() ? num_keys() : limit;
  }
  __device__ __forceinline__ int64_t first_row(int64_t key) const {
    return ((first_frame + key / tokens_per_frame) * num_query + frames - 1) / frames;
  }
  __device__ __forceinline__ int64_t num_keys() const { return (end_frame - first_frame) * tokens_per_frame; }
};

__device__ __forceinline__ Sample sample_of(const AttentionShape& p, int b) {
  return Sample{p.num_query, p.tokens_per_frame, load(p.frames + b), load(p.first_frame + b), load(p.end_frame + b)};
}

// What a CTA of a (B*H, query tiles[, splits]) grid owns: its sample, head and kv head, its
// first row m0, and the tile's key bounds: keys below `lo` are visible to every row of the
// tile (no mask), keys in [lo, hi) to some rows (masked per row), none at or past `hi`.
// Query tiles launch longest first: blocks start in linear order, so the grid's first row of
// blocks takes the last tile, whose rows see the most keys.
struct QueryTile {
  int bh, b, h, hk;
  int64_t m0, lo, hi;
  Sample sample;
};

__device__ __forceinline__ QueryTile query_tile(const AttentionShape& p, int block_m) {
  QueryTile t;
  t.bh = blockIdx.x;
  t.b = t.bh / p.heads;
  t.h = t.bh % p.heads;
  t.hk = t.h / p.group;
  t.sample = sample_of(p, t.b);
  t.m0 = int64_t(gridDim.y - 1 - blockIdx.y) * block_m;
  t.lo = t.sample.key_limit(t.m0);
  t.hi = t.sample.key_limit(min(t.m0 + block_m, int64_t(p.num_query)) - 1);
  return t;
}

// The key tiles (of block_n keys) one CTA of a query tile walks: all it sees, [0, hi), or with
// `splits` > 1 the share blockIdx.z of those tiles; and how many of them, from the first, end
// at or below lo, where every row of the tile sees them whole (no mask, no NaN check).
struct KeyTiles {
  int64_t key_lo, key_hi;
  int n_tiles, n_full;
};

__device__ __forceinline__ KeyTiles key_tiles(const QueryTile& t, int block_n, int splits) {
  KeyTiles r{0, t.hi, 0, 0};
  if (splits > 1) {
    const int64_t tiles = (t.hi + block_n - 1) / block_n, per_split = (tiles + splits - 1) / splits;
    r.key_lo = min(int64_t(blockIdx.z) * per_split, tiles) * block_n;
    r.key_hi = min(r.key_lo + per_split * block_n, t.hi);
  }
  r.n_tiles = r.key_hi > r.key_lo ? static_cast<int>((r.key_hi - r.key_lo + block_n - 1) / block_n) : 0;
  r.n_full = t.lo > r.key_lo ? static_cast<int>(min(int64_t(r.n_tiles), (t.lo - r.key_lo) / block_n)) : 0;
  return r;
}

}  // namespace ccam
