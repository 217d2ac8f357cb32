"""The compiled kernels' resources for an sm_90 target, without a GPU: registers, spills and
shared memory, from which the model derives resident CTAs per SM.

CUDA: every instantiation of csrc/instantiations compiled by nvcc for sm_90a with
``-Xptxas -v`` (cuda_build.compile_one), parsed per kernel. Triton: each kernel of
triton_kernels.py compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` at every
autotune config (a CPU can do that: nothing is loaded), its shared memory from the compile
metadata and its registers and spills from the bundled ptxas -v on the kernel's PTX (the
driver reports ``n_regs`` only after loading on a GPU).

The table is committed as resources.json (compiling takes minutes); regenerate it with
``python -m ccam_kernels.perf_model.resources --write`` after a kernel change, and
tests/test_perf_model.py checks it is current where nvcc is on the PATH.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

TABLE = pathlib.Path(__file__).with_name("resources.json")
TRITON_HEAD_DIMS = (32, 64, 128)  # BLOCK_D of the head dims the model's shapes use


def cuda_kernel_name(kernel: str, dtype: str, dp: int) -> str:
    """The demangled name cuda_build gives an instantiation: ``fwd_kernel<bf16, 64>``."""
    return f"{kernel}<{dtype}, {dp}>"


def cuda_resources(jobs: int | None = None) -> dict:
    """{kernel name: {registers, stack, spill_stores, spill_loads}} of every sm_90a instantiation."""
    from .. import cuda_build

    out_dir = pathlib.Path(tempfile.mkdtemp(prefix="ccam-perf-model-"))
    table = {}
    with concurrent.futures.ThreadPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        for result in pool.map(lambda s: cuda_build.compile_one(s, ("90a",), out_dir), cuda_build.kernel_sources()):
            if not result.ok:
                raise RuntimeError(f"{result.source.name} failed to compile:\n{result.log[-2000:]}")
            for (kernel, arch), res in result.kernels.items():
                table[kernel] = dict(sorted(res.items()))
    return dict(sorted(table.items()))


# -- Triton ---------------------------------------------------------------------------------

_SIZES = {"N", "H", "G", "P", "D", "TUNE_CLASS"}  # upper-case ints; every other upper-case argument is a pointer
_POINTERS_FP32 = {"LSE", "DELTA", "DQ"}
_POINTERS_I64 = {"FRAMES", "KEY_START", "FIRST_FRAME", "END_FRAME", "TILE_SAMPLE", "TILE_START", "SEED"}


def _triton_signature(fn, constexprs: dict, dtype: str) -> tuple[dict, dict]:
    """Signature and attributes of a launch as the backend makes it at the v1.2 shape: 16-bit
    q/k/v/dO, float32 LSE/delta/dQ/split partials, int64 plans, 32-bit sizes and strides, and
    every pointer and stride divisible by 16 (Triton specializes them so for contiguous
    (B, N, H, D) tensors with H*D a multiple of 16; docs/triton.md)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.isupper() and name not in _SIZES:
            fp32 = name in _POINTERS_FP32 or (name == "O" and constexprs.get("SPLIT"))
            sig[name] = "*i64" if name in _POINTERS_I64 else "*fp32" if fp32 else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_"):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_report(ptx: str, arch: str = "sm_90a") -> dict:
    """ptxas -v of Triton's PTX, by the ptxas Triton ships (Triton's own choice for sm_90: its
    PTX version is newer than the toolkit's ptxas may accept)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.ptx"
        path.write_text(ptx)
        proc = subprocess.run([str(ptxas), f"-arch={arch}", "-v", str(path), "-o",
                               str(pathlib.Path(tmp) / "k.cubin")], capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas failed:\n{log[-2000:]}")
    regs, stack = _PTXAS_REGS.search(log), _PTXAS_STACK.search(log)
    return {"registers": int(regs.group(1)), "stack": int(stack.group(1)), "spill_stores": int(stack.group(2)),
            "spill_loads": int(stack.group(3)), "serialized_wgmma": "C7515" in log}


def triton_config_key(kernel: str, block_d: int, num_warps: int, num_stages: int) -> str:
    return f"{kernel}|D{block_d}|w{num_warps}s{num_stages}"


def triton_configs(kernel: str) -> list[tuple[int, int]]:
    """(num_warps, num_stages) of ``kernel``'s GPU autotune space (triton_kernels._configs)."""
    from ..backends import triton_kernels

    return [(w, s) for w, s in triton_kernels.KERNEL_CONFIGS[kernel]]


def _compile_triton(args) -> tuple[str, dict]:
    kernel, block_d, warps, stages = args
    import triton
    from triton.backends.compiler import GPUTarget

    from ..backends import triton_kernels

    fn = getattr(triton_kernels, {"fwd": "_fwd_kernel", "dq": "_bwd_dq_kernel", "dkdv": "_bwd_dkdv_kernel"}[kernel]).fn
    block_m, block_n, _ = triton_kernels.gpu_block_sizes(block_d, kernel)
    # The kernels without dropout (DROPOUT compiles it out), as the v1.2 inference shape runs them.
    # Head dim = BLOCK_D (EVEN_D: v1.2's 64, and 32, 128): its loads are the pipelined ones.
    constexprs = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=True, IEEE=False, DROPOUT=False)
    if "SPLIT" in fn.arg_names:
        constexprs["SPLIT"] = False
    sig, attrs = _triton_signature(fn, constexprs, "bf16")
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    report = _ptxas_report(compiled.asm["ptx"])
    report["shared"] = int(compiled.metadata.shared)
    # Loads the sm_90 pipeliner made asynchronous copies (cp.async into shared memory, issued
    # num_stages - 1 iterations ahead): 0 means every load of the loops is synchronous.
    report["async_copies"] = compiled.asm["ttgir"].count("async_copy_global_to_local")
    return triton_config_key(kernel, block_d, warps, stages), report


def _compile_merge(args) -> tuple[str, dict]:
    """The split merge (backends/triton_merge.py) at one head dim, writing the float32 output
    too (keep_acc: its most registers), bf16 out."""
    block_d, = args
    import triton
    from triton.backends.compiler import GPUTarget

    from ..backends import triton_merge

    fn = triton_merge._merge_kernel
    constexprs = dict(BLOCK_R=triton_merge.block_rows(block_d), BLOCK_D=block_d, WRITE_OUT=True, WRITE_ACC=True)
    pointers = {"O_PARTS": "*fp32", "LSE_PARTS": "*fp32", "OUT": "*bf16", "ACC": "*fp32", "LSE": "*fp32"}
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=triton_merge.NUM_WARPS))
    report = _ptxas_report(compiled.asm["ptx"])
    report["shared"] = int(compiled.metadata.shared)
    return triton_config_key("merge", block_d, triton_merge.NUM_WARPS, 1), report


def triton_resources(jobs: int | None = None) -> dict:
    """{kernel|D|config: {registers, spills, shared, serialized_wgmma, async_copies}} for sm_90 (bf16; fp16
    compiles to the same resources), the split merge's one config included."""
    work = [(k, d, w, s) for k in ("fwd", "dq", "dkdv") for d in TRITON_HEAD_DIMS for w, s in triton_configs(k)]
    with concurrent.futures.ProcessPoolExecutor(jobs or os.cpu_count() or 1) as pool:
        table = dict(pool.map(_compile_triton, work))
        table.update(pool.map(_compile_merge, [(d,) for d in TRITON_HEAD_DIMS]))
    return dict(sorted(table.items()))


def generate() -> dict:
    import triton

    from .. import cuda_build

    version = subprocess.run([cuda_build._tool("nvcc"), "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    return {"nvcc": version, "triton": triton.__version__, "cuda_sm_90a": cuda_resources(),
            "triton_sm_90": triton_resources()}


def load() -> dict:
    return json.loads(TABLE.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ccam_kernels.perf_model.resources", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"regenerate {TABLE.name}")
    args = p.parse_args(argv)
    table = generate()
    text = json.dumps(table, indent=1, sort_keys=True) + "\n"
    if args.write:
        TABLE.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
