// Thin wrappers over the PTX the kernels use: cp.async (16-byte, zero-filling), ldmatrix,
// mma.sync m16n8k16 with float32 accumulators (fp16 and bf16 operands, sm_80 and up), ex2,
// and plain loads / stores (load, store). With CCAM_EMULATE the same names come from the CPU
// emulator's models (csrc/emu/ptx.h); the code after the #endif is shared by both builds.
//
// Fragment layouts of mma.m16n8k16 (lane = threadIdx.x % 32, g = lane / 4, c = lane % 4):
//   A (16x16, row-major) 4 regs: (g, 2c..2c+1), (g+8, 2c..), (g, 2c+8..), (g+8, 2c+8..)
//   B (16x8, "col")      2 regs: (k = 2c..2c+1, n = g), (k = 2c+8.., n = g)
//   C (16x8, float)      4 vals: (g, 2c), (g, 2c+1), (g+8, 2c), (g+8, 2c+1)
// So the C fragments of two adjacent 8-column chunks, packed to 16 bits, are the A fragment of
// the 16-wide k-chunk they span: probabilities go from one GEMM into the next in registers.
#pragma once

#include <cstdint>
#include <type_traits>

#ifdef CCAM_EMULATE
#include "../emu/ptx.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ccam {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; when !valid nothing is read and zeros are written.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// c += a * b (m16n8k16, float32 accumulators), one definition per 16-bit operand type.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

#define CCAM_DEFINE_MMA(CTYPE, PTX_TYPE)                                                                   \
  template <>                                                                                          \
  __device__ __forceinline__ void mma_m16n8k16<CTYPE>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,  \
                                                      uint32_t b1) {                                   \
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." PTX_TYPE "." PTX_TYPE                         \
                 ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"               \
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                                       \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));                     \
  }

CCAM_DEFINE_MMA(__half, "f16")
CCAM_DEFINE_MMA(__nv_bfloat16, "bf16")
#undef CCAM_DEFINE_MMA

// 2^x with the SFU (ex2.approx: relative error ~2^-22; 2^-inf = +0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Plain loads and stores of global or shared memory: the emulator checks each one.
template <typename V>
__device__ __forceinline__ V load(const V* p) {
  return *p;
}
template <typename V>
__device__ __forceinline__ void store(V* p, V value) {
  *p = value;
}

}  // namespace ccam
#endif  // CCAM_EMULATE

namespace ccam {

// Mma<T>::run: c += a * b; Mma<T>::pack: two floats as one register, `lo` in the low 16 bits
// (the lower column index).
template <typename T>
struct Mma {
  static __device__ __forceinline__ void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    mma_m16n8k16<T>(c, a, b0, b1);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    if constexpr (std::is_same_v<T, __half>) {
      __half2 h = __floats2half2_rn(lo, hi);
      return *reinterpret_cast<uint32_t*>(&h);
    } else {
      __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
      return *reinterpret_cast<uint32_t*>(&h);
    }
  }
};

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

}  // namespace ccam
