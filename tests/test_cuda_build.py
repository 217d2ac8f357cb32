"""The "cuda" backend without a GPU: every csrc/ source compiles with nvcc for sm_80 and
sm_90a (compile only: torch's CPU build has no CUDA libraries to link), every kernel's SASS
holds tensor-core MMAs, the generated instantiations are current, the host's tile constants
match the kernels', and the Python side refuses cleanly where it cannot run."""

import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

from ccam_kernels import available_backends, ccam_attention
from ccam_kernels import cuda_build
from ccam_kernels.backends import cuda_backend

CSRC = pathlib.Path(cuda_build.__file__).resolve().parent.parent / "csrc"
NVCC = shutil.which("nvcc")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc is not on the PATH: the CUDA sources cannot be compile-checked here")
    return cuda_build.compile_all(cuda_build.DEFAULT_ARCHS, out_dir=tmp_path_factory.mktemp("objs"), progress=None)


def test_every_source_compiles_for_sm80_and_sm90a(compiled):
    failed = {str(r.source): r.log for r in compiled if not r.ok}
    assert not failed, failed
    names = {r.source.name for r in compiled}
    assert {"ccam_attention.cpp", "module.cpp"} <= names
    # kernels x dtypes x padded head dims, and the sm_90a forward's dtypes x head dims 64 and 128
    assert len([n for n in names if n.endswith(".cu")]) == 3 * 2 * 4 + 2 * 2


def test_resource_report_covers_every_kernel_and_arch(compiled):
    """ptxas's report parses for every kernel on both archs; no kernel uses local memory."""
    kernels = {key: res for r in compiled for key, res in r.kernels.items()}
    assert len(kernels) == (24 + 4) * 2
    assert {arch for _, arch in kernels} == {"sm_80", "sm_90a"}
    for (kernel, arch), res in kernels.items():
        assert 0 < res["registers"] <= 255, (kernel, arch)
        assert res["spill_stores"] == res["spill_loads"] == res["stack"] == 0, (kernel, arch, res)
    table = cuda_build.format_resources(compiled)
    assert "fwd_kernel<bf16, 64>" in table


def test_every_kernel_runs_on_tensor_cores(compiled):
    """SASS check: HMMA (mma.sync) in every kernel for both archs, as many as the tile loops
    unroll to (forward at DP=64: 4 k-chunks x 8 key columns for S, 4 x 8 for P V)."""
    counts = {}
    objects = [r.obj for r in compiled if r.source.suffix == ".cu"]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # one cuobjdump per object
        for per_object in pool.map(cuda_build.sass_mma_counts, objects):
            counts.update(per_object)
    assert len(counts) == (24 + 4) * 2
    for key, ops in counts.items():
        if key[0].startswith("fwd_sm90_kernel"):  # wgmma on sm_90a; on sm_80 a trap, never launched
            assert ops["HGMMA"] > 0 if key[1] == "sm_90a" else ops["HGMMA"] == ops["HMMA"] == 0, (key, ops)
        else:
            assert ops["HMMA"] > 0, key
    assert counts[("fwd_kernel<bf16, 64>", "sm_90a")]["HMMA"] == 64
    # the sm_90a forward at DP=64: 4 k-steps of S = Q K^T (m64n128k16) before the loop and 4 in
    # it (the next tile's, pipelined), 8 of P V (m64n64k16)
    assert counts[("fwd_sm90_kernel<bf16, 64>", "sm_90a")]["HGMMA"] == 4 + 4 + 8
    assert counts[("fwd_sm90_kernel<bf16, 64>", "sm_90a")]["UTMALDG"] == 3  # Q (4-d), K and V (3-d)


def test_check_command_exits_nonzero_with_the_compiler_message(tmp_path, monkeypatch):
    if NVCC is None:
        pytest.skip("nvcc is not on the PATH")
    bad = tmp_path / "instantiations"
    bad.mkdir()
    (bad / "broken.cu").write_text("this is not C++;\n")
    (tmp_path / "ccam").mkdir()
    monkeypatch.setattr(cuda_build, "CSRC", tmp_path)
    proc_code = cuda_build.main(["--check", "--arch", "80", "--out", str(tmp_path / "o")])
    assert proc_code == 1


def test_generated_instantiations_are_current():
    proc = subprocess.run([sys.executable, str(CSRC / "generate_instantiations.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_host_tile_constants_match_the_kernels():
    params = (CSRC / "ccam" / "params.h").read_text()
    fwd = (CSRC / "ccam" / "fwd.cuh").read_text()
    assert int(re.search(r"kFwdBlockN = (\d+);", params).group(1)) == cuda_backend.FWD_BLOCK_N
    assert int(re.search(r"kBwdKeyTile = (\d+);", params).group(1)) == cuda_backend.BWD_KEY_TILE
    assert int(re.search(r"kBlockM = (\d+)", fwd).group(1)) == cuda_backend.FWD_BLOCK_M


def test_setup_builds_every_source_it_checks():
    """setup.py takes its source list and flags from cuda_build: what CI compiles is what ships."""
    text = (CSRC.parent / "setup.py").read_text()
    assert "build.host_sources() + build.kernel_sources()" in text
    assert "gencode_flags" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU side")
def test_cuda_backend_refuses_cleanly_without_a_gpu(monkeypatch):
    monkeypatch.delenv("CCAM_CUDA_EMULATE", raising=False)  # the emulator is a separate, opt-in path
    assert "cuda" not in available_backends()
    q = torch.randn(8, 2, 16, dtype=torch.float16)
    k = torch.randn(6, 2, 16, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="no CUDA device") as info:
        ccam_attention(q, k, k, (2,), 3, backend="cuda")
    assert "torch" in str(info.value)


def test_missing_extension_says_how_to_build_it(monkeypatch):
    monkeypatch.delenv("CCAM_CUDA_EMULATE", raising=False)
    if "cuda" in available_backends():
        pytest.skip("the extension is built here")
    cuda_backend._load_error.cache_clear()
    try:
        message = cuda_backend._load_error()
    finally:
        cuda_backend._load_error.cache_clear()
    assert "CCAM_BUILD_CUDA=1" in message and "CCAM_CUDA_JIT=1" in message


def test_emulator_build_failure_is_the_reason(monkeypatch):
    """Under CCAM_CUDA_EMULATE=1 a failed emulation build makes "cuda" unusable with its message."""

    def broken(verbose=False):
        raise RuntimeError("g++: not found")

    monkeypatch.setenv("CCAM_CUDA_EMULATE", "1")
    monkeypatch.setattr(cuda_backend, "_EMULATOR_STATE", {})
    monkeypatch.setattr(cuda_build, "load_emulator", broken)
    why = cuda_backend.why_unusable()
    assert "CCAM_CUDA_EMULATE=1" in why and "g++: not found" in why
    assert "cuda" not in available_backends()


def test_float32_refusal_names_the_alternatives():
    from ccam_kernels.attention import BACKENDS

    why = BACKENDS["cuda"].refuses_dtype_on("cuda", torch.float32)
    assert "triton" in why and "torch" in why
    assert BACKENDS["cuda"].refuses_dtype_on("cuda", torch.bfloat16) is None


def test_rows_alignment_copies_only_what_cp_async_cannot_read():
    x = torch.randn(10, 2, 16, dtype=torch.float16)
    assert cuda_backend._rows_aligned(x) is x
    half = torch.randn(10, 2, 32, dtype=torch.float16)[..., 16:]  # row stride 32, 32-byte offset: readable
    assert cuda_backend._rows_aligned(half) is half
    strided = torch.randn(10, 2, 20, dtype=torch.float16)[..., :16]  # row stride 20: not a multiple of 8
    fixed = cuda_backend._rows_aligned(strided)
    assert fixed is not strided and fixed.is_contiguous() and torch.equal(fixed, strided)
    offset = torch.randn(10 * 2 * 16 + 1, dtype=torch.float16)[1:].view(10, 2, 16)  # 2-byte offset
    assert cuda_backend._rows_aligned(offset).data_ptr() % 16 == 0


def test_fake_implementations_give_the_shapes():
    """torch.compile traces the custom ops through their fakes: shapes and dtypes without running."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(20, 4, 64, dtype=torch.float16)
        k = torch.empty(5 * 7, 2, 64, dtype=torch.float16)
        out, lse, _ = cuda_backend.cuda_attention(q, k, k, torch.tensor([2, 3]), 7, 0.125)
        assert out.shape == (2, 20, 4, 64) and out.dtype == torch.float16
        assert lse.shape == (2, 4, 20) and lse.dtype == torch.float32
        dq, dk, dv = torch.ops.ccam_kernels.cuda_attention_backward(out, q, k, k, out, lse, torch.tensor([2, 3]), 7, 0.125)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
