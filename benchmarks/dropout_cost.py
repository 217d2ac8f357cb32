"""The torch backend's cost of attention dropout on CPU: ms per call with dropout_p = 0.1 vs 0
(the fused CPU engine, and the explicit engine that dropout runs on), forward and fwd+bwd.

    python benchmarks/dropout_cost.py [--threads 2] [--repeats 7] [N H D T P]

(ccam-bench has no --dropout yet: issue 22 item 5 is open.) Prints one line per measurement."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ccam_kernels.attention import resolve_backend
from ccam_kernels.checks import check_attention_args


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("shape", type=int, nargs="*", default=[256, 8, 64, 16, 64], help="N H D T P")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N, H, D, T, P = args.shape
    q, k, v = torch.randn(N, H, D), torch.randn(T * P, H, D), torch.randn(T * P, H, D)
    dout = torch.randn(1, N, H, D)

    def call(p, variant, backward):
        problem = check_attention_args(q, k, v, [T], P, None, p)
        backend = resolve_backend("torch", q, problem)
        qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))
        out = backend.run(qq, kk, vv, problem, seed=torch.tensor(5) if p else None, variant=variant)
        if backward:
            out.backward(dout)

    print(f"torch backend, CPU, {args.threads} threads, N={N} H={H} D={D} T={T} P={P} float32")
    for backward in (False, True):
        for p, variant in ((0.0, ""), (0.0, "explicit"), (0.1, "explicit")):
            times = []
            for _ in range(args.repeats + 1):
                t0 = time.perf_counter()
                call(p, variant, backward)
                times.append(time.perf_counter() - t0)
            ms = statistics.median(times[1:]) * 1e3
            print(f"{'fwd+bwd' if backward else 'fwd'} dropout_p={p} engine={variant or 'best'}: {ms:.1f} ms "
                  f"(min {min(times[1:]) * 1e3:.1f})")


if __name__ == "__main__":
    main()
