// Host models of the PTX instructions mma.cuh wraps, written from the PTX ISA (the section and
// figure are named at each model by title: their numbers move between ISA versions). Each warp-level one is a collective
// (runtime.h): all 32 lanes must arrive at it.
#include <cmath>
#include <cstring>
#include <string>

#include "runtime.h"
#include "shim.h"

namespace ccam_emu {
namespace {

using In = unsigned char[32][detail::kMaxIn];
using Out = unsigned char[32][detail::kMaxOut];

float from_bits(uint16_t b, bool bf16) { return bf16 ? bf16_to_float(b) : half_to_float(b); }

void shfl_compute(const In& in, Out& out, int lane_mask) {
  for (int l = 0; l < 32; ++l) std::memcpy(out[l], in[l ^ (lane_mask & 31)], 4);
}

struct LdmIn {
  const void* addr;
  int tid;
};

void ldmatrix_compute(const In& in, Out& out, int trans) {
  const char* what = trans ? "ldmatrix.trans" : "ldmatrix";
  uint16_t m[4][8][8];  // [matrix][row][column]
  for (int l = 0; l < 32; ++l) {
    LdmIn x;
    std::memcpy(&x, in[l], sizeof x);
    if (!is_shared(x.addr)) throw Error(std::string(what) + ": lane " + std::to_string(l) + "'s row address is not in shared memory");
    detail::shared_access(x.addr, 16, false, x.tid, what);
    std::memcpy(m[l / 8][l % 8], x.addr, 16);
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, c = l % 4;
    uint32_t regs[4];
    for (int i = 0; i < 4; ++i) {
      const uint16_t lo = trans ? m[i][2 * c][g] : m[i][g][2 * c];
      const uint16_t hi = trans ? m[i][2 * c + 1][g] : m[i][g][2 * c + 1];
      regs[i] = uint32_t(lo) | (uint32_t(hi) << 16);
    }
    std::memcpy(out[l], regs, 16);
  }
}

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

void mma_compute(const In& in, Out& out, int bf16) {
  // Gather the whole tiles from the lanes' fragments, then D = A B + C.
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    MmaIn x;
    std::memcpy(&x, in[l], sizeof x);
    const int g = l / 4, c = l % 4;
    // A, m16n8k16 .f16/.bf16 (figure "MMA .m16n8k16 fragment layout for matrix A"): a0,a1 at
    // (g, 2c..2c+1), a2,a3 at (g+8, 2c..), a4,a5 at (g, 2c+8..), a6,a7 at (g+8, 2c+8..); two
    // per 32-bit register, the lower index in the low half.
    const int arow[4] = {g, g + 8, g, g + 8}, acol[4] = {2 * c, 2 * c, 2 * c + 8, 2 * c + 8};
    for (int r = 0; r < 4; ++r) {
      A[arow[r]][acol[r]] = from_bits(uint16_t(x.a[r] & 0xffff), bf16);
      A[arow[r]][acol[r] + 1] = from_bits(uint16_t(x.a[r] >> 16), bf16);
    }
    // B (figure "... for matrix B"): b0,b1 at (k = 2c..2c+1, n = g), b2,b3 at (k = 2c+8.., n = g).
    for (int r = 0; r < 2; ++r) {
      B[2 * c + 8 * r][g] = from_bits(uint16_t(x.b[r] & 0xffff), bf16);
      B[2 * c + 8 * r + 1][g] = from_bits(uint16_t(x.b[r] >> 16), bf16);
    }
    // C/D, .f32 (figure "... for accumulator matrix C/D"): c0,c1 at (g, 2c..2c+1), c2,c3 at (g+8, 2c..).
    C[g][2 * c] = x.c[0], C[g][2 * c + 1] = x.c[1], C[g + 8][2 * c] = x.c[2], C[g + 8][2 * c + 1] = x.c[3];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, c = l % 4;
    float d[4];
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * c + (e & 1);
      // Products of 16-bit values are exact in float; the sum is rounded once (the hardware's
      // accumulation order and rounding are unspecified: only a GPU shows its exact bits).
      double acc = C[row][col];
      for (int k = 0; k < 16; ++k) acc += double(A[row][k]) * double(B[k][col]);
      d[e] = static_cast<float>(acc);
    }
    std::memcpy(out[l], d, 16);
  }
}

}  // namespace

// shfl.sync.bfly.b32 (PTX ISA, Data Movement and Conversion Instructions: "shfl.sync", mode
// .bfly): lane l reads lane l ^ laneMask.
// Only the full member mask is modelled (the kernels use nothing else).
float shfl_xor(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) throw Error("__shfl_xor_sync: only the full mask 0xffffffff is emulated");
  float out;
  detail::collective("shfl.sync.bfly", lane_mask, &value, 4, &out, 4, shfl_compute);
  return out;
}

// ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 (PTX ISA, Data Movement and Conversion
// Instructions: "ldmatrix", figure
// "ldmatrix fragment layout for one 8x8 matrix"): lanes 8i..8i+7 give the addresses of rows
// 0..7 of matrix i (16 bytes each, 16-byte aligned). Register r[i] of lane l receives, of
// matrix i, row l/4, elements 2(l%4) and 2(l%4)+1 (the lower index in the low half). .trans
// reads each matrix transposed: r[i] of lane l gets (row 2(l%4), column l/4) and
// (row 2(l%4)+1, column l/4).
void ldmatrix_x4(uint32_t (&r)[4], const void* smem, bool trans) {
  const LdmIn in{smem, detail::current_tid()};
  detail::collective(trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", trans, &in, sizeof in, r, 16, ldmatrix_compute);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}.{f16,bf16}.f32 (PTX ISA, Warp Level
// Matrix Multiply-Accumulate Instructions: "Matrix Fragments for mma.m16n8k16 with floating
// point type", figures "MMA .m16n8k16 fragment layout for matrix A / B with .f16/.bf16 type" and
// "... for accumulator matrix C/D with .f32 type"): D = A (16x16) * B (16x8) + C.
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, bool bf16) {
  MmaIn in;
  std::memcpy(in.a, a, 16);
  in.b[0] = b0, in.b[1] = b1;
  std::memcpy(in.c, c, 16);
  static_assert(sizeof(MmaIn) <= detail::kMaxIn);
  if (detail::current_tid() % 32 == 0) detail::count_mma();  // once per warp instruction
  detail::collective(bf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", bf16, &in, sizeof in, c, 16, mma_compute);
}

// ex2.approx.ftz.f32 (PTX ISA, Floating Point Instructions: "ex2"): 2^x; subnormal inputs and
// results flush to +-0, ex2(-inf) = +0, ex2(+inf) = +inf, NaN stays NaN. The hardware's result
// is within about 2^-22 relative; this model is the correctly rounded value.
float ex2_approx_ftz(float x) {
  if (std::fpclassify(x) == FP_SUBNORMAL) x = std::copysign(0.f, x);
  float y = static_cast<float>(std::exp2(double(x)));
  if (std::fpclassify(y) == FP_SUBNORMAL) y = 0.f;
  return y;
}

}  // namespace ccam_emu
