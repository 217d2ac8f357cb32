// The emulation build's versions of hopper.cuh's sm_90a wrappers (same names, same
// signatures): each calls the host model of its instruction in ptx_hopper.cpp.
#pragma once

#include <cstdint>
#include <type_traits>

#include "runtime.h"
#include "shim.h"

#define __grid_constant__

// The tensor map (CUtensorMap is opaque on the GPU: 128 bytes the driver encodes). The
// emulator's model keeps what cuTensorMapEncodeTiled is given; encode_tensor_map fills it.
struct alignas(64) CUtensorMap {
  const void* base;
  int rank, elem_bytes, swizzle_bytes;  // swizzle_bytes: 0 (none), 32, 64 or 128
  int64_t dims[5];                      // elements, innermost first
  int64_t strides[5];                   // bytes; strides[0] is the element size
  int box[5];                           // elements, innermost first
  uint32_t magic;                       // set by encode_tensor_map
};

namespace ccam_emu {

void encode_tensor_map(CUtensorMap* map, const void* base, int elem_bytes, int rank, const int64_t* dims,
                       const int64_t* stride_bytes, const int* box, int swizzle_bytes);
void mbarrier_init(uint64_t* bar, uint32_t count);
void mbarrier_arrive(uint64_t* bar, uint32_t tx_bytes, bool expect_tx);
bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity);
void tma_load(void* smem, const CUtensorMap* map, uint64_t* bar, const int32_t* coords, int rank);
void fence_proxy_async();
bool elect_one();
void setmaxnreg(int regs, bool inc);
void wgmma_fence();
void wgmma_commit();
void wgmma_wait(int pending);
// d (n / 2 floats per thread) = A (64x16) B (16xn) + (scale_d ? d : 0). a_regs null: A from
// desc_a; else A from the four registers per thread (the mma.m16n8k16 A layout per warp).
void wgmma(float* d, int n, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, int scale_d, bool trans_a,
           bool trans_b, bool bf16);

}  // namespace ccam_emu

namespace ccam {

// Throws ccam_emu::Error where the driver would refuse the map.
inline cudaError_t encode_tensor_map(CUtensorMap* map, const void* base, int elem_bytes, int rank,
                                     const int64_t* dims, const int64_t* stride_bytes, const int* box,
                                     int swizzle_bytes) {
  ccam_emu::encode_tensor_map(map, base, elem_bytes, rank, dims, stride_bytes, box, swizzle_bytes);
  return cudaSuccess;
}
inline void mbarrier_init(uint64_t* bar, uint32_t count) { ccam_emu::mbarrier_init(bar, count); }
inline void fence_barrier_init() {}  // the model's init is visible at once; the barrier orders uses
inline void mbarrier_arrive(uint64_t* bar) { ccam_emu::mbarrier_arrive(bar, 0, false); }
inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) { ccam_emu::mbarrier_arrive(bar, bytes, true); }
inline bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
  return ccam_emu::mbarrier_try_wait_parity(bar, parity);
}
inline void tma_load_2d(void* smem, const CUtensorMap* map, uint64_t* bar, int c0, int c1) {
  const int32_t c[2] = {c0, c1};
  ccam_emu::tma_load(smem, map, bar, c, 2);
}
inline void tma_load_3d(void* smem, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2) {
  const int32_t c[3] = {c0, c1, c2};
  ccam_emu::tma_load(smem, map, bar, c, 3);
}
inline void tma_load_4d(void* smem, const CUtensorMap* map, uint64_t* bar, int c0, int c1, int c2, int c3) {
  const int32_t c[4] = {c0, c1, c2, c3};
  ccam_emu::tma_load(smem, map, bar, c, 4);
}
inline void fence_proxy_async() { ccam_emu::fence_proxy_async(); }
inline bool elect_one() { return ccam_emu::elect_one(); }
template <int Regs>
inline void setmaxnreg_inc() {
  ccam_emu::setmaxnreg(Regs, true);
}
template <int Regs>
inline void setmaxnreg_dec() {
  ccam_emu::setmaxnreg(Regs, false);
}
inline void wgmma_fence() { ccam_emu::wgmma_fence(); }
inline void wgmma_commit() { ccam_emu::wgmma_commit(); }
template <int Pending>
inline void wgmma_wait() {
  ccam_emu::wgmma_wait(Pending);
}
template <typename T, int N, bool TransA = false, bool TransB = false>
inline void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, int scale_d) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N % 8 == 0 && N >= 8 && N <= 256);
  ccam_emu::wgmma(d, N, desc_a, nullptr, desc_b, scale_d, TransA, TransB, std::is_same_v<T, __nv_bfloat16>);
}
template <typename T, int N, bool TransB = false>
inline void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  static_assert(N % 8 == 0 && N >= 8 && N <= 256);
  ccam_emu::wgmma(d, N, 0, a, desc_b, scale_d, false, TransB, std::is_same_v<T, __nv_bfloat16>);
}
inline uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(smem_bytes));
}

}  // namespace ccam
