// A C interface to the emulator's sm_90a models for tests (tests/test_cuda_hopper_emulator.py
// loads it with ctypes): each instruction on its own, through hopper.cuh's names, and cases
// that must make the emulator report an error (or observe NaN where data is not yet defined).
#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "../ccam/bwd_dq_sm90.cuh"
#include "../ccam/fwd_sm90.cuh"
#include "../ccam/hopper.cuh"
#include "capi.h"
#include "runtime.h"

namespace {

using ccam_emu_capi::report;

int run(int threads, int smem, int regs, const std::vector<ccam_emu::Region>& regions,
        const std::function<void()>& body, char* err, int errlen) {
  try {
    ccam_emu::Geometry g{"hopper_probe", 1, 1, 1, threads, smem};
    g.regs = regs;
    ccam_emu::run_grid(g, regions, {}, body);
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// Every thread stores its share of `words` 16-bit words at shared offset `at`, then fences the
// generic proxy against the async one and meets the others.
void fill_shared(const uint16_t* words, int n, int at) {
  auto* s = reinterpret_cast<uint16_t*>(ccam::smem_bytes + at);
  for (int i = threadIdx.x; i < n; i += blockDim.x) ccam::store(s + i, words[i]);
  ccam::fence_proxy_async();
  __syncthreads();
}

template <typename T, int N>
void issue(bool a_regs, bool trans_a, bool trans_b, float* d, const uint32_t (&a)[4], uint64_t da, uint64_t db,
           int scale_d) {
  if (a_regs) {
    if (trans_b) ccam::wgmma_rs<T, N, true>(*reinterpret_cast<float(*)[N / 2]>(d), a, db, scale_d);
    else ccam::wgmma_rs<T, N, false>(*reinterpret_cast<float(*)[N / 2]>(d), a, db, scale_d);
  } else if (trans_a) {
    if (trans_b) ccam::wgmma_ss<T, N, true, true>(*reinterpret_cast<float(*)[N / 2]>(d), da, db, scale_d);
    else ccam::wgmma_ss<T, N, true, false>(*reinterpret_cast<float(*)[N / 2]>(d), da, db, scale_d);
  } else {
    if (trans_b) ccam::wgmma_ss<T, N, false, true>(*reinterpret_cast<float(*)[N / 2]>(d), da, db, scale_d);
    else ccam::wgmma_ss<T, N, false, false>(*reinterpret_cast<float(*)[N / 2]>(d), da, db, scale_d);
  }
}

template <typename T>
void issue_n(int n, bool a_regs, bool ta, bool tb, float* d, const uint32_t (&a)[4], uint64_t da, uint64_t db, int sd) {
  switch (n) {
    case 8: issue<T, 8>(a_regs, ta, tb, d, a, da, db, sd); break;
    case 16: issue<T, 16>(a_regs, ta, tb, d, a, da, db, sd); break;
    case 32: issue<T, 32>(a_regs, ta, tb, d, a, da, db, sd); break;
    case 64: issue<T, 64>(a_regs, ta, tb, d, a, da, db, sd); break;
    case 128: issue<T, 128>(a_regs, ta, tb, d, a, da, db, sd); break;
    default: throw ccam_emu::Error("probe: n must be 8, 16, 32, 64 or 128");
  }
}

}  // namespace

extern "C" {

// The sm_90a forward. Tensors: q, k, v, frames, key_start, first_frame, end_frame, out, lse
// (as ccam_emu_fwd in capi.cpp).
int ccam_emu_fwd_sm90(const EmuProblem* pb, const EmuTensor* t, char* err, int errlen) {
  try {
    static const char* names[] = {"q", "k", "v", "frames", "key_start", "first_frame", "end_frame", "out", "lse"};
    const std::vector<ccam_emu::Region> regs = ccam_emu_capi::regions(t, 9, names);
    ccam::FwdParams p{};
    p.frames = static_cast<const int64_t*>(t[3].data), p.key_start = static_cast<const int64_t*>(t[4].data);
    p.first_frame = static_cast<const int64_t*>(t[5].data), p.end_frame = static_cast<const int64_t*>(t[6].data);
    p.batch = pb->batch, p.num_query = pb->num_query, p.heads = pb->heads, p.group = pb->group;
    p.tokens_per_frame = pb->tokens_per_frame, p.head_dim = pb->head_dim;
    const EmuTensor &q = t[0], &k = t[1], &v = t[2];
    p.q_stride_b = q.ndim == 4 ? q.strides[0] : 0;
    p.q_stride_n = q.strides[q.ndim - 3], p.q_stride_h = q.strides[q.ndim - 2];
    p.k_stride_l = k.strides[0], p.k_stride_h = k.strides[1], p.v_stride_l = v.strides[0], p.v_stride_h = v.strides[1];
    p.scale_log2 = static_cast<float>(pb->scale * 1.4426950408889634);
    p.q = q.data, p.k = k.data, p.v = v.data;
    const int64_t N = pb->num_query, H = pb->heads, D = pb->head_dim;
    p.o_stride_b = N * H * D, p.o_stride_n = H * D, p.o_stride_h = D;
    p.num_splits = pb->num_splits;
    if (t[7].ndim == 5) p.out_partial = static_cast<float*>(t[7].data);
    else p.out = t[7].data;
    p.lse = static_cast<float*>(t[8].data);
    if (!ccam::sm90_fwd_supported(p)) throw ccam_emu::Error("fwd_sm90: this call does not fit the sm_90a kernel");
    ccam_emu::LaunchScope scope(regs, {pb->schedule, pb->seed});
    const int64_t L = k.sizes[0];
    const int hkv = static_cast<int>(k.sizes[1]);
#ifdef CCAM_EMU_SM90_FP16_D64_ONLY  // the mutation tests' builds: one instantiation
    if (pb->bf16 || D > 64) throw ccam_emu::Error("this emulator build has the sm_90a forward for fp16 at D <= 64 only");
    ccam::launch_fwd_sm90<__half, 64>(p, L, hkv, nullptr);
#else
    if (D <= 64) {
      if (pb->bf16) ccam::launch_fwd_sm90<__nv_bfloat16, 64>(p, L, hkv, nullptr);
      else ccam::launch_fwd_sm90<__half, 64>(p, L, hkv, nullptr);
    } else {
      if (pb->bf16) ccam::launch_fwd_sm90<__nv_bfloat16, 128>(p, L, hkv, nullptr);
      else ccam::launch_fwd_sm90<__half, 128>(p, L, hkv, nullptr);
    }
#endif
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// The sm_90a dQ pass. Tensors: dout, q, k, v, lse, delta, frames, key_start, first_frame,
// end_frame, dq_rows ((B, N, H, D), or (S, B, N, H, D) for S key splits), as ccam_emu_bwd_dq.
int ccam_emu_bwd_dq_sm90(const EmuProblem* pb, const EmuTensor* t, char* err, int errlen) {
  try {
    static const char* names[] = {"dout", "q", "k", "v", "lse", "delta", "frames", "key_start", "first_frame",
                                  "end_frame", "dq_rows"};
    const std::vector<ccam_emu::Region> regs = ccam_emu_capi::regions(t, 11, names);
    ccam::BwdParams p = ccam_emu_capi::bwd_params(*pb, t);
    p.dq_rows = static_cast<float*>(t[10].data);
    p.dq_splits = t[10].ndim == 5 ? static_cast<int>(t[10].sizes[0]) : 1;
    ccam_emu::LaunchScope scope(regs, {pb->schedule, pb->seed});
    const int64_t L = t[2].sizes[0], D = pb->head_dim;
    const int hkv = static_cast<int>(t[2].sizes[1]);
#ifdef CCAM_EMU_SM90_FP16_D64_ONLY
    if (pb->bf16 || D > 64) throw ccam_emu::Error("this emulator build has the sm_90a dQ pass for fp16 at D <= 64 only");
    ccam::launch_bwd_dq_sm90<__half, 64>(p, L, hkv, nullptr);
#else
    if (D <= 64) {
      if (pb->bf16) ccam::launch_bwd_dq_sm90<__nv_bfloat16, 64>(p, L, hkv, nullptr);
      else ccam::launch_bwd_dq_sm90<__half, 64>(p, L, hkv, nullptr);
    } else {
      if (pb->bf16) ccam::launch_bwd_dq_sm90<__nv_bfloat16, 128>(p, L, hkv, nullptr);
      else ccam::launch_bwd_dq_sm90<__half, 128>(p, L, hkv, nullptr);
    }
#endif
    return 0;
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
}

// One warpgroup: shared memory holds `words` from offset 0; d = A B + (scale_d ? c : 0) with A
// from desc_a (or the 4 registers per thread in a_regs), B from desc_b. c, d: (128, n / 2).
int ccam_emu_wgmma(int bf16, int n, int a_from_regs, int trans_a, int trans_b, const uint16_t* words, int nwords,
                   uint64_t desc_a, uint64_t desc_b, const uint32_t* a_regs, const float* c, int scale_d, float* d,
                   char* err, int errlen) {
  return run(128, 2 * nwords, 0, {}, [&] {
    const int t = threadIdx.x;
    fill_shared(words, nwords, 0);
    float acc[128];
    std::memcpy(acc, c + t * (n / 2), 4 * (n / 2));
    const uint32_t a[4] = {a_regs[4 * t], a_regs[4 * t + 1], a_regs[4 * t + 2], a_regs[4 * t + 3]};
    ccam::wgmma_fence();
    if (bf16) issue_n<__nv_bfloat16>(n, a_from_regs, trans_a, trans_b, acc, a, desc_a, desc_b, scale_d);
    else issue_n<__half>(n, a_from_regs, trans_a, trans_b, acc, a, desc_a, desc_b, scale_d);
    ccam::wgmma_commit();
    ccam::wgmma_wait<0>();
    std::memcpy(d + t * (n / 2), acc, 4 * (n / 2));
  }, err, errlen);
}

// Thread 0 copies the box at coords of the tensor (rank dims, innermost first) into shared
// memory at offset `at` (a barrier at offset 0), waits, and the shared image [0, smem) comes
// back in `image`.
int ccam_emu_tma(const void* gmem, int elem_bytes, int rank, const int64_t* dims, const int64_t* stride_bytes,
                 const int* box, int swizzle, const int32_t* coords, int at, int smem, uint8_t* image, char* err,
                 int errlen) {
  std::vector<ccam_emu::Region> regs(1);
  regs[0].name = "tensor", regs[0].data = gmem, regs[0].elem_size = elem_bytes;
  for (int r = 0; r < rank; ++r) {
    regs[0].sizes.push_back(dims[r]);
    regs[0].strides.push_back(r == 0 ? 1 : stride_bytes[r - 1] / elem_bytes);
  }
  CUtensorMap map;
  try {
    ccam::encode_tensor_map(&map, gmem, elem_bytes, rank, dims, stride_bytes, box, swizzle);
  } catch (const std::exception& e) {
    return report(e, err, errlen);
  }
  int64_t bytes = elem_bytes;
  for (int r = 0; r < rank; ++r) bytes *= box[r];
  return run(32, smem, 0, regs, [&] {
    auto* bar = reinterpret_cast<uint64_t*>(ccam::smem_bytes);
    if (threadIdx.x == 0) {
      ccam::mbarrier_init(bar, 1);
      ccam::mbarrier_arrive_expect_tx(bar, static_cast<uint32_t>(bytes));
      void* dst = ccam::smem_bytes + at;
      if (rank == 2) ccam::tma_load_2d(dst, &map, bar, coords[0], coords[1]);
      else if (rank == 3) ccam::tma_load_3d(dst, &map, bar, coords[0], coords[1], coords[2]);
      else ccam::tma_load_4d(dst, &map, bar, coords[0], coords[1], coords[2], coords[3]);
      ccam::mbarrier_wait(bar, 0);
      std::memcpy(image, ccam::smem_bytes, smem);
    }
  }, err, errlen);
}

// The last grid's geometry (grid x, y, z, threads, shared bytes) and, per block in launch order,
// its wgmma work in m64n8k16 steps (runtime.h wgmma_counts). Returns the number of blocks.
int64_t ccam_emu_last_grid_wgmma(int64_t* geometry, int64_t* counts, int64_t capacity) {
  const ccam_emu::Geometry& g = ccam_emu::last_geometry();
  const int64_t dims[5] = {g.grid_x, g.grid_y, g.grid_z, g.threads, g.smem_bytes};
  for (int i = 0; i < 5; ++i) geometry[i] = dims[i];
  const auto& c = ccam_emu::wgmma_counts();
  for (int64_t i = 0; i < capacity && i < static_cast<int64_t>(c.size()); ++i) counts[i] = static_cast<int64_t>(c[i]);
  return static_cast<int64_t>(c.size());
}

// Cases (see tests/test_cuda_hopper_emulator.py); `out` receives observations.
int ccam_emu_hopper_case(int which, float* out, char* err, int errlen) {
  static uint16_t src[2][256];  // two 512-byte tiles of fp16 ones and twos
  for (int i = 0; i < 256; ++i) src[0][i] = 0x3c00, src[1][i] = 0x4000;
  std::vector<ccam_emu::Region> regs(1);
  regs[0].name = "src", regs[0].data = src, regs[0].elem_size = 2, regs[0].sizes = {2, 256}, regs[0].strides = {256, 1};
  static CUtensorMap map;
  const int64_t dims[2] = {256, 2}, strides[1] = {512};
  const int box[2] = {256, 1};
  ccam::encode_tensor_map(&map, src, 2, 2, dims, strides, box, 0);
  const int threads = which >= 13 && which <= 16 ? 256 : 128;
  const int regs_per_thread = which == 13 ? 0 : 128;
  return run(threads, 16384, regs_per_thread, regs, [&] {
    const int t = threadIdx.x;
    auto* bar = reinterpret_cast<uint64_t*>(ccam::smem_bytes);
    auto* tile = reinterpret_cast<uint16_t*>(ccam::smem_bytes + 1024);
    // A (64 x 16, K-major, no swizzle: core matrices 128 B apart along K, 256 B along M) at
    // 4096, B (8 x 16) at 8192, all fp16 ones: D = 16 everywhere.
    auto desc = [](int at, int lbo, int sbo) { return ccam::make_smem_desc(ccam::smem_bytes + at, lbo, sbo, 0); };
    auto ones = [&] {
      auto* s = reinterpret_cast<uint16_t*>(ccam::smem_bytes + 4096);
      for (int i = t; i < 64 * 16 + 8 * 16 + 2048; i += blockDim.x) ccam::store(s + i, uint16_t(0x3c00));
    };
    float acc[4] = {0, 0, 0, 0};
    switch (which) {
      case 0: case 1: case 2: case 3: {  // bulk copies of two tiles; expect_tx off, wrong parity, right
        if (t == 0) {
          ccam::mbarrier_init(bar, 1);
          const uint32_t tx = which == 0 ? 3 * 512 : which == 1 ? 512 : 2 * 512;
          ccam::mbarrier_arrive_expect_tx(bar, tx);
          ccam::tma_load_2d(tile, &map, bar, 0, 0);
          ccam::tma_load_2d(tile + 256, &map, bar, 0, 1);
        }
        __syncthreads();
        ccam::mbarrier_wait(bar, which == 2 ? 1 : 0);
        if (t == 0) {
          out[0] = ccam_emu::half_to_float(tile[0]);
          out[1] = ccam_emu::half_to_float(tile[256]);
        }
        break;
      }
      case 4: {  // count 2, one arrival: the wait never ends
        if (t == 0) ccam::mbarrier_init(bar, 2);
        __syncthreads();
        if (t == 0) ccam::mbarrier_arrive(bar);
        if (t < 32) ccam::mbarrier_wait(bar, 0);
        break;
      }
      case 5: case 6: case 7: case 17: {  // wgmma: read early; no fence; register written in flight; wait<1>
        ones();
        ccam::fence_proxy_async();
        __syncthreads();
        float acc2[4] = {0, 0, 0, 0};
        if (which != 6) ccam::wgmma_fence();
        ccam::wgmma_ss<__half, 8>(acc, desc(4096, 128, 256), desc(6144, 128, 256), 1);
        ccam::wgmma_commit();
        if (which == 17) {
          ccam::wgmma_fence();
          ccam::wgmma_ss<__half, 8>(acc2, desc(4096, 128, 256), desc(6144, 128, 256), 0);
          ccam::wgmma_commit();
          ccam::wgmma_wait<1>();
          if (t == 0) out[0] = acc[0], out[1] = acc2[0];
          ccam::wgmma_wait<0>();
          if (t == 0) out[2] = acc2[0];
          break;
        }
        if (t == 0) out[0] = acc[0];
        if (which == 7 && t == 5) acc[1] = 1.f;
        ccam::wgmma_wait<0>();
        if (t == 0) out[1] = acc[0];
        break;
      }
      case 8: case 9: {  // generic writes of an operand with / without fence.proxy.async
        ones();
        if (which == 9) ccam::fence_proxy_async();
        __syncthreads();
        ccam::wgmma_fence();
        ccam::wgmma_ss<__half, 8>(acc, desc(4096, 128, 256), desc(6144, 128, 256), 0);
        ccam::wgmma_commit();
        ccam::wgmma_wait<0>();
        if (t == 0) out[0] = acc[0];
        break;
      }
      case 10: {  // a bulk copy into a stage a wgmma still reads
        ones();
        ccam::fence_proxy_async();
        if (t == 0) ccam::mbarrier_init(bar, 1);
        __syncthreads();
        ccam::wgmma_fence();
        ccam::wgmma_ss<__half, 8>(acc, desc(4096, 128, 256), desc(6144, 128, 256), 0);
        ccam::wgmma_commit();
        if (t == 0) {
          ccam::mbarrier_arrive_expect_tx(bar, 512);
          ccam::tma_load_2d(ccam::smem_bytes + 6144, &map, bar, 0, 0);
        }
        ccam::wgmma_wait<0>();
        break;
      }
      case 11: out[t] = ccam::elect_one() ? 1.f : 0.f; break;
      case 12: if (t % 32 < 16) (void)ccam::elect_one(); break;
      case 13: ccam::setmaxnreg_dec<64>(); break;  // the launch declares no register count
      case 14: case 15: {  // 2 warpgroups at 128: 24 + 232 fit the CTA's registers, 24 + 240 do not
        if (t >= 128) ccam::setmaxnreg_dec<24>();
        else if (which == 14) ccam::setmaxnreg_inc<232>();
        else ccam::setmaxnreg_inc<240>();
        out[0] = 1.f;
        break;
      }
      case 16: ccam::setmaxnreg_inc<100>(); break;  // not a multiple of 8
      case 18: {  // half a warpgroup leaves before a wgmma
        ones();
        ccam::fence_proxy_async();
        __syncthreads();
        if (t >= 64) return;
        ccam::wgmma_fence();
        ccam::wgmma_ss<__half, 8>(acc, desc(4096, 128, 256), desc(6144, 128, 256), 0);
        break;
      }
      case 20: case 21: case 22: {  // generic shared accesses ordered by mbarriers (race checker)
        // 20: thread 0 writes, then arrives; thread 64 waits, then reads: ordered.
        // 21: thread 0 arrives, then writes: the read races with the write.
        // 22: thread 0 writes, arrives on A; thread 32 waits on A, arrives on B; thread 64 waits
        //     on B and reads: ordered through thread 32.
        auto* word = reinterpret_cast<uint32_t*>(ccam::smem_bytes + 2048);
        if (t == 0) ccam::mbarrier_init(bar, 1), ccam::mbarrier_init(bar + 1, 1);
        __syncthreads();
        if (t == 0) {
          if (which == 21) ccam::mbarrier_arrive(bar);
          ccam::store(word, 42u);
          if (which != 21) ccam::mbarrier_arrive(bar);
        }
        if (t == 32 && which == 22) {
          ccam::mbarrier_wait(bar, 0);
          ccam::mbarrier_arrive(bar + 1);
        }
        if (t == 64) {
          ccam::mbarrier_wait(bar + (which == 22 ? 1 : 0), 0);
          out[0] = static_cast<float>(ccam::load(word));
        }
        break;
      }
      case 19: {  // more arrivals than the count
        if (t == 0) ccam::mbarrier_init(bar, 1);
        __syncthreads();
        if (t == 0) {
          ccam::mbarrier_arrive_expect_tx(bar, 512);
          ccam::mbarrier_arrive(bar);
        }
        break;
      }
      default: break;
    }
  }, err, errlen);
}

}  // extern "C"
