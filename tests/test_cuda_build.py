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
    # kernels (fwd, dq, dkdv, merge) x dtypes x padded head dims, and the sm_90a forward's dtypes x head dims 64 and 128
    assert len([n for n in names if n.endswith(".cu")]) == 4 * 2 * 4 + 2 * 2


# Known spills, each with its reason; the test fails when one goes away (update this) or a new
# one appears. The sm_90a forward at head dim 64 spills (bf16: 16 B, 40 B loads) at its 168 registers a
# thread since the Philox of dropout.cuh became one template for the GPU and the native CPU
# build (issue 22): the same rounds, written once, but ptxas allocates them differently; the
# old non-template copy compiled without spills. Not yet resolved (docs/cuda.md).
KNOWN_SPILLS = {("fwd_sm90_kernel<bf16, 64>", "sm_90a"), ("fwd_sm90_kernel<fp16, 64>", "sm_90a")}


def test_resource_report_covers_every_kernel_and_arch(compiled):
    """ptxas's report parses for every kernel on both archs; no kernel uses local memory but the
    known ones above."""
    kernels = {key: res for r in compiled for key, res in r.kernels.items()}
    assert len(kernels) == (32 + 8 + 4) * 2  # + the forward's dropout instances
    assert {arch for _, arch in kernels} == {"sm_80", "sm_90a"}
    spilling = set()
    for (kernel, arch), res in kernels.items():
        assert 0 < res["registers"] <= 255, (kernel, arch)
        if res["spill_stores"] or res["spill_loads"] or res["stack"]:
            spilling.add((kernel, arch))
    assert spilling == KNOWN_SPILLS
    table = cuda_build.format_resources(compiled)
    assert "fwd_kernel<bf16, 64>" in table


def test_perf_model_resource_table_is_current(compiled):
    """ccam_kernels/perf_model/resources.json holds what ptxas reports for every sm_90a kernel
    now (regenerate: python -m ccam_kernels.perf_model.resources --write)."""
    from ccam_kernels.perf_model import resources

    fresh = {kernel: dict(sorted(res.items())) for r in compiled for (kernel, arch), res in r.kernels.items()
             if arch == "sm_90a"}
    assert fresh == resources.load()["cuda_sm_90a"]


def test_every_kernel_runs_on_tensor_cores(compiled):
    """SASS check: HMMA (mma.sync) in every attention kernel for both archs, as many as the tile
    loops unroll to (forward at DP=64: 4 k-chunks x 8 key columns for S, 4 x 8 for P V and 4 for
    the row sums, in each of the two instances of the key-tile loop, unmasked and masked)."""
    counts = {}
    objects = [r.obj for r in compiled if r.source.suffix == ".cu"]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # one cuobjdump per object
        for per_object in pool.map(cuda_build.sass_mma_counts, objects):
            counts.update(per_object)
    assert len(counts) == (32 + 8 + 4) * 2
    for key, ops in counts.items():
        if key[0].startswith("merge_kernel"):  # the split merge: memory-bound, no matrix product
            assert ops["HMMA"] == ops["HGMMA"] == 0, (key, ops)
        elif key[0].startswith("fwd_sm90_kernel"):  # wgmma on sm_90a; on sm_80 a trap, never launched
            assert ops["HGMMA"] > 0 if key[1] == "sm_90a" else ops["HGMMA"] == ops["HMMA"] == 0, (key, ops)
        else:
            assert ops["HMMA"] > 0, key
    assert counts[("fwd_kernel<bf16, 64>", "sm_90a")]["HMMA"] == 2 * (64 + 4)  # the masked and the mask-free loop
    assert counts[("fwd_kernel<bf16, 64, dropout>", "sm_90a")]["HMMA"] == 2 * 64  # row sums by float adds
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
    merge = (CSRC / "ccam" / "merge.cuh").read_text()
    assert int(re.search(r"kMergeRows = (\d+);", merge).group(1)) == cuda_backend.MERGE_ROWS


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


# ---- the emulation build's cache: keyed by its sources, moved into place whole ----------------


def _csrc_copy(dest: pathlib.Path) -> pathlib.Path:
    shutil.copytree(CSRC, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@pytest.mark.parametrize("edit", ["ccam/rule.cuh", "emu/runtime.h", "ccam_dispatch.h", "emu/kernels.cpp",
                                  "instantiations/fwd_fp16_d32.cu", "emu/new_header.h"])
def test_emulator_build_name_hashes_every_source(tmp_path, monkeypatch, edit):
    """The name changes with any C++/CUDA file under csrc/ (a header it includes, a new file),
    and not with the tree's path or its files' times."""
    monkeypatch.setattr(cuda_build, "CSRC", _csrc_copy(tmp_path / "a"))
    first = cuda_build.emulator_build_name()
    assert first.startswith("ccam_kernels_cuda_emulator_")
    monkeypatch.setattr(cuda_build, "CSRC", _csrc_copy(tmp_path / "b"))
    os.utime(tmp_path / "b" / "ccam" / "rule.cuh", (0, 0))
    assert cuda_build.emulator_build_name() == first
    path = tmp_path / "b" / edit
    path.write_text((path.read_text() if path.exists() else "") + "\n// edited\n")
    assert cuda_build.emulator_build_name() != first


def test_emulator_build_is_moved_into_place_whole(tmp_path, monkeypatch):
    """Each builder compiles into a fresh folder and renames it into place: the keyed folder is
    never seen half-written, a finished one is loaded without a build, and a builder that lost
    the race to another drops its own folder and uses the winner's."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    name = cuda_build.emulator_build_name()
    final = tmp_path / "ext" / name
    builds, loaded = [], []

    def fake_build(name, sources, extra_cflags, build_directory, is_python_module, verbose):
        assert not final.exists() or race, "built although the finished folder was there"
        assert pathlib.Path(build_directory).parent == tmp_path / "ext" and build_directory != str(final)
        assert {pathlib.Path(s).name for s in sources} == {pathlib.Path(s).name for s in cuda_build.EMULATOR_SOURCES}
        (pathlib.Path(build_directory) / f"{name}.so").write_text(f"build {len(builds)}")
        builds.append(build_directory)
        loaded.append((pathlib.Path(build_directory) / f"{name}.so").read_text())
        if race:  # another builder finishes first, while this one is still building
            final.mkdir()
            (final / f"{name}.so").write_text("winner")

    monkeypatch.setattr(cpp_extension, "load", fake_build)
    monkeypatch.setattr(cuda_build, "_LOADED", set())
    monkeypatch.setattr(torch.ops, "load_library", lambda path: loaded.append(pathlib.Path(path).read_text()))
    race = False
    cuda_build.load_emulator()
    assert (final / f"{name}.so").read_text() == "build 0" and loaded == ["build 0"]
    cuda_build.load_emulator()  # loaded already in this process: nothing to do
    assert len(builds) == 1 and loaded == ["build 0"]
    cuda_build._LOADED.clear()  # as a new process: the finished folder is loaded as it is
    cuda_build.load_emulator()
    assert len(builds) == 1 and loaded == ["build 0", "build 0"]
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == [name]

    shutil.rmtree(final)
    cuda_build._LOADED.clear()
    race = True
    cuda_build.load_emulator()
    assert (final / f"{name}.so").read_text() == "winner"
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == [name]  # the loser's folder is gone


_RUN_TREE = """
import os, sys, torch
sys.path.insert(0, sys.argv[2])
from ccam_kernels import ccam_attention, cuda_build
from oracle import attention_oracle
torch.manual_seed(int(sys.argv[1]))
counts, P = [3, 2], 4
q = torch.randn(2, 7, 2, 32, dtype=torch.float16)
k, v = (torch.randn(sum(counts) * P, 2, 32, dtype=torch.float16) for _ in range(2))
out = ccam_attention(q, k, v, counts, P, backend="cuda")
want = attention_oracle(q, k, v, counts, P)
print(cuda_build.emulator_build_name(), float((out.double() - want).norm() / want.norm()))
"""


def test_trees_sharing_an_extension_dir_each_run_their_own_sources(tmp_path, seed):
    """Two copies of the package whose csrc/ differ (one with a wrong mask rule), sharing one
    TORCH_EXTENSIONS_DIR and started together: each runs its own kernels. The real sources'
    build is taken from this session's extension folder when it is there (one build less)."""
    repo = CSRC.parent
    shared = tmp_path / "ext"
    shared.mkdir()
    real = cuda_build.emulator_build_name()
    if (cuda_build.extensions_root() / real / f"{real}.so").exists():
        shutil.copytree(cuda_build.extensions_root() / real, shared / real)
    trees = {}
    for tree in ("mutant", "real"):
        shutil.copytree(repo / "ccam_kernels", tmp_path / tree / "ccam_kernels", ignore=shutil.ignore_patterns("__pycache__"))
        _csrc_copy(tmp_path / tree / "csrc")
        trees[tree] = tmp_path / tree
    rule = tmp_path / "mutant" / "csrc" / "ccam" / "rule.cuh"
    text = rule.read_text()
    assert "* frames / num_query + 1 - first_frame)" in text
    rule.write_text(text.replace("* frames / num_query + 1 - first_frame)", "* frames / num_query + 2 - first_frame)"))
    # Both at once: torch's builder, given one folder, made the second process wait for the
    # first's build and then load it, whichever tree it came from.
    procs = {tree: subprocess.Popen([sys.executable, "-c", _RUN_TREE, str(seed), str(repo / "tests")], cwd=tmp_path,
                                    env=dict(os.environ, PYTHONPATH=str(trees[tree]), TORCH_EXTENSIONS_DIR=str(shared),
                                             CCAM_CUDA_EMULATE="1"),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tree in ("mutant", "real")}
    results = {}
    for tree, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        name, error = out.split()
        results[tree] = (name, float(error))
    assert results["real"][0] == real != results["mutant"][0]
    assert results["real"][1] < 2e-3, results
    assert results["mutant"][1] > 0.05, results
    assert sorted(p.name for p in shared.iterdir()) == sorted([real, results["mutant"][0]])
