"""The emulator's sm_90a models (csrc/emu/ptx_hopper.cpp, wrapped as csrc/ccam/hopper.cuh's
names) against NumPy descriptions of the PTX ISA's layouts and rules:

* wgmma.mma_async m64nNk16 (fp16 / bf16, float32 accumulators): A and B from shared-memory
  descriptors in every canonical layout (K-major and MN-major; no swizzle, 32B, 64B, 128B),
  A from registers; the accumulator fragment of a 128-thread warpgroup;
* cp.async.bulk.tensor through a tensor map: box, strides, out-of-range zeros, swizzles;
* the rules: mbarrier phases, parities and transaction counts (a byte count that never
  completes, or a wait that never ends, is reported as a hang naming the barrier; too many
  bytes is an error; a wrong parity passes early and reads NaN), accumulators NaN until their
  wait_group, wgmma.fence, fence.proxy.async, a bulk copy over an operand still being read,
  elect.sync, setmaxnreg against the launch's registers, warpgroup divergence.

The layouts are described here differently from the model: by rows and 16-byte chunks
permuted per row, where the model permutes address bits. Built with g++ only (seconds)."""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest
import torch

import emu_lib


@pytest.fixture(scope="module")
def lib():
    path = emu_lib._cache_dir() / f"libccam_emu_hopper_{emu_lib._digest(emu_lib.CSRC / 'ccam', emu_lib.CSRC / 'emu')}.so"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        emu_lib._gxx([*emu_lib.FLAGS, "-shared", "-Wl,-Bsymbolic", str(emu_lib.CSRC / "emu" / "capi_hopper.cpp"),
                      *(str(o) for o in emu_lib.machine_objects()), "-o", str(tmp)])
        tmp.replace(path)
    return ctypes.CDLL(str(path))


def _call(lib, fn, *args):
    err = ctypes.create_string_buffer(4096)
    rc = getattr(lib, fn)(*args, err, len(err))
    return None if rc == 0 else err.value.decode()


def _ptr(a: np.ndarray):
    return ctypes.c_void_p(a.ctypes.data)


def _bits(x: torch.Tensor) -> np.ndarray:
    return x.contiguous().view(torch.int16).numpy().astype(np.uint16)


# ---- layouts -------------------------------------------------------------------------------


def permute_chunks(row_bytes: np.ndarray, row: int, span: int) -> np.ndarray:
    """One row of a swizzled atom (span bytes): 16-byte chunk c is stored at chunk
    c ^ ((row * span // 128) % (span // 16)) (128B: the row's index mod 8; 64B: half of it; 32B:
    a quarter)."""
    if span == 0:
        return row_bytes
    chunks = row_bytes.reshape(-1, 16)
    out = np.empty_like(chunks)
    for c in range(len(chunks)):
        out[c ^ ((row * span // 128) % (span // 16))] = chunks[c]
    return out.reshape(-1)


def store_operand(image: np.ndarray, start: int, m: np.ndarray, mn_major: bool, span: int, lbo: int, sbo: int):
    """Write m (rows x 16 uint16, rows along M or N, columns along K) into the byte image in the
    ISA's canonical layout. No swizzle: 8 x 8 core matrices (128 contiguous bytes, 8 rows of 16
    bytes; K-major rows run along K, MN-major rows along MN), core matrices LBO apart along K
    and SBO apart along M/N. Swizzled: atoms of 8 rows of `span` bytes; K-major: a row is one
    M/N index's K values, atoms SBO apart along M/N; MN-major: a row is one K index's span/2
    MN values, atoms SBO apart along K and LBO apart along MN."""
    rows = m.shape[0]
    if span == 0:
        for ig in range(rows // 8):
            for jg in range(2):
                core = m[8 * ig:8 * ig + 8, 8 * jg:8 * jg + 8]
                core = core.T if mn_major else core  # a core matrix row: 8 contiguous elements
                at = start + ig * sbo + jg * lbo
                image[at:at + 128] = np.ascontiguousarray(core, "<u2").view(np.uint8).reshape(-1)
        return
    if not mn_major:
        for i in range(rows):
            at = start + (i // 8) * sbo + (i % 8) * span
            row = np.zeros(span // 2, np.uint16)
            row[:16] = m[i]
            image[at:at + span] = permute_chunks(row.astype("<u2").view(np.uint8), i % 8, span)
        return
    per = span // 2
    for blk in range(math.ceil(rows / per)):
        for j in range(16):
            at = start + blk * lbo + (j // 8) * sbo + (j % 8) * span
            row = np.zeros(per, np.uint16)
            vals = m[blk * per:(blk + 1) * per, j]
            row[:len(vals)] = vals
            image[at:at + span] = permute_chunks(row.astype("<u2").view(np.uint8), j % 8, span)


def desc(start, lbo, sbo, span):
    layout = {0: 0, 128: 1, 64: 2, 32: 3}[span]
    return (start >> 4) | (lbo >> 4) << 16 | (sbo >> 4) << 32 | layout << 62


def layout_params(rows, mn_major, span):
    """(lbo, sbo, bytes) with gaps between core matrices / atoms, so a wrong stride shows."""
    if span == 0:
        if mn_major:
            return (rows // 8) * 128 + 128, 128, ((rows // 8) * 128 + 128) * 2
        return 128, 384, (rows // 8) * 384
    if mn_major:
        blocks = math.ceil(rows / (span // 2))
        return 3 * 8 * span, 8 * span, blocks * 3 * 8 * span
    return 16, 2 * 8 * span, (rows // 8) * 2 * 8 * span


def accumulator(D: np.ndarray) -> np.ndarray:
    """The m64nNk16 float32 accumulator fragment: thread t (warp w = t // 32, g = lane // 4,
    c = lane % 4) holds d[4i + e] = D(16w + g + 8 (e // 2), 8i + 2c + e % 2)."""
    n = D.shape[1]
    out = np.zeros((128, n // 2), np.float32)
    for t in range(128):
        w, g, c = t // 32, (t % 32) // 4, t % 4
        for k in range(n // 2):
            i, e = divmod(k, 4)
            out[t, k] = D[16 * w + g + 8 * (e // 2), 8 * i + 2 * c + e % 2]
    return out


def a_registers(A_bits: np.ndarray) -> np.ndarray:
    """A from registers: warp w gives rows 16w..16w+15 as mma.m16n8k16's A fragment."""
    regs = np.zeros((128, 4), np.uint32)
    for t in range(128):
        w, g, c = t // 32, (t % 32) // 4, t % 4
        for r, (row, col) in enumerate([(g, 2 * c), (g + 8, 2 * c), (g, 2 * c + 8), (g + 8, 2 * c + 8)]):
            regs[t, r] = int(A_bits[16 * w + row, col]) | int(A_bits[16 * w + row, col + 1]) << 16
    return regs


def run_wgmma(lib, dtype, n, span, trans_a, trans_b, a_regs, scale_d, generator):
    A = torch.randn(64, 16, generator=generator).to(dtype)
    B = torch.randn(n, 16, generator=generator).to(dtype)  # B as N x K
    C = torch.randn(64, n, generator=generator)
    lbo_a, sbo_a, size_a = layout_params(64, trans_a, span)
    lbo_b, sbo_b, size_b = layout_params(n, trans_b, span)
    start_b = -(-size_a // 1024) * 1024
    image = np.zeros(start_b + size_b + 1024, np.uint8)
    if not a_regs:
        store_operand(image, 0, _bits(A), trans_a, span, lbo_a, sbo_a)
    store_operand(image, start_b, _bits(B), trans_b, span, lbo_b, sbo_b)
    words = image.view("<u2").copy()
    c = accumulator(C.numpy())
    d = np.zeros_like(c)
    regs = a_registers(_bits(A))
    err = _call(lib, "ccam_emu_wgmma", int(dtype == torch.bfloat16), n, int(a_regs), int(trans_a), int(trans_b),
                _ptr(words), len(words), ctypes.c_uint64(desc(0, lbo_a, sbo_a, span)),
                ctypes.c_uint64(desc(start_b, lbo_b, sbo_b, span)), _ptr(regs), _ptr(c), scale_d, _ptr(d))
    assert err is None, err
    want = A.double().numpy() @ B.double().numpy().T + (C.double().numpy() if scale_d else 0)
    return d, accumulator(want)


@pytest.mark.parametrize("span", [0, 32, 64, 128], ids=lambda s: f"swizzle{s}")
@pytest.mark.parametrize("trans_a,trans_b", [(False, False), (False, True), (True, False)], ids=["KK", "KN", "MK"])
def test_wgmma_descriptors_follow_the_isa_layouts(lib, span, trans_a, trans_b, generator):
    dtype = torch.bfloat16 if span in (32, 128) else torch.float16
    d, want = run_wgmma(lib, dtype, 64 if trans_b else 32, span, trans_a, trans_b, False, 1, generator)
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_wgmma_a_from_registers_and_scale_d(lib, dtype, generator):
    d, want = run_wgmma(lib, dtype, 16, 128, False, True, True, 0, generator)
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)


def test_wgmma_layout_is_not_symmetric_by_accident(lib, generator):
    """The same bytes read with a neighbouring swizzle give something else."""
    d, want = run_wgmma(lib, torch.float16, 16, 64, False, False, False, 0, generator)
    np.testing.assert_allclose(d, want, rtol=1e-5, atol=1e-5)
    A = torch.randn(64, 16, generator=generator).half()
    B = torch.randn(16, 16, generator=generator).half()
    lbo, sbo, size = layout_params(64, False, 64)
    image = np.zeros(2 * 16384, np.uint8)
    store_operand(image, 0, _bits(A), False, 64, lbo, sbo)
    store_operand(image, 16384, _bits(B), False, 64, lbo, sbo)
    words = image.view("<u2").copy()
    d = np.zeros((128, 8), np.float32)
    regs = np.zeros((128, 4), np.uint32)
    err = _call(lib, "ccam_emu_wgmma", 0, 16, 0, 0, 0, _ptr(words), len(words), ctypes.c_uint64(desc(0, lbo, sbo, 128)),
                ctypes.c_uint64(desc(16384, lbo, sbo, 128)), _ptr(regs), _ptr(d.copy()), 0, _ptr(d))
    assert err is None, err
    assert np.abs(d - accumulator(A.double().numpy() @ B.double().numpy().T)).max() > 1e-2


# ---- cp.async.bulk.tensor ------------------------------------------------------------------


def tma_expected(x: np.ndarray, box, coords, span, at, smem):
    """The box (outermost first in x's axes order reversed: box/coords innermost first) as a
    row-major array, zeros outside x, each row's 16-byte chunks permuted for the swizzle."""
    rank = x.ndim
    shape = tuple(reversed(box))
    out = np.zeros(shape, x.dtype)
    for idx in np.ndindex(*shape):
        src = tuple(c + i for c, i in zip(reversed(coords), idx))
        if all(0 <= s < n for s, n in zip(src, x.shape)):
            out[idx] = x[src]
    flat = out.reshape(-1, box[0]).view(np.uint8)
    image = np.full(smem, 0xFF, np.uint8)
    rows = [permute_chunks(flat[r].copy(), r % (1024 // max(span, 1)) if span else r, span) for r in range(len(flat))]
    image[at:at + flat.size] = np.concatenate(rows)
    return image


@pytest.mark.parametrize("span", [0, 32, 64, 128], ids=lambda s: f"swizzle{s}")
def test_tma_box_strides_zero_fill_and_swizzle(lib, span, generator):
    rows, cols = 37, 150
    x = torch.randint(-30000, 30000, (rows, cols + 10), generator=generator, dtype=torch.int16).numpy()[:, :cols]
    base = np.ascontiguousarray(x.base if x.base is not None else x)
    view = base[:, :cols]
    inner = span // 2 if span else 24
    box = [inner, 20]
    for coords in ([0, 0], [cols - inner // 2, rows - 7], [-5, -3], [8, 30]):
        smem = 2048 + inner * 2 * 20 + 1024
        image = np.zeros(smem, np.uint8)
        dims = (ctypes.c_int64 * 2)(cols, rows)
        strides = (ctypes.c_int64 * 1)(base.strides[0])
        err = _call(lib, "ccam_emu_tma", _ptr(base), 2, 2, dims, strides, (ctypes.c_int * 2)(*box), span,
                    (ctypes.c_int32 * 2)(*coords), 2048, smem, _ptr(image))
        assert err is None, err
        want = tma_expected(view, box, coords, span, 2048, smem)
        np.testing.assert_array_equal(image[2048:], want[2048:], err_msg=str(coords))


def test_tma_3d_box(lib, generator):
    x = torch.randint(-30000, 30000, (5, 9, 16), generator=generator, dtype=torch.int16).numpy()
    box, coords = [16, 4, 3], [0, 7, 3]  # runs past the end of both outer dims
    smem = 1024 + 16 * 4 * 3 * 2
    image = np.zeros(smem, np.uint8)
    err = _call(lib, "ccam_emu_tma", _ptr(x), 2, 3, (ctypes.c_int64 * 3)(16, 9, 5), (ctypes.c_int64 * 2)(32, 9 * 32),
                (ctypes.c_int * 3)(*box), 0, (ctypes.c_int32 * 3)(*coords), 1024, smem, _ptr(image))
    assert err is None, err
    np.testing.assert_array_equal(image[1024:], tma_expected(x, box, coords, 0, 1024, smem)[1024:])


@pytest.mark.parametrize("box,span,stem", [([16, 4], 64, "must equal the swizzle span"),
                                           ([4, 4], 0, "multiple of 16 bytes")])
def test_tensor_map_limits(lib, box, span, stem):
    x = np.zeros((8, 64), np.int16)
    image = np.zeros(4096, np.uint8)
    err = _call(lib, "ccam_emu_tma", _ptr(x), 2, 2, (ctypes.c_int64 * 2)(64, 8), (ctypes.c_int64 * 1)(128),
                (ctypes.c_int * 2)(*box), span, (ctypes.c_int32 * 2)(0, 0), 1024, 4096, _ptr(image))
    assert err is not None and stem in err, err


# ---- rules ---------------------------------------------------------------------------------


def case(lib, which, n=256):
    out = np.full(n, -7.0, np.float32)
    return _call(lib, "ccam_emu_hopper_case", which, _ptr(out)), out


def test_mbarrier_transactions_complete_the_phase(lib):
    err, out = case(lib, 3)
    assert err is None, err
    assert out[0] == 1.0 and out[1] == 2.0


def test_expect_tx_one_tile_too_many_is_a_hang(lib):
    err, _ = case(lib, 0)
    assert "deadlock" in err and "mbarrier at shared offset 0 hangs" in err and "512 transaction bytes outstanding" in err


def test_expect_tx_one_tile_too_few_is_an_error(lib):
    err, _ = case(lib, 1)
    assert "512 bytes more than its arrive.expect_tx announced" in err


def test_wrong_parity_passes_early_and_reads_undefined_data(lib):
    err, out = case(lib, 2)
    assert err is None, err
    assert np.isnan(out[0]) and np.isnan(out[1])


def test_a_phase_that_never_completes_is_a_hang(lib):
    err, _ = case(lib, 4)
    assert "deadlock" in err and "1 of 2 arrivals pending" in err and "wait for parity 0" in err


def test_more_arrivals_than_the_count_is_an_error(lib):
    err, _ = case(lib, 19)
    assert "more arrivals than the barrier's count" in err


@pytest.mark.parametrize("which,race", [(20, False), (21, True), (22, False)], ids=["arrive-wait", "arrive-before-write", "chain"])
def test_mbarriers_order_generic_shared_accesses(lib, which, race):
    """Inside one __syncthreads interval the race checker takes mbarrier arrive -> completed
    wait as an ordering (vector clocks): a write before the writer's arrive is seen by the
    waiter, also through a third thread; a write after the arrive races with the read."""
    err, out = case(lib, which)
    if race:
        assert err is not None and "race on shared byte 2048" in err, err
    else:
        assert err is None, err
        assert out[0] == 42.0


def test_accumulator_is_nan_until_its_wait(lib):
    err, out = case(lib, 5)
    assert err is None, err
    assert np.isnan(out[0]) and out[1] == 16.0


def test_wait_group_lands_only_the_covered_groups(lib):
    err, out = case(lib, 17)
    assert err is None, err
    assert out[0] == 16.0 and np.isnan(out[1]) and out[2] == 16.0


def test_wgmma_needs_a_fence(lib):
    err, _ = case(lib, 6)
    assert "no wgmma.fence" in err


def test_accumulator_written_in_flight_is_an_error(lib):
    err, _ = case(lib, 7)
    assert "wrote an accumulator register while a wgmma on it was in flight" in err


def test_generic_writes_need_fence_proxy_async(lib):
    err, _ = case(lib, 8)
    assert "no fence.proxy.async" in err
    err, out = case(lib, 9)
    assert err is None and out[0] == 16.0, err


def test_bulk_copy_over_an_operand_in_use_is_an_error(lib):
    err, _ = case(lib, 10)
    assert "still reads" in err


def test_elect_sync_elects_lane_zero_of_each_warp(lib):
    err, out = case(lib, 11)
    assert err is None, err
    np.testing.assert_array_equal(out[:128], [1.0 if t % 32 == 0 else 0.0 for t in range(128)])
    err, _ = case(lib, 12)
    assert "elect.sync" in err


@pytest.mark.parametrize("which,stem", [(13, "declares no register count"), (15, "deadlock"),
                                        (16, "multiple of 8")])
def test_setmaxnreg_is_checked_against_the_launch(lib, which, stem):
    err, _ = case(lib, which)
    assert err is not None and stem in err, err


def test_setmaxnreg_within_the_ctas_registers(lib):
    err, out = case(lib, 14)
    assert err is None and out[0] == 1.0, err


def test_half_a_warpgroup_at_a_wgmma_is_a_deadlock(lib):
    err, _ = case(lib, 18)
    assert "deadlock" in err and "wgmma.mma_async" in err


# ---- the GPU side of the same names --------------------------------------------------------


def test_generated_wgmma_wrappers_are_current():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(emu_lib.CSRC / "generate_wgmma.py"), "--check"], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hopper_wrappers_compile_for_sm90a(tmp_path):
    """hopper.cuh's inline PTX (every wrapper, in csrc/sm90/check/hopper_wrappers.cu) assembles for
    sm_90a and ptxas reports no spills."""
    import shutil
    import subprocess
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on the PATH: the sm_90a wrappers cannot be compile-checked here")
    proc = subprocess.run([nvcc, "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-c",
                           str(emu_lib.CSRC / "sm90" / "check" / "hopper_wrappers.cu"), "-o", str(tmp_path / "w.o")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "0 bytes spill stores, 0 bytes spill loads" in proc.stderr, proc.stderr
