// Attention dropout applied in place to CPU probability blocks: the torch backend's dropout on
// CPU (ccam_kernels/backends/cpu_dropout.py binds it; ccam_kernels.dropout is the definition,
// csrc/ccam/dropout.cuh its C++ copy, whose Philox rounds run here as they are).
//
// block[a, r, k] sits at head head0 + a * group + r % group, query row row0 + r / group, key
// key0 + k (keys counted from the start of the sample's video): the torch backend's folded rows
// (group = query heads per K/V head). It is multiplied by 1 / (1 - p) where kept and by 0 where
// dropped, in float32 (float64 for double; rounded once to bfloat16 for a bfloat16 block): the
// torch path's `block * where(keep, scale, 0)`, bit for bit (a NaN stays NaN). Several blocks of
// one shape and layout share one mask (the backward's P and dP): the draws are made once.
//
// Speed (the int64 torch Philox this replaces cost 2-3x the attention's time): per row, the
// draws of up to kChunkGroups consecutive 8-key groups are made first, 8 Philox counters at a
// time on AVX2 (the header's rounds on a lane type; scalar elsewhere), and stored in key order
// (key 8 g + t is 16-bit half t & 1 of word t >> 1 of group g's call); a second loop, which g++
// vectorizes, compares them with the threshold and multiplies.
#include <cstdint>
#include <cstring>

#include "../ccam/dropout.cuh"
#include "export.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t kChunkGroups = 64;  // 512 keys per pass: the draws stay in L1

#if defined(__AVX2__)
constexpr int64_t kLanes = 8;

// 8 Philox words, one per lane: what ccam::philox4x32_10 needs of a word type.
struct U32x8 {
  __m256i v;
};
inline U32x8 operator^(U32x8 a, U32x8 b) { return {_mm256_xor_si256(a.v, b.v)}; }
inline U32x8 operator^(U32x8 a, uint32_t b) { return {_mm256_xor_si256(a.v, _mm256_set1_epi32(int(b)))}; }
// (hi, lo) of the 8 products m * a: vpmuludq multiplies the even lanes (and, after a shift,
// the odd ones) to 64 bits; the halves are blended back into lanes.
inline void mulhilo(U32x8 a, uint32_t m, U32x8& hi, U32x8& lo) {
  const __m256i mm = _mm256_set1_epi32(int(m));
  const __m256i even = _mm256_mul_epu32(a.v, mm), odd = _mm256_mul_epu32(_mm256_srli_epi64(a.v, 32), mm);
  hi.v = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
  lo.v = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
}

// The draws of groups g, ..., g + kLanes - 1 of one (row, stream): 8 kLanes uint16 in key order.
inline void draw_groups(uint16_t* draws, uint32_t g, uint32_t row, uint32_t stream, uint32_t offset, uint32_t k0,
                  uint32_t k1) {
  U32x8 c[4] = {{_mm256_add_epi32(_mm256_set1_epi32(int(g)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))},
                {_mm256_set1_epi32(int(row))},
                {_mm256_set1_epi32(int(stream))},
                {_mm256_set1_epi32(int(offset))}};
  ccam::philox4x32_10(c, k0, k1);
  // 4 words x 8 groups -> 8 groups x 4 words: group i's call is draws[8 i, 8 i + 8).
  const __m256i w01l = _mm256_unpacklo_epi32(c[0].v, c[1].v), w01h = _mm256_unpackhi_epi32(c[0].v, c[1].v);
  const __m256i w23l = _mm256_unpacklo_epi32(c[2].v, c[3].v), w23h = _mm256_unpackhi_epi32(c[2].v, c[3].v);
  const __m256i g04 = _mm256_unpacklo_epi64(w01l, w23l), g15 = _mm256_unpackhi_epi64(w01l, w23l);
  const __m256i g26 = _mm256_unpacklo_epi64(w01h, w23h), g37 = _mm256_unpackhi_epi64(w01h, w23h);
  __m256i* out = reinterpret_cast<__m256i*>(draws);
  _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(g04, g15, 0x20));
  _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(g26, g37, 0x20));
  _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(g04, g15, 0x31));
  _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(g26, g37, 0x31));
}
#else
constexpr int64_t kLanes = 1;

// The draws of group g of one (row, stream): 8 uint16 in key order.
inline void draw_groups(uint16_t* draws, uint32_t g, uint32_t row, uint32_t stream, uint32_t offset, uint32_t k0,
                  uint32_t k1) {
  uint32_t c[4] = {g, row, stream, offset};
  ccam::philox4x32_10(c, k0, k1);
  for (int w = 0; w < 4; ++w) {  // little end first: word w's low half is key 2 w
    draws[2 * w] = uint16_t(c[w]);
    draws[2 * w + 1] = uint16_t(c[w] >> 16);
  }
}
#endif

static_assert(kChunkGroups % kLanes == 0, "a chunk is whole lane steps");

struct Position {
  uint64_t seed;
  uint32_t offset, threshold;
  int64_t sample, num_heads, head0, row0, key0, group;
};

// float -> bfloat16 bits, round to nearest even, NaN -> 0x7FC0: c10::BFloat16's conversion.
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (x != x) return 0x7FC0u;
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float bf16_value(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

template <typename T, typename Acc>
inline void scale_keys(T* p, const uint16_t* draws, int64_t n, uint32_t threshold, Acc scale) {
  for (int64_t k = 0; k < n; ++k) p[k] *= uint32_t(draws[k]) >= threshold ? scale : Acc(0);
}

inline void scale_keys(uint16_t* p, const uint16_t* draws, int64_t n, uint32_t threshold, float scale) {
  for (int64_t k = 0; k < n; ++k) p[k] = bf16_bits(bf16_value(p[k]) * (uint32_t(draws[k]) >= threshold ? scale : 0.f));
}

// One row of each block, keys [key0, key0 + keys), in chunks of whole 8-key groups.
template <typename T, typename Acc>
void apply_row(T* const* rows, int64_t num_blocks, int64_t keys, uint32_t row, uint32_t stream, const Position& pos,
               Acc scale) {
  const uint32_t k0 = uint32_t(pos.seed), k1 = uint32_t(pos.seed >> 32);
  alignas(64) uint16_t draws[8 * kChunkGroups];
  for (int64_t done = 0; done < keys;) {
    const int64_t j = pos.key0 + done, lead = j & 7;  // j's place in its group
    const int64_t n = keys - done < 8 * kChunkGroups - lead ? keys - done : 8 * kChunkGroups - lead;
    const int64_t groups = (lead + n + 7) >> 3;
    for (int64_t i = 0; i < groups; i += kLanes)
      draw_groups(draws + 8 * i, uint32_t((j >> 3) + i), row, stream, pos.offset, k0, k1);
    for (int64_t b = 0; b < num_blocks; ++b) scale_keys(rows[b] + done, draws + lead, n, pos.threshold, scale);
    done += n;
  }
}

constexpr int64_t kMaxBlocks = 4;

template <typename T, typename Acc>
void apply(T* const* blocks, int64_t num_blocks, int64_t heads, int64_t rows, int64_t keys, int64_t stride_a,
           int64_t stride_r, const Position& pos, Acc scale) {
  T* row_ptrs[kMaxBlocks];
  for (int64_t a = 0; a < heads; ++a) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t b = 0; b < num_blocks; ++b) row_ptrs[b] = blocks[b] + a * stride_a + r * stride_r;
      const int64_t head = pos.head0 + a * pos.group + r % pos.group;
      apply_row(row_ptrs, num_blocks, keys, uint32_t(pos.row0 + r / pos.group),
                uint32_t(pos.sample * pos.num_heads + head), pos, scale);
    }
  }
}

}  // namespace

// C entry points (ctypes: ccam_kernels/backends/cpu_dropout.py). blocks: num_blocks (at most 4)
// pointers to (heads, rows, keys) blocks of one layout, unit stride along keys;
// threshold = ceil(p * 65536) != 0; scale = 1 / (1 - p). Returns 0, or 1 for too many blocks.
#define CCAM_CPU_DROPOUT_ARGS                                                                                  \
  int64_t num_blocks, int64_t heads, int64_t rows, int64_t keys, int64_t stride_a, int64_t stride_r, uint64_t seed, \
      uint32_t offset, uint32_t threshold, int64_t sample, int64_t num_heads, int64_t head0, int64_t row0,        \
      int64_t key0, int64_t group, double scale
#define CCAM_CPU_DROPOUT_APPLY(T, ACC)                                                                         \
  if (num_blocks > kMaxBlocks) return 1;                                                                       \
  apply(blocks, num_blocks, heads, rows, keys, stride_a, stride_r,                                              \
        Position{seed, offset, threshold, sample, num_heads, head0, row0, key0, group}, ACC(scale));           \
  return 0

CCAM_CPU_EXPORT int ccam_cpu_dropout_apply_f32(float* const* blocks, CCAM_CPU_DROPOUT_ARGS) {
  CCAM_CPU_DROPOUT_APPLY(float, float);
}

CCAM_CPU_EXPORT int ccam_cpu_dropout_apply_f64(double* const* blocks, CCAM_CPU_DROPOUT_ARGS) {
  CCAM_CPU_DROPOUT_APPLY(double, double);
}

CCAM_CPU_EXPORT int ccam_cpu_dropout_apply_bf16(uint16_t* const* blocks, CCAM_CPU_DROPOUT_ARGS) {
  CCAM_CPU_DROPOUT_APPLY(uint16_t, float);
}
