// The attention-dropout mask, the C++/CUDA copy of ccam_kernels/dropout.py (the definition; tests
// check this one bit for bit against it). Shared by the GPU build, the CPU emulation build and
// the native CPU build (csrc/cpu: plain g++, no CUDA names): plain integer arithmetic, a 64-bit
// product gives Philox's mulhi.
//
//   u = Philox4x32-10(key = (seed lo, seed hi), counter = (j >> 3, i, b * H + h, offset))
//   r = 16-bit half (j & 1) of word u[(j >> 1) & 3];  keep iff r >= threshold = ceil(p * 65536)
//
// j is the key counted from the start of sample b's video: a frame window adds its first key.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(CCAM_EMULATE)
#include "params.h"  // the kernels' launch parameters (dropout_of), and the device names
#define CCAM_DROPOUT_FN __device__ __forceinline__
#define CCAM_PHILOX_ROUNDS_UNROLL _Pragma("unroll 1")
#else
// csrc/cpu: a plain host build sees the Philox and the mask only, inlined into its loops.
#define CCAM_DROPOUT_FN inline __attribute__((always_inline))
#define CCAM_PHILOX_ROUNDS_UNROLL _Pragma("GCC unroll 10")
#endif

namespace ccam {

// Philox's one multiplication, 32 x 32 -> 64 bits as (hi, lo) words: the only primitive
// philox4x32_10 needs from its word type. This is the scalar one; csrc/cpu supplies one for 8
// lanes of AVX2 (found by argument-dependent lookup), so the rounds below, written once, also
// run 8 counters at a time there.
CCAM_DROPOUT_FN void mulhilo(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
  const uint64_t product = uint64_t(m) * a;
  hi = uint32_t(product >> 32);
  lo = uint32_t(product);
}

// Philox4x32-10 of counter c under key (k0, k1), in place. W: uint32_t here and in the kernels;
// a lane type with mulhilo and ^ (with W and with uint32_t) on the CPU.
template <typename W>
CCAM_DROPOUT_FN void philox4x32_10(W (&c)[4], uint32_t k0, uint32_t k1) {
  // Not unrolled on the GPU: the kernels call this inside unrolled tile loops at up to 255
  // registers, and unrolled rounds let the scheduler interleave many calls (register spills at
  // DP = 128). Unrolled on the host (csrc/cpu), where each call runs 8 counters.
  CCAM_PHILOX_ROUNDS_UNROLL
  for (int round = 0; round < 10; ++round) {
    W hi0, lo0, hi1, lo1;
    mulhilo(c[0], 0xD2511F53u, hi0, lo0);
    mulhilo(c[2], 0xCD9E8D57u, hi1, lo1);
    const W c1 = c[1], c3 = c[3];
    c[0] = hi1 ^ c1 ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c3 ^ k1;
    c[3] = lo0;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// One (sample, head)'s dropout: off when threshold == 0 (p = 0: the kernels skip it).
struct Dropout {
  uint32_t k0, k1, stream, offset, threshold;
  int64_t key_base;  // added to a kernel's key index: the window's first key in the video

  CCAM_DROPOUT_FN bool on() const { return threshold != 0u; }

  CCAM_DROPOUT_FN bool keep(int64_t row, int64_t key) const {
    const int64_t j = key_base + key;
    uint32_t c[4] = {uint32_t(j >> 3), uint32_t(row), stream, offset};
    philox4x32_10(c, k0, k1);
    // Selected with conditionals, not c[(j >> 1) & 3]: a dynamic index would put c in local
    // memory (stack) in kernels that are already at 255 registers.
    const int64_t w = (j >> 1) & 3;
    const uint32_t word = w == 0 ? c[0] : w == 1 ? c[1] : w == 2 ? c[2] : c[3];
    return ((word >> ((j & 1) * 16)) & 0xFFFFu) >= threshold;
  }
};

#if defined(__CUDACC__) || defined(CCAM_EMULATE)
// A kernel's dropout for sample b, query head h, keys counted from key_base (the frame window's
// first key in the video). `seed` is *p.dropout_seed, read by the caller with its checked `load`
// (only when p.dropout_threshold != 0).
__device__ __forceinline__ Dropout dropout_of(const AttentionShape& p, uint64_t seed, int64_t b, int64_t h,
                                              int64_t key_base) {
  return Dropout{uint32_t(seed), uint32_t(seed >> 32), uint32_t(b * p.heads + h), 0u, p.dropout_threshold, key_base};
}
#endif

CCAM_DROPOUT_FN Dropout make_dropout(uint64_t seed, uint32_t offset, uint32_t threshold, int64_t sample,
                                                int64_t head, int64_t heads, int64_t key_base) {
  return Dropout{uint32_t(seed), uint32_t(seed >> 32), uint32_t(sample * heads + head), offset, threshold, key_base};
}

}  // namespace ccam
