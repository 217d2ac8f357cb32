// Tiles of the sm_90a kernels (fwd_sm90.cuh, bwd_dq_sm90.cuh) as TMA writes them (64-column
// blocks, 128B-swizzled), and the pieces of the NaN rule (docs/reference.md §7) that work on
// them: the sanitizer's word test and the consumers' add of the non-finite values a row sees.
#pragma once

#include "hopper.cuh"
#include "launch.cuh"
#include "params.h"
#include "tile.cuh"

namespace ccam {

// Byte offset of element (row, col) in a tile TMA wrote as 64-column blocks of `rows` 128-byte
// rows, 128B-swizzled (16-byte chunk c of row r at chunk c ^ (r % 8); the blocks start
// 1024-byte aligned).
__device__ __forceinline__ int sw128_offset(int rows, int row, int col) {
  return (col / 64) * rows * 128 + row * 128 + ((((col % 64) / 8) ^ (row % 8)) * 16) + (col % 8) * 2;
}

// A 32-bit word of two 16-bit values with each NaN or inf zeroed (the word itself if finite).
template <typename T>
__device__ __forceinline__ uint32_t finite_part(uint32_t bits) {
  constexpr uint32_t lo = kExponentBits<T>, hi = lo << 16;
  return bits & (((bits & lo) == lo ? 0u : 0xffffu) | ((bits & hi) == hi ? 0u : 0xffff0000u));
}

// acc (a warp's 16 x DP strip) += for each of this thread's two rows, the non-finite values of
// the swizzled tile's rows [0, end[half]) in its columns: the NaN and inf the row sees (as
// tile.cuh's add_seen_nonfinite for fwd.cuh's padded tiles).
template <typename T, int DP, int ROWS>
__device__ __forceinline__ void add_seen_nonfinite_sw128(float (&acc)[DP / 8][4], const unsigned char* tile,
                                                         const int (&end)[2]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < DP / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = j * 8 + 2 * (lane % 4) + (e & 1);
      float sum = 0.f;
      for (int r = 0; r < end[e / 2]; ++r)
        sum += nonfinite_part<T>(load(reinterpret_cast<const uint16_t*>(tile + sw128_offset(ROWS, r, col))));
      acc[j][e] += sum;
    }
}

// Whether any lane of the warp passes true (every lane must call it).
__device__ __forceinline__ bool warp_any(bool x) {
  float v = x ? 1.f : 0.f;
#pragma unroll
  for (int m = 1; m < 32; m *= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, m));
  return v != 0.f;
}

// Host side, shared by the sm_90a launchers. K's and V's tensor maps: (head dim, kv heads,
// keys) of 2-byte elements, boxes of 64 columns x 1 head x block_n keys, 128B swizzle.
// P: FwdParams or BwdParams (each holds its own k and v pointers).
template <typename P>
inline cudaError_t encode_kv_maps(CUtensorMap* k, CUtensorMap* v, const P& p, int64_t num_keys, int kv_heads,
                                  int block_n) {
  const int64_t dims[3] = {p.head_dim, kv_heads, num_keys};
  const int box[3] = {64, 1, block_n};
  const int64_t kstr[2] = {2 * p.k_stride_h, 2 * p.k_stride_l}, vstr[2] = {2 * p.v_stride_h, 2 * p.v_stride_l};
  const cudaError_t err = encode_tensor_map(k, p.k, 2, 3, dims, kstr, box, 128);
  return err != cudaSuccess ? err : encode_tensor_map(v, p.v, 2, 3, dims, vstr, box, 128);
}

// Launch an sm_90a kernel with its tensor-map arguments: in the emulator with the register
// budget its setmaxnreg calls are checked against; on a GPU only where the build holds the
// kernel's machine code from compute_90a PTX (a build without sm_90a, or PTX JIT-compiled from
// compute_80, has the trap): cudaErrorNotSupported otherwise, and the caller takes mma.sync.
template <typename Args>
inline cudaError_t launch_sm90(void (*kernel)(Args), const Geometry& g, int regs, cudaStream_t stream,
                               const Args& a) {
#ifdef CCAM_EMULATE
  ccam_emu::Geometry eg{g.kernel, g.grid_x, g.grid_y, g.grid_z, g.threads, g.smem_bytes};
  eg.regs = regs;
  (void)stream;
  ccam_emu::run_launch(eg, [&] { kernel(a); });
  return cudaSuccess;
#else
  (void)regs;
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.ptxVersion < 90) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  return launch(kernel, g, stream, a);
#endif
}

}  // namespace ccam
