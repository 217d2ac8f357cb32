"""Instructions per HMMA in a kernel's hot loop, from the SASS of its sm_90a build
(cuobjdump -sass): the loop is the backward branch whose body holds the most HMMA (the
smallest such body when loops nest); its static instructions are counted by opcode. The
forward's ratio of non-MMA instructions to HMMA is the issue-23 measure of its hot loop.

    python -m ccam_kernels.perf_model.sass [--source fwd_bf16_d64] [--arch 90a]
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import tempfile

_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def functions(sass: str) -> dict:
    """{(demangled kernel, arch): [(address, opcode, operands)]} of a cuobjdump -sass listing."""
    from .. import cuda_build

    out, arch, current = {}, None, None
    for line in sass.splitlines():
        if m := re.search(r"arch = (sm_\w+)", line):
            arch = m.group(1)
        elif m := re.search(r"Function : (\S+)", line):
            current = out.setdefault((cuda_build._demangle(m.group(1)), arch), [])
        elif current is not None and (m := _LINE.search(line)):
            current.append((int(m.group(1), 16), m.group(3), m.group(4)))
    return out


def hot_loop(instrs: list) -> dict:
    """{"start", "end", "instructions", "hmma", "non_mma_per_hmma", "opcodes"} of the loop
    whose body holds the most HMMA."""
    best = None
    for addr, op, operands in instrs:
        if not op.startswith("BRA"):
            continue
        target = re.search(r"0x([0-9a-f]+)", operands)
        if not target or int(target.group(1), 16) > addr:
            continue
        start = int(target.group(1), 16)
        body = [op2 for a, op2, _ in instrs if start <= a <= addr]
        hmma = sum(o.startswith("HMMA") for o in body)
        if hmma and (best is None or (hmma, -len(body)) > (best[2], -len(best[3]))):
            best = (start, addr, hmma, body)
    if best is None:
        raise ValueError("no loop with HMMA instructions")
    start, end, hmma, body = best
    opcodes = collections.Counter(o.split(".")[0] for o in body)
    return {"start": start, "end": end, "instructions": len(body), "hmma": hmma,
            "non_mma_per_hmma": round((len(body) - hmma) / hmma, 2), "opcodes": dict(opcodes.most_common())}


def main(argv=None) -> int:
    from .. import cuda_build

    p = argparse.ArgumentParser(prog="python -m ccam_kernels.perf_model.sass", description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default="fwd_bf16_d64", help="an instantiation in csrc/instantiations (default fwd_bf16_d64)")
    p.add_argument("--arch", default="90a")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        import pathlib

        src = cuda_build.csrc_dir() / "instantiations" / f"{args.source}.cu"
        result = cuda_build.compile_one(src, (args.arch,), pathlib.Path(tmp))
        if not result.ok:
            print(result.log)
            return 1
        sass = subprocess.run([cuda_build._tool("cuobjdump"), "-sass", str(result.obj)], capture_output=True,
                              text=True, check=True).stdout
    for (kernel, arch), instrs in functions(sass).items():
        loop = hot_loop(instrs)
        print(f"{kernel} {arch}: hot loop 0x{loop['start']:x}..0x{loop['end']:x}, {loop['instructions']} instructions, "
              f"{loop['hmma']} HMMA, {loop['non_mma_per_hmma']} non-MMA per HMMA")
        print("  " + ", ".join(f"{op} {n}" for op, n in loop["opcodes"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
