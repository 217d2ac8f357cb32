"""Build script. The pure-Python package always installs; the CUDA extension is optional.

CCAM_BUILD_CUDA=1   build the extension from csrc/ (needs torch with CUDA and nvcc)
CCAM_BUILD_CUDA=0   never build it
unset               build it only when torch has CUDA and nvcc is found
CCAM_CUDA_ARCHS     architectures to build for, default "80;90a"

The source lists and nvcc flags come from ccam_kernels/cuda_build.py (loaded by path: the
package itself imports torch, which a build environment may lack), the same module that
compile-checks csrc/ in CI and JIT-builds it for development.
"""

import importlib.util
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _cuda_build():
    spec = importlib.util.spec_from_file_location("_ccam_cuda_build", os.path.join(HERE, "ccam_kernels", "cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    if switch == "1" and not has_cuda:
        raise RuntimeError("CCAM_BUILD_CUDA=1 but torch has no CUDA or nvcc is not on the PATH")
    return has_cuda


def _extensions():
    if not _want_cuda():
        return [], {}
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    build = _cuda_build()
    sources = [os.path.relpath(p, HERE) for p in build.host_sources() + build.kernel_sources()]
    # No -std flag: torch's builder passes the standard its headers need.
    ext = CUDAExtension(
        name="ccam_kernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *build.gencode_flags(build.parse_archs(None))]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
