// The attention-dropout mask, the CUDA copy of ccam_kernels/dropout.py (the definition; tests
// check this one bit for bit against it, in the emulation build). Shared by the GPU build and
// the CPU emulation build (plain integer arithmetic: a 64-bit product gives Philox's mulhi).
//
//   u = Philox4x32-10(key = (seed lo, seed hi), counter = (j >> 3, i, b * H + h, offset))
//   r = 16-bit half (j & 1) of word u[(j >> 1) & 3];  keep iff r >= threshold = ceil(p * 65536)
//
// j is the key counted from the start of sample b's video: a frame window adds its first key.
#pragma once

#include <cstdint>

#include "params.h"

namespace ccam {

__device__ __forceinline__ void philox4x32_10(uint32_t (&c)[4], uint32_t k0, uint32_t k1) {
  // Not unrolled: the kernels call this inside unrolled tile loops at up to 255 registers, and
  // unrolled rounds let the scheduler interleave many calls (register spills at DP = 128).
#pragma unroll 1
  for (int round = 0; round < 10; ++round) {
    const uint64_t p0 = uint64_t(0xD2511F53u) * c[0], p1 = uint64_t(0xCD9E8D57u) * c[2];
    const uint32_t c1 = c[1], c3 = c[3];
    c[0] = uint32_t(p1 >> 32) ^ c1 ^ k0;
    c[1] = uint32_t(p1);
    c[2] = uint32_t(p0 >> 32) ^ c3 ^ k1;
    c[3] = uint32_t(p0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

// One (sample, head)'s dropout: off when threshold == 0 (p = 0: the kernels skip it).
struct Dropout {
  uint32_t k0, k1, stream, offset, threshold;
  int64_t key_base;  // added to a kernel's key index: the window's first key in the video

  __device__ __forceinline__ bool on() const { return threshold != 0u; }

  __device__ __forceinline__ bool keep(int64_t row, int64_t key) const {
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

// A kernel's dropout for sample b, query head h, keys counted from key_base (the frame window's
// first key in the video). `seed` is *p.dropout_seed, read by the caller with its checked `load`
// (only when p.dropout_threshold != 0).
__device__ __forceinline__ Dropout dropout_of(const AttentionShape& p, uint64_t seed, int64_t b, int64_t h,
                                              int64_t key_base) {
  return Dropout{uint32_t(seed), uint32_t(seed >> 32), uint32_t(b * p.heads + h), 0u, p.dropout_threshold, key_base};
}

__device__ __forceinline__ Dropout make_dropout(uint64_t seed, uint32_t offset, uint32_t threshold, int64_t sample,
                                                int64_t head, int64_t heads, int64_t key_base) {
  return Dropout{uint32_t(seed), uint32_t(seed >> 32), uint32_t(sample * heads + head), offset, threshold, key_base};
}

}  // namespace ccam
