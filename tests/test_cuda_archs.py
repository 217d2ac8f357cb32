"""Which GPUs the cuda backend can run on: the nvcc flags (machine code plus sm_80 PTX), the
reader of a library's embedded images (checked on real nvcc output against cuobjdump), and
the backend's refusal on a GPU the build has no image for (faked capabilities: no GPU here)."""

import dataclasses
import re
import shutil
import subprocess
import types

import pytest
import torch

from ccam_kernels import attention, cuda_archs, cuda_build
from ccam_kernels.attention import BACKENDS, resolve_backend
from ccam_kernels.backends import cuda_backend
from ccam_kernels.checks import check_attention_args
from ccam_kernels.cuda_archs import Image

KERNEL = """
__global__ void NAME_kernel(float* x, float s) { x[threadIdx.x] *= s; }
void NAME(float* x) { NAME_kernel<<<1, 32>>>(x, 2.f); }
"""


def test_default_flags_embed_sm80_ptx_for_newer_gpus():
    flags = cuda_build.gencode_flags(cuda_build.DEFAULT_ARCHS)
    assert flags == ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
                     "-gencode=arch=compute_80,code=compute_80"]
    # An arch-specific target alone gets no PTX (it would only run on that GPU anyway), and
    # the oldest plain arch is the one whose PTX is kept.
    assert cuda_build.gencode_flags(("90a",)) == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert cuda_build.gencode_flags(("89", "86"))[-1] == "-gencode=arch=compute_86,code=compute_86"


def test_arch_for_capability():
    assert cuda_build.arch_for_capability(9, 0) == "90a"
    assert cuda_build.arch_for_capability(8, 6) == "86"
    assert cuda_build.arch_for_capability(12, 0) == "120"


@pytest.mark.parametrize("image, runs, refuses", [
    (Image(80, "sass"), [(8, 0), (8, 6), (8, 9)], [(7, 5), (9, 0), (12, 0)]),
    (Image(90, "sass", "a"), [(9, 0)], [(8, 0), (10, 0)]),
    (Image(80, "ptx"), [(8, 0), (9, 0), (10, 0), (12, 0)], [(7, 5)]),
    (Image(90, "ptx", "a"), [(9, 0)], [(10, 0)]),
    (Image(100, "sass", "f"), [(10, 0), (10, 3)], [(12, 0), (9, 0)]),
])
def test_compatibility_rules(image, runs, refuses):
    assert all(image.runs_on(c) for c in runs)
    assert not any(image.runs_on(c) for c in refuses)


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """A tiny kernel compiled with the default flags, and with the GPU suite's Hopper-only
    flags, each an object file; and both linked into one shared library, as setup.py links
    one object per source."""
    nvcc, cxx = shutil.which("nvcc"), shutil.which("g++") or shutil.which("c++")
    if nvcc is None or cxx is None:
        pytest.skip("nvcc and a C++ compiler are needed to build a CUDA library here")
    tmp = tmp_path_factory.mktemp("fatbin")
    objs = {}
    for name, archs in (("default", cuda_build.DEFAULT_ARCHS), ("hopper", ("90a",))):
        source, objs[name] = tmp / f"{name}.cu", tmp / f"{name}.o"
        source.write_text(KERNEL.replace("NAME", f"launch_{name}"))  # distinct symbols per object
        subprocess.run([nvcc, "-c", "-Xcompiler", "-fPIC", *cuda_build.gencode_flags(archs), str(source),
                        "-o", str(objs[name])], check=True, capture_output=True)
    objs["linked"] = tmp / "libboth.so"
    subprocess.run([cxx, "-shared", str(objs["default"]), str(objs["hopper"]), "-o", str(objs["linked"])],
                   check=True, capture_output=True)
    return objs


def test_reads_the_images_nvcc_embedded(libraries):
    assert cuda_archs.images_in(str(libraries["default"])) == (Image(80, "ptx"), Image(80, "sass"),
                                                                Image(90, "sass", "a"))
    assert cuda_archs.images_in(str(libraries["hopper"])) == (Image(90, "sass", "a"),)
    assert cuda_archs.images_in(str(libraries["linked"])) == cuda_archs.images_in(str(libraries["default"]))


def test_reader_agrees_with_cuobjdump(libraries):
    try:
        tool = cuda_build._tool("cuobjdump")
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", str(libraries["linked"])], capture_output=True,
                             text=True, check=True).stdout
    # cuobjdump names images like "libboth.2.sm_90a.cubin" and "libboth.1.sm_80.ptx".
    seen = {(m.group(1), m.group(2)) for m in re.finditer(r"\.(sm_\w+?)\.(cubin|ptx)", listing)}
    ours = {(f"sm_{i.arch}{i.variant}", "cubin" if i.kind == "sass" else "ptx")
            for i in cuda_archs.images_in(str(libraries["linked"]))}
    assert seen == ours, listing


def test_why_not_built_for(libraries):
    default, hopper = str(libraries["default"]), str(libraries["hopper"])
    for capability in ((8, 0), (8, 6), (9, 0), (10, 0), (12, 0)):
        assert cuda_archs.why_not_built_for(capability, default) is None, capability
    assert cuda_archs.why_not_built_for((9, 0), hopper) is None
    why = cuda_archs.why_not_built_for((12, 0), hopper)
    assert "sm_120" in why and "sm_90a" in why and "CCAM_CUDA_ARCHS=120" in why


def test_not_an_elf_file_is_a_reason_not_a_crash(tmp_path):
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not a library at all")
    why = cuda_archs.why_not_built_for((9, 0), str(junk))
    assert "cannot read" in why and "junk.so" in why


def _fake_gpu(monkeypatch, capability, images):
    """This process sees a CUDA GPU of ``capability`` and a loaded extension holding ``images``."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(cuda_backend, "_load_error", lambda: None)
    monkeypatch.setattr(cuda_archs, "loaded_library", lambda: "/fake/_C.so")
    monkeypatch.setattr(cuda_archs, "images_in", lambda path: images)
    # Only cuda or torch can be picked, so a fallback lands on torch whatever triton would do.
    monkeypatch.setitem(attention.BACKENDS, "triton",
                        dataclasses.replace(BACKENDS["triton"], why_unusable=lambda: "disabled in this test"))


def _problem_on_cuda():
    """(q stand-in on a CUDA device, checked problem): resolve_backend only reads q's device,
    dtype and the problem, so no CUDA tensor is needed."""
    q = torch.randn(8, 2, 16, dtype=torch.float16)
    k = torch.randn(6, 2, 16, dtype=torch.float16)
    problem = check_attention_args(q, k, k, (2,), 3, None, 0.0)
    return types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16), problem


@pytest.mark.parametrize("capability, images", [
    ((12, 0), (Image(80, "sass"), Image(90, "sass", "a"))),  # the old build on a Blackwell GPU
    ((8, 6), (Image(90, "sass", "a"),)),  # the GPU suite's Hopper-only build on an sm_86 GPU
])
def test_auto_falls_back_and_named_cuda_says_why(monkeypatch, capability, images):
    _fake_gpu(monkeypatch, capability, images)
    q, problem = _problem_on_cuda()
    assert resolve_backend("auto", q, problem).name == "torch"
    assert "cuda" not in attention.available_backends()
    with pytest.raises(RuntimeError) as info:
        resolve_backend("cuda", q, problem)
    message = str(info.value)
    assert f"sm_{capability[0]}{capability[1]}" in message and "sm_90a" in message and "torch" in message


def test_sm80_ptx_lets_a_newer_gpu_run_the_cuda_backend(monkeypatch):
    _fake_gpu(monkeypatch, (12, 0), (Image(80, "ptx"), Image(80, "sass"), Image(90, "sass", "a")))
    q, problem = _problem_on_cuda()
    assert resolve_backend("auto", q, problem).name == "cuda"
    assert attention.available_backends()[0] == "cuda"
