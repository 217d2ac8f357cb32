"""The CPU emulator of the CUDA kernels (csrc/emu) is itself tested:

* each emulated instruction against an independent description of its layout from the PTX
  ISA tables, written here with NumPy indexing (mma.m16n8k16 A/B/C fragments, ldmatrix with and
  without .trans, cp.async groups, ex2.approx.ftz, the shuffles);
* every rule the emulator enforces makes it report an error (races, bounds, divergent warps,
  barriers not reached, read-only inputs);
* mutation tests: deliberate breaks applied to a copy of the kernel sources (masks off by one,
  removed __syncthreads, a cp.async wait that waits too little, a dropped .trans, a wrong first
  row in the dK/dV walk, a launch with too little shared memory, a frame window's row limit or
  first row not shifted by its first frame) are each caught, by the float64 oracle or by the
  emulator.

These use the emulator's C interface through ctypes (tests/emu_lib.py): g++ only, no torch
headers, fp16 kernels at head dim 32 only, so a mutant builds in seconds (two at a time)."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

import emu_lib
from conftest import rel_err
from oracle import attention_oracle


@pytest.fixture(scope="module")
def emu():
    return emu_lib.cached_library(small=True)


def _bits(x: torch.Tensor) -> np.ndarray:
    """16-bit patterns of an fp16 / bf16 tensor as uint32."""
    return x.contiguous().view(torch.int16).numpy().astype(np.uint16).astype(np.uint32)


def _pack(lo, hi):
    return lo | (hi << 16)


# ---- mma.sync.aligned.m16n8k16.row.col.f32 -------------------------------------------------


def mma_fragments(A, B, C):
    """Per-lane registers from the PTX ISA's m16n8k16 fragment figures ("Matrix Fragments for
    mma.m16n8k16 with floating point type"): lane l,
    g = l // 4, c = l % 4. A: {a0,a1} (g, 2c..2c+1), {a2,a3} (g+8, 2c..), {a4,a5} (g, 2c+8..),
    {a6,a7} (g+8, 2c+8..). B: {b0,b1} (k = 2c..2c+1, n = g), {b2,b3} (k = 2c+8.., n = g).
    C/D: c0,c1 (g, 2c..2c+1), c2,c3 (g+8, 2c..). A, B: uint32 bit patterns; C: float."""
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    for lane in range(32):
        g, q = divmod(lane, 4)
        for r, (row, col) in enumerate([(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)]):
            a[lane, r] = _pack(A[row, col], A[row, col + 1])
        for r, k in enumerate([2 * q, 2 * q + 8]):
            b[lane, r] = _pack(B[k, g], B[k + 1, g])
        c[lane] = [C[g, 2 * q], C[g, 2 * q + 1], C[g + 8, 2 * q], C[g + 8, 2 * q + 1]]
    return a, b, c


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mma_fragments_follow_the_isa(emu, dtype):
    A = torch.randn(16, 16).to(dtype)
    B = torch.randn(16, 8).to(dtype)
    C = torch.randn(16, 8)
    a, b, c = mma_fragments(_bits(A), _bits(B), C.numpy())
    d = emu.mma(torch.from_numpy(a.astype(np.int64)), torch.from_numpy(b.astype(np.int64)), torch.from_numpy(c),
                dtype == torch.bfloat16).numpy()
    want = A.double().numpy() @ B.double().numpy() + C.double().numpy()
    _, _, d_want = mma_fragments(np.zeros((16, 16), np.uint32), np.zeros((16, 8), np.uint32), want)
    np.testing.assert_allclose(d, d_want, rtol=1e-6, atol=1e-6)
    # And the layout is not symmetric by accident: a transposed B gives something else.
    _, b_t, _ = mma_fragments(_bits(A), _bits(B.flip(0)), C.numpy())
    d_t = emu.mma(torch.from_numpy(a.astype(np.int64)), torch.from_numpy(b_t.astype(np.int64)), torch.from_numpy(c),
                  dtype == torch.bfloat16).numpy()
    assert np.abs(d_t - d_want).max() > 1e-2


# ---- ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16 -------------------------------------


@pytest.mark.parametrize("trans", [False, True], ids=["plain", "trans"])
def test_ldmatrix_follows_the_isa(emu, trans, generator):
    """Lanes 8i..8i+7 address rows 0..7 of matrix i; lane l receives of matrix i row l // 4,
    elements 2(l%4), 2(l%4)+1 (.trans: elements (2(l%4), l//4) and (2(l%4)+1, l//4))."""
    pitch, rows = 40, 64  # elements per row (a multiple of 8: rows 16-byte aligned)
    words = torch.randint(0, 1 << 15, (rows * pitch,), generator=generator).tolist()
    smem = np.array(words, np.uint32).reshape(rows, pitch)
    offsets, mats = [], []
    for i in range(4):
        r0, c0 = int(torch.randint(0, rows - 8, (1,), generator=generator)), 8 * int(torch.randint(0, pitch // 8, (1,), generator=generator))
        mats.append(smem[r0:r0 + 8, c0:c0 + 8])
        offsets += [(r0 + j) * pitch + c0 for j in range(8)]
    got = emu.ldmatrix(words, offsets, trans)
    for lane in range(32):
        g, q = divmod(lane, 4)
        for i, m in enumerate(mats):
            m = m.T if trans else m
            assert got[lane][i] == _pack(m[g, 2 * q], m[g, 2 * q + 1]), (lane, i)


# ---- cp.async + commit_group + wait_group -------------------------------------------------


@pytest.mark.parametrize("pending", [0, 1, 2, 3])
def test_cp_async_lands_only_at_a_covering_wait(emu, pending):
    """Four groups of one 16-byte copy (the third a zero-fill); wait_group(pending) lands all
    but the newest `pending` groups; the rest read back as NaN (0xFFFF) until a wait covers them."""
    src = list(range(1, 33))
    valid = [1, 1, 0, 1]
    seen = emu.cp_async(src, valid, pending)
    for g in range(4):
        chunk = seen[8 * g:8 * g + 8]
        if g < 4 - pending:
            assert chunk == (src[8 * g:8 * g + 8] if valid[g] else [0] * 8), g
        else:
            assert chunk == [0xFFFF] * 8, g


# ---- ex2.approx.ftz.f32 and the shuffles ---------------------------------------------------


def test_ex2_approx_matches_exp2_with_flush_to_zero(emu):
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 127.5, 128.0, -126.0, -149.0, -150.0,
                             float("inf"), float("-inf"), 1e-40, -1e-40])
    x = torch.cat([specials, torch.randn(1000) * 30])
    y = emu.ex2(x).numpy()
    xs = x.numpy().astype(np.float64)
    xs = np.where(np.abs(xs) < np.finfo(np.float32).tiny, 0.0, xs)  # .ftz: subnormal inputs are 0
    with np.errstate(over="ignore"):
        want = np.exp2(xs).astype(np.float32)
    want = np.where(np.abs(want) < np.finfo(np.float32).tiny, np.float32(0), want)  # and results
    np.testing.assert_array_equal(y, want)
    assert np.isnan(emu.ex2(torch.tensor([float("nan")])).numpy()).all()


@pytest.mark.parametrize("lane_mask", [1, 2, 4, 8, 16])
def test_shfl_xor(emu, lane_mask):
    x = torch.randn(32)
    y = emu.shuffle(0, lane_mask, x).numpy()
    np.testing.assert_array_equal(y, x.numpy()[np.arange(32) ^ lane_mask])


def test_quad_max_and_quad_sum(emu):
    x = torch.randn(32)
    quads = x.numpy().reshape(8, 4)
    np.testing.assert_array_equal(emu.shuffle(1, 0, x).numpy(), np.repeat(quads.max(1), 4))
    # quad_sum is a butterfly: x + x[l ^ 1], then that + its value at l ^ 2, in float32.
    lanes, xs = np.arange(32), x.numpy()
    pair = xs + xs[lanes ^ 1]
    np.testing.assert_array_equal(emu.shuffle(2, 0, x).numpy(), pair + pair[lanes ^ 2])


# ---- the rules the emulator enforces --------------------------------------------------------

FAULTS = {
    0: r"race on shared byte 20: thread 3 write \(store\) and thread 40 write \(store\)",
    1: r"race on shared byte 0: thread 1 write \(store\) and thread 2 read \(load\)",
    2: r"outside the launch's 256 B of dynamic shared memory",
    3: r"no element of any tensor",
    4: r"divergent warp",
    5: r"exited while 32 threads wait at __syncthreads|deadlock",
    6: r"read-only input",
    7: r"full mask",
    8: r"exited while lanes of its warp wait at shfl",
    9: r"store: writes an element of output that block 0 thread 0 wrote in this launch \(this is block 1 thread 0\)",
    10: r"load: reads an element of output that block 0 thread 0 wrote",
}


@pytest.mark.parametrize("which", sorted(FAULTS))
def test_emulator_reports_broken_rules(emu, which):
    with pytest.raises(emu_lib.EmulatorError, match=FAULTS[which]):
        emu.fault(which)


# ---- mutation tests -------------------------------------------------------------------------

MUTANTS = {
    "fwd-mask-off-by-one": ("ccam/fwd.cuh", "(e & 1) >= cut) s[j][e] = -INFINITY", "(e & 1) > cut) s[j][e] = -INFINITY"),
    "fwd-no-trailing-syncthreads": ("ccam/fwd.cuh", "    __syncthreads();  // this stage is refilled", "    // this stage is refilled"),
    "fwd-wait-group-too-little": ("ccam/fwd.cuh", "    cp_async_wait<1>();\n    const int64_t s0", "    cp_async_wait<2>();\n    const int64_t s0"),
    "fwd-q-read-before-it-lands": ("ccam/fwd.cuh", "  cp_async_wait<1>();\n  __syncthreads();\n  if (p.scale_log2",
                                   "  cp_async_wait<2>();\n  __syncthreads();\n  if (p.scale_log2"),
    "fwd-row-sum-misses-keys": ("ccam/tile.cuh", "const uint32_t ones = Mma<T>::pack(1.f, 1.f);",
                                "const uint32_t ones = Mma<T>::pack(1.f, 0.f);"),
    "fwd-tile-stream-stays": ("ccam/tile.cuh", "      src[i] += step;", "      src[i] += 0;"),
    "fwd-tile-stream-past-the-end": ("ccam/tile.cuh", "static_cast<int>(valid_rows < ROWS ? valid_rows : ROWS)",
                                     "static_cast<int>(ROWS)"),
    "fwd-unmasked-tile-past-lo": ("ccam/rule.cuh", "(t.lo - r.key_lo) / block_n)", "(t.lo - r.key_lo + block_n - 1) / block_n)"),
    "pv-dropped-trans": ("ccam/tile.cuh", "ldmatrix_x4_trans(b, b_tile", "ldmatrix_x4(b, b_tile"),
    "dkdv-wrong-first-row": ("ccam/bwd.cuh", "const int64_t m_begin = rows_from / BM * BM;",
                             "const int64_t m_begin = rows_from / BM * BM + BM;"),
    "dkdv-mask-off-by-one": ("ccam/bwd.cuh", "masked && (col < cut[e / 2] || col >= rows)",
                             "masked && (col <= cut[e / 2] || col >= rows)"),
    "dkdv-smem-without-lse-rows": ("ccam/bwd.cuh", "int(Tiles::kSmemElems * sizeof(T) + Tiles::kSmemFloats * sizeof(float))",
                                   "int(Tiles::kSmemElems * sizeof(T))"),
    "dq-no-syncthreads-after-wait": ("ccam/bwd.cuh", "__syncthreads_or(masked && !own_chunks_finite<BN, DP, 128>(kt))",
                                     "(masked && !own_chunks_finite<BN, DP, 128>(kt))"),
    # frame windows (partial attention): only the window case of problems_found can catch these
    "window-limit-not-shifted": ("ccam/rule.cuh", "(row * frames / num_query + 1 - first_frame) * tokens_per_frame",
                                 "(row * frames / num_query + 1) * tokens_per_frame"),
    "window-first-row-not-shifted": ("ccam/rule.cuh", "((first_frame + key / tokens_per_frame) * num_query",
                                     "((key / tokens_per_frame) * num_query"),
}

# Ragged, GQA, batched q, several key tiles per query tile (>= 3: a stage is refilled while
# it could still be read), frame boundaries inside tiles; and a partial call over frame windows
# (rows before a window, a window starting mid-video, windows cut mid-tile).
MUTATION_CASE = dict(N=70, H=2, Hkv=1, D=32, counts=(3, 8), P=37, ranges=((1, 3), (2, 7)))
TOL = 2e-3


def problems_found(lib: emu_lib.Emu, seed: int) -> list[str]:
    """Run the forward and both backward kernels on MUTATION_CASE (fp16); every check that
    fails against the float64 oracle, or the emulator's error. Empty: nothing caught."""
    c = MUTATION_CASE
    gen = torch.Generator().manual_seed(seed)
    L, B = sum(c["counts"]) * c["P"], len(c["counts"])
    q = torch.randn(B, c["N"], c["H"], c["D"], generator=gen).half()
    k, v = (torch.randn(L, c["Hkv"], c["D"], generator=gen).half() for _ in range(2))
    dout = torch.randn(B, c["N"], c["H"], c["D"], generator=gen).half()
    scale = c["D"] ** -0.5
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    want = attention_oracle(q64, k64, v64, c["counts"], c["P"])
    want.backward(dout.double())
    try:
        out, lse = lib.forward(q, k, v, c["counts"], c["P"], scale, splits=1)
        parts, lse_parts = lib.forward(q, k, v, c["counts"], c["P"], scale, splits=3)
        dq, dk, dv = lib.backward(dout, q, k, v, out.float(), lse, c["counts"], c["P"], scale)
    except emu_lib.EmulatorError as exc:
        return [f"emulator: {exc}"]
    from ccam_kernels.backends import tiling

    merged, _ = tiling.merge_splits(parts, lse_parts)
    found = window_problems(lib, q, k, v, dout, scale, gen)
    for name, got, ref, tol in (("out", out, want, TOL), ("out (3 splits)", merged, want, TOL),
                                ("dq", dq, q64.grad, 2 * TOL), ("dk", dk, k64.grad, 2 * TOL), ("dv", dv, v64.grad, 2 * TOL)):
        err = rel_err(got, ref)
        if not err <= tol:  # NaN fails too
            found.append(f"{name}: rel err {err:.3g} > {tol}")
    return found


def window_problems(lib: emu_lib.Emu, q, k, v, dout, scale, gen) -> list[str]:
    """MUTATION_CASE's partial call over its frame windows (2 splits, so float32 partials),
    its output, LSE and gradients (through the output and the LSE) against float64 autograd
    through the reference partial attention."""
    from ccam_kernels.backends import tiling
    from ccam_kernels.long_video import ccam_partial_attention
    from test_long_video_partial import keys_of_ranges

    c = MUTATION_CASE
    kr, vr = (keys_of_ranges(x, c["counts"], c["P"], c["ranges"]) for x in (k, v))
    leaves64 = [x.double().requires_grad_() for x in (q, kr, vr)]
    want, want_lse = ccam_partial_attention(*leaves64, c["counts"], c["P"], c["ranges"], scale=scale, backend="reference")
    seen = torch.isfinite(want_lse)
    dlse = torch.randn(want_lse.shape, generator=gen)
    grads = torch.autograd.grad((want, torch.where(seen, want_lse, 0.0)), leaves64, (dout.double(), dlse.double()))
    try:
        parts, lse_parts = lib.forward(q, kr, vr, c["counts"], c["P"], scale, splits=2, ranges=c["ranges"])
        out, lse = tiling.merge_splits(parts, lse_parts)
        dq, dk, dv = lib.backward(dout, q, kr, vr, out, lse, c["counts"], c["P"], scale, ranges=c["ranges"], dlse=dlse)
    except emu_lib.EmulatorError as exc:
        return [f"emulator (window): {exc}"]
    found = [] if torch.equal(torch.isneginf(lse), ~seen) else ["window: rows that see nothing differ"]
    for name, got, ref, tol in (("window out", out, want, TOL), ("window lse", lse[seen], want_lse[seen], TOL),
                                ("window dq", dq, grads[0], 2 * TOL), ("window dk", dk, grads[1], 2 * TOL),
                                ("window dv", dv, grads[2], 2 * TOL)):
        err = rel_err(got, ref)
        if not err <= tol:  # NaN fails too
            found.append(f"{name}: rel err {err:.3g} > {tol}")
    return found


def test_unmutated_kernels_pass_the_mutation_case(emu, seed):
    assert problems_found(emu, seed) == []


@pytest.fixture(scope="module")
def mutant_libraries(tmp_path_factory):
    """Every mutant built from its own copy of csrc/, two compiles at a time."""
    root = tmp_path_factory.mktemp("mutants")
    emu_lib.machine_objects()  # shared, built once before the pool

    def build(name):
        rel, old, new = MUTANTS[name]
        src = emu_lib.csrc_copy(root / name, {rel: (old, new)})
        return name, emu_lib.Emu(emu_lib.build(src, root / f"{name}.so"))

    with concurrent.futures.ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        return dict(pool.map(build, MUTANTS))


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_each_mutation_is_caught(mutant, mutant_libraries, seed):
    found = problems_found(mutant_libraries[mutant], seed)
    assert found, f"mutant {mutant} passed every check"
    print(f"{mutant}: {found}")


# ---- undefined behaviour (UBSan) --------------------------------------------------------------

_RUN_CASE = (
    "import pathlib, sys; import emu_lib, test_cuda_emulator as t; "
    "print(t.problems_found(emu_lib.Emu(pathlib.Path(sys.argv[1])), int(sys.argv[2])))"
)


def _run_under_ubsan(lib: pathlib.Path, seed: int) -> subprocess.CompletedProcess:
    tests = pathlib.Path(__file__).resolve().parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tests.parent), str(tests)]))
    return subprocess.run([sys.executable, "-c", _RUN_CASE, str(lib), str(seed)], capture_output=True, text=True,
                          env=env, cwd=tests)


def test_kernels_have_no_undefined_behaviour(seed):
    """The mutation case's three kernels, built with UBSan: no out-of-bounds index into a
    register array, no signed overflow, no misaligned pointer, and still the right results."""
    proc = _run_under_ubsan(emu_lib.cached_ubsan_library(), seed)
    assert proc.returncode == 0 and "runtime error" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("[]"), proc.stdout


def test_ubsan_catches_a_register_array_overrun(tmp_path, seed):
    """A mutant that reads lse[2] of the forward's float lse[2] is reported by UBSan."""
    src = emu_lib.csrc_copy(tmp_path / "src", {"ccam/fwd_epilogue.cuh": ("store(lse_row + row0, lse[0]);",
                                                                           "store(lse_row + row0, lse[2]);")})
    proc = _run_under_ubsan(emu_lib.build_ubsan(src, tmp_path / "ubsan.so"), seed)
    assert proc.returncode != 0 and "index 2 out of bounds for type 'float [2]'" in proc.stderr, proc.stderr[-2000:]

