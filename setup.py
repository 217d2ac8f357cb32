"""Build script. The pure-Python package always installs; the CUDA extension is optional.

CCAM_BUILD_CUDA=1   build the extension from csrc/ (needs torch with CUDA and nvcc)
CCAM_BUILD_CUDA=0   never build it
unset               build it only when torch has CUDA, nvcc is found and csrc/ holds kernels
CCAM_CUDA_ARCHS     architectures to build for, default "80;90a"
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_sources():
    return sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True)) + sorted(
        glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True)
    )


def _want_cuda() -> bool:
    switch = os.environ.get("CCAM_BUILD_CUDA", "").strip()
    if switch == "0":
        return False
    try:
        import torch
    except ImportError:
        if switch == "1":
            raise RuntimeError("CCAM_BUILD_CUDA=1 but torch is not installed in the build environment "
                               "(use pip install --no-build-isolation)")
        return False
    has_cuda = torch.version.cuda is not None and shutil.which("nvcc") is not None
    if switch == "1":
        if not has_cuda:
            raise RuntimeError("CCAM_BUILD_CUDA=1 but torch has no CUDA or nvcc is not on the PATH")
        if not _cuda_sources():
            raise RuntimeError("CCAM_BUILD_CUDA=1 but csrc/ holds no kernels yet")
        return True
    return has_cuda and bool(_cuda_sources())


def _extensions():
    if not _want_cuda():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = os.environ.get("CCAM_CUDA_ARCHS", "80;90a").split(";")
    gencode = []
    for arch in filter(None, (a.strip() for a in archs)):
        gencode += [f"-gencode=arch=compute_{arch},code=sm_{arch}"]
    ext = CUDAExtension(
        name="ccam_kernels._C",
        sources=_cuda_sources(),
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", *gencode]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
