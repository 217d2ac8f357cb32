// A C interface to the emulator for tests without torch (tests/emu_lib.py loads it with
// ctypes): the three kernels on raw buffers, each emulated instruction on its own, and probes
// that must make the emulator report an error. Built by g++ alone (seconds), so the mutation
// tests can compile a changed copy of the kernel sources cheaply.
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../ccam/bwd.cuh"
#include "../ccam/fwd.cuh"
#include "runtime.h"

#include "capi.h"

namespace {

using ccam_emu_capi::bwd_params;
using ccam_emu_capi::regions;
using ccam_emu_capi::shape_of;
using ccam_emu_capi::report;

// CCAM_EMU_FP16_D32_ONLY: kernels for fp16 at padded head dim 32 only (the mutation tests'
// builds: one instantiation per kernel compiles in a few seconds).
template <typename F>
cudaError_t dispatch(const EmuProblem& pb, F f) {
  const int dp = ccam::padded_head_dim(pb.head_dim);
#ifdef CCAM_EMU_FP16_D32_ONLY
  if (pb.bf16 || dp != 32) throw ccam_emu::Error("this emulator build has kernels for fp16 at head dims 16..32 only");
  return f(__half{}, std::integral_constant<int, 32>{});
#else
  auto by_dim = [&](auto t) -> cudaError_t {
    using T = decltype(t);
    switch (dp) {
      case 32: return f(T{}, std::integral_constant<int, 32>{});
      case 64: return f(T{}, std::integral_constant<int, 64>{});
      case 96: return f(T{}, std::integral_constant<int, 96>{});
      default: return f(T{}, std::integral_constant<int, 128>{});
    }
  };
  return pb.bf16 ? by_dim(__nv_bfloat16{}) : by_dim(__half{});
#endif
}

ccam_emu::Schedule schedule_of(const EmuProblem& pb) { return {pb.schedule, pb.seed}; }

}  // namespace

extern "C" {

// Tensors: q, k, v, frames, key_start, first_frame, end_frame, out, lse.
int ccam_emu_fwd(const EmuProblem* pb, const EmuTensor* t, char* err, int errlen) {
  try {
    static const char* names[] = {"q", "k", "v", "frames", "key_start", "first_frame", "end_frame", "out", "lse"};
    ccam::FwdParams p{};
    static_cast<ccam::AttentionShape&>(p) = shape_of(*pb, t[0], t[1], t[2], t + 3);
    p.q = t[0].data, p.k = t[1].data, p.v = t[2].data;
    const int64_t N = pb->num_query, H = pb->heads, D = pb->head_dim;
    p.o_stride_b = N * H * D, p.o_stride_n = H * D, p.o_stride_h = D;
    p.num_splits = pb->num_splits;
    if (t[7].ndim == 5)  // float32 partials (S, B, N, H, D)
      p.out_partial = static_cast<float*>(t[7].data);
    else
      p.out = t[7].data;
    p.lse = static_cast<float*>(t[8].data);
    ccam_emu::LaunchScope scope(regions(t, 9, names), schedule_of(*pb));
    dispatch(*pb, [&](auto dtype, auto width) { return ccam::launch_fwd<decltype(dtype), decltype(width)::value>(p, nullptr); });
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}


// Tensors: dout, q, k, v, lse, delta, frames, key_start, first_frame, end_frame, dq_rows
// ((B, N, H, D), or (S, B, N, H, D) for S key splits).
int ccam_emu_bwd_dq(const EmuProblem* pb, const EmuTensor* t, char* err, int errlen) {
  try {
    static const char* names[] = {"dout", "q", "k", "v", "lse", "delta", "frames", "key_start", "first_frame",
                                  "end_frame", "dq_rows"};
    ccam::BwdParams p = bwd_params(*pb, t);
    p.dq_rows = static_cast<float*>(t[10].data);
    p.dq_splits = t[10].ndim == 5 ? static_cast<int>(t[10].sizes[0]) : 1;  // (S, B, N, H, D) split partials
    ccam_emu::LaunchScope scope(regions(t, 11, names), schedule_of(*pb));
    dispatch(*pb, [&](auto dtype, auto width) { return ccam::launch_bwd_dq<decltype(dtype), decltype(width)::value>(p, nullptr); });
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// Tensors: dout, q, k, v, lse, delta, frames, key_start, first_frame, end_frame, tile_sample,
// tile_start, dk, dv.
int ccam_emu_bwd_dkdv(const EmuProblem* pb, const EmuTensor* t, char* err, int errlen) {
  try {
    static const char* names[] = {"dout", "q", "k", "v", "lse", "delta", "frames", "key_start", "first_frame",
                                  "end_frame", "tile_sample", "tile_start", "dk", "dv"};
    ccam::BwdParams p = bwd_params(*pb, t);
    p.tile_sample = static_cast<const int64_t*>(t[10].data), p.tile_start = static_cast<const int64_t*>(t[11].data);
    p.num_key_tiles = static_cast<int>(t[10].sizes[0]);
    p.dk = t[12].data, p.dv = t[13].data;
    p.dk_stride_l = t[12].strides[0], p.dk_stride_h = t[12].strides[1];
    p.dv_stride_l = t[13].strides[0], p.dv_stride_h = t[13].strides[1];
    ccam_emu::LaunchScope scope(regions(t, 14, names), schedule_of(*pb));
    if (p.num_key_tiles == 0) return 0;
    dispatch(*pb, [&](auto dtype, auto width) { return ccam::launch_bwd_dkdv<decltype(dtype), decltype(width)::value>(p, nullptr); });
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// The last grid: geometry (grid x, y, z, threads, dynamic shared memory bytes) into geometry[5],
// and the mma.sync warp instructions of each block in launch order (x fastest) into
// counts[0..capacity). Returns the number of blocks.
int64_t ccam_emu_last_grid(int64_t* geometry, int64_t* counts, int64_t capacity) {
  const ccam_emu::Geometry& g = ccam_emu::last_geometry();
  const int64_t dims[5] = {g.grid_x, g.grid_y, g.grid_z, g.threads, g.smem_bytes};
  for (int i = 0; i < 5; ++i) geometry[i] = dims[i];
  const auto& c = ccam_emu::mma_counts();
  for (int64_t i = 0; i < capacity && i < static_cast<int64_t>(c.size()); ++i) counts[i] = static_cast<int64_t>(c[i]);
  return static_cast<int64_t>(c.size());
}

// ---- single instructions, each run by one warp (a 32-thread CTA) ----

static int one_warp(int smem_bytes, const std::function<void()>& body, char* err, int errlen) {
  try {
    ccam_emu::run_grid({"probe", 1, 1, 1, 32, smem_bytes}, {}, {}, body);
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// a: (32, 4) registers, b: (32, 2), c: (32, 4) floats in, d: (32, 4) floats out.
int ccam_emu_mma(int bf16, const uint32_t* a, const uint32_t* b, const float* c, float* d, char* err, int errlen) {
  return one_warp(0, [&] {
    const int l = threadIdx.x;
    const uint32_t ar[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]};
    float acc[4] = {c[4 * l], c[4 * l + 1], c[4 * l + 2], c[4 * l + 3]};
    if (bf16)
      ccam::Mma<__nv_bfloat16>::run(acc, ar, b[2 * l], b[2 * l + 1]);
    else
      ccam::Mma<__half>::run(acc, ar, b[2 * l], b[2 * l + 1]);
    std::memcpy(d + 4 * l, acc, 16);
  }, err, errlen);
}

// smem: n 16-bit words stored into shared memory (by the warp, then a barrier); offsets: the
// element offset of each lane's row address; out: (32, 4) registers.
int ccam_emu_ldmatrix(int trans, const uint16_t* smem, int n, const int32_t* offsets, uint32_t* out, char* err,
                      int errlen) {
  return one_warp(2 * n, [&] {
    const int l = threadIdx.x;
    auto* s = reinterpret_cast<uint16_t*>(ccam::smem_bytes);
    for (int i = l; i < n; i += 32) ccam::store(s + i, smem[i]);
    __syncthreads();
    uint32_t r[4];
    if (trans)
      ccam::ldmatrix_x4_trans(r, s + offsets[l]);
    else
      ccam::ldmatrix_x4(r, s + offsets[l]);
    std::memcpy(out + 4 * l, r, 16);
  }, err, errlen);
}

// Lane 0 copies `groups` chunks of 8 halves from src (valid[g] == 0: a zero-fill copy), one
// commit_group per chunk, then waits with cp.async.wait_group `pending` and reads every chunk
// back into seen. The other lanes do nothing.
int ccam_emu_cp_async(const uint16_t* src, const int32_t* valid, int groups, int pending, uint16_t* seen, char* err,
                      int errlen) {
  std::vector<ccam_emu::Region> regs(1);
  regs[0].name = "src", regs[0].data = src, regs[0].elem_size = 2, regs[0].sizes = {groups, 8}, regs[0].strides = {8, 1};
  try {
    ccam_emu::run_grid({"probe", 1, 1, 1, 32, 16 * groups}, regs, {}, [&] {
      if (threadIdx.x != 0) return;
      auto* s = reinterpret_cast<uint16_t*>(ccam::smem_bytes);
      for (int g = 0; g < groups; ++g) {
        ccam::cp_async_16(s + 8 * g, src + 8 * g, valid[g] != 0);
        ccam::cp_async_commit();
      }
      switch (pending) {
        case 0: ccam::cp_async_wait<0>(); break;
        case 1: ccam::cp_async_wait<1>(); break;
        case 2: ccam::cp_async_wait<2>(); break;
        default: ccam::cp_async_wait<3>(); break;
      }
      for (int i = 0; i < 8 * groups; ++i) seen[i] = ccam::load(s + i);
    });
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

int ccam_emu_ex2(const float* x, float* y, int n) {
  for (int i = 0; i < n; ++i) y[i] = ccam::exp2_approx(x[i]);
  return 0;
}

// op 0: __shfl_xor_sync(full, x, lane_mask); 1: quad_max; 2: quad_sum. x, y: 32 floats.
int ccam_emu_shuffle(int op, int lane_mask, const float* x, float* y, char* err, int errlen) {
  return one_warp(0, [&] {
    const int l = threadIdx.x;
    y[l] = op == 0 ? __shfl_xor_sync(0xffffffffu, x[l], lane_mask) : op == 1 ? ccam::quad_max(x[l]) : ccam::quad_sum(x[l]);
  }, err, errlen);
}

// Kernels that break a rule; each must end in an emulator error:
// 0 two threads write one shared word with no barrier between; 1 a write then another
// thread's read in the same barrier interval; 2 a read past the dynamic shared memory; 3 a
// global read outside every tensor; 4 lanes of one warp at different collectives; 5 half the
// CTA at a barrier, half exited; 6 a write into a read-only tensor; 7 a shuffle with a partial
// mask; 8 half a warp leaves while the other half waits at a shuffle; 9 two blocks write one
// output element; 10 a thread reads an output element another wrote.
int ccam_emu_fault(int which, char* err, int errlen) {
  static float input[4] = {1, 2, 3, 4}, output[4];
  std::vector<ccam_emu::Region> regs(2);
  regs[0].name = "input", regs[0].data = input, regs[0].elem_size = 4, regs[0].sizes = {4}, regs[0].strides = {1};
  regs[1] = regs[0];
  regs[1].name = "output", regs[1].data = output, regs[1].writable = true;
  try {
    ccam_emu::run_grid({"fault", which == 9 ? 2u : 1u, 1, 1, 64, 256}, regs, {}, [&] {
      auto* s = reinterpret_cast<float*>(ccam::smem_bytes);
      const int t = threadIdx.x;
      switch (which) {
        case 0: if (t == 3 || t == 40) ccam::store(s + 5, float(t)); break;
        case 1: if (t == 1) ccam::store(s, 1.f); if (t == 2) (void)ccam::load(s); break;
        case 2: if (t == 0) (void)ccam::load(s + 64); break;
        case 3: if (t == 0) (void)ccam::load(input + 4); break;
        case 4: (void)__shfl_xor_sync(0xffffffffu, 1.f, t % 32 < 16 ? 1 : 2); break;
        case 5: if (t < 32) __syncthreads(); break;
        case 6: if (t == 0) ccam::store(input + 1, 5.f); break;
        case 7: (void)__shfl_xor_sync(0xffffu, 1.f, 1); break;
        case 8: if (t % 32 < 16) (void)__shfl_xor_sync(0xffffffffu, 1.f, 1); else (void)ccam::quad_sum(1.f); break;
        case 9: if (t == 0) ccam::store(output + 2, float(blockIdx.x)); break;
        case 10: if (t == 0) ccam::store(output, 1.f); if (t == 33) (void)ccam::load(output); break;
        default: break;
      }
    });
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

}  // extern "C"
