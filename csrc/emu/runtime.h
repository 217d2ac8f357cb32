// The CPU emulator's machine: a grid runs one CTA after another (in a selectable order), a CTA
// runs as its threads, each a fiber with its own stack, switched cooperatively at the points
// where threads meet (warp collectives, __syncthreads). Everything is checked as it runs:
//   - warp collectives (mma, ldmatrix, shuffles) are exchanges among the warp's 32 lanes: all
//     32 must arrive at the same instruction, else an error names the lanes;
//   - __syncthreads is a barrier of all the CTA's threads; a thread that exits while others
//     wait, or a set of threads that can never meet, is an error (deadlock);
//   - shared memory starts as NaN (0xFF bytes) for every CTA; an access outside the launch's
//     dynamic shared-memory size is an error;
//   - every global access must fall on an element of a tensor registered for the launch
//     (Region: pointer, sizes, strides), inside its row for multi-element accesses, aligned,
//     and writes only into tensors marked writable;
//   - an element of a writable tensor is written once per launch, by one block and thread, and
//     not read back (blocks run one at a time, so overlapping tiles would go unseen otherwise);
//   - a race checker reports the first pair of accesses to one shared byte by two threads, at
//     least one a write, with no barrier between them (the kernel, both threads, the offset):
//     no __syncthreads, and no chain of mbarrier arrive -> completed wait (vector clocks).
// Errors are ccam_emu::Error exceptions raised from the launch. One grid runs at a time (a
// process-wide lock): the emulated CTA state is global.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

// The kernels' dynamic shared memory (`extern __shared__ unsigned char smem_bytes[]`): one
// buffer, reused by each CTA in turn.
namespace ccam {
extern unsigned char smem_bytes[];
}

namespace ccam_emu {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// The largest dynamic shared memory a CTA may opt into: sm_80's 163 KB (sm_90 allows 227 KB,
// but the kernels must run on both).
constexpr int kMaxSmemBytes = 166912;

struct Thread {
  Dim3 idx;
  int tid = 0;
};

struct Cta {
  Dim3 block, grid, block_dim;
};

// The fiber running now (valid only inside a launch).
extern Thread* g_current_thread;
extern Cta g_cta;
inline const Thread& current_thread() { return *g_current_thread; }
inline const Cta& current_cta() { return g_cta; }

// A tensor a kernel may touch: element size, sizes and strides (in elements).
struct Region {
  std::string name;
  const void* data = nullptr;
  int64_t elem_size = 1;
  std::vector<int64_t> sizes, strides;
  bool writable = false;
};

// Block order of a grid and thread order within each CTA's round-robin schedule:
// 0 linear (x fastest, as the hardware issues them) and ascending threads, 1 reversed both,
// 2 a random permutation of both (seeded). CCAM_EMU_SCHEDULE overrides: "linear", "reverse",
// "random" or "random:SEED".
struct Schedule {
  int order = 0;
  uint64_t seed = 0;
};
Schedule schedule_from_env();

struct Geometry {
  const char* kernel;
  unsigned grid_x, grid_y, grid_z;
  int threads, smem_bytes;
  // Registers per thread the launch declares (__launch_bounds__ / maxnreg); 0: not declared
  // (setmaxnreg is then an error). Checked only by setmaxnreg (ptx_hopper.cpp).
  int regs = 0;
};

// Run body() as every thread of every CTA of the grid. regions: what global memory may be
// touched. Throws Error on the first problem found.
void run_grid(const Geometry& g, const std::vector<Region>& regions, const Schedule& schedule,
              const std::function<void()>& body);

// The regions of the launches made by launchers inside this scope (the launchers' signature
// carries no tensors): set by the op wrappers and the C API.
struct LaunchScope {
  LaunchScope(std::vector<Region> regions, Schedule schedule);
  ~LaunchScope();
};
void run_launch(const Geometry& g, const std::function<void()>& body);

// Memory accesses of the emulated instructions. `what` names the instruction in errors.
void access(const void* p, size_t bytes, bool write, const char* what);
bool is_shared(const void* p);

// The last grid's geometry and, per block (linear index, x fastest: the hardware's launch
// order), the mma.sync instructions its warps executed, each warp instruction counted once.
// The performance model (ccam_kernels/perf_model) predicts the same counts; a test compares.
const Geometry& last_geometry();
const std::vector<uint64_t>& mma_counts();
// Likewise the wgmma work of each block: per warpgroup wgmma.m64nNk16, N / 8 (its m64n8k16
// steps, 16384 FLOPs each), so that one count covers every N.
const std::vector<uint64_t>& wgmma_counts();

// PTX models (ptx.cpp).
void cp_async(void* smem, const void* gmem, bool valid);
void cp_async_commit();
void cp_async_wait(int pending);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans);
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16);
float ex2_approx_ftz(float x);


// For the instruction models (ptx.cpp): a warp collective. Every lane of the calling thread's
// warp passes `in`; when the 32nd arrives (all at the same kind and param, else an error),
// compute(ins, outs, param) runs once and each lane gets its `out`.
namespace detail {
constexpr int kMaxIn = 48, kMaxOut = 16;
using Compute = void (*)(const unsigned char (&in)[32][kMaxIn], unsigned char (&out)[32][kMaxOut], int param);
void collective(const char* kind, int param, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                Compute compute);
// A shared-memory access made for thread `tid` (a collective's lanes): bounds and races.
void shared_access(const void* p, size_t bytes, bool write, int tid, const char* what);
// A global access: must be inside a registered tensor's row, aligned, writable for writes.
void global_access(const void* p, size_t bytes, bool write, const char* what);
int current_tid();
// One mma.sync of the current block's warps (called by its lane 0 only).
void count_mma();
// One wgmma of the current block's warpgroups, of n8 m64n8k16 steps (called once per warpgroup).
void count_wgmma(int n8);

// ---- for the Hopper models (ptx_hopper.cpp), kept out of the machine's own logic ----
// Block the calling thread until ready() holds. The scheduler evaluates ready() between
// fibers (no current thread); `what` names the wait in a deadlock report.
void block_until(const char* what, std::function<bool()> ready);
// A collective of `size` consecutive threads (group = tid / size; size divides the block):
// each passes a pointer to its own operands; when the last arrives (all at the same kind and
// param, else an error) compute(ios) runs once, ios[i] being thread group*size + i's pointer.
void group_collective(const char* kind, long param, int size, void* io,
                      const std::function<void(void* const* ios)>& compute);
// Called at the start of every CTA (reset per-CTA model state); text added to a deadlock
// report (what the models' waiters wait for). Register from a static initializer.
void on_cta_start(std::function<void()> f);
void on_deadlock(std::function<std::string()> f);
const Geometry& geometry();
// The async proxy (TMA, wgmma) and the generic proxy (ld/st.shared): fence.proxy.async by the
// calling thread; an async-proxy read of shared bytes (bounds, races with generic writes of
// other threads since the last barrier, and a generic write not followed by a
// fence.proxy.async of its writer is an error); an async-proxy write (bounds; the bytes'
// race history restarts: the mbarrier that completes it orders it).
void proxy_fence();
void async_read(const void* p, size_t bytes, int tid, const char* what);
void async_write(const void* p, size_t bytes, const char* what);
// The race checker's mbarrier edges: an arrive releases the calling thread's clock into the
// phase's (`into`); a completed wait acquires the phase's clock. Inside one __syncthreads
// interval, accesses ordered by arrive -> wait are no race.
void clock_release(std::vector<uint32_t>& into);
void clock_acquire(const std::vector<uint32_t>& from);
}  // namespace detail

}  // namespace ccam_emu
