"""The GPU suite's first step: what machine and software this is, and which CUDA architecture
to build for.

    python benchmarks/suite_env.py ENV_TXT

Writes versions, the GPU (torch's view and nvidia-smi's) and the commit to ENV_TXT; prints
one line on stdout, the CCAM_CUDA_ARCHS value for the GPU present (e.g. "90a" on an H200:
cuda_build.arch_for_capability), so the build compiles one architecture instead of every
default one. Exits 3, printing nothing on stdout, when torch sees no CUDA device: on the
suite's machine that is a failure to report, not a run whose GPU tests all skip.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys


def _run(cmd: list[str]) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cmd[0]}: not available ({exc})"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    import torch

    from ccam_kernels import available_backends, cuda_build

    lines = [f"commit: {_run(['git', 'rev-parse', 'HEAD'])}"
             + ("" if not _run(["git", "status", "--porcelain", "--untracked-files=no"]) else " (dirty tree)"),
             f"python {platform.python_version()}",
             f"torch {torch.__version__} cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()}"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed")
    arch = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        arch = cuda_build.arch_for_capability(props.major, props.minor)
        lines.append(f"gpu {props.name} {props.total_memory / 2**30:.0f} GiB sm_{props.major}{props.minor} "
                     f"{props.multi_processor_count} SMs; build arch {arch}")
    else:
        lines.append("gpu: torch sees no CUDA device")
    lines.append(f"nvcc: {shutil.which('nvcc') or 'NOT on the PATH'}; C compiler (Triton needs one): "
                 f"{shutil.which('gcc') or shutil.which('cc') or 'NONE'}; "
                 f"compute-sanitizer: {shutil.which('compute-sanitizer') or 'not on the PATH'}")
    lines.append(f"usable backends before the build: {available_backends()}")
    lines.append(_run(["nvidia-smi"]))
    with open(argv[0], "w") as f:
        f.write("\n".join(lines) + "\n")
    if arch is None:
        return 3
    print(arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
