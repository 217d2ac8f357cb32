// The CCAM attention forward of the torch backend on CPU, float32: one pass over the visible
// (query, key) pairs, with the scores, their softmax and the output product fused per tile so
// that nothing but the output leaves the caches (ccam_kernels/backends/cpu_attention.py calls it;
// docs/torch.md has the design and its measurements).
//
// Work: one task per (sample, query head), run whole by one thread; the threads pull the tasks
// from a shared counter, largest first, and nothing is threaded inside a product (so the result
// does not depend on the thread count). A task walks its sample's keys in chunks of at most
// CHUNK_KEYS keys (frames grouped, or a long frame cut in equal pieces). The rows that see a
// chunk's last frame are a suffix of the queries (queries are ordered by frame) and see all of it;
// the rows of each earlier frame of a group get a product of their own over the keys they see.
// Every product thus runs over pairs that are all visible: no mask, no masked pair computed, and
// a NaN or inf in a key no row of the product sees never enters its arithmetic
// (docs/reference.md §7). Online softmax across the chunks.
//
// Products: with AVX2 + FMA (-march=native), this file's 6x16 FMA tiles, K^T and V of a chunk
// packed once for all its rows, and per tile of 6 rows scores -> softmax -> output in L1.
// Otherwise the BLAS inside torch's library (its sgemm_, handed over by
// ccam_cpu_attention_set_blas), single-threaded per worker, per block of BLOCK_ROWS rows.
//
// Softmax in base 2: q is pre-scaled by scale * log2(e), so p = 2^(s - m) (one fewer multiply
// per pair), and lse = (m + log2(l)) * ln(2). Rows whose chunk holds a NaN score or whose running
// max is not finite (+-inf scores) take a scalar path with std::exp2, so NaN and inf reach
// exactly what the formula makes them reach.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include "export.h"

namespace {

using sgemm_fn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*,
                          const float*, const int*, const float*, const int*, const float*, float*, const int*);
using set_threads_fn = int (*)(int);

// MKL's packed-operand GEMM (cblas_sgemm_pack_get_size, cblas_sgemm_pack, cblas_sgemm_compute):
// K and V of a chunk are packed once and reused by every row block (else each call packs them).
enum { CBLAS_ROW_MAJOR = 101, CBLAS_NO_TRANS = 111, CBLAS_TRANS = 112, CBLAS_PACKED = 151, CBLAS_B = 162 };
using pack_size_fn = size_t (*)(int, int, int, int);
using pack_fn = void (*)(int, int, int, int, int, int, float, const float*, int, float*);
using compute_fn = void (*)(int, int, int, int, int, int, const float*, int, const float*, int, float, float*, int);

sgemm_fn g_sgemm = nullptr;
set_threads_fn g_set_threads_local = nullptr;
pack_size_fn g_pack_size = nullptr;
pack_fn g_pack = nullptr;
compute_fn g_compute = nullptr;

constexpr int64_t BLOCK_ROWS = 128;  // query rows of a product
constexpr int64_t CHUNK_KEYS = 1024;  // keys per product: one frame of 729 keys in one chunk
// Row stride of the score tile: not a multiple of 4 KB, so that the rows of a tile do not all
// fall in one L1 set (the output product reads 6 of them at once).
constexpr int64_t S_LD = CHUNK_KEYS + 16;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;
const float NEG_INF = -std::numeric_limits<float>::infinity();

// Row-major C (m x n, ldc) = A (m x k, lda) * B^T (B: n x k, ldb), or += A * B (B: k x n) with
// beta = 1: BLAS is column-major, so each call computes the transpose with operands swapped.
inline void gemm_abt(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.f, zero = 0.f;
  g_sgemm("T", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &zero, c, &ldc);
}
inline void gemm_ab_acc(int m, int n, int k, const float* a, int lda, const float* b, int ldb, float* c, int ldc) {
  const float one = 1.f;
  g_sgemm("N", "N", &n, &m, &k, &one, b, &ldb, a, &lda, &one, c, &ldc);
}

#if defined(__AVX2__) && defined(__FMA__)
// 2^x for x <= 0 or -inf (not NaN: rows holding a NaN score take the scalar path): x = n + f,
// |f| <= 1/2, 2^f by its Taylor series to degree 6 (relative error < 2e-7), 2^n put in the
// exponent; x is clamped at -127 first, whose exponent field 0 makes the result 0.
inline __m256 exp2_nonpositive(__m256 x) {
  const __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-127.f));
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);                   // ln2^6 / 6!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 5!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));   // ln2^4 / 4!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));   // ln2^3 / 3!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.2402265069591007f));     // ln2^2 / 2!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471805599453f));     // ln2
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// Max of s[0, n), NaN ignored; *nan set when s holds a NaN.
inline float row_max(const float* s, int64_t n, bool* nan) {
  int64_t j = 0;
  float m = NEG_INF;
  bool any_nan = false;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_set1_ps(NEG_INF), a1 = a0, bad = _mm256_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m256 x0 = _mm256_loadu_ps(s + j), x1 = _mm256_loadu_ps(s + j + 8);
    a0 = _mm256_max_ps(x0, a0);  // (max_ps returns its second operand when one is NaN)
    a1 = _mm256_max_ps(x1, a1);
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(x0, x1, _CMP_UNORD_Q));
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_max_ps(a0, a1));
  for (float x : t) m = std::max(m, x);
  any_nan = _mm256_movemask_ps(bad) != 0;
#endif
  for (; j < n; ++j) {
    m = s[j] > m ? s[j] : m;
    any_nan |= std::isnan(s[j]);
  }
  *nan = any_nan;
  return m;
}

// s[j] = 2^(s[j] - m) in place; returns the sum. m finite, no s[j] NaN.
inline float exp_sum(float* s, int64_t n, float m) {
  int64_t j = 0;
  float sum = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 mv = _mm256_set1_ps(m), a0 = _mm256_setzero_ps(), a1 = a0;
  for (; j + 16 <= n; j += 16) {
    __m256 p0 = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    __m256 p1 = exp2_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + j + 8), mv));
    _mm256_storeu_ps(s + j, p0);
    _mm256_storeu_ps(s + j + 8, p1);
    a0 = _mm256_add_ps(a0, p0);
    a1 = _mm256_add_ps(a1, p1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_add_ps(a0, a1));
  for (float x : t) sum += x;
#endif
  for (; j < n; ++j) {
    s[j] = std::exp2(s[j] - m);
    sum += s[j];
  }
  return sum;
}

#if defined(__AVX2__) && defined(__FMA__)
// The products on AVX2 + FMA, written here so that each one reads its operands where the
// softmax leaves them (no packing of P or of q per product) and a tile of MICRO_ROWS rows
// runs scores -> softmax -> output in L1. Tiles of R <= 6 rows by 16 columns: 12 accumulators,
// 2 loads of the packed operand and R broadcasts per step (bound by the 2 FMA ports).
constexpr bool OWN_KERNELS = true;
constexpr int64_t MICRO_ROWS = 6;

// kt: K^T of the chunk in panels of 16 keys, kt[(p * D + d) * 16 + c] = k[16 p + c][d]; zero past nk.
// By 8 x 8 transposes in registers (the rows of k are Hkv * D apart: one page each at v1.2).
void pack_kt(const float* k, int64_t ldk, int64_t nk, int64_t D, float* kt) {
  const int64_t d8 = D / 8 * 8;
  for (int64_t c0 = 0; c0 < nk; c0 += 8) {  // 8 keys: half a panel
    float* dst = kt + (c0 / 16) * D * 16 + c0 % 16;
    const int64_t keys = std::min<int64_t>(8, nk - c0);
    for (int64_t d = 0; d < d8; d += 8) {
      __m256 r[8];
      for (int i = 0; i < 8; ++i) r[i] = i < keys ? _mm256_loadu_ps(k + (c0 + i) * ldk + d) : _mm256_setzero_ps();
      const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
      const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
      const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
      const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      _mm256_storeu_ps(dst + (d + 0) * 16, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(dst + (d + 1) * 16, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(dst + (d + 2) * 16, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(dst + (d + 3) * 16, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(dst + (d + 4) * 16, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(dst + (d + 5) * 16, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(dst + (d + 6) * 16, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(dst + (d + 7) * 16, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
    for (int64_t d = d8; d < D; ++d)
      for (int64_t i = 0; i < 8; ++i) dst[d * 16 + i] = i < keys ? k[(c0 + i) * ldk + d] : 0.f;
  }
  if (nk % 16 != 0 && nk % 16 <= 8) {  // the last panel's second half: no keys
    float* dst = kt + (nk / 16) * D * 16 + 8;
    for (int64_t d = 0; d < D; ++d) std::fill(dst + d * 16, dst + d * 16 + 8, 0.f);
  }
}

// vp: the chunk's V rows, contiguous, Dp = D rounded up to 16 columns (zero past D).
void pack_v(const float* v, int64_t ldk, int64_t nk, int64_t D, int64_t Dp, float* vp) {
  for (int64_t j = 0; j < nk; ++j) {
    std::memcpy(vp + j * Dp, v + j * ldk, D * sizeof(float));
    std::fill(vp + j * Dp + D, vp + (j + 1) * Dp, 0.f);
  }
}

// s (R x 16 * panels, row stride lds) = q (R x D, rows of D) K^T.
template <int R>
void scores_tile(const float* q, int64_t D, const float* kt, int64_t panels, float* s, int64_t lds) {
  for (int64_t p = 0; p < panels; ++p) {
    const float* kp = kt + p * D * 16;
    __m256 acc[R][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; ++d) {
      const __m256 b0 = _mm256_loadu_ps(kp + d * 16), b1 = _mm256_loadu_ps(kp + d * 16 + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(q + r * D + d);
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(s + r * lds + p * 16, acc[r][0]);
      _mm256_storeu_ps(s + r * lds + p * 16 + 8, acc[r][1]);
    }
  }
}

// o (R x Dp, row stride ldo) += p (R x nk, row stride lds) vp.
template <int R>
void output_tile(const float* pr, int64_t lds, const float* vp, int64_t Dp, int64_t nk, float* o, int64_t ldo) {
  for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
    __m256 acc[R][2];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < nk; ++j) {
      const __m256 b0 = _mm256_loadu_ps(vp + j * Dp + d0), b1 = _mm256_loadu_ps(vp + j * Dp + d0 + 8);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 a = _mm256_broadcast_ss(pr + r * lds + j);
        acc[r][0] = _mm256_fmadd_ps(a, b0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(a, b1, acc[r][1]);
      }
    }
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      float* dst = o + r * ldo + d0;
      _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), acc[r][0]));
      _mm256_storeu_ps(dst + 8, _mm256_add_ps(_mm256_loadu_ps(dst + 8), acc[r][1]));
    }
  }
}

#else
constexpr bool OWN_KERNELS = false;
constexpr int64_t MICRO_ROWS = 1;
#endif

struct Problem {
  const float *q, *k, *v;
  float *out, *lse;
  int64_t q_batch_stride;  // 0: one q shared by the batch
  int64_t N, H, Hkv, D;
  const int64_t* first;       // per sample: first query of each frame, T_b + 1 entries
  const int64_t* first_offs;  // B + 1 offsets into first
  const int64_t* key_offs;    // B + 1 key offsets into the packed k, v
  float scale;
};

struct Task {
  int64_t b, h, cost;
};

// One worker's buffers: the task's whole head (scaled q, output accumulator with rows of Dp =
// D rounded up to 16, running max and sum: O(N * D), in L2/L3), one score tile, and the packed
// K and V of one key chunk.
struct Scratch {
  int64_t Dp;
  std::vector<float> qs, s, o, m, l, kpack, vpack, kt, vp;
  Scratch(int64_t N, int64_t D, bool blas)
      : Dp((D + 15) / 16 * 16), qs(N * D), s((blas ? BLOCK_ROWS : MICRO_ROWS) * S_LD), o(N * Dp), m(N), l(N) {
    if (!blas) {
      kt.resize(CHUNK_KEYS * D);
      vp.resize(CHUNK_KEYS * Dp);
    } else if (g_pack_size) {
      kpack.resize(g_pack_size(CBLAS_B, int(BLOCK_ROWS), int(CHUNK_KEYS), int(D)) / sizeof(float) + 16);
      vpack.resize(g_pack_size(CBLAS_B, int(BLOCK_ROWS), int(D), int(CHUNK_KEYS)) / sizeof(float) + 16);
    }
  }
};

// The softmax update of rows [r0, r0 + nr) by their scores s (nr x nk, row stride S_LD),
// replaced by their probabilities 2^(s - m_new); the rows' outputs rescaled.
void softmax_update(Scratch& w, float* s, int64_t r0, int64_t nr, int64_t nk) {
  const int64_t D = w.Dp;
  for (int64_t r = 0; r < nr; ++r) {
    float* srow = s + r * S_LD;
    float* orow = w.o.data() + (r0 + r) * D;
    float& m = w.m[r0 + r];
    float& l = w.l[r0 + r];
    bool nan;
    const float cm = row_max(srow, nk, &nan);
    const float mn = std::isnan(m) ? m : std::max(m, cm);
    const float alpha = std::exp2(m - mn);  // 0 on the row's first chunk (m = -inf)
    float sum;
    if (std::isfinite(mn) && !nan) {
      sum = exp_sum(srow, nk, mn);
    } else {  // a NaN score, +inf score, or every score -inf so far: the formula, scalar
      sum = 0.f;
      for (int64_t j = 0; j < nk; ++j) {
        srow[j] = std::exp2(srow[j] - mn);
        sum += srow[j];
      }
    }
    if (alpha != 1.f) {
      for (int64_t d = 0; d < D; ++d) orow[d] *= alpha;
    }
    l = l * alpha + sum;
    m = mn;
  }
}

#if defined(__AVX2__) && defined(__FMA__)
// Rows [row0, row0 + R) of the task: scores, softmax, output, the tile's scores in L1.
template <int R>
void rows_tile(Scratch& w, const float* q, int64_t D, int64_t panels, int64_t nk, int64_t row0) {
  float* s = w.s.data();
  scores_tile<R>(q, D, w.kt.data(), panels, s, S_LD);
  softmax_update(w, s, row0, R, nk);
  output_tile<R>(s, S_LD, w.vp.data(), w.Dp, nk, w.o.data() + row0 * w.Dp, w.Dp);
}
#endif

// Keys [j0, j1) (all seen by rows [r0, r1)) of the task's head: K and V of the chunk packed
// once, then per tile of rows the scores, the softmax update and the output product.
void attend_chunk(const Problem& pb, const Task& t, Scratch& w, int64_t r0, int64_t r1, int64_t j0, int64_t j1,
                  bool blas) {
  const int64_t D = pb.D, ldk = pb.Hkv * D, hk = t.h / (pb.H / pb.Hkv), nk = j1 - j0, ldo = w.Dp;
  const float* kc = pb.k + (pb.key_offs[t.b] + j0) * ldk + hk * D;
  const float* vc = pb.v + (pb.key_offs[t.b] + j0) * ldk + hk * D;
#if defined(__AVX2__) && defined(__FMA__)
  if (!blas) {
    pack_kt(kc, ldk, nk, D, w.kt.data());
    pack_v(vc, ldk, nk, D, w.Dp, w.vp.data());
    const int64_t panels = (nk + 15) / 16;
    int64_t i = r0;
    for (; i + MICRO_ROWS <= r1; i += MICRO_ROWS) rows_tile<6>(w, w.qs.data() + i * D, D, panels, nk, i);
    switch (r1 - i) {
      case 5: rows_tile<5>(w, w.qs.data() + i * D, D, panels, nk, i); break;
      case 4: rows_tile<4>(w, w.qs.data() + i * D, D, panels, nk, i); break;
      case 3: rows_tile<3>(w, w.qs.data() + i * D, D, panels, nk, i); break;
      case 2: rows_tile<2>(w, w.qs.data() + i * D, D, panels, nk, i); break;
      case 1: rows_tile<1>(w, w.qs.data() + i * D, D, panels, nk, i); break;
      default: break;
    }
    return;
  }
#endif
  const bool packed = g_pack != nullptr && !w.kpack.empty();
  if (packed) {
    g_pack(CBLAS_ROW_MAJOR, CBLAS_B, CBLAS_TRANS, int(BLOCK_ROWS), int(nk), int(D), 1.f, kc, int(ldk), w.kpack.data());
    g_pack(CBLAS_ROW_MAJOR, CBLAS_B, CBLAS_NO_TRANS, int(BLOCK_ROWS), int(D), int(nk), 1.f, vc, int(ldk), w.vpack.data());
  }
  for (int64_t i0 = r0; i0 < r1; i0 += BLOCK_ROWS) {
    const int64_t nr = std::min(BLOCK_ROWS, r1 - i0);
    float* s = w.s.data();
    const float* qb = w.qs.data() + i0 * D;
    float* ob = w.o.data() + i0 * ldo;
    if (packed) {
      g_compute(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, int(nr), int(nk), int(D), qb, int(D), w.kpack.data(),
                int(ldk), 0.f, s, int(S_LD));
    } else {
      gemm_abt(int(nr), int(nk), int(D), qb, int(D), kc, int(ldk), s, int(S_LD));
    }
    softmax_update(w, s, i0, nr, nk);
    if (packed) {
      g_compute(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, int(nr), int(D), int(nk), s, int(S_LD),
                w.vpack.data(), int(ldk), 1.f, ob, int(ldo));
    } else {
      gemm_ab_acc(int(nr), int(D), int(nk), s, int(S_LD), vc, int(ldk), ob, int(ldo));
    }
  }
}

void run_task(const Problem& pb, const Task& t, Scratch& w, bool blas) {
  const int64_t D = pb.D, N = pb.N, H = pb.H;
  const int64_t* first = pb.first + pb.first_offs[t.b];
  const int64_t T = pb.first_offs[t.b + 1] - pb.first_offs[t.b] - 1;
  const int64_t P = (pb.key_offs[t.b + 1] - pb.key_offs[t.b]) / T;
  const float qscale = pb.scale * LOG2E;
  const float* q = pb.q + t.b * pb.q_batch_stride;
  for (int64_t i = 0; i < N; ++i) {
    const float* src = q + (i * H + t.h) * D;
    for (int64_t d = 0; d < D; ++d) w.qs[i * D + d] = src[d] * qscale;
  }
  std::fill(w.o.begin(), w.o.end(), 0.f);
  std::fill(w.m.begin(), w.m.end(), NEG_INF);
  std::fill(w.l.begin(), w.l.end(), 0.f);
  // Frames in groups of up to CHUNK_KEYS keys (a frame with more is cut into pieces). The rows
  // that see a group's last frame see all of it; the rows of each earlier frame g of the group
  // see its frames up to g, a product of their own.
  const int64_t per_group = std::max<int64_t>(1, CHUNK_KEYS / P);
  for (int64_t f = 0; f < T && first[f] < N;) {
    int64_t fb = std::min(T, f + per_group);
    while (first[fb - 1] >= N) --fb;  // frames no query sees end the walk
    if (fb - f == 1) {
      const int64_t pieces = (P + CHUNK_KEYS - 1) / CHUNK_KEYS;  // equal pieces: no short tail
      for (int64_t c = 0; c < pieces; ++c)
        attend_chunk(pb, t, w, first[f], N, f * P + P * c / pieces, f * P + P * (c + 1) / pieces, blas);
    } else {
      attend_chunk(pb, t, w, first[fb - 1], N, f * P, fb * P, blas);
      for (int64_t g = f; g < fb - 1; ++g)
        if (first[g] < first[g + 1]) attend_chunk(pb, t, w, first[g], first[g + 1], f * P, (g + 1) * P, blas);
    }
    f = fb;
  }
  for (int64_t i = 0; i < N; ++i) {
    float* dst = pb.out + ((t.b * N + i) * H + t.h) * D;
    const float inv = 1.f / w.l[i];
    for (int64_t d = 0; d < D; ++d) dst[d] = w.o[i * w.Dp + d] * inv;
    pb.lse[(t.b * H + t.h) * N + i] = (w.m[i] + std::log2(w.l[i])) * LN2;
  }
}

}  // namespace

// sgemm: the Fortran sgemm_ of torch's BLAS (32-bit ints); set_threads_local: MKL's
// mkl_set_num_threads_local, or null for a BLAS without it (then each call may thread).
// pack_size, pack, compute: MKL's cblas_sgemm_pack_get_size, cblas_sgemm_pack and
// cblas_sgemm_compute, or all null.
CCAM_CPU_EXPORT void ccam_cpu_attention_set_blas(void* sgemm, void* set_threads_local, void* pack_size, void* pack,
                                                 void* compute) {
  g_sgemm = reinterpret_cast<sgemm_fn>(sgemm);
  g_set_threads_local = reinterpret_cast<set_threads_fn>(set_threads_local);
  const bool all = pack_size && pack && compute;
  g_pack_size = all ? reinterpret_cast<pack_size_fn>(pack_size) : nullptr;
  g_pack = all ? reinterpret_cast<pack_fn>(pack) : nullptr;
  g_compute = all ? reinterpret_cast<compute_fn>(compute) : nullptr;
}

// q (B or 1, N, H, D), k, v (L, Hkv, D), out (B, N, H, D), lse (B, H, N): contiguous float32.
// first: the first query of each frame of each sample (ccam_kernels.mask.first_query_of_frame),
// concatenated, first_offs (B + 1) where each sample's starts; key_offs (B + 1): ccam_kernels.mask.key_offsets.
// blas: 1 runs the products on the BLAS (always so where the own kernels are not compiled: no
// AVX2 + FMA). Returns 0, or -1 when the BLAS is needed and none was set.
CCAM_CPU_EXPORT int ccam_cpu_attention_forward_f32(const float* q, const float* k, const float* v, float* out,
                                                   float* lse, int64_t B, int64_t q_batch_stride, int64_t N,
                                                   int64_t H, int64_t Hkv, int64_t D, const int64_t* first,
                                                   const int64_t* first_offs, const int64_t* key_offs, float scale,
                                                   int64_t num_threads, int64_t blas) {
  const bool use_blas = blas != 0 || !OWN_KERNELS;
  if (use_blas && g_sgemm == nullptr) return -1;
  Problem pb{q, k, v, out, lse, q_batch_stride, N, H, Hkv, D, first, first_offs, key_offs, scale};
  std::vector<Task> tasks;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t* fs = first + first_offs[b];
    const int64_t T = first_offs[b + 1] - first_offs[b] - 1;
    int64_t cost = 0;  // visible (row, frame) pairs of the sample
    for (int64_t f = 0; f < T; ++f) cost += N - fs[f];
    for (int64_t h = 0; h < H; ++h) tasks.push_back({b, h, cost});
  }
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  std::atomic<size_t> next{0};
  auto worker = [&](bool restore) {
    const bool set = use_blas && g_set_threads_local;
    const int previous = set ? g_set_threads_local(1) : 0;
    Scratch w(N, D, use_blas);
    for (size_t i; (i = next.fetch_add(1)) < tasks.size();) run_task(pb, tasks[i], w, use_blas);
    if (set && restore) g_set_threads_local(previous);
  };
  const int64_t extra = std::max<int64_t>(0, std::min<int64_t>(num_threads, int64_t(tasks.size())) - 1);
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < extra; ++i) pool.emplace_back(worker, false);
  worker(true);
  for (auto& th : pool) th.join();
  return 0;
}
