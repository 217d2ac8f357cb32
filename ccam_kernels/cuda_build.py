"""Build and check the CUDA extension of the "cuda" backend (the sources in csrc/).

    python -m ccam_kernels.cuda_build --check        # compile every source for sm_80 and sm_90a (no link)
    python -m ccam_kernels.cuda_build --resources    # + registers, stack and spills of every kernel
    python -m ccam_kernels.cuda_build --sass         # + check every kernel's SASS holds tensor-core MMAs
    python -m ccam_kernels.cuda_build --jit          # build with ninja and load it (CUDA torch only)
    python -m ccam_kernels.cuda_build --emulator     # build and load the CPU emulation build (g++, no CUDA)

The check needs nvcc only, not a GPU nor a CUDA build of torch: it compiles, and never links
(torch's CPU build has no CUDA libraries to link against). The kernel files include no torch
header, so each compiles in seconds; the host file (ccam_attention.cpp) compiles against
torch's headers. `--arch 80,90a` picks the architectures (machine code for each, and PTX of
the oldest plain one for newer GPUs: gencode_flags), `--jobs N` the parallel compiles.
The installed build is setup.py's (CCAM_BUILD_CUDA=1, see docs/cuda.md); the JIT build is for
development. Both need a source checkout (csrc/ is not part of the installed package).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field

from .native_build import build_once, extensions_root, source_digest  # noqa: F401 (extensions_root: cuda_build's API)

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
DEFAULT_ARCHS = ("80", "90a")


def csrc_dir() -> pathlib.Path:
    if not (CSRC / "ccam").is_dir():
        raise FileNotFoundError(f"{CSRC} has no CUDA sources: building the extension needs a source checkout of ccam_kernels")
    return CSRC


def kernel_sources() -> list[pathlib.Path]:
    """One file per (kernel, dtype, padded head dim): csrc/instantiations/*.cu, and the sm_90a
    forward's csrc/sm90/*.cu (machine code only in the sm_90a pass; a trap elsewhere)."""
    return sorted((csrc_dir() / "instantiations").glob("*.cu")) + sorted((csrc_dir() / "sm90").glob("*.cu"))


def host_sources() -> list[pathlib.Path]:
    """The op registrations and the module stub: csrc/*.cpp."""
    return sorted(csrc_dir().glob("*.cpp"))


def gencode_flags(archs) -> list[str]:
    """Machine code for each arch, plus PTX of the oldest plain (not "a"/"f") one, which the
    driver compiles for GPUs newer than every listed arch (sm_100, sm_120 for the default
    list) instead of failing with "no kernel image". The kernels use no arch-specific
    instruction, so PTX for sm_80 is the same code. That PTX is the front end's output for
    its machine code anyway, so embedding it costs no extra compile pass."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    plain = [a for a in archs if a.isdigit()]
    if plain:
        oldest = min(plain, key=int)
        flags.append(f"-gencode=arch=compute_{oldest},code=compute_{oldest}")
    return flags


def arch_for_capability(major: int, minor: int) -> str:
    """The one arch to build for a GPU of this compute capability (the GPU suite builds only
    that): sm_90a on Hopper, as in DEFAULT_ARCHS, else the plain sm_XY."""
    return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"


def parse_archs(text: str | None) -> tuple[str, ...]:
    archs = tuple(a.strip() for a in (text or os.environ.get("CCAM_CUDA_ARCHS", "")).replace(";", ",").split(",") if a.strip())
    return archs or DEFAULT_ARCHS


def _torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    flags = [f"-I{p}" for p in include_paths()]
    torch_include = pathlib.Path(include_paths()[0])
    if not (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        # torch's CPU wheels ship c10/cuda headers without this generated file; it only sets
        # export macros, which a compile-only check does not need.
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return flags


def _cxx_std() -> str:
    """The C++ standard torch's own extension builder uses for this torch (c++20 from 2.10 on)."""
    import torch

    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return "-std=c++20" if (major, minor) >= (2, 10) else "-std=c++17"


@dataclass
class Compiled:
    source: pathlib.Path
    ok: bool
    log: str
    seconds: float
    obj: pathlib.Path | None = None
    kernels: dict = field(default_factory=dict)  # (kernel, arch) -> {"registers", "stack", "spill_stores", "spill_loads"}


_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _parse_ptxas(log: str) -> dict:
    """ptxas -v output -> {(kernel, arch): resources}."""
    found, current = {}, None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = (_demangle(m.group(1)), m.group(2))
            found[current] = {}
        elif current and (m := _STACK.search(line)):
            found[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current and (m := _REGS.search(line)):
            found[current]["registers"] = int(m.group(1))
    return found


def _demangle(symbol: str) -> str:
    """``_ZN4ccam10fwd_kernelI13__nv_bfloat16Li64EEEv...`` -> ``fwd_kernel<bf16, 64>`` (our
    kernels' symbols only; anything else is returned as is). cu++filt is not always installed."""
    m = re.match(r"_ZN4ccam(\d+)", symbol)
    if not m:
        return symbol
    pos = m.end(1)
    name = symbol[pos:pos + int(m.group(1))]
    rest = symbol[pos + int(m.group(1)):]
    t = re.match(r"I(\d+)", rest)
    if not t:
        return name
    ctype = rest[t.end(1):t.end(1) + int(t.group(1))]
    dp = re.match(r"Li(\d+)E", rest[t.end(1) + int(t.group(1)):])
    short = {"__half": "fp16", "__nv_bfloat16": "bf16"}.get(ctype, ctype)
    return f"{name}<{short}, {dp.group(1) if dp else '?'}>"


def _tool(name: str) -> str:
    """A CUDA binary tool: from the PATH, else the copy Triton ships (its NVIDIA backend bundles
    cuobjdump and nvdisasm)."""
    found = shutil.which(name)
    if found:
        return found
    try:
        import triton

        bundled = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    raise FileNotFoundError(f"{name} is not on the PATH (it ships with the CUDA toolkit, and with triton)")


def compile_one(source: pathlib.Path, archs, out_dir: pathlib.Path) -> Compiled:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on the PATH")
    obj = out_dir / (source.stem + ".o")
    common = ["-O3", f"-I{csrc_dir()}", "-c", str(source), "-o", str(obj)]
    if source.suffix == ".cu":
        cmd = [nvcc, "-std=c++17", *gencode_flags(archs), "-Xptxas", "-v", *common]
    else:
        cmd = [nvcc, _cxx_std(), *_torch_includes(), f"-I{sysconfig.get_paths()['include']}", *common]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    result = Compiled(source, proc.returncode == 0, log, time.perf_counter() - start, obj if proc.returncode == 0 else None)
    result.kernels = _parse_ptxas(log)
    return result


def compile_all(archs=DEFAULT_ARCHS, jobs: int | None = None, out_dir=None, progress=print) -> list[Compiled]:
    """Compile every csrc/ source (kernels for each arch, host files once), in parallel."""
    sources = host_sources() + kernel_sources()
    out_dir = pathlib.Path(out_dir or tempfile.mkdtemp(prefix="ccam-cuda-check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = jobs or os.cpu_count() or 1
    results = []
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(compile_one, s, archs, out_dir) for s in sources]
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            r = fut.result()
            results.append(r)
            if progress:
                progress(f"[{i}/{len(sources)}] {r.source.relative_to(csrc_dir())}: "
                         f"{'ok' if r.ok else 'FAILED'} ({r.seconds:.1f} s)")
    return sorted(results, key=lambda r: r.source)


def sass_mma_counts(obj: pathlib.Path) -> dict:
    """{(kernel, arch): number of tensor-core MMA instructions} from the object's SASS:
    HMMA (mma.sync, sm_80+) and HGMMA (wgmma, sm_90a); and UTMALDG (TMA tensor loads, sm_90a)."""
    text = subprocess.run([_tool("cuobjdump"), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    counts, arch, kernel = {}, None, None
    for line in text.splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function : (\S+)", line):
            kernel = (_demangle(m.group(1)), arch)
            counts[kernel] = {"HMMA": 0, "HGMMA": 0, "UTMALDG": 0}
        elif kernel:
            for op in ("HGMMA", "HMMA", "UTMALDG"):
                if re.search(rf"\b{op}\.", line):
                    counts[kernel][op] += 1
                    break
    return counts


def format_resources(results: list[Compiled]) -> str:
    rows = ["| kernel | arch | registers | stack B | spill stores B | spill loads B |", "|---|---|---|---|---|---|"]
    for r in results:
        for (kernel, arch), res in sorted(r.kernels.items()):
            rows.append(f"| {kernel} | {arch} | {res.get('registers', '?')} | {res.get('stack', '?')} | "
                        f"{res.get('spill_stores', '?')} | {res.get('spill_loads', '?')} |")
    return "\n".join(rows)


def load(archs=None, verbose: bool = False):
    """JIT-build the extension with ninja (torch.utils.cpp_extension.load) and load it: its ops
    register under torch.ops.ccam_kernels. Needs a CUDA build of torch and nvcc."""
    from torch.utils.cpp_extension import load as cpp_load

    archs = archs or parse_archs(None)
    build_dir = pathlib.Path(os.environ.get("CCAM_CUDA_JIT_DIR", pathlib.Path.home() / ".cache" / "ccam_kernels" / "jit"))
    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(s) for s in host_sources() + kernel_sources() if s.name != "module.cpp"]
    cpp_load(name="ccam_kernels_cuda_jit", sources=sources, extra_include_paths=[str(csrc_dir())],
             extra_cflags=["-O3"], extra_cuda_cflags=["-O3", *gencode_flags(archs)], build_directory=str(build_dir),
             is_python_module=False, verbose=verbose)


EMULATOR_SOURCES = ("emu/ccam_attention_emu.cpp", "emu/kernels.cpp", "emu/runtime.cpp", "emu/ptx.cpp",
                    "emu/ptx_hopper.cpp")
EMULATOR_FLAGS = ("-O2", "-std=c++20", "-DCCAM_EMULATE")
_CXX_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def emulator_build_name() -> str:
    """The emulation build's extension name: a prefix and a hash (native_build.source_digest)
    of everything its binary depends on here: every C++/CUDA file under csrc/ but csrc/cpu/
    (the native CPU build's, which it never includes; the build includes headers from ccam/,
    emu/ and csrc/ itself, so all of those count, and a file it does not compile only costs a
    rebuild), the flags, the compiler and torch's version."""
    import torch

    root = csrc_dir()
    files = [p for p in root.rglob("*") if p.suffix in _CXX_SUFFIXES and p.is_file()
             and p.relative_to(root).parts[0] != "cpu"]
    digest = source_digest(root, files, [*EMULATOR_FLAGS, os.environ.get("CXX", "c++"), torch.__version__, sys.version])
    return f"ccam_kernels_cuda_emulator_{digest}"


_LOADED: set = set()  # the emulation builds loaded in this process, by name


def load_emulator(verbose: bool = False):
    """Build (once per source state) and load the CPU emulation build of the kernels
    (csrc/emu): the ops cuda_fwd, cuda_bwd_dq and cuda_bwd_dkdv for CPU tensors. g++ only, no
    CUDA; about a minute the first time. Built by native_build.build_once (a folder keyed by
    emulator_build_name() that is only ever complete: concurrent builders never load a
    half-written binary, and no tree loads another tree's)."""
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    name = emulator_build_name()
    if name in _LOADED:  # its ops are registered: a second copy of the library would register them again
        return
    built_here = []

    def build(folder: pathlib.Path) -> None:
        # torch's builder also loads the library (from `folder`; it stays mapped after the rename).
        cpp_load(name=name, sources=[str(csrc_dir() / s) for s in EMULATOR_SOURCES], extra_cflags=list(EMULATOR_FLAGS),
                 build_directory=str(folder), is_python_module=False, verbose=verbose)
        built_here.append(folder)

    library = build_once(name, f"{name}.so", build)
    if not built_here:
        torch.ops.load_library(str(library))
    _LOADED.add(name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ccam_kernels.cuda_build", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="compile every source, no link; exit 1 on any error")
    p.add_argument("--resources", action="store_true", help="also print registers / stack / spills per kernel")
    p.add_argument("--sass", action="store_true", help="also check that every kernel's SASS holds tensor-core MMAs")
    p.add_argument("--jit", action="store_true", help="build with ninja and load (CUDA torch only)")
    p.add_argument("--emulator", action="store_true", help="build and load the CPU emulation build (csrc/emu)")
    p.add_argument("--arch", help=f"comma-separated, default $CCAM_CUDA_ARCHS or {','.join(DEFAULT_ARCHS)}")
    p.add_argument("--jobs", type=int, help="parallel compiles (default: CPU count)")
    p.add_argument("--out", help="where to keep the objects (default: a temp dir)")
    args = p.parse_args(argv)
    archs = parse_archs(args.arch)
    if args.emulator:
        load_emulator(verbose=True)
        print("ccam_kernels cuda: CPU emulation build loaded (use it with CCAM_CUDA_EMULATE=1)")
        return 0
    if args.jit:
        load(archs, verbose=True)
        print("ccam_kernels cuda: JIT build loaded")
        return 0
    if not (args.check or args.resources or args.sass):
        p.error("nothing to do: give --check, --resources, --sass, --jit or --emulator")
    print(f"compiling csrc/ for {', '.join('sm_' + a for a in archs)} ...")
    results = compile_all(archs, args.jobs, args.out)
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"\n--- {r.source.relative_to(csrc_dir())} ---\n{r.log}", file=sys.stderr)
    if args.resources:
        print(format_resources(results))
    status = 1 if failed else 0
    if args.sass and not failed:
        missing = []
        for r in results:
            if r.source.suffix != ".cu":
                continue
            for (kernel, arch), ops in sorted(sass_mma_counts(r.obj).items()):
                print(f"{kernel} {arch}: {ops['HMMA']} HMMA, {ops['HGMMA']} HGMMA")
                if ops["HMMA"] + ops["HGMMA"] == 0:
                    missing.append(f"{kernel} ({arch})")
        if missing:
            print("no tensor-core MMA in: " + ", ".join(missing), file=sys.stderr)
            status = 1
    print(f"{len(results) - len(failed)}/{len(results)} sources compiled" + (": FAILED" if status else ": ok"))
    return status


if __name__ == "__main__":
    sys.exit(main())
