"""A small case for compute-sanitizer (memcheck, racecheck) over every kernel of the kernel
backends: forward with and without key splits, and the backward (dQ and dK/dV), of the cuda
backend and of the triton backend, on a ragged GQA batch whose sizes cut every tile short (N,
P, L not multiples of the tiles). Run by benchmarks/gpu_suite.sh:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/sanitize_case.py --backends cuda,triton

(without the caching allocator every tensor is its own allocation, so memcheck sees any
access past one). Triton runs one config (CCAM_TRITON_ONE_CONFIG=1): no autotuning runs
under the sanitizer. Exits 1 when a result is off the float64 oracle."""

import argparse
import os
import sys

os.environ.setdefault("CCAM_TRITON_ONE_CONFIG", "1")  # read when the Triton kernels are defined

import torch  # noqa: E402

from ccam_kernels import ccam_attention  # noqa: E402
from ccam_kernels.backends import tiling  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="cuda", help="comma-separated: cuda, triton (default cuda)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    N, H, Hkv, D, counts, P = 70, 4, 2, 40, (3, 5), 13
    L = sum(counts) * P
    q = torch.randn(N, H, D, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(L, Hkv, D, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(L, Hkv, D, device="cuda", dtype=torch.float16, requires_grad=True)
    want = ccam_attention(q.double(), k.double(), v.double(), counts, P, backend="reference")
    failed = False
    for backend in args.backends.split(","):
        worst = 0.0
        for splits in (1, 3):
            tiling.FORCE_SPLITS = splits
            out = ccam_attention(q, k, v, counts, P, backend=backend)
            out.float().sum().backward()
            worst = max(worst, ((out.double() - want).norm() / want.norm()).item())
        tiling.FORCE_SPLITS = None
        torch.cuda.synchronize()
        print(f"sanitize case {backend}: max rel err {worst:.2e}")
        failed |= not worst <= 2e-3
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
