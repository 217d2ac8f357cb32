// Thin wrappers over the sm_90a (Hopper) PTX a warp-specialized kernel needs: mbarriers with
// transaction counts, TMA bulk tensor loads (cp.async.bulk.tensor) through a CUtensorMap,
// wgmma.mma_async (m64nNk16, fp16 / bf16, float32 accumulators) from shared-memory matrix
// descriptors or registers, wgmma.fence / commit_group / wait_group, fence.proxy.async,
// elect.sync and setmaxnreg. With CCAM_EMULATE the same names come from the CPU emulator's
// models (csrc/emu/hopper.h, csrc/emu/ptx_hopper.cpp); the code after the #endif is shared.
// The GPU versions compile only for compute_90a (the "a" features: wgmma, setmaxnreg).
//
// wgmma accumulator layout (m64nNk16, float32): warp w of the warpgroup (threads 128g + 32w +
// lane), g = lane / 4, c = lane % 4, holds d[4i + e] = D(16w + g + 8 (e / 2), 8i + 2c + e % 2),
// i.e. mma.m16n8k16's C fragment per 8-column block, one 16-row slab per warp. The register A
// operand (wgmma_rs) is mma.m16n8k16's A fragment of the warp's 16 rows.
#pragma once

#include <cstdint>

#include "mma.cuh"

#ifdef CCAM_EMULATE
#include "../emu/hopper.h"
#else
#include <cuda.h>
#include <cudaTypedefs.h>

namespace ccam {

// Host: a tiled tensor map (cuTensorMapEncodeTiled, reached through the runtime's driver entry
// point so nothing links libcuda directly). dims and box innermost first; stride_bytes for
// dims 1..rank-1; swizzle_bytes 0, 32, 64 or 128; elements are 16-bit (fp16 / bf16).
inline cudaError_t encode_tensor_map(CUtensorMap* map, const void* base, int elem_bytes, int rank,
                                     const int64_t* dims, const int64_t* stride_bytes, const int* box,
                                     int swizzle_bytes) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status;
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &status);
#endif
    if (err != cudaSuccess || status != cudaDriverEntryPointSuccess)
      fn = nullptr;
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr || elem_bytes != 2) return cudaErrorNotSupported;
  cuuint64_t d[5], s[4];
  cuuint32_t b[5], e[5];
  for (int r = 0; r < rank; ++r) d[r] = cuuint64_t(dims[r]), b[r] = cuuint32_t(box[r]), e[r] = 1;
  for (int r = 0; r + 1 < rank; ++r) s[r] = cuuint64_t(stride_bytes[r]);
  const CUtensorMapSwizzle sw = swizzle_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B
                                : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                : swizzle_bytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                      : CU_TENSOR_MAP_SWIZZLE_NONE;
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, cuuint32_t(rank), const_cast<void*>(base), d, s, b,
                            e, CU_TENSOR_MAP_INTERLEAVE_NONE, sw, CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

// ---- mbarrier ----
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count));
}
// Makes the inits visible to the async proxy and other threads (before a __syncthreads).
__device__ __forceinline__ void fence_barrier_init() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::); }
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}
// True once the phase of this parity has completed (may suspend for a while before false).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// ---- TMA: one thread copies a box of the tensor map into shared memory; its bytes complete
// on the mbarrier. Coordinates are element indices, innermost first (may be out of range:
// those elements read as zeros). The map must live in param/const/global memory
// (a __grid_constant__ kernel parameter).
__device__ __forceinline__ void tma_load_2d(void* smem, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4}], [%2];\n" ::
          "r"(smem_addr(smem)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1)
      : "memory");
}
__device__ __forceinline__ void tma_load_3d(void* smem, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
      "[%2];\n" ::"r"(smem_addr(smem)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0), "r"(c1),
      "r"(c2)
      : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* smem, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, "
      "%6}], [%2];\n" ::"r"(smem_addr(smem)), "l"(reinterpret_cast<uint64_t>(map)), "r"(smem_addr(bar)), "r"(c0),
      "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

// Orders this thread's generic shared-memory writes before later async-proxy accesses (a
// wgmma reading an operand the threads stored).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// One lane of the (fully active) warp is elected.
__device__ __forceinline__ bool elect_one() {
  uint32_t pred;
  asm volatile("{\n.reg .pred p;\nelect.sync _|p, 0xffffffff;\nselp.u32 %0, 1, 0, p;\n}\n" : "=r"(pred));
  return pred != 0;
}

// Warpgroup-wide register reallocation (every thread of the warpgroup must execute it).
template <int Regs>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(Regs));
}
template <int Regs>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(Regs));
}

// ---- wgmma ----
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int Pending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(Pending) : "memory");
}

template <typename T, int N>
struct WgmmaOp;
#include "wgmma_sm90.inc"

// d (N / 2 floats per thread) = A (64 x 16) B (16 x N) + (scale_d ? d : 0). TransA / TransB:
// the operand is stored MN-major (K x M, K x N) instead of K-major.
template <typename T, int N, bool TransA = false, bool TransB = false>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  WgmmaOp<T, N>::template ss<TransA, TransB>(d, desc_a, desc_b, scale_d);
}
template <typename T, int N, bool TransB = false>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  WgmmaOp<T, N>::template rs<TransB>(d, a, desc_b, scale_d);
}

}  // namespace ccam
#endif  // CCAM_EMULATE

namespace ccam {

// Spin on try_wait (the GPU's try_wait gives up after a time limit; the emulator's blocks).
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
}

// A wgmma shared-memory matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address,
// leading and stride dimension byte offsets (each >> 4, 14 bits), base offset 0, swizzle
// (bits 62-63: 0 none, 1 128B, 2 64B, 3 32B). swizzle_bytes: 0, 32, 64 or 128.
__device__ __forceinline__ uint64_t make_smem_desc(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                                   int swizzle_bytes) {
  const uint64_t layout = swizzle_bytes == 128 ? 1 : swizzle_bytes == 64 ? 2 : swizzle_bytes == 32 ? 3 : 0;
  return uint64_t((smem_addr(smem) >> 4) & 0x3fff) | uint64_t((lbo_bytes >> 4) & 0x3fff) << 16 |
         uint64_t((sbo_bytes >> 4) & 0x3fff) << 32 | layout << 62;
}

}  // namespace ccam
