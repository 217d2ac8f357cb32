// The emulation build's versions of mma.cuh's PTX wrappers (same names, same signatures): each
// calls the host model of its instruction (ptx.cpp, runtime.cpp).
#pragma once

#include <cstdint>
#include <type_traits>

#include "runtime.h"
#include "shim.h"

namespace ccam {

inline void cp_async_16(void* smem, const void* gmem, bool valid) { ccam_emu::cp_async(smem, gmem, valid); }
inline void cp_async_commit() { ccam_emu::cp_async_commit(); }
template <int Pending>
inline void cp_async_wait() {
  ccam_emu::cp_async_wait(Pending);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem) { ccam_emu::ldmatrix_x4(r, smem, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) { ccam_emu::ldmatrix_x4(r, smem, true); }

template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>);
  ccam_emu::mma_m16n8k16(c, a, b0, b1, std::is_same_v<T, __nv_bfloat16>);
}

inline float exp2_approx(float x) { return ccam_emu::ex2_approx_ftz(x); }

template <typename V>
inline V load(const V* p) {
  ccam_emu::access(p, sizeof(V), false, "load");
  return *p;
}
template <typename V>
inline void store(V* p, V value) {
  ccam_emu::access(p, sizeof(V), true, "store");
  *p = value;
}

}  // namespace ccam
