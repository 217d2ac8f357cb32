"""Compile and autotune the Triton kernels for the shape classes the GPU suite times (the
Video-CCAM v1.2 shape, bf16, at 96 and 16 frames, B = 1 and 8: forward with and without key
splits, and the backward), so that the benchmarks time kernels, not compiles. The autotuner
caches its choice on disk (triton_kernels: cache_results), keyed by the shape class
(triton_kernels.tune_class), and the compiled kernels sit in Triton's cache: later processes
reuse both. Run first by benchmarks/gpu_suite.sh:

    python benchmarks/prewarm.py [--frames 96,16] [--batch 1,8]
"""

import argparse
import sys
import time

import torch

from ccam_kernels import ccam_attention
from ccam_kernels.config import CCAMConfig


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", default="96,16")
    p.add_argument("--batch", default="1,8")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("prewarm: no CUDA device", file=sys.stderr)
        return 3
    cfg, P = CCAMConfig(), 729
    for t in (int(x) for x in args.frames.split(",")):
        for b in (int(x) for x in args.batch.split(",")):
            start = time.perf_counter()
            q = torch.randn(b, cfg.num_query, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
            k, v = (torch.randn(b * t * P, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
            with torch.no_grad():
                ccam_attention(q, k, v, (t,) * b, P, backend="triton")
            for x in (q, k, v):
                x.requires_grad_()
            ccam_attention(q, k, v, (t,) * b, P, backend="triton").sum().backward()
            torch.cuda.synchronize()
            print(f"prewarm T={t} B={b}: {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
