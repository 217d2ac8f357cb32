"""The native CPU build (ccam_kernels/cpu_native.py, csrc/cpu/) and its dropout op: the same
bits as ccam_kernels.dropout.keep_mask (the definition) on odd shapes, offsets and key starts,
with and without AVX2, and the torch fallback where no compiler is present."""

import ctypes
import platform
import shutil
import subprocess
import warnings

import pytest
import torch

from ccam_kernels import cpu_native
from ccam_kernels.backends import cpu_dropout
from ccam_kernels.backends.cpu_dropout import cpu_dropout_apply_
from ccam_kernels.dropout import keep_mask, keep_scale, threshold

needs_compiler = pytest.mark.skipif(cpu_native.compiler() is None, reason="no C++ compiler")


@pytest.fixture
def fresh_native():
    """Each test decides native vs fallback anew, and leaves the next one to decide again."""
    cpu_native.reset()
    yield
    cpu_native.reset()


def same_bits(a, b):
    """Equal values, NaN where NaN (a NaN's payload aside)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def expected(block, seed, offset, sample, num_heads, head0, row0, key0, p, group):
    """The definition written out: keep_mask at each element's (head, row, key), the scale
    multiplied in float32 (float64 for float64), one rounding to the block's dtype."""
    A, R, K = block.shape
    r = torch.arange(R)
    heads = head0 + torch.arange(A)[:, None] * group + r % group
    keep = keep_mask(seed, offset, sample, heads, row0 + r // group, key0, key0 + K, num_heads, p)
    acc = torch.float64 if block.dtype == torch.float64 else torch.float32
    factor = torch.where(keep, torch.tensor(keep_scale(p), dtype=acc), torch.tensor(0.0, dtype=acc))
    return (block.to(acc) * factor).to(block.dtype)


# (A, R, K, key0, row0, group): key starts and lengths not multiples of 8, rows past a chunk
# (512 keys), GQA folding, one key, keys past 2**32 (the group counter wraps mod 2**32).
CASES = [(3, 10, 37, 13, 3, 1), (2, 12, 1, 7, 0, 3), (1, 5, 1031, 509, 11, 1), (4, 6, 70, 2**35 + 3, 2**32 + 5, 2),
         (2, 4, 8, 16, 0, 1)]


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_native_matches_definition(fresh_native, dtype, case):
    A, R, K, key0, row0, group = case
    assert cpu_dropout.native_entry(dtype) is not None, "the native build must load where a compiler is"
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
    for p, offset in ((0.3, 5), (0.9, 2**32 - 1)):
        block = torch.rand(A, R, K, dtype=torch.float64).to(dtype)
        block[0, 0, 0] = float("nan")  # stays NaN, kept or dropped
        want = expected(block, seed, offset, 3, 7, 1, row0, key0, p, group)
        got, twin = block.clone(), block.clone()
        torch.ops.ccam_kernels.cpu_dropout_apply_([got, twin], seed, offset, 3, 7, 1, row0, key0, p, group)
        assert same_bits(got, want) and same_bits(twin, want)


@needs_compiler
def test_native_strided_blocks_and_p0(fresh_native):
    """A block with a strided key axis (copied through) and blocks of different layouts; p = 0
    leaves the blocks untouched."""
    seed = torch.tensor(2**40 + 17)
    base = torch.rand(2, 9, 30)
    strided = base.transpose(1, 2).contiguous().transpose(1, 2)  # keys with stride 9
    plain = base.clone()
    cpu_dropout_apply_([strided, plain], seed, 0, 1, 4, 0, 2, 3, 0.4, 2)
    want = expected(base, seed, 0, 1, 4, 0, 2, 3, 0.4, 2)
    assert torch.equal(strided, want) and torch.equal(plain, want)
    untouched = base.clone()
    cpu_dropout_apply_([untouched], seed, 0, 1, 4, 0, 2, 3, 0.0, 2)
    assert torch.equal(untouched, base)


def test_fallback_without_compiler_warns_once_same_bits(fresh_native, monkeypatch):
    """No C++ compiler: one warning saying so, then the torch Philox gives the same numbers."""
    monkeypatch.setattr(cpu_native, "compiler", lambda: None)
    seed = torch.tensor(123456789)
    block = torch.rand(3, 11, 45)
    got = block.clone()
    with pytest.warns(RuntimeWarning, match="no native CPU build .no C.. compiler"):
        cpu_dropout_apply_([got], seed, 4, 2, 9, 1, 5, 21, 0.25, 3)
    assert cpu_native.library() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = block.clone()
        cpu_dropout_apply_([again], seed, 4, 2, 9, 1, 5, 21, 0.25, 3)  # no second warning
    want = expected(block, seed, 4, 2, 9, 1, 5, 21, 0.25, 3)
    assert torch.equal(got, want) and torch.equal(again, want)


def test_env_turns_native_off_quietly(fresh_native, monkeypatch):
    monkeypatch.setenv(cpu_native.ENV, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert cpu_native.library() is None and cpu_dropout.native_entry(torch.float32) is None


def _torch_backend_grads():
    """Output and gradients of the torch backend's explicit engine with dropout, float32, GQA,
    two samples (a seed tensor as ccam_attention passes it)."""
    from ccam_kernels.attention import resolve_backend
    from ccam_kernels.checks import check_attention_args

    gen = torch.Generator().manual_seed(3)
    q, dout = torch.randn(2, 11, 4, 16, generator=gen), torch.randn(2, 11, 4, 16, generator=gen)
    k, v = (torch.randn(7 * 3, 2, 16, generator=gen) for _ in range(2))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    problem = check_attention_args(q, k, v, [4, 3], 3, None, 0.3)
    out = resolve_backend("torch", q, problem).run(q, k, v, problem, seed=torch.tensor(99), variant="explicit")
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


@needs_compiler
def test_torch_backend_same_numbers_native_and_fallback(fresh_native, monkeypatch):
    """The torch backend's output and gradients with dropout are bitwise the same with the
    native mask and with the torch Philox."""
    native = _torch_backend_grads()
    assert cpu_native.library() is not None
    monkeypatch.setenv(cpu_native.ENV, "0")
    cpu_native.reset()
    fallback = _torch_backend_grads()
    assert cpu_native.library() is None
    for a, b in zip(native, fallback):
        assert torch.equal(a, b)


@needs_compiler
def test_build_name_follows_sources(tmp_path, monkeypatch):
    """The build is keyed by csrc/cpu/ and csrc/ccam/ contents (a new source counts), not by
    the tree's path; the CUDA emulation build's key ignores csrc/cpu/."""
    from ccam_kernels import cuda_build

    cxx = cpu_native.compiler()
    for tree in ("a", "b"):
        shutil.copytree(cpu_native.CSRC, tmp_path / tree / "csrc", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(cpu_native, "CSRC", tmp_path / "a" / "csrc")
    first = cpu_native.build_name(cxx)
    monkeypatch.setattr(cpu_native, "CSRC", tmp_path / "b" / "csrc")
    monkeypatch.setattr(cuda_build, "CSRC", tmp_path / "b" / "csrc")
    emulator = cuda_build.emulator_build_name()
    assert cpu_native.build_name(cxx) == first and first.startswith("ccam_kernels_cpu_")
    (tmp_path / "b" / "csrc" / "cpu" / "attention.cpp").write_text("// a second source\n")
    assert cpu_native.build_name(cxx) != first
    assert cuda_build.emulator_build_name() == emulator
    (tmp_path / "b" / "csrc" / "cpu" / "attention.cpp").unlink()
    (tmp_path / "b" / "csrc" / "ccam" / "dropout.cuh").write_text("// edited\n")
    assert cpu_native.build_name(cxx) != first


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("g++") is None,
                    reason="needs g++ on x86-64")
def test_scalar_path_matches_definition(tmp_path):
    """csrc/cpu/dropout.cpp built without AVX2 (its one-counter-at-a-time path, what CPUs
    without AVX2 run) gives the same bits."""
    lib = tmp_path / "libscalar.so"
    subprocess.run(["g++", "-O2", "-mno-avx2", "-std=c++17", "-shared", "-fPIC", f"-I{cpu_native.CSRC}",
                    str(cpu_native.CSRC / "cpu" / "dropout.cpp"), "-o", str(lib)], check=True)
    entry = ctypes.CDLL(str(lib)).ccam_cpu_dropout_apply_f32
    entry.argtypes, entry.restype = cpu_dropout._ARGTYPES, ctypes.c_int
    seed = torch.randint(0, 2**63 - 1, (), dtype=torch.int64)
    block = torch.rand(2, 7, 77)
    got = block.clone()
    pointers = (ctypes.c_void_p * 1)(got.data_ptr())
    assert entry(pointers, 1, 2, 7, 77, got.stride(0), got.stride(1), int(seed), 3, threshold(0.45), 1, 6, 1, 4, 45,
                 3, keep_scale(0.45)) == 0
    assert torch.equal(got, expected(block, seed, 3, 1, 6, 1, 4, 45, 0.45, 3))


def test_dropout_header_compiles_as_plain_cpp(tmp_path):
    """csrc/ccam/dropout.cuh in a plain host build (no CUDA names, no emulation shim)."""
    cxx = cpu_native.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler")
    src = tmp_path / "probe.cpp"
    src.write_text('#include "ccam/dropout.cuh"\nint main() { uint32_t c[4] = {0, 0, 0, 0};'
                   ' ccam::philox4x32_10(c, 0u, 0u); return c[0] == 0x6627E8D5u ? 0 : 1; }\n')
    subprocess.run([cxx, "-std=c++17", "-Wall", "-Werror", f"-I{cpu_native.CSRC}", str(src), "-o",
                    str(tmp_path / "probe")], check=True)
    assert subprocess.run([str(tmp_path / "probe")]).returncode == 0  # Random123's known answer
