// Device-side names for the host (emulation) build of the kernels: with CCAM_EMULATE defined,
// params.h includes this instead of <cuda_runtime_api.h>, so fwd.cuh, bwd.cuh, tile.cuh and
// rule.cuh compile with g++ as they are. Qualifiers expand to nothing; threadIdx, blockIdx and
// gridDim read the emulated thread's state (runtime.h); __syncthreads and __shfl_xor_sync go
// to the emulated CTA. __half / __nv_bfloat16 are 16-bit storage types with the CUDA headers'
// round-to-nearest-even conversions.
#pragma once

#include <math.h>

#include <cstdint>
#include <cstring>

#include "runtime.h"

#define __device__
#define __host__
#define __global__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

#define threadIdx (::ccam_emu::current_thread().idx)
#define blockIdx (::ccam_emu::current_cta().block)
#define gridDim (::ccam_emu::current_cta().grid)
#define blockDim (::ccam_emu::current_cta().block_dim)

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorNotSupported = 801;  // as CUDA's (the sm_90a launcher's "not here")
using cudaStream_t = struct CUstream_st*;

struct float2 {
  float x, y;
};
struct alignas(16) uint4 {  // CUDA's built-in vector type (16-byte loads and stores)
  uint32_t x, y, z, w;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};

namespace ccam_emu {

// float -> fp16 / bf16, round to nearest even (cvt.rn.f16.f32, cvt.rn.bf16.f32).
inline uint16_t half_bits(float x) {
  const _Float16 h = static_cast<_Float16>(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}
inline uint16_t bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float half_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline float bf16_to_float(uint16_t b) {
  const uint32_t u = uint32_t(b) << 16;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

// Warp shuffle (shfl.sync.bfly.b32): every lane of the warp must arrive with the same mask.
float shfl_xor(unsigned mask, float value, int lane_mask);
void syncthreads();
int syncthreads_or(int predicate);

}  // namespace ccam_emu

inline __half2 __floats2half2_rn(float lo, float hi) {
  return {{ccam_emu::half_bits(lo)}, {ccam_emu::half_bits(hi)}};
}
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {{ccam_emu::bf16_bits(lo)}, {ccam_emu::bf16_bits(hi)}};
}
inline float __log2f(float x) { return log2f(x); }
inline void __syncthreads() { ccam_emu::syncthreads(); }
inline int __syncthreads_or(int predicate) { return ccam_emu::syncthreads_or(predicate); }
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  return ccam_emu::shfl_xor(mask, value, lane_mask);
}
// CUDA's integer min for the kernels' same-typed arguments.
template <typename I>
inline I min(I a, I b) {
  return b < a ? b : a;
}
