// Host models of the sm_90a instructions hopper.cuh wraps, written from the PTX ISA's text
// (sections named by title: "mbarrier", "cp.async.bulk.tensor", "Tensor Map", "Asynchronous
// Warpgroup Level Matrix Multiply-Accumulate" with its "Matrix Descriptor" and "Shared Memory
// Matrix Layout", "wgmma.fence / commit_group / wait_group", "membar/fence" (.proxy.async),
// "elect.sync", "setmaxnreg"). What each model checks is said at the model. The state here is
// per CTA (reset by a runtime hook); the runtime is unchanged for kernels that use none of it.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <deque>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "hopper.h"
#include "runtime.h"
#include "shim.h"

namespace ccam_emu {
namespace {

constexpr uint32_t kMapMagic = 0x7e45a0c1u;
constexpr int kMaxThreads = 1024;

[[noreturn]] void fail(const std::string& m) { throw Error(m); }

size_t smem_off(const void* p) {
  return reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(ccam::smem_bytes);
}

// ---- mbarrier (PTX ISA, Parallel Synchronization and Communication Instructions: "mbarrier")
// A phase completes when its pending arrival count reaches zero and its transaction count is
// zero; then the phase number advances and the arrival count is re-armed with the init count.
// Bulk copies complete their bytes on the barrier ("complete_tx"). The model lands a copy as
// late as the ISA allows: when a thread waits on the barrier's current phase (the copy's
// destination holds NaN until then), so a wait that passes early (a wrong parity) reads NaN.
// A copy counts towards the phase during which it was issued: a wait on an earlier phase
// never lands it (a phase completed early by a too-small expect_tx leaves its data NaN).
struct Copy {
  unsigned char* dst;
  std::vector<unsigned char> data;
  uint32_t phase;
};
// For the race checker, a phase also carries its arrivals' joined vector clock (`arrived`),
// which becomes the clock a completed wait acquires (`completed`): an arrive -> wait orders the
// arriving thread's earlier shared accesses before the waiter's later ones.
struct Barrier {
  int count = 0, pending = 0;
  int64_t tx = 0;
  uint32_t phase = 0;
  std::vector<Copy> copies;
  std::vector<uint32_t> arrived, completed;
};

struct Pending {  // one wgmma's accumulator result, in flight until a covering wait_group
  float* acc;
  int n;
  std::vector<float> values;
  size_t lo[2], hi[2];  // shared bytes each descriptor operand spans (a bulk copy into them is a hazard)
};

struct ThreadHopper {
  bool fenced = false;                      // wgmma.fence since the last commit / wait / start
  std::vector<Pending> open;                // since the last commit_group
  std::deque<std::vector<Pending>> groups;  // committed, oldest first
  int wait_bar = -1;                        // the barrier it waits on (offset), for a hang report
  uint32_t wait_parity = 0;
};

struct State {
  std::map<size_t, Barrier> bars;
  ThreadHopper threads[kMaxThreads];
  int regs[kMaxThreads / 128] = {};  // setmaxnreg: registers per thread of each warpgroup
  int pool = 0;                      // registers the launch gives the CTA
};
State S;

Barrier& barrier(uint64_t* bar, const char* what) {
  if (!is_shared(bar)) fail(std::string(what) + ": the mbarrier is not in shared memory");
  auto it = S.bars.find(smem_off(bar));
  if (it == S.bars.end())
    fail(std::string(what) + ": no mbarrier was initialized at shared offset " + std::to_string(smem_off(bar)));
  return it->second;
}

void complete_phase(Barrier& b, size_t off) {
  if (b.pending == 0 && b.tx < 0)
    fail("mbarrier at shared offset " + std::to_string(off) + ": phase " + std::to_string(b.phase) + " received " +
         std::to_string(-b.tx) + " bytes more than its arrive.expect_tx announced (expect_tx too small)");
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.count;
    b.completed = std::move(b.arrived);
    b.arrived.clear();
  }
}

// Land the copies issued during the current phase.
void land(Barrier& b, size_t off) {
  std::vector<Copy> later;
  for (Copy& c : b.copies) {
    if (c.phase != b.phase) {
      later.push_back(std::move(c));
      continue;
    }
    detail::async_write(c.dst, c.data.size(), "cp.async.bulk.tensor landing");
    std::memcpy(c.dst, c.data.data(), c.data.size());
    b.tx -= static_cast<int64_t>(c.data.size());
  }
  b.copies = std::move(later);
  complete_phase(b, off);
}

std::string hang_report() {
  std::ostringstream os;
  const int n = detail::geometry().threads;
  for (auto& [off, b] : S.bars) {
    std::vector<int> waiters;
    for (int t = 0; t < n; ++t)
      if (S.threads[t].wait_bar == static_cast<int>(off)) waiters.push_back(t);
    if (waiters.empty()) continue;
    os << " mbarrier at shared offset " << off << " hangs: phase " << b.phase << " (parity " << (b.phase & 1)
       << ") has " << b.pending << " of " << b.count << " arrivals pending and " << b.tx
       << " transaction bytes outstanding; threads";
    for (size_t i = 0; i < waiters.size() && i < 8; ++i) os << " " << waiters[i];
    if (waiters.size() > 8) os << " ...";
    os << " wait for parity " << S.threads[waiters[0]].wait_parity << ";";
  }
  return os.str();
}

[[maybe_unused]] const bool registered = [] {
  detail::on_cta_start([] {
    S.bars.clear();
    for (auto& t : S.threads) t = ThreadHopper{};
    const Geometry& g = detail::geometry();
    for (int w = 0; w < kMaxThreads / 128; ++w) S.regs[w] = g.regs;
    S.pool = g.regs * g.threads;
  });
  detail::on_deadlock(hang_report);
  return true;
}();

ThreadHopper& me() { return S.threads[detail::current_tid()]; }

// ---- shared-memory matrix layouts (wgmma descriptors) and swizzles -------------------------
// Swizzle modes permute 16-byte chunks by address bits: with a span of W bytes (32, 64, 128),
// bits [4, 4 + log2(W / 16)) of the shared address are XORed with the same number of bits
// from bit 7 up: chunk c of 128-byte row r (of an 8-row, W * 8-byte repeat) moves to c ^ (r % (W / 16)).
size_t swizzle(size_t addr, int span) {
  if (span == 0) return addr;
  const size_t mask = size_t(span / 16 - 1);
  return addr ^ (((addr >> 7) & mask) << 4);
}

// Descriptor fields (PTX ISA "Matrix Descriptor Format"): bits 0-13 start address >> 4,
// 16-29 leading dimension byte offset >> 4, 32-45 stride dimension byte offset >> 4, 49-51
// base offset, 62-63 swizzle (0 none, 1 128B, 2 64B, 3 32B).
struct Desc {
  size_t start, lbo, sbo;
  int span;  // swizzle span in bytes, 0 for none
};
Desc decode(uint64_t d, const char* what) {
  Desc x{size_t(d & 0x3fff) << 4, size_t((d >> 16) & 0x3fff) << 4, size_t((d >> 32) & 0x3fff) << 4, 0};
  if ((d >> 49) & 7) fail(std::string(what) + ": descriptor base offset " + std::to_string((d >> 49) & 7) +
                          " is not modelled (swizzled operands must start in an aligned repeat)");
  static const int spans[4] = {0, 128, 64, 32};
  x.span = spans[d >> 62];
  return x;
}

// Byte address of element (i along M or N, j along K, 16-bit elements) of an operand under
// the ISA's canonical layouts ("Shared Memory Matrix Layout"), T = 8 elements = 16 bytes:
//   K-major,  no swizzle: ((8, m), (T, 2k)) : ((1T, SBO), (1, LBO))
//   K-major,  W swizzle:  ((8, m), (T, 2k)) : ((W/16 T, SBO), (1, T))       (LBO unused)
//   MN-major, no swizzle: ((T, 1, m), (8, k)) : ((1, T, SBO), (1T, LBO))
//   MN-major, W swizzle:  ((T, W/16, m), (8, k)) : ((1, T, LBO), (W/16 T, SBO))
// then the swizzle on the address.
size_t element_addr(const Desc& d, bool mn_major, int i, int j) {
  size_t a;
  if (!mn_major) {
    a = d.span == 0 ? d.start + (i % 8) * 16 + (i / 8) * d.sbo + (j % 8) * 2 + (j / 8) * d.lbo
                    : d.start + (i % 8) * d.span + (i / 8) * d.sbo + j * 2;
  } else {
    const int per_row = d.span == 0 ? 8 : d.span / 2;  // elements of one K row inside a repeat
    a = d.span == 0 ? d.start + (i % 8) * 2 + (i / 8) * d.sbo + (j % 8) * 16 + (j / 8) * d.lbo
                    : d.start + (i % per_row) * 2 + (i / per_row) * d.lbo + (j % 8) * d.span + (j / 8) * d.sbo;
  }
  return swizzle(a, d.span);
}

float from_bits(uint16_t b, bool bf16) { return bf16 ? bf16_to_float(b) : half_to_float(b); }

// Read a rows x 16 operand through a descriptor: the async proxy reads it (bounds, races,
// fences); returns the span of bytes read.
void read_operand(uint64_t desc, bool mn_major, int rows, bool bf16, int tid, const char* what,
                  std::vector<float>& out, size_t& lo, size_t& hi) {
  const Desc d = decode(desc, what);
  out.assign(size_t(rows) * 16, 0.f);
  for (int i = 0; i < rows; ++i)
    for (int j = 0; j < 16; ++j) {
      const size_t a = element_addr(d, mn_major, i, j);
      unsigned char* p = ccam::smem_bytes + a;
      detail::async_read(p, 2, tid, what);
      uint16_t bits;
      std::memcpy(&bits, p, 2);
      out[size_t(i) * 16 + j] = from_bits(bits, bf16);
      lo = std::min(lo, a), hi = std::max(hi, a + 2);
    }
}

struct WgmmaIo {
  float* d;
  const uint32_t* a;
  uint64_t desc_a, desc_b;
  int scale_d;
  std::vector<float> c;  // the accumulator's value before this wgmma (pending or registers)
};

struct WgmmaParam {
  int n;
  bool trans_a, trans_b, bf16, a_regs;
};

float latest(const ThreadHopper& t, const float* acc, int k, const float* regs) {
  for (auto it = t.open.rbegin(); it != t.open.rend(); ++it)
    if (it->acc == acc) return it->values[k];
  for (auto g = t.groups.rbegin(); g != t.groups.rend(); ++g)
    for (auto it = g->rbegin(); it != g->rend(); ++it)
      if (it->acc == acc) return it->values[k];
  return regs[k];
}

}  // namespace

// ---- tensor maps (CUDA driver API "cuTensorMapEncodeTiled"; PTX ISA "Tensor Map") ----------
// Limits checked as the driver documents them: rank 1..5, global address 16-byte aligned,
// strides multiples of 16 bytes, box sizes 1..256, the box's inner extent a multiple of 16
// bytes; with a swizzle the inner extent must be at most the span (the model requires it to
// equal the span: the layout wgmma's canonical swizzled forms read).
void encode_tensor_map(CUtensorMap* map, const void* base, int elem_bytes, int rank, const int64_t* dims,
                       const int64_t* stride_bytes, const int* box, int swizzle_bytes) {
  const std::string k = "encode_tensor_map: ";
  if (rank < 1 || rank > 5) fail(k + "rank must be 1..5");
  if (elem_bytes != 1 && elem_bytes != 2 && elem_bytes != 4 && elem_bytes != 8) fail(k + "bad element size");
  if (reinterpret_cast<uintptr_t>(base) % 16) fail(k + "global address must be 16-byte aligned");
  if (swizzle_bytes != 0 && swizzle_bytes != 32 && swizzle_bytes != 64 && swizzle_bytes != 128)
    fail(k + "swizzle must be 0, 32, 64 or 128 bytes");
  std::memset(map, 0, sizeof *map);
  map->base = base, map->rank = rank, map->elem_bytes = elem_bytes, map->swizzle_bytes = swizzle_bytes;
  map->strides[0] = elem_bytes;
  for (int r = 0; r < rank; ++r) {
    if (dims[r] < 1 || dims[r] > (int64_t(1) << 32)) fail(k + "dimension " + std::to_string(r) + " out of range");
    if (box[r] < 1 || box[r] > 256) fail(k + "box size " + std::to_string(r) + " must be 1..256");
    map->dims[r] = dims[r], map->box[r] = box[r];
    if (r > 0) {
      if (stride_bytes[r - 1] % 16) fail(k + "stride " + std::to_string(r) + " must be a multiple of 16 bytes");
      map->strides[r] = stride_bytes[r - 1];
    }
  }
  const int inner = box[0] * elem_bytes;
  if (inner % 16) fail(k + "the box's inner extent must be a multiple of 16 bytes, got " + std::to_string(inner));
  if (swizzle_bytes && inner != swizzle_bytes)
    fail(k + "a swizzled box's inner extent (" + std::to_string(inner) + " B) must equal the swizzle span (" +
         std::to_string(swizzle_bytes) + " B) in this model");
  map->magic = kMapMagic;
}

// ---- mbarrier.init / arrive / arrive.expect_tx / try_wait.parity ---------------------------
void mbarrier_init(uint64_t* bar, uint32_t count) {
  if (!is_shared(bar) || smem_off(bar) % 8) fail("mbarrier.init: the barrier must be 8-byte aligned shared memory");
  if (count < 1 || count > (1u << 20) - 1) fail("mbarrier.init: count must be 1..2^20-1");
  detail::shared_access(bar, 8, true, detail::current_tid(), "mbarrier.init");
  Barrier& b = S.bars[smem_off(bar)];
  if (!b.copies.empty()) fail("mbarrier.init: re-initialized while bulk copies are in flight on it");
  b = Barrier{};
  b.count = b.pending = static_cast<int>(count);
}

void mbarrier_arrive(uint64_t* bar, uint32_t tx_bytes, bool expect_tx) {
  const char* what = expect_tx ? "mbarrier.arrive.expect_tx" : "mbarrier.arrive";
  Barrier& b = barrier(bar, what);
  if (b.pending == 0) fail(std::string(what) + ": more arrivals than the barrier's count in one phase");
  b.tx += tx_bytes;
  --b.pending;
  detail::clock_release(b.arrived);
  complete_phase(b, smem_off(bar));
}

// try_wait.parity P is true once the phase of parity P has completed, i.e. while the current
// phase's parity differs from P. The model suspends the thread instead of returning false (the
// ISA lets try_wait suspend); a wait that can never be satisfied is a deadlock, reported with
// every waited-on barrier's state.
bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
  Barrier& b = barrier(bar, "mbarrier.try_wait.parity");
  const size_t off = smem_off(bar);
  parity &= 1;
  if ((b.phase & 1) != parity) {
    detail::clock_acquire(b.completed);
    return true;
  }
  ThreadHopper& t = me();
  t.wait_bar = static_cast<int>(off), t.wait_parity = parity;
  Barrier* bp = &b;
  detail::block_until("mbarrier.try_wait.parity", [bp, off, parity] {
    if ((bp->phase & 1) != parity) return true;
    land(*bp, off);
    return (bp->phase & 1) != parity;
  });
  t.wait_bar = -1;
  detail::clock_acquire(bp->completed);
  return true;
}

// ---- cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes ------
// One thread copies the box at coords (innermost first) into shared memory: row-major box
// (inner dimension contiguous), the swizzle applied to the shared address; elements outside
// the tensor are zeros. The bytes count on the barrier's transaction count when they land.
void tma_load(void* smem, const CUtensorMap* map, uint64_t* bar, const int32_t* coords, int rank) {
  const char* what = "cp.async.bulk.tensor";
  if (map->magic != kMapMagic) fail(std::string(what) + ": the tensor map was not encoded");
  if (map->rank != rank) fail(std::string(what) + ": a " + std::to_string(rank) + "-d copy with a rank-" +
                              std::to_string(map->rank) + " tensor map");
  if (!is_shared(smem)) fail(std::string(what) + ": the destination is not shared memory");
  const size_t off = smem_off(smem);
  const size_t align = map->swizzle_bytes ? size_t(map->swizzle_bytes) * 8 : 128;
  if (off % align)
    fail(std::string(what) + ": destination offset " + std::to_string(off) + " is not " + std::to_string(align) +
         "-byte aligned (128 B, or the swizzle's whole repeat)");
  Barrier& b = barrier(bar, what);
  int64_t elems = 1;
  for (int r = 0; r < rank; ++r) elems *= map->box[r];
  const size_t bytes = size_t(elems) * map->elem_bytes;
  detail::async_write(smem, bytes, what);  // bounds
  // A copy into bytes that a wgmma not yet covered by its wait_group reads is a hazard.
  for (int t = 0; t < detail::geometry().threads; ++t) {
    auto check = [&](const std::vector<Pending>& ps) {
      for (const Pending& p : ps)
        for (int r = 0; r < 2; ++r)
          if (p.lo[r] < off + bytes && off < p.hi[r])
            fail(std::string(what) + ": overwrites shared bytes " + std::to_string(std::max(p.lo[r], off)) +
                 ".. that thread " + std::to_string(t) + "'s wgmma still reads (no wgmma.wait_group covers it yet)");
    };
    check(S.threads[t].open);
    for (auto& g : S.threads[t].groups) check(g);
  }
  Copy c;
  c.dst = static_cast<unsigned char*>(smem);
  c.data.assign(bytes, 0);
  c.phase = b.phase;
  const int eb = map->elem_bytes;
  const int64_t inner = map->box[0];
  int64_t idx[5] = {0, 0, 0, 0, 0};
  for (int64_t row = 0; row < elems / inner; ++row) {
    int64_t rest = row;
    for (int r = 1; r < rank; ++r) idx[r] = rest % map->box[r], rest /= map->box[r];
    bool outer_in = true;
    const unsigned char* g = static_cast<const unsigned char*>(map->base);
    for (int r = 1; r < rank; ++r) {
      const int64_t x = int64_t(coords[r]) + idx[r];
      if (x < 0 || x >= map->dims[r]) outer_in = false;
      g += x * map->strides[r];
    }
    for (int64_t i = 0; outer_in && i < inner; ++i) {
      const int64_t x = int64_t(coords[0]) + i;
      if (x < 0 || x >= map->dims[0]) continue;
      const unsigned char* src = g + x * eb;
      detail::global_access(src, eb, false, what);
      const size_t linear = off + size_t(row * inner + i) * eb;
      std::memcpy(c.data.data() + (swizzle(linear, map->swizzle_bytes) - off), src, eb);
    }
  }
  std::memset(smem, 0xFF, bytes);  // undefined until it lands
  b.copies.push_back(std::move(c));
}

// fence.proxy.async: orders the thread's generic-proxy shared writes before later async-proxy
// accesses (wgmma operands read from shared memory, bulk copies).
void fence_proxy_async() { detail::proxy_fence(); }

// elect.sync with the full member mask: exactly one lane (the lowest) is elected; all 32 lanes
// must arrive.
bool elect_one() {
  int in = 0, out = 0;
  detail::collective("elect.sync", 0, &in, 4, &out, 4, [](const unsigned char (&)[32][detail::kMaxIn],
                                                         unsigned char (&o)[32][detail::kMaxOut], int) {
    for (int l = 0; l < 32; ++l) {
      const int v = l == 0;
      std::memcpy(o[l], &v, 4);
    }
  });
  return out != 0;
}

// setmaxnreg.{inc,dec}.sync.aligned.u32: a warpgroup collective; regs in 24..256, a multiple
// of 8; .inc must not lower and .dec must not raise the warpgroup's count; the launch must
// declare its registers per thread, and an .inc waits until the CTA's registers (the launch's
// count times its threads) have room (a wait that never ends is a deadlock).
void setmaxnreg(int regs, bool inc) {
  const char* what = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
  const Geometry& g = detail::geometry();
  if (g.regs <= 0) fail(std::string(what) + ": the launch declares no register count per thread");
  if (regs < 24 || regs > 256 || regs % 8) fail(std::string(what) + ": count must be 24..256, a multiple of 8");
  const int wg = detail::current_tid() / 128;
  int dummy = 0;
  detail::group_collective(what, regs, 128, &dummy, [&](void* const*) {
    if (inc ? regs < S.regs[wg] : regs > S.regs[wg])
      fail(std::string(what) + " " + std::to_string(regs) + ": warpgroup " + std::to_string(wg) + " holds " +
           std::to_string(S.regs[wg]));
    if (!inc) S.regs[wg] = regs;
  });
  if (inc) {
    detail::block_until(what, [wg, regs] {
      if (S.regs[wg] == regs) return true;
      int used = 0;
      for (int w = 0; w < detail::geometry().threads / 128; ++w) used += 128 * (w == wg ? regs : S.regs[w]);
      if (used > S.pool) return false;
      S.regs[wg] = regs;
      return true;
    });
  }
}

// ---- wgmma.fence / mma_async / commit_group / wait_group -----------------------------------
// The accumulator registers of a wgmma hold NaN from its issue until a wait_group covers its
// group (reading them early reads NaN); a register written while in flight is an error at the
// wait. Chained wgmmas on one accumulator see each other's results in order. A wgmma must
// follow a wgmma.fence issued since the thread's last commit_group or wait_group (stricter
// than the ISA, which asks for it where registers were touched in between: the kernels fence
// before each batch). Operands are read from shared memory at issue.
void wgmma_fence() { me().fenced = true; }

void wgmma_commit() {
  ThreadHopper& t = me();
  t.groups.push_back(std::move(t.open));
  t.open.clear();
  t.fenced = false;
}

void wgmma_wait(int pending) {
  ThreadHopper& t = me();
  const uint32_t poison = 0xffffffffu;
  std::vector<Pending> landing;
  while (static_cast<int>(t.groups.size()) > pending) {
    for (Pending& p : t.groups.front()) landing.push_back(std::move(p));
    t.groups.pop_front();
  }
  for (const Pending& p : landing)
    for (int k = 0; k < p.n; ++k) {
      uint32_t bits;
      std::memcpy(&bits, p.acc + k, 4);
      if (bits != poison)
        fail("wgmma.wait_group: thread " + std::to_string(detail::current_tid()) +
             " wrote an accumulator register while a wgmma on it was in flight");
    }
  for (const Pending& p : landing) std::memcpy(p.acc, p.values.data(), size_t(p.n) * 4);
  for (const Pending& p : landing) {  // still the target of a newer, uncovered wgmma
    bool newer = false;
    for (auto& g : t.groups)
      for (auto& q : g) newer |= q.acc == p.acc;
    for (auto& q : t.open) newer |= q.acc == p.acc;
    if (newer) std::memset(p.acc, 0xff, size_t(p.n) * 4);
  }
  t.fenced = false;
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16}: D (64 x N) = A (64 x 16)
// B (16 x N) + D. A from a descriptor (K-major, or MN-major with imm-trans-a) or from registers
// (warp w of the warpgroup gives rows 16w..16w+15 in mma.m16n8k16's A layout); B from a
// descriptor, stored N x K (K-major) or, with imm-trans-b, K x N (MN-major). The accumulator
// (figure "WGMMA .m64nNk16 register fragment layout for accumulator matrix D"): warp w, lane
// l (g = l / 4, c = l % 4) holds d[4i + e] = D(16w + g + 8(e / 2), 8i + 2c + e % 2).
void wgmma(float* d, int n, uint64_t desc_a, const uint32_t* a_regs, uint64_t desc_b, int scale_d, bool trans_a,
           bool trans_b, bool bf16) {
  const char* what = "wgmma.mma_async";
  ThreadHopper& t = me();
  const int tid = detail::current_tid();
  if (!t.fenced)
    fail(std::string(what) + ": thread " + std::to_string(tid) +
         " issues a wgmma with no wgmma.fence since its last commit_group / wait_group");
  WgmmaIo io{d, a_regs, desc_a, desc_b, scale_d, {}};
  io.c.resize(n / 2);
  for (int k = 0; k < n / 2; ++k) io.c[k] = latest(t, d, k, d);
  const long param = long(n) | long(trans_a) << 9 | long(trans_b) << 10 | long(bf16) << 11 | long(a_regs != nullptr) << 12;
  const int base = tid / 128 * 128;
  detail::group_collective(what, param, 128, &io, [&](void* const* ios) {
    detail::count_wgmma(n / 8);  // the performance model predicts these per block
    auto* io0 = static_cast<WgmmaIo*>(ios[0]);
    for (int i = 1; i < 128; ++i) {
      auto* x = static_cast<WgmmaIo*>(ios[i]);
      if (x->desc_b != io0->desc_b || (!a_regs && x->desc_a != io0->desc_a) || x->scale_d != io0->scale_d)
        fail(std::string(what) + ": thread " + std::to_string(base + i) +
             "'s descriptors or scale-d differ from thread " + std::to_string(base) + "'s");
    }
    size_t lo[2] = {SIZE_MAX, SIZE_MAX}, hi[2] = {0, 0};  // A's and B's spans
    std::vector<float> A(64 * 16), B;
    if (a_regs) {
      for (int i = 0; i < 128; ++i) {
        const uint32_t* a = static_cast<WgmmaIo*>(ios[i])->a;
        const int w = i / 32, g = (i % 32) / 4, c = i % 4;
        const int row[4] = {g, g + 8, g, g + 8}, col[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
        for (int r = 0; r < 4; ++r) {
          A[(16 * w + row[r]) * 16 + col[r]] = from_bits(uint16_t(a[r] & 0xffff), bf16);
          A[(16 * w + row[r]) * 16 + col[r] + 1] = from_bits(uint16_t(a[r] >> 16), bf16);
        }
      }
    } else {
      read_operand(io0->desc_a, trans_a, 64, bf16, base, "wgmma.mma_async (A)", A, lo[0], hi[0]);
    }
    read_operand(io0->desc_b, trans_b, n, bf16, base, "wgmma.mma_async (B)", B, lo[1], hi[1]);
    for (int i = 0; i < 128; ++i) {
      auto* x = static_cast<WgmmaIo*>(ios[i]);
      const int w = i / 32, g = (i % 32) / 4, c = i % 4;
      ThreadHopper& th = S.threads[base + i];
      Pending p{x->d, n / 2, std::vector<float>(n / 2), {lo[0], lo[1]}, {hi[0], hi[1]}};
      for (int k = 0; k < n / 2; ++k) {
        const int row = 16 * w + g + 8 * ((k % 4) / 2), col = 8 * (k / 4) + 2 * c + k % 2;
        // Products of 16-bit values are exact; one rounding of the sum (the hardware's order
        // and rounding are unspecified).
        double acc = x->scale_d ? double(x->c[k]) : 0.0;
        for (int j = 0; j < 16; ++j) acc += double(A[row * 16 + j]) * double(B[size_t(col) * 16 + j]);
        p.values[k] = static_cast<float>(acc);
      }
      std::memset(x->d, 0xff, size_t(n / 2) * 4);
      th.open.push_back(std::move(p));
    }
  });
}

}  // namespace ccam_emu
