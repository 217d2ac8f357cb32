"""A small case for compute-sanitizer (memcheck, racecheck) over the cuda backend's kernels:
forward with and without key splits, and the backward, on a ragged GQA batch whose sizes cut
every tile short (N, P, L not multiples of the tiles). Run by benchmarks/gpu_suite.sh:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \\
        python benchmarks/sanitize_case.py

(without the caching allocator every tensor is its own allocation, so memcheck sees any
access past one). Exits 1 when the result is off the float64 oracle."""

import sys

import torch

from ccam_kernels import ccam_attention
from ccam_kernels.backends import tiling


def main() -> int:
    torch.manual_seed(0)
    N, H, Hkv, D, counts, P = 70, 4, 2, 40, (3, 5), 13
    L = sum(counts) * P
    q = torch.randn(N, H, D, device="cuda", dtype=torch.float16, requires_grad=True)
    k = torch.randn(L, Hkv, D, device="cuda", dtype=torch.float16, requires_grad=True)
    v = torch.randn(L, Hkv, D, device="cuda", dtype=torch.float16, requires_grad=True)
    want = ccam_attention(q.double(), k.double(), v.double(), counts, P, backend="reference")
    worst = 0.0
    for splits in (1, 3):
        tiling.FORCE_SPLITS = splits
        out = ccam_attention(q, k, v, counts, P, backend="cuda")
        out.float().sum().backward()
        worst = max(worst, ((out.double() - want).norm() / want.norm()).item())
    torch.cuda.synchronize()
    print(f"sanitize case: max rel err {worst:.2e}")
    return 0 if worst <= 2e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
