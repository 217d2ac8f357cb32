// The C interface's shared part (capi.cpp, capi_hopper.cpp): the structs tests/emu_lib.py
// fills through ctypes, and the helpers that turn them into the emulator's checked regions.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "runtime.h"

extern "C" {

struct EmuTensor {
  void* data;
  int64_t elem_size;
  int32_t ndim;
  int32_t writable;
  int64_t sizes[5];
  int64_t strides[5];
};

struct EmuProblem {
  int32_t bf16, batch, num_query, heads, group, tokens_per_frame, head_dim, num_splits, schedule;
  float scale;
  uint64_t seed;
};

}  // extern "C"

namespace ccam_emu_capi {


inline int report(const std::exception& e, char* err, int errlen) {
  std::snprintf(err, errlen, "%s", e.what());
  return 1;
}

inline std::vector<ccam_emu::Region> regions(const EmuTensor* t, int n, const char* const* names) {
  std::vector<ccam_emu::Region> out;
  for (int i = 0; i < n; ++i) {
    ccam_emu::Region r;
    r.name = names[i];
    r.data = t[i].data;
    r.elem_size = t[i].elem_size;
    r.sizes.assign(t[i].sizes, t[i].sizes + t[i].ndim);
    r.strides.assign(t[i].strides, t[i].strides + t[i].ndim);
    r.writable = t[i].writable;
    out.push_back(r);
    if (r.writable) {  // outputs start NaN (contiguous outputs only)
      int64_t numel = 1;
      for (int d = 0; d < t[i].ndim; ++d) numel *= t[i].sizes[d];
      std::memset(t[i].data, 0xFF, numel * t[i].elem_size);
    }
  }
  return out;
}

}  // namespace ccam_emu_capi
