// Shared-memory tiles and the warp-level GEMM steps every kernel is built from.
//
// A tile holds ROWS rows of DP (padded head dim) 16-bit elements with a row pitch of DP + 8
// elements: the 16-byte pad puts the 8 rows an ldmatrix reads in 8 different bank groups, so
// fragment loads are conflict-free for every DP in {32, 64, 96, 128}. Each warp computes a
// 16-row strip; see mma.cuh for the fragment layouts.
#pragma once

#include "mma.cuh"

namespace ccam {

template <int DP>
constexpr int kPitch = DP + 8;

// Asynchronously copy rows [0, ROWS) of a (rows, head_dim) slab into a tile: rows >= valid_rows
// and columns >= head_dim (the pad up to DP) are zero-filled and never read from global memory.
// head_dim is a multiple of 8, so every 16-byte chunk is wholly in or out.
template <int ROWS, int DP, int THREADS, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* rows, int64_t row_stride, int64_t valid_rows,
                                          int head_dim, const T* safe) {
  constexpr int kChunks = DP / 8;
  static_assert((ROWS * kChunks) % THREADS == 0, "tile chunks must split evenly over the threads");
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = r < valid_rows && col < head_dim;
    cp_async_16(tile + r * kPitch<DP> + col, valid ? rows + r * row_stride + col : safe, valid);
  }
}

// load_tile over consecutive tiles of one slab, for a kernel's hot loop: each thread's chunk
// addresses are computed once and then advance by ROWS rows per tile (one 64-bit add each),
// instead of a 64-bit multiply, a 64-bit bounds test and a parameter reload per chunk and tile.
// It keeps 2 registers per chunk: for up to 4 chunks a thread (the forward at head dims <= 64;
// at 128, 16 pointers for K and V made the kernel spill, so it calls load_tile there).
template <int ROWS, int DP, int THREADS, typename T>
struct TileStream {
  static constexpr int kChunks = DP / 8, kPer = ROWS * kChunks / THREADS;
  static_assert((ROWS * kChunks) % THREADS == 0, "tile chunks must split evenly over the threads");
  const T* src[kPer];    // this thread's chunks in the next tile
  int64_t step;          // ROWS rows
  unsigned col_ok = 0;   // bit i: chunk i's columns are below head_dim

  // `rows`: row 0 of the first tile; `row_stride`: elements between rows.
  __device__ __forceinline__ TileStream(const T* rows, int64_t row_stride, int head_dim) : step(ROWS * row_stride) {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = threadIdx.x + i * THREADS, r = c / kChunks, col = (c % kChunks) * 8;
      src[i] = rows + r * row_stride + col;
      col_ok |= unsigned(col < head_dim) << i;
    }
  }

  // Copy the next tile (its rows >= valid_rows, and the columns past head_dim, zero-filled)
  // and move on to the one after it. An invalid chunk's source may lie past the slab: with
  // src-size 0 cp.async reads nothing from it (PTX ISA; Triton's masked loads rely on the same),
  // so no select of a safe address per chunk.
  __device__ __forceinline__ void load_next(T* tile, int64_t valid_rows) {
    const int valid_r = static_cast<int>(valid_rows < ROWS ? valid_rows : ROWS);
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int c = threadIdx.x + i * THREADS, r = c / kChunks, col = (c % kChunks) * 8;
      cp_async_16(tile + r * kPitch<DP> + col, src[i], r < valid_r && ((col_ok >> i) & 1u));
      src[i] += step;
    }
  }
};

// A fragment (16 x 16) of a row-major tile: rows row0.., columns 16*kc...
template <int DP, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int kc) {
  const int lane = threadIdx.x % 32;
  ldmatrix_x4(a, tile + (row0 + lane % 8 + ((lane / 8) % 2) * 8) * kPitch<DP> + kc * 16 + (lane / 16) * 8);
}

// acc (16 x NC) += A (16 x DP) * B^T, with B an (NC x DP) tile stored [n][k] (e.g. keys x head
// dim: S = Q K^T). a_frag(kc, a) supplies A's k-chunk kc (from registers or from a tile).
template <typename T, int DP, int NC, typename AFrag>
__device__ __forceinline__ void gemm_abt(float (&acc)[NC / 8][4], AFrag a_frag, const T* b_tile) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kc = 0; kc < DP / 16; ++kc) {
    uint32_t a[4];
    a_frag(kc, a);
#pragma unroll
    for (int np = 0; np < NC / 16; ++np) {
      uint32_t b[4];
      ldmatrix_x4(b, b_tile + (np * 16 + lane % 8 + (lane / 16) * 8) * kPitch<DP> + kc * 16 + ((lane / 8) % 2) * 8);
      Mma<T>::run(acc[2 * np], a, b[0], b[1]);
      Mma<T>::run(acc[2 * np + 1], a, b[2], b[3]);
    }
  }
}

// acc (16 x DP) += P (16 x NK, float C fragments, rounded to T) * B, with B an (NK x DP) tile
// stored [k][n] (e.g. keys x head dim: O += P V), read transposed by ldmatrix.trans.
// With kRowSum, row_sum (a 16 x 8 accumulator) also gets P times a block of ones: every column
// is then the row sums of P as rounded for the product (4 more mma per 64 keys instead of a
// float add per score).
template <typename T, int DP, int NK, bool kRowSum = false>
__device__ __forceinline__ void gemm_pb(float (&acc)[DP / 8][4], const float (&p)[NK / 8][4], const T* b_tile,
                                        float* row_sum = nullptr) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int kc = 0; kc < NK / 16; ++kc) {
    const uint32_t a[4] = {Mma<T>::pack(p[2 * kc][0], p[2 * kc][1]), Mma<T>::pack(p[2 * kc][2], p[2 * kc][3]),
                           Mma<T>::pack(p[2 * kc + 1][0], p[2 * kc + 1][1]),
                           Mma<T>::pack(p[2 * kc + 1][2], p[2 * kc + 1][3])};
    if constexpr (kRowSum) {
      const uint32_t ones = Mma<T>::pack(1.f, 1.f);
      Mma<T>::run(*reinterpret_cast<float(*)[4]>(row_sum), a, ones, ones);
    }
#pragma unroll
    for (int dp = 0; dp < DP / 16; ++dp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, b_tile + (kc * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kPitch<DP> + dp * 16 + (lane / 16) * 8);
      Mma<T>::run(acc[2 * dp], a, b[0], b[1]);
      Mma<T>::run(acc[2 * dp + 1], a, b[2], b[3]);
    }
  }
}

// A 64-bit bound (a row's key limit, a key's first row) relative to a tile starting at `start`,
// clamped to [-1, width]: the per-element mask compares 32-bit tile columns against it.
__device__ __forceinline__ int tile_cut(int64_t bound, int64_t start, int width) {
  const int64_t rel = bound - start;
  return rel < 0 ? -1 : rel > width ? width : static_cast<int>(rel);
}

// The NaN rule (docs/reference.md §7, "NaN and inf"): a tile that straddles the rows' limits holds keys (or,
// in the dK/dV pass, query rows) that some rows (keys) of the product do not see, and their
// probability 0 times a NaN or inf would still be NaN. Each thread checks the chunks it copied
// (own_chunks_finite) and one barrier-OR tells the CTA; in the rare tile that holds a NaN or
// inf, each thread adds to its accumulators the non-finite values its rows see
// (add_seen_nonfinite), then the non-finite values are zeroed (zero_own_nonfinite) for the MMA.
template <typename T>
constexpr uint32_t kExponentBits = std::is_same_v<T, __half> ? 0x7c00u : 0x7f80u;

// A 16-bit value, given by its bits, as a float when it is NaN or +-inf; 0 when it is finite.
template <typename T>
__device__ __forceinline__ float nonfinite_part(uint16_t bits) {
  constexpr uint32_t e = kExponentBits<T>;
  if ((bits & e) != e) return 0.f;
  if (bits & 0x7fffu & ~e) return NAN;
  return bits & 0x8000u ? -INFINITY : INFINITY;
}

// Whether the 16-byte chunks this thread copied into a tile (load_tile's mapping) are finite.
template <int ROWS, int DP, int THREADS, typename T>
__device__ __forceinline__ bool own_chunks_finite(const T* tile) {
  constexpr int kChunks = DP / 8;
  constexpr uint32_t lo = kExponentBits<T>, hi = lo << 16;
  bool finite = true;
#pragma unroll
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const uint32_t* x = reinterpret_cast<const uint32_t*>(tile + (c / kChunks) * kPitch<DP> + (c % kChunks) * 8);
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const uint32_t bits = load(x + w);
      finite = finite && (bits & lo) != lo && (bits & hi) != hi;
    }
  }
  return finite;
}

// Zero the NaN and inf values of the chunks this thread copied into a tile.
template <int ROWS, int DP, int THREADS, typename T>
__device__ __forceinline__ void zero_own_nonfinite(T* tile) {
  constexpr int kChunks = DP / 8;
  constexpr uint32_t lo = kExponentBits<T>, hi = lo << 16;
  for (int i = 0; i < ROWS * kChunks / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    uint32_t* x = reinterpret_cast<uint32_t*>(tile + (c / kChunks) * kPitch<DP> + (c % kChunks) * 8);
    for (int w = 0; w < 4; ++w) {
      uint32_t bits = load(x + w);
      const uint32_t kept = ((bits & lo) == lo ? 0u : 0xffffu) | ((bits & hi) == hi ? 0u : 0xffff0000u);
      if (kept != 0xffffffffu) store(x + w, bits & kept);
    }
  }
}

// acc (this warp's 16 x DP strip, C-fragment layout) += for each of this thread's two rows
// (half 0: row g, half 1: row g + 8) and each of its columns, the sum of the non-finite values
// of tile rows [begin[half], end[half]) in that column: the NaN and inf that the row sees.
template <int DP, typename T>
__device__ __forceinline__ void add_seen_nonfinite(float (&acc)[DP / 8][4], const T* tile, const int (&begin)[2],
                                                   const int (&end)[2]) {
  const int lane = threadIdx.x % 32;
  const uint16_t* bits = reinterpret_cast<const uint16_t*>(tile);
  // Unrolled: acc must stay in registers (a runtime index would move it to local memory).
#pragma unroll
  for (int j = 0; j < DP / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = j * 8 + 2 * (lane % 4) + (e & 1);
      float sum = 0.f;
      for (int r = begin[e / 2]; r < end[e / 2]; ++r) sum += nonfinite_part<T>(load(bits + r * kPitch<DP> + col));
      acc[j][e] += sum;
    }
}

template <int R, int C>
__device__ __forceinline__ void zero(float (&x)[R][C]) {
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < C; ++j) x[i][j] = 0.f;
}

// Store a warp's 16 x DP float accumulator strip, times `mul`, as pairs of elements: rows
// row0 + g and row0 + g + 8 (skipped at or past row_end), columns < head_dim.
template <typename Out, int DP>
__device__ __forceinline__ void store_strip(Out* base, int64_t row_stride, int64_t row0, int64_t row_end,
                                            int head_dim, const float (&acc)[DP / 8][4], float mul0, float mul1) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t row = row0 + lane / 4 + half * 8;
    if (row >= row_end) continue;
    const float mul = half ? mul1 : mul0;
#pragma unroll
    for (int j = 0; j < DP / 8; ++j) {
      const int col = j * 8 + 2 * (lane % 4);
      if (col >= head_dim) continue;
      const float x0 = acc[j][2 * half] * mul, x1 = acc[j][2 * half + 1] * mul;
      Out* dst = base + row * row_stride + col;
      if constexpr (sizeof(Out) == 4) {
        store(reinterpret_cast<float2*>(dst), make_float2(x0, x1));
      } else {
        store(reinterpret_cast<uint32_t*>(dst), Mma<Out>::pack(x0, x1));
      }
    }
  }
}

}  // namespace ccam
