// The C interface's shared part (capi.cpp, capi_hopper.cpp): the structs tests/emu_lib.py
// fills through ctypes, and the helpers that turn them into the emulator's checked regions.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <vector>

#include "../ccam/params.h"
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

inline ccam::AttentionShape shape_of(const EmuProblem& pb, const EmuTensor& q, const EmuTensor& k,
                                     const EmuTensor& v, const EmuTensor* plan) {  // frames, key_start, first_frame, end_frame
  ccam::AttentionShape s{};
  s.frames = static_cast<const int64_t*>(plan[0].data);
  s.key_start = static_cast<const int64_t*>(plan[1].data);
  s.first_frame = static_cast<const int64_t*>(plan[2].data);
  s.end_frame = static_cast<const int64_t*>(plan[3].data);
  s.batch = pb.batch, s.num_query = pb.num_query, s.heads = pb.heads, s.group = pb.group;
  s.tokens_per_frame = pb.tokens_per_frame, s.head_dim = pb.head_dim;
  const int d = q.ndim;
  s.q_stride_b = d == 4 ? q.strides[0] : 0;
  s.q_stride_n = q.strides[d - 3], s.q_stride_h = q.strides[d - 2];
  s.k_stride_l = k.strides[0], s.k_stride_h = k.strides[1];
  s.v_stride_l = v.strides[0], s.v_stride_h = v.strides[1];
  s.scale_log2 = static_cast<float>(pb.scale * 1.4426950408889634);
  return s;
}

// Tensors: dout, q, k, v, lse, delta, frames, key_start, first_frame, end_frame, ...
inline ccam::BwdParams bwd_params(const EmuProblem& pb, const EmuTensor* t) {
  ccam::BwdParams p{};
  static_cast<ccam::AttentionShape&>(p) = shape_of(pb, t[1], t[2], t[3], t + 6);
  p.dout = t[0].data, p.q = t[1].data, p.k = t[2].data, p.v = t[3].data;
  p.do_stride_b = t[0].strides[0], p.do_stride_n = t[0].strides[1], p.do_stride_h = t[0].strides[2];
  p.lse = static_cast<const float*>(t[4].data), p.delta = static_cast<const float*>(t[5].data);
  p.scale = pb.scale;
  return p;
}

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
