"""The torch backend's cost of attention dropout on CPU: ms per call with dropout_p = 0.1 vs 0
(the fused CPU engine, and the explicit engine that dropout runs on), forward and fwd+bwd, with
the mask from the native CPU build (csrc/cpu) and from the torch Philox it replaces.

    python benchmarks/dropout_cost.py [--threads 2] [--repeats 7] [N H D T P]

The configurations run interleaved (one call of each per round, in a rotating order), so a
change of the machine's load hits them alike; medians over the rounds, and the ratios of the
dropout rows to the best engine without dropout. ccam-bench --dropout P times the same thing
for the whole backend. Prints one line per measurement."""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch

from ccam_kernels import cpu_native
from ccam_kernels.attention import resolve_backend
from ccam_kernels.checks import check_attention_args


@contextlib.contextmanager
def mask_source(native: bool):
    """Run with (native) or without (torch Philox) the native CPU library."""
    saved = dict(cpu_native._state)
    if not native:
        cpu_native._state["library"] = None
    try:
        yield
    finally:
        cpu_native._state.clear()
        cpu_native._state.update(saved)


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
    native = cpu_native.library() is not None

    def call(p, variant, backward):
        problem = check_attention_args(q, k, v, [T], P, None, p)
        backend = resolve_backend("torch", q, problem)
        qq, kk, vv = (x.detach().requires_grad_(backward) for x in (q, k, v))
        out = backend.run(qq, kk, vv, problem, seed=torch.tensor(5) if p else None, variant=variant)
        if backward:
            out.backward(dout)

    configs = [(0.0, "", True, "p=0 engine=best"), (0.0, "explicit", True, "p=0 engine=explicit"),
               (0.1, "explicit", True, "p=0.1 mask=native" if native else "p=0.1 mask=torch (no native build)")]
    if native:
        configs.append((0.1, "explicit", False, "p=0.1 mask=torch Philox"))
    print(f"torch backend, CPU, {args.threads} threads, N={N} H={H} D={D} T={T} P={P} float32, "
          f"{args.repeats} interleaved rounds, load {os.getloadavg()[0]:.1f}")
    for backward in (False, True):
        times = {c: [] for c in configs}
        for c in configs:  # warm-up
            with mask_source(c[2]):
                call(c[0], c[1], backward)
        for r in range(args.repeats):
            for c in configs[r % len(configs):] + configs[:r % len(configs)]:
                with mask_source(c[2]):
                    t0 = time.perf_counter()
                    call(c[0], c[1], backward)
                    times[c].append(time.perf_counter() - t0)
        base = statistics.median(times[configs[0]])
        for c in configs:
            ms = statistics.median(times[c]) * 1e3
            print(f"{'fwd+bwd' if backward else 'fwd'} {c[3]}: {ms:.1f} ms (min {min(times[c]) * 1e3:.1f}), "
                  f"{ms / (base * 1e3):.2f}x p=0 best")
    print(f"load after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
