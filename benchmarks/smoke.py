"""Correctness smoke of every usable backend at the Video-CCAM v1.2 shape, forward and backward,
against the reference backend in float32 on the same inputs. The GPU suite's first check after
the build (about a minute, most of it Triton's first compile): a backend that is wrong at the
real shape shows here before any benchmark is timed.

    python benchmarks/smoke.py [--device cuda] [--dtype bfloat16] [--frames 16] [--batch 1]
                               [--require triton,cuda] [--backends ...] [--json smoke.json] [--tiny]

Prints one markdown table (backend, output and gradient errors, verdict) and exits 1 when a
backend is off by more than the tolerance, raises, or gives NaN/inf, or a --require'd backend
is not usable (its reason is printed). --tiny runs a small case (for the CPU test of this
script). Inputs are fresh random data from a seeded generator; outputs are poisoned first.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

import torch

from ccam_kernels import available_backends, ccam_attention
from ccam_kernels.attention import BACKENDS

# ||got - ref|| / ||ref|| against the float32 reference: the bounds of docs/reference.md §7 against float64,
# which the float32 reference is far inside of (about 1e-6); gradients get twice as much.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
V12 = dict(num_query=1024, num_heads=16, num_kv_heads=16, head_dim=64, tokens_per_frame=729)
TINY = dict(num_query=37, num_heads=4, num_kv_heads=2, head_dim=16, tokens_per_frame=7)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.double(), ref.double()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).norm() / ref.norm()).item()


def inputs(shape: dict, counts: list[int], dtype, device, seed: int = 0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    N, H, Hkv, D, P = (shape[k] for k in ("num_query", "num_heads", "num_kv_heads", "head_dim", "tokens_per_frame"))
    L = sum(counts) * P

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    return randn(N, H, D), randn(L, Hkv, D), randn(L, Hkv, D), randn(len(counts), N, H, D)


@contextlib.contextmanager
def nan_poison():
    """torch.empty / empty_like give NaN-filled floating tensors, so an element of an output or
    gradient that a kernel never writes shows as NaN (an infinite error) instead of old memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **kw: poison(real_empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: poison(real_empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


def run(backend: str, q, k, v, dout, counts, P):
    """(out, dq, dk, dv) of one backend, computed from leaf copies of the inputs."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    with nan_poison():
        out = ccam_attention(*leaves, counts, P, backend=backend)
        out.backward(dout)
    return (out.detach(), *(leaf.grad for leaf in leaves))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--require", default="", help="comma-separated backends that must be usable")
    p.add_argument("--backends", default="", help="comma-separated: check only these (default every usable one)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--tiny", action="store_true", help="a small shape instead of v1.2's")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    shape = TINY if args.tiny else V12
    counts, P = [args.frames] * args.batch, shape["tokens_per_frame"]
    torch.backends.cuda.matmul.allow_tf32 = False

    usable = available_backends()
    # Quickest first: Triton's first compile (and autotuning) takes most of the minute, and
    # a smoke stopped at its time limit should still have measured the others.
    backends = sorted((b for b in usable if b != "reference" and BACKENDS[b].refuses_placement(device.type, dtype) is None
                       and (not args.backends or b in args.backends.split(","))), key=("torch", "cuda", "triton").index)
    problems = [f"{b}: required but not usable here: {BACKENDS[b].why_unusable() or 'refuses ' + str(dtype)}"
                for b in args.require.split(",") if b and b not in backends]
    if not backends:
        problems.append("no backend besides the reference is usable here")
    shape_text = (f"N={shape['num_query']} H={shape['num_heads']} Hkv={shape['num_kv_heads']} D={shape['head_dim']} "
                  f"P={P} frames={counts} {str(dtype).replace('torch.', '')} on {device}")
    # Printed as it goes (flushed): the suite keeps whatever a run stopped at its limit printed.
    print(f"Smoke ({shape_text}), against the float32 reference; limits {TOLERANCE[dtype]:g} (out), "
          f"{2 * TOLERANCE[dtype]:g} (grads). Usable backends: {usable}", flush=True)
    for line in problems:
        print(line, flush=True)
    print("\n| backend | out | dq | dk | dv | s | verdict |\n|---|---|---|---|---|---|---|", flush=True)
    q, k, v, dout = inputs(shape, counts, dtype, device)
    start = time.perf_counter()
    want = run("reference", *(x.float() for x in (q, k, v, dout)), counts, P)
    rows = []
    for backend in backends:
        t0 = time.perf_counter()
        try:
            got = run(backend, q, k, v, dout, counts, P)
            errors = [rel_err(g, w) for g, w in zip(got, want)]
            limits = [TOLERANCE[dtype]] + [2 * TOLERANCE[dtype]] * 3
            ok = all(e <= lim for e, lim in zip(errors, limits))
            row = dict(backend=backend, out=errors[0], dq=errors[1], dk=errors[2], dv=errors[3], ok=ok, error=None,
                       seconds=time.perf_counter() - t0)
            print(f"| {backend} | {row['out']:.1e} | {row['dq']:.1e} | {row['dk']:.1e} | {row['dv']:.1e} | "
                  f"{row['seconds']:.1f} | {'ok' if ok else 'TOO FAR OFF'} |", flush=True)
        except Exception as exc:  # noqa: BLE001 - one broken backend must not hide the others
            row = dict(backend=backend, ok=False, error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)
            print(f"| {backend} | | | | | {row['seconds']:.1f} | ERROR {row['error'][:300]} |", flush=True)
        rows.append(row)
    print(f"\n({time.perf_counter() - start:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": shape_text, "usable": usable, "rows": rows, "problems": problems}, f, indent=1)
    return 0 if rows and all(r["ok"] for r in rows) and not problems else 1


if __name__ == "__main__":
    sys.exit(main())
