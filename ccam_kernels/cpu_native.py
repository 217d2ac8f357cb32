"""The native CPU build: every C++ source in csrc/cpu/ compiled into one shared library with the
host's C++ compiler, loaded with ctypes. Optional: without a compiler (or with
CCAM_CPU_NATIVE=0) ``library()`` is None, after one warning, and the callers run their torch
code instead (the same formula and dropout masks, slower).

    library() -> ctypes.CDLL | None            built at first use (about a second), then cached
    function(name, argtypes, restype=None)     one extern "C" entry point of it, or None

Adding a source: put a .cpp with ``extern "C"`` entry points in csrc/cpu/ (it is compiled into
the same library, with FLAGS; it may include csrc/ccam/ headers, which compile as plain C++
there: see csrc/ccam/dropout.cuh), and bind them with ``function``; wrap them as torch ops in
the module that uses them (backends/cpu_dropout.py is the pattern). Tensors go in as data
pointers plus sizes and strides: the C side sees no torch header, so a build takes a second and
does not depend on torch's C++ ABI.

The build is keyed by a hash of csrc/cpu/ and csrc/ccam/ (the headers it may include), the
flags, the compiler's version and this CPU's model and features (-march=native: the binary is
for the machine that built it), and placed by native_build.build_once (a folder that is only
ever complete; concurrent builders and trees sharing TORCH_EXTENSIONS_DIR never load a
half-written or another tree's binary).
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import platform
import shutil
import subprocess
import threading
import warnings
from typing import Optional, Sequence

from .native_build import build_once, source_digest

__all__ = ["FLAGS", "ENV", "library", "function", "build_name", "compiler"]

ENV = "CCAM_CPU_NATIVE"  # "0": never build nor load (the torch fallbacks run)
# -march=native: the build runs where it is built. No -ffast-math: the kernels must give the
# torch fallbacks' bits (IEEE products, NaN kept). -pthread: attention_forward.cpp runs std::threads.
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-pthread")
LIBRARY_FILE = "libccam_cpu.so"
CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

_lock = threading.Lock()
_state: dict = {}  # "library": the loaded CDLL or None (decided once per process)


def compiler() -> Optional[str]:
    """The C++ compiler: $CXX, else c++ or g++ on the PATH; None when there is none."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.isfile(cxx) else None)
    return shutil.which("c++") or shutil.which("g++")


def _sources() -> list[pathlib.Path]:
    return sorted((CSRC / "cpu").glob("*.cpp"))


def _cpu_identity() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
        return "\n".join(dict.fromkeys(lines))  # one copy per distinct line (every core repeats them)
    except OSError:
        return platform.processor() or platform.machine()


def build_name(cxx: str) -> str:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    files = [p for sub in ("cpu", "ccam") for p in (CSRC / sub).rglob("*")
             if p.suffix in (".cpp", ".h", ".cuh", ".inc") and p.is_file()]
    return f"ccam_kernels_cpu_{source_digest(CSRC, files, [*FLAGS, cxx, version, _cpu_identity()])}"


def _build(cxx: str, folder: pathlib.Path) -> None:
    cmd = [cxx, *FLAGS, f"-I{CSRC}", *map(str, _sources()), "-o", str(folder / LIBRARY_FILE)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the native CPU library failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")


def _fallback(reason: str) -> None:
    warnings.warn(f"ccam_kernels: no native CPU build ({reason}); its CPU paths (the float32 attention forward, "
                  f"attention dropout) run their slower torch code instead: the same formula, the same dropout "
                  f"masks", RuntimeWarning, stacklevel=3)
    return None


def _load() -> Optional[ctypes.CDLL]:
    if os.environ.get(ENV, "") == "0":
        return None  # asked for: no warning
    cxx = compiler()
    if cxx is None:
        return _fallback("no C++ compiler: set CXX or install g++")
    if not _sources() or not (CSRC / "ccam").is_dir():
        return _fallback(f"{CSRC} has no C++ sources: a source checkout is needed")
    try:
        path = build_once(build_name(cxx), LIBRARY_FILE, lambda folder: _build(cxx, folder))
        return ctypes.CDLL(str(path))
    except (RuntimeError, OSError) as err:
        return _fallback(str(err))


def library() -> Optional[ctypes.CDLL]:
    """The native CPU library, built and loaded at the first call of the process (then
    cached); None, with one warning, where it cannot be built."""
    with _lock:
        if "library" not in _state:
            _state["library"] = _load()
        return _state["library"]


def function(name: str, argtypes: Sequence, restype=None):
    """The library's extern "C" function ``name`` with its ctypes signature; None when the
    library is not there (the caller runs its torch code)."""
    lib = library()
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = list(argtypes), restype
    return fn


def reset() -> None:
    """Forget the decision (tests: force the fallback, then the native build again)."""
    with _lock:
        _state.clear()
