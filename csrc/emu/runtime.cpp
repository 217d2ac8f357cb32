// The emulator's machine (see runtime.h): fibers, the CTA scheduler, barriers, warp
// collectives, the memory checks and the shared-memory race checker.
#include "runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <unordered_map>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// The kernels' `extern __shared__ unsigned char smem_bytes[]`: one buffer, reused by every CTA
// (they run one after another).
namespace ccam {
alignas(128) unsigned char smem_bytes[ccam_emu::kMaxSmemBytes];
}

namespace ccam_emu {

Thread* g_current_thread = nullptr;
Cta g_cta;

namespace {

// ---- fibers ------------------------------------------------------------------------------
// x86-64: a minimal switch (callee-saved registers, MXCSR and the x87 control word, then the
// stack pointer): glibc's swapcontext makes a system call per switch, and a kernel run makes
// millions. Other architectures use ucontext.
#if defined(__x86_64__)
extern "C" void ccam_emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.p2align 4
.globl ccam_emu_switch
.hidden ccam_emu_switch
.type ccam_emu_switch,@function
ccam_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $16, %rsp
  stmxcsr (%rsp)
  fnstcw 8(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 8(%rsp)
  addq $16, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size ccam_emu_switch, .-ccam_emu_switch
)");

struct Context {
  void* sp = nullptr;
};
void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
  auto top = reinterpret_cast<uintptr_t>(stack + size) & ~uintptr_t(15);
  auto* frame = reinterpret_cast<uint64_t*>(top - 80);  // 16-byte aligned: see the layout below
  std::memset(frame, 0, 80);
  uint32_t mxcsr;
  uint16_t fpucw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpucw));
  std::memcpy(&frame[0], &mxcsr, 4);
  std::memcpy(&frame[1], &fpucw, 2);
  // frame[2..7]: r15 r14 r13 r12 rbx rbp (zero); frame[8]: where `ret` goes; frame[9]: a null
  // return address for the entry function, which never returns.
  frame[8] = reinterpret_cast<uint64_t>(entry);
  c.sp = frame;
}
void swap_context(Context& from, Context& to) { ccam_emu_switch(&from.sp, to.sp); }
#else
struct Context {
  ucontext_t uc;
};
void make_context(Context& c, unsigned char* stack, size_t size, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = size;
  c.uc.uc_link = nullptr;
  makecontext(&c.uc, entry, 0);
}
void swap_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

constexpr size_t kStackBytes = 256 << 10;

unsigned char* new_stack() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (mem == MAP_FAILED) throw Error("ccam emulator: cannot map a fiber stack");
  mprotect(mem, page, PROT_NONE);  // guard page: an overflow faults instead of corrupting
  return static_cast<unsigned char*>(mem) + page;
}

// ---- CTA state -----------------------------------------------------------------------------
enum class State { Runnable, Blocked, Done };

struct Copy {
  unsigned char* dst;
  unsigned char data[16];
};

struct ThreadState : Thread {
  Context ctx;
  unsigned char* stack = nullptr;
  State state = State::Runnable;
  const char* waiting_at = "";
  std::vector<Copy> open;                 // cp.async issued since the last commit_group
  std::deque<std::vector<Copy>> groups;   // committed, oldest first
  std::function<bool()> ready;            // block_until's condition while Blocked
  uint32_t proxy_fences = 0;              // fence.proxy.async count (async-proxy reads check it)
};

// A group_collective in progress (key: size and group index).
struct Group {
  int arrived = 0, first = 0;
  uint64_t generation = 0;
  const char* kind = nullptr;
  long param = 0;
  std::vector<void*> io;
};

std::vector<std::function<void()>>& cta_start_hooks() {
  static std::vector<std::function<void()>> hooks;
  return hooks;
}
std::vector<std::function<std::string()>>& deadlock_hooks() {
  static std::vector<std::function<std::string()>> hooks;
  return hooks;
}

struct Warp {
  int arrived = 0;
  const char* kind = nullptr;
  int param = 0;
  int first_lane = 0;
  unsigned char in[32][detail::kMaxIn];
  unsigned char out[32][detail::kMaxOut];
};

// Race-checker shadow of one shared byte: the last writer and the readers in the current
// barrier interval (epoch). Epochs are unique per CTA and per barrier, so nothing is reset.
// Each access also keeps its thread's own clock at the access (see `clocks` below): inside one
// epoch, an access ordered by mbarrier arrive -> wait edges is no race.
struct Shadow {
  uint64_t w_epoch = 0, r_epoch = 0;
  int32_t w_tid = -1, r_tid = -1, r_other = -1;
  uint32_t w_clock = 0, r_clock = 0, r_other_clock = 0;
  uint32_t w_fence = 0;  // the writer's fence.proxy.async count at the write
  const char *w_what = "", *r_what = "";
};

struct Machine {
  std::vector<ThreadState> threads;
  std::vector<Warp> warps;
  Context main;
  const Geometry* geometry = nullptr;
  const std::vector<Region>* regions = nullptr;
  const std::function<void()>* body = nullptr;
  int barrier_arrived = 0;
  bool barrier_or = false, barrier_result = false;  // __syncthreads_or: the arrivals' OR, the last result
  uint64_t epoch = 0, cta_epoch = 0;  // cta_epoch: the first epoch of the running CTA
  std::unordered_map<int64_t, Group> groups;
  std::string error;
  int error_tid = -1;
  std::vector<Shadow> shadow = std::vector<Shadow>(kMaxSmemBytes);
  // Vector clocks of the CTA's threads (row t: what thread t has synchronized with; clocks[t][t]
  // its own clock, from 1), advanced only by mbarrier arrive (release) and completed waits
  // (acquire): __syncthreads orders everything through the epochs instead. Thread t's access
  // is ordered after thread u's access at u's clock c iff clocks[t][u] >= c.
  std::vector<uint32_t> clocks;
  // Writable tensors' elements written in this launch: element address -> (block, thread). A
  // second writer, or a read by another thread of an element written in this launch, is an
  // error: outputs are written once, by their owner, and never read back.
  std::unordered_map<uintptr_t, std::pair<uint64_t, int>> written;
};

Machine M;
Geometry g_last_geometry{"none", 0, 0, 0, 0, 0};
std::vector<uint64_t> g_mma_counts;
std::vector<uint64_t> g_wgmma_counts;
std::mutex g_launch_mutex;
std::vector<Region> g_regions;
Schedule g_schedule;
bool g_in_scope = false;

ThreadState& cur() { return *static_cast<ThreadState*>(g_current_thread); }

void yield_to_scheduler(ThreadState& t) { swap_context(t.ctx, M.main); }

std::string dim_str(const Dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

[[noreturn]] void fail(const std::string& msg) { throw Error(msg); }

void fiber_main() {
  ThreadState& t = cur();
  try {
    (*M.body)();
  } catch (const std::exception& e) {
    if (M.error.empty()) {
      M.error = e.what();
      M.error_tid = t.tid;
    }
  }
  t.state = State::Done;
  if (M.error.empty()) {
    const Warp& w = M.warps[t.tid / 32];
    if (w.arrived > 0) {
      M.error = "thread " + std::to_string(t.tid) + " exited while lanes of its warp wait at " + w.kind;
      M.error_tid = t.tid;
    } else if (M.barrier_arrived > 0) {
      M.error = "thread " + std::to_string(t.tid) + " exited while " + std::to_string(M.barrier_arrived) +
                " threads wait at __syncthreads";
      M.error_tid = t.tid;
    }
  }
  swap_context(t.ctx, M.main);
  std::abort();  // never resumed
}

// Thread ids grouped by where they wait, for a deadlock message.
std::string waiting_summary() {
  std::ostringstream os;
  const char* last = nullptr;
  int from = -1;
  auto flush = [&](int to) {
    if (from >= 0) os << " threads " << from << "-" << to << " at " << last << ";";
  };
  for (auto& t : M.threads) {
    const char* at = t.state == State::Done ? "exit" : t.waiting_at;
    if (from < 0 || at != last) {
      flush(t.tid - 1);
      from = t.tid;
      last = at;
    }
  }
  flush(static_cast<int>(M.threads.size()) - 1);
  return os.str();
}

void run_cta(const std::vector<int>& order) {
  const int n = static_cast<int>(M.threads.size());
  std::memset(ccam::smem_bytes, 0xFF, M.geometry->smem_bytes);  // NaN in fp16, bf16 and fp32
  ++M.epoch;
  M.cta_epoch = M.epoch;
  M.barrier_arrived = 0;
  M.barrier_or = false;
  M.clocks.assign(size_t(n) * n, 0);
  for (int i = 0; i < n; ++i) M.clocks[size_t(i) * n + i] = 1;
  M.groups.clear();
  for (auto& w : M.warps) w.arrived = 0;
  for (auto& h : cta_start_hooks()) h();
  for (auto& t : M.threads) {
    t.state = State::Runnable;
    t.waiting_at = "";
    t.open.clear();
    t.groups.clear();
    t.ready = nullptr;
    t.proxy_fences = 0;
    make_context(t.ctx, t.stack, kStackBytes, fiber_main);
  }
  int done = 0;
  while (done < n) {
    bool ran = false;
    for (int i : order) {
      ThreadState& t = M.threads[i];
      if (t.state == State::Blocked && t.ready) {
        bool go = false;
        try {
          go = t.ready();
        } catch (const std::exception& e) {
          fail("ccam emulator: " + std::string(M.geometry->kernel) + " block " + dim_str(g_cta.block) + " thread " +
               std::to_string(t.tid) + ": " + e.what());
        }
        if (!go) continue;
        t.state = State::Runnable;
        t.ready = nullptr;
      }
      if (t.state != State::Runnable) continue;
      g_current_thread = &t;
      swap_context(M.main, t.ctx);
      g_current_thread = nullptr;
      ran = true;
      if (!M.error.empty()) {
        fail("ccam emulator: " + std::string(M.geometry->kernel) + " block " + dim_str(g_cta.block) + " thread " +
             std::to_string(M.error_tid) + ": " + M.error);
      }
      if (t.state == State::Done) ++done;
    }
    if (!ran) {
      std::string more;
      for (auto& h : deadlock_hooks()) more += h();
      fail("ccam emulator: " + std::string(M.geometry->kernel) + " block " + dim_str(g_cta.block) +
           ": deadlock:" + waiting_summary() + more);
    }
  }
}

}  // namespace

Schedule schedule_from_env() {
  Schedule s;
  const char* env = std::getenv("CCAM_EMU_SCHEDULE");
  if (!env || !*env || !std::strcmp(env, "linear")) return s;
  const std::string v(env);
  if (v == "reverse") {
    s.order = 1;
  } else if (v.rfind("random", 0) == 0) {
    s.order = 2;
    s.seed = v.size() > 7 && v[6] == ':' ? std::stoull(v.substr(7)) : 0;
  } else {
    fail("CCAM_EMU_SCHEDULE must be linear, reverse, random or random:SEED, got '" + v + "'");
  }
  return s;
}

void run_grid(const Geometry& g, const std::vector<Region>& regions, const Schedule& schedule,
              const std::function<void()>& body) {
  const std::string k = std::string("ccam emulator: ") + g.kernel + ": ";
  if (g.threads <= 0 || g.threads > 1024 || g.threads % 32 != 0)
    fail(k + "threads per block must be a multiple of 32 in 32..1024, got " + std::to_string(g.threads));
  if (g.smem_bytes < 0 || g.smem_bytes > kMaxSmemBytes)
    fail(k + "dynamic shared memory " + std::to_string(g.smem_bytes) + " B exceeds sm_80's " +
         std::to_string(kMaxSmemBytes) + " B");
  if (g.grid_x < 1 || g.grid_y < 1 || g.grid_z < 1 || g.grid_x > 0x7fffffffu || g.grid_y > 65535 ||
      g.grid_z > 65535)
    fail(k + "invalid grid (" + std::to_string(g.grid_x) + ", " + std::to_string(g.grid_y) + ", " +
         std::to_string(g.grid_z) + ")");
  M.geometry = &g;
  M.regions = &regions;
  M.body = &body;
  M.error.clear();
  M.error_tid = -1;
  M.written.clear();
  g_last_geometry = g;
  g_mma_counts.assign(size_t(g.grid_x) * g.grid_y * g.grid_z, 0);
  g_wgmma_counts.assign(size_t(g.grid_x) * g.grid_y * g.grid_z, 0);
  static std::vector<unsigned char*> stacks;  // kept for the process: one per thread ever used
  while (static_cast<int>(stacks.size()) < g.threads) stacks.push_back(new_stack());
  M.threads.resize(g.threads);
  for (int i = 0; i < g.threads; ++i) {
    M.threads[i].tid = i;
    M.threads[i].idx = Dim3{unsigned(i), 0, 0};
    M.threads[i].stack = stacks[i];
  }
  M.warps.assign(g.threads / 32, Warp{});

  std::vector<Dim3> blocks;
  blocks.reserve(size_t(g.grid_x) * g.grid_y * g.grid_z);
  for (unsigned z = 0; z < g.grid_z; ++z)
    for (unsigned y = 0; y < g.grid_y; ++y)
      for (unsigned x = 0; x < g.grid_x; ++x) blocks.push_back(Dim3{x, y, z});
  std::vector<int> order(g.threads);
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(schedule.seed);
  if (schedule.order == 1) {
    std::reverse(blocks.begin(), blocks.end());
    std::reverse(order.begin(), order.end());
  } else if (schedule.order == 2) {
    std::shuffle(blocks.begin(), blocks.end(), rng);
  }
  g_cta.grid = Dim3{g.grid_x, g.grid_y, g.grid_z};
  g_cta.block_dim = Dim3{unsigned(g.threads), 1, 1};
  for (const Dim3& b : blocks) {
    g_cta.block = b;
    if (schedule.order == 2) std::shuffle(order.begin(), order.end(), rng);
    run_cta(order);
  }
}

LaunchScope::LaunchScope(std::vector<Region> regions, Schedule schedule) {
  g_launch_mutex.lock();
  g_regions = std::move(regions);
  g_schedule = schedule;
  g_in_scope = true;
}
LaunchScope::~LaunchScope() {
  g_in_scope = false;
  g_regions.clear();
  g_launch_mutex.unlock();
}

const Geometry& last_geometry() { return g_last_geometry; }
const std::vector<uint64_t>& mma_counts() { return g_mma_counts; }
const std::vector<uint64_t>& wgmma_counts() { return g_wgmma_counts; }

void run_launch(const Geometry& g, const std::function<void()>& body) {
  if (!g_in_scope) fail(std::string("ccam emulator: ") + g.kernel + " launched outside a LaunchScope");
  if (const char* trace = std::getenv("CCAM_EMU_TRACE"); trace && !std::strcmp(trace, "1"))
    std::fprintf(stderr, "ccam emulator: launch %s\n", g.kernel);  // which kernel a dispatch chose
  run_grid(g, g_regions, g_schedule, body);
}

bool is_shared(const void* p) {
  const auto a = reinterpret_cast<uintptr_t>(p), base = reinterpret_cast<uintptr_t>(ccam::smem_bytes);
  return a >= base && a < base + kMaxSmemBytes;
}

namespace detail {

int current_tid() { return cur().tid; }

// Whether thread `tid` has synchronized (mbarrier edges) with thread `other`'s clock `c`.
bool ordered_after(int tid, int other, uint32_t c) {
  return M.clocks[size_t(tid) * M.threads.size() + other] >= c;
}

void shared_access(const void* p, size_t bytes, bool write, int tid, const char* what) {
  const auto off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(ccam::smem_bytes);
  if (!is_shared(p) || off + bytes > size_t(M.geometry->smem_bytes))
    fail(std::string(what) + ": shared access of " + std::to_string(bytes) + " B at offset " +
         std::to_string(static_cast<intptr_t>(off)) + " is outside the launch's " +
         std::to_string(M.geometry->smem_bytes) + " B of dynamic shared memory");
  if (reinterpret_cast<uintptr_t>(p) % std::min<size_t>(bytes, 16) != 0)
    fail(std::string(what) + ": misaligned shared access of " + std::to_string(bytes) + " B at offset " +
         std::to_string(off));
  const uint64_t e = M.epoch;
  const uint32_t now = M.clocks[size_t(tid) * M.threads.size() + tid];
  for (size_t i = off; i < off + bytes; ++i) {
    Shadow& s = M.shadow[i];
    int other = -1;
    const char *mine = write ? "write" : "read", *theirs = nullptr, *their_what = nullptr;
    if (s.w_epoch == e && s.w_tid != tid && !ordered_after(tid, s.w_tid, s.w_clock)) {
      other = s.w_tid, theirs = "write", their_what = s.w_what;
    } else if (write && s.r_epoch == e) {
      if (s.r_tid != tid && !ordered_after(tid, s.r_tid, s.r_clock))
        other = s.r_tid, theirs = "read", their_what = s.r_what;
      else if (s.r_other >= 0 && s.r_other != tid && !ordered_after(tid, s.r_other, s.r_other_clock))
        other = s.r_other, theirs = "read", their_what = s.r_what;
    }
    if (other >= 0) {
      fail("race on shared byte " + std::to_string(i) + ": thread " + std::to_string(other) + " " + theirs + " (" +
           their_what + ") and thread " + std::to_string(tid) + " " + mine + " (" + what +
           ") with no __syncthreads or mbarrier wait between");
    }
    if (write) {
      s.w_epoch = e, s.w_tid = tid, s.w_clock = now, s.w_what = what, s.w_fence = M.threads[tid].proxy_fences;
    } else if (s.r_epoch != e) {
      s.r_epoch = e, s.r_tid = tid, s.r_clock = now, s.r_other = -1, s.r_what = what;
    } else if (s.r_tid == tid) {
      s.r_clock = now;
    } else {
      s.r_other = tid, s.r_other_clock = now;
    }
  }
}

// mbarrier.arrive: the arriving thread's clock joins the phase's (`into`), then ticks.
void clock_release(std::vector<uint32_t>& into) {
  const size_t n = M.threads.size(), t = cur().tid;
  into.resize(n, 0);
  for (size_t u = 0; u < n; ++u) into[u] = std::max(into[u], M.clocks[t * n + u]);
  ++M.clocks[t * n + t];
}

// A completed mbarrier wait: the waiter's clock joins the completed phase's.
void clock_acquire(const std::vector<uint32_t>& from) {
  const size_t n = M.threads.size(), t = cur().tid;
  for (size_t u = 0; u < n && u < from.size(); ++u) M.clocks[t * n + u] = std::max(M.clocks[t * n + u], from[u]);
}

void global_access(const void* p, size_t bytes, bool write, const char* what) {
  const auto a = reinterpret_cast<uintptr_t>(p);
  for (const Region& r : *M.regions) {
    const auto base = reinterpret_cast<uintptr_t>(r.data);
    if (a < base) continue;
    const uintptr_t off = a - base;
    if (off % r.elem_size) continue;
    // Decompose the element offset over the dims, largest stride first.
    int64_t rest = static_cast<int64_t>(off / r.elem_size), inner_index = -1, inner_size = 0;
    std::vector<int> dims(r.sizes.size());
    std::iota(dims.begin(), dims.end(), 0);
    std::sort(dims.begin(), dims.end(), [&](int x, int y) { return r.strides[x] > r.strides[y]; });
    bool ok = true;
    for (int d : dims) {
      if (r.sizes[d] <= 0) ok = false;
      if (!ok || r.strides[d] <= 0 || r.sizes[d] == 1) continue;
      const int64_t i = rest / r.strides[d];
      if (i >= r.sizes[d]) ok = false;
      rest -= i * r.strides[d];
      if (r.strides[d] == 1) inner_index = i, inner_size = r.sizes[d];
    }
    if (!ok || rest != 0) continue;
    const int64_t n = static_cast<int64_t>(bytes) / r.elem_size;
    if (n > 1 && (inner_index < 0 || inner_index + n > inner_size))
      fail(std::string(what) + ": " + std::to_string(bytes) + " B access runs past the end of a row of " + r.name);
    if (a % std::min<size_t>(bytes, 16) != 0)
      fail(std::string(what) + ": misaligned " + std::to_string(bytes) + " B access into " + r.name);
    if (write && !r.writable) fail(std::string(what) + ": write into the read-only input " + r.name);
    if (r.writable) {
      const Cta& c = g_cta;
      const uint64_t block = (uint64_t(c.block.z) * c.grid.y + c.block.y) * c.grid.x + c.block.x;
      const int tid = cur().tid;
      for (int64_t e = 0; e < std::max<int64_t>(n, 1); ++e) {
        const uintptr_t key = a + e * r.elem_size;
        auto it = M.written.find(key);
        if (it != M.written.end() && (it->second.first != block || it->second.second != tid)) {
          const uint64_t ob = it->second.first;
          fail(std::string(what) + ": " + (write ? "writes" : "reads") + " an element of " + r.name +
               " that block " + std::to_string(ob) + " thread " + std::to_string(it->second.second) +
               " wrote in this launch (this is block " + std::to_string(block) + " thread " + std::to_string(tid) +
               "): outputs must have one writer and are not read back");
        }
        if (write) M.written[key] = {block, tid};
      }
    }
    return;
  }
  fail(std::string(what) + ": " + (write ? "write" : "read") + " of " + std::to_string(bytes) +
       " B at an address that is no element of any tensor of the launch");
}

void collective(const char* kind, int param, const void* in, size_t in_bytes, void* out, size_t out_bytes,
                Compute compute) {
  ThreadState& t = cur();
  const int wi = t.tid / 32, lane = t.tid % 32;
  Warp& w = M.warps[wi];
  if (w.arrived == 0) {
    w.kind = kind, w.param = param, w.first_lane = lane;
  } else if (std::strcmp(w.kind, kind) != 0 || w.param != param) {
    fail("divergent warp " + std::to_string(wi) + ": lane " + std::to_string(lane) + " is at " + kind + " (" +
         std::to_string(param) + ") while lane " + std::to_string(w.first_lane) + " is at " + w.kind + " (" +
         std::to_string(w.param) + ")");
  }
  std::memcpy(w.in[lane], in, in_bytes);
  if (++w.arrived < 32) {
    t.state = State::Blocked;
    t.waiting_at = kind;
    yield_to_scheduler(t);
  } else {
    compute(w.in, w.out, param);
    w.arrived = 0;
    for (int l = 0; l < 32; ++l)
      if (l != lane) M.threads[wi * 32 + l].state = State::Runnable;
  }
  std::memcpy(out, w.out[lane], out_bytes);
}

void count_mma() {
  const Cta& c = g_cta;
  ++g_mma_counts[(size_t(c.block.z) * c.grid.y + c.block.y) * c.grid.x + c.block.x];
}

void count_wgmma(int n8) {
  const Cta& c = g_cta;
  g_wgmma_counts[(size_t(c.block.z) * c.grid.y + c.block.y) * c.grid.x + c.block.x] += n8;
}

void block_until(const char* what, std::function<bool()> ready) {
  if (ready()) return;
  ThreadState& t = cur();
  t.state = State::Blocked;
  t.waiting_at = what;
  t.ready = std::move(ready);
  yield_to_scheduler(t);
}

void group_collective(const char* kind, long param, int size, void* io,
                      const std::function<void(void* const* ios)>& compute) {
  ThreadState& t = cur();
  const int n = static_cast<int>(M.threads.size());
  if (n % size != 0)
    fail(std::string(kind) + ": needs whole groups of " + std::to_string(size) + " threads; the block has " +
         std::to_string(n));
  const int gi = t.tid / size, me = t.tid % size;
  Group& g = M.groups[int64_t(size) * 4096 + gi];
  if (g.arrived == 0) {
    g.kind = kind, g.param = param, g.first = t.tid;
    g.io.assign(size, nullptr);
  } else if (std::strcmp(g.kind, kind) != 0 || g.param != param) {
    fail("divergent group of " + std::to_string(size) + " threads " + std::to_string(gi * size) + "-" +
         std::to_string(gi * size + size - 1) + ": thread " + std::to_string(t.tid) + " is at " + kind + " (" +
         std::to_string(param) + ") while thread " + std::to_string(g.first) + " is at " + g.kind + " (" +
         std::to_string(g.param) + ")");
  }
  g.io[me] = io;
  if (++g.arrived < size) {
    const uint64_t gen = g.generation;
    Group* gp = &g;
    block_until(kind, [gp, gen] { return gp->generation != gen; });
  } else {
    g.arrived = 0;
    compute(g.io.data());
    ++g.generation;
  }
}

void on_cta_start(std::function<void()> f) { cta_start_hooks().push_back(std::move(f)); }
void on_deadlock(std::function<std::string()> f) { deadlock_hooks().push_back(std::move(f)); }
const Geometry& geometry() { return *M.geometry; }

void proxy_fence() { ++cur().proxy_fences; }

namespace {
size_t shared_offset(const void* p, size_t bytes, const char* what) {
  const auto off = reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(ccam::smem_bytes);
  if (!is_shared(p) || off + bytes > size_t(M.geometry->smem_bytes))
    fail(std::string(what) + ": shared access of " + std::to_string(bytes) + " B at offset " +
         std::to_string(static_cast<intptr_t>(off)) + " is outside the launch's " +
         std::to_string(M.geometry->smem_bytes) + " B of dynamic shared memory");
  return off;
}
}  // namespace

void async_read(const void* p, size_t bytes, int tid, const char* what) {
  const size_t off = shared_offset(p, bytes, what);
  for (size_t i = off; i < off + bytes; ++i) {
    const Shadow& s = M.shadow[i];
    if (s.w_epoch >= M.cta_epoch && s.w_tid >= 0 && M.threads[s.w_tid].proxy_fences == s.w_fence)
      fail(std::string(what) + ": reads shared byte " + std::to_string(i) + " that thread " +
           std::to_string(s.w_tid) + " wrote (" + s.w_what +
           ") with no fence.proxy.async after the write: the async proxy may not see it");
  }
  shared_access(p, bytes, false, tid, what);
}

void async_write(const void* p, size_t bytes, const char* what) {
  const size_t off = shared_offset(p, bytes, what);
  for (size_t i = off; i < off + bytes; ++i) M.shadow[i] = Shadow{};
}

}  // namespace detail

void access(const void* p, size_t bytes, bool write, const char* what) {
  if (is_shared(p))
    detail::shared_access(p, bytes, write, cur().tid, what);
  else
    detail::global_access(p, bytes, write, what);
}

int syncthreads_or(int predicate);
void syncthreads() { syncthreads_or(0); }

// bar.red.or (__syncthreads_or): the barrier, returning to every thread whether any thread
// arrived with a non-zero predicate. The last arrival publishes the result before it wakes the
// others, and they read it on waking, before any of them can arrive at the next barrier.
int syncthreads_or(int predicate) {
  ThreadState& t = cur();
  M.barrier_or = M.barrier_or || predicate != 0;
  if (++M.barrier_arrived < static_cast<int>(M.threads.size())) {
    t.state = State::Blocked;
    t.waiting_at = "__syncthreads";
    yield_to_scheduler(t);
  } else {
    M.barrier_result = M.barrier_or;
    M.barrier_or = false;
    M.barrier_arrived = 0;
    ++M.epoch;
    for (auto& o : M.threads)
      if (&o != &t) o.state = State::Runnable;
  }
  return M.barrier_result;
}

// ---- cp.async (PTX ISA, Data Movement and Conversion Instructions: "cp.async",
// "cp.async.commit_group", "cp.async.wait_group / cp.async.wait_all") ----
// The copy is a write by the issuing thread both when issued (the destination is undefined
// from then on: it holds NaN here) and when it lands, which is at the first wait_group that
// covers its group, run by the same thread.
void cp_async(void* smem, const void* gmem, bool valid) {
  ThreadState& t = cur();
  detail::shared_access(smem, 16, true, t.tid, "cp.async");
  Copy c;
  c.dst = static_cast<unsigned char*>(smem);
  if (valid) {
    detail::global_access(gmem, 16, false, "cp.async");
    std::memcpy(c.data, gmem, 16);
  } else {
    std::memset(c.data, 0, 16);  // src-size 0: nothing read, zeros written
  }
  std::memset(smem, 0xFF, 16);
  t.open.push_back(c);
}

void cp_async_commit() {
  ThreadState& t = cur();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
}

void cp_async_wait(int pending) {
  ThreadState& t = cur();
  while (static_cast<int>(t.groups.size()) > pending) {
    for (const Copy& c : t.groups.front()) {
      detail::shared_access(c.dst, 16, true, t.tid, "cp.async landing at wait_group");
      std::memcpy(c.dst, c.data, 16);
    }
    t.groups.pop_front();
  }
}

}  // namespace ccam_emu
