// The CCAM attention forward of the torch backend on CPU, float32: one pass over the visible
// (query, key) pairs, with the scores, their softmax and the output product fused per tile so
// that nothing but the output leaves the caches (ccam_kernels/backends/cpu_attention.py calls it;
// docs/torch.md has the design and its measurements).
//
// Work: one task per (sample, query head, block of BLOCK_ROWS query rows). A task walks its keys
// in segments whose rows are a suffix of the block: the keys of the frames every row of the block
// sees (rows [0, rows)), then each frame f that only some rows see (rows [first[f] - i0, rows)):
// queries are ordered by frame, so the rows that see a frame are always a suffix. Every product
// thus runs over pairs that are all visible: no mask, no masked pair computed, and a NaN or inf
// in a key no row of the product sees never enters its arithmetic (docs/reference.md §7).
// Segments are cut into chunks of at most CHUNK_KEYS keys, online softmax across the chunks.
//
// The two matrix products of a chunk go to the BLAS that torch uses (its sgemm_, handed over by
// ccam_cpu_attention_set_blas), single-threaded per call: the threads split the tasks instead
// (largest first, pulled from a shared counter), which keeps every product big enough to run at
// the GEMM rate, where threads inside small GEMMs would not.
//
// Softmax in base 2: q is pre-scaled by scale * log2(e), so p = 2^(s - m) (one fewer multiply
// per pair), and lse = (m + log2(l)) * ln(2). Rows whose running max is not finite (a NaN, or
// +-inf scores) take a scalar path with std::exp2, so NaN and inf reach exactly what the formula
// makes them reach.
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
// 2^x for x <= 0 (finite or -inf; NaN stays NaN): x = n + f, |f| <= 1/2, 2^f by its Taylor
// series to degree 6 (relative error < 2e-7), 2^n put in the exponent; below -126 it is 0.
inline __m256 exp2_nonpositive(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.f);
  __m256 tiny = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  __m256 xc = _mm256_max_ps(x, lo);  // (NaN -> -126 here; restored below)
  __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);  // ln2^6 / 6!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));  // ln2^5 / 5!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618129107628477e-3f));   // ln2^4 / 4!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550410866482158e-2f));   // ln2^3 / 3!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.2402265069591007f));     // ln2^2 / 2!
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.6931471805599453f));     // ln2
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  r = _mm256_andnot_ps(tiny, r);
  __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_ps(r, x, nan);
}
#endif

// Max of s[0, n), NaN ignored (a NaN score makes the row's sum NaN in exp_sum).
inline float row_max(const float* s, int64_t n) {
  int64_t j = 0;
  float m = NEG_INF;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_set1_ps(NEG_INF), a1 = a0;
  for (; j + 16 <= n; j += 16) {
    a0 = _mm256_max_ps(_mm256_loadu_ps(s + j), a0);
    a1 = _mm256_max_ps(_mm256_loadu_ps(s + j + 8), a1);
  }
  alignas(32) float t[8];
  _mm256_store_ps(t, _mm256_max_ps(a0, a1));
  for (float x : t) m = std::max(m, x);
#endif
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[j] = 2^(s[j] - m) in place; returns the sum. m finite.
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

// One worker's buffers: the task's whole head (scaled q, output accumulator, running max and
// sum: O(N * D), in L2/L3), one score tile, and the packed K and V of one key chunk.
struct Scratch {
  std::vector<float> qs, s, o, m, l, kpack, vpack;
  Scratch(int64_t N, int64_t D) : qs(N * D), s(BLOCK_ROWS * CHUNK_KEYS), o(N * D), m(N), l(N) {
    if (g_pack_size) {
      kpack.resize(g_pack_size(CBLAS_B, int(BLOCK_ROWS), int(CHUNK_KEYS), int(D)) / sizeof(float) + 16);
      vpack.resize(g_pack_size(CBLAS_B, int(BLOCK_ROWS), int(D), int(CHUNK_KEYS)) / sizeof(float) + 16);
    }
  }
};

// The softmax update of rows [r0, r0 + nr) by their scores s (nr x nk, row stride CHUNK_KEYS),
// replaced by their probabilities 2^(s - m_new); the rows' outputs rescaled.
void softmax_update(Scratch& w, int64_t D, int64_t r0, int64_t nr, int64_t nk) {
  for (int64_t r = 0; r < nr; ++r) {
    float* srow = w.s.data() + r * CHUNK_KEYS;
    float* orow = w.o.data() + (r0 + r) * D;
    float& m = w.m[r0 + r];
    float& l = w.l[r0 + r];
    const float cm = row_max(srow, nk);
    const float mn = std::isnan(m) ? m : std::max(m, cm);
    const float alpha = std::exp2(m - mn);  // 0 on the row's first chunk (m = -inf)
    float sum;
    if (std::isfinite(mn)) {
      sum = exp_sum(srow, nk, mn);
    } else {  // NaN row, +inf score, or every score -inf so far: the formula, scalar
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

// Keys [j0, j1) (all seen by rows [r0, r1)) of the task's head: in row blocks, scores, softmax,
// output product. With the packing API, K and V of the chunk are packed once for all blocks.
void attend_chunk(const Problem& pb, const Task& t, Scratch& w, int64_t r0, int64_t r1, int64_t j0, int64_t j1) {
  const int64_t D = pb.D, ldk = pb.Hkv * D, hk = t.h / (pb.H / pb.Hkv), nk = j1 - j0;
  const float* kc = pb.k + (pb.key_offs[t.b] + j0) * ldk + hk * D;
  const float* vc = pb.v + (pb.key_offs[t.b] + j0) * ldk + hk * D;
  const bool packed = g_pack != nullptr;
  if (packed) {
    g_pack(CBLAS_ROW_MAJOR, CBLAS_B, CBLAS_TRANS, int(BLOCK_ROWS), int(nk), int(D), 1.f, kc, int(ldk), w.kpack.data());
    g_pack(CBLAS_ROW_MAJOR, CBLAS_B, CBLAS_NO_TRANS, int(BLOCK_ROWS), int(D), int(nk), 1.f, vc, int(ldk), w.vpack.data());
  }
  for (int64_t i0 = r0; i0 < r1; i0 += BLOCK_ROWS) {
    const int64_t nr = std::min(BLOCK_ROWS, r1 - i0);
    float* s = w.s.data();
    const float* qb = w.qs.data() + i0 * D;
    float* ob = w.o.data() + i0 * D;
    if (packed) {
      g_compute(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, int(nr), int(nk), int(D), qb, int(D), w.kpack.data(),
                int(ldk), 0.f, s, int(CHUNK_KEYS));
    } else {
      gemm_abt(int(nr), int(nk), int(D), qb, int(D), kc, int(ldk), s, int(CHUNK_KEYS));
    }
    softmax_update(w, D, i0, nr, nk);
    if (packed) {
      g_compute(CBLAS_ROW_MAJOR, CBLAS_NO_TRANS, CBLAS_PACKED, int(nr), int(D), int(nk), s, int(CHUNK_KEYS),
                w.vpack.data(), int(ldk), 1.f, ob, int(D));
    } else {
      gemm_ab_acc(int(nr), int(D), int(nk), s, int(CHUNK_KEYS), vc, int(ldk), ob, int(D));
    }
  }
}

void run_task(const Problem& pb, const Task& t, Scratch& w) {
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
        attend_chunk(pb, t, w, first[f], N, f * P + P * c / pieces, f * P + P * (c + 1) / pieces);
    } else {
      attend_chunk(pb, t, w, first[fb - 1], N, f * P, fb * P);
      for (int64_t g = f; g < fb - 1; ++g)
        if (first[g] < first[g + 1]) attend_chunk(pb, t, w, first[g], first[g + 1], f * P, (g + 1) * P);
    }
    f = fb;
  }
  for (int64_t i = 0; i < N; ++i) {
    float* dst = pb.out + ((t.b * N + i) * H + t.h) * D;
    const float inv = 1.f / w.l[i];
    for (int64_t d = 0; d < D; ++d) dst[d] = w.o[i * D + d] * inv;
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
// Returns 0, or -1 when no BLAS was set.
CCAM_CPU_EXPORT int ccam_cpu_attention_forward_f32(const float* q, const float* k, const float* v, float* out,
                                                   float* lse, int64_t B, int64_t q_batch_stride, int64_t N,
                                                   int64_t H, int64_t Hkv, int64_t D, const int64_t* first,
                                                   const int64_t* first_offs, const int64_t* key_offs, float scale,
                                                   int64_t num_threads) {
  if (g_sgemm == nullptr) return -1;
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
    int previous = g_set_threads_local ? g_set_threads_local(1) : 0;
    Scratch w(N, D);
    for (size_t i; (i = next.fetch_add(1)) < tasks.size();) run_task(pb, tasks[i], w);
    if (g_set_threads_local && restore) g_set_threads_local(previous);
  };
  const int64_t extra = std::max<int64_t>(0, std::min<int64_t>(num_threads, int64_t(tasks.size())) - 1);
  std::vector<std::thread> pool;
  for (int64_t i = 0; i < extra; ++i) pool.emplace_back(worker, false);
  worker(true);
  for (auto& th : pool) th.join();
  return 0;
}
