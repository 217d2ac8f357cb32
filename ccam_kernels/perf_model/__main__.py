"""python -m ccam_kernels.perf_model: the performance model's table (or --json records)."""

from __future__ import annotations

import argparse
import json
import sys

from . import BACKENDS, Shape, default_shapes, machine, predict
from ..config import CCAMConfig


def _frames(text: str) -> tuple:
    counts = tuple(int(x) for x in text.split(",") if x.strip())
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"frame counts must be positive integers, got {text!r}")
    return counts


def parse(argv=None) -> argparse.Namespace:
    cfg = CCAMConfig()
    p = argparse.ArgumentParser(prog="python -m ccam_kernels.perf_model",
                                description="Predicted CTAs, balance over 132 SMs, FLOPs, bytes and time of the "
                                            "cuda and triton kernels (a CPU model: docs/gpu.md). Without shape "
                                            "flags: the v1.2 shapes of issue 23.")
    p.add_argument("--num-query", type=int, help=f"N (default {cfg.num_query} with any shape flag)")
    p.add_argument("--heads", type=int, help=f"H (default {cfg.num_heads})")
    p.add_argument("--kv-heads", type=int, help="Hkv (default H)")
    p.add_argument("--head-dim", type=int, help=f"D (default {cfg.head_dim})")
    p.add_argument("--tokens-per-frame", type=int, help="P (default 729)")
    p.add_argument("--frame-counts", type=_frames, help="one batch's frame counts, e.g. 5,1,9 (default 96)")
    p.add_argument("--dtype", choices=("bf16", "fp16"), help="default bf16")
    p.add_argument("--backend", choices=BACKENDS, action="append",
                   help="default all: cuda (mma.sync), cuda_sm90 (the sm_90a forward), triton")
    p.add_argument("--sms", type=int, default=132, help="SMs to schedule over (default 132, an H100 SXM)")
    p.add_argument("--rate-cuda", type=float, default=machine.RATE_TFLOPS["cuda"],
                   help="issued tensor TF/s the cuda kernels sustain (stated estimate)")
    p.add_argument("--rate-cuda-sm90", type=float, default=machine.RATE_TFLOPS["cuda_sm90"],
                   help="issued tensor TF/s the cuda backend's sm_90a forward sustains (stated estimate)")
    p.add_argument("--rate-triton", type=float, default=machine.RATE_TFLOPS["triton"],
                   help="issued tensor TF/s the triton kernels sustain (stated estimate)")
    p.add_argument("--merge", choices=("fused", "pytorch"),
                   help="how the backends merge split partials (default: fused, one kernel)")
    p.add_argument("--json", action="store_true", help="print the records as a JSON list")
    return p.parse_args(argv)


def shapes_of(args) -> list:
    given = [args.num_query, args.heads, args.kv_heads, args.head_dim, args.tokens_per_frame, args.frame_counts,
             args.dtype]
    if all(x is None for x in given):
        return default_shapes()
    cfg = CCAMConfig()
    heads = args.heads or cfg.num_heads
    kv = args.kv_heads or heads
    if heads % kv:
        raise SystemExit(f"--heads {heads} is not a multiple of --kv-heads {kv}")
    return [Shape(num_query=args.num_query or cfg.num_query, heads=heads, kv_heads=kv,
                  head_dim=args.head_dim or cfg.head_dim, tokens_per_frame=args.tokens_per_frame or 729,
                  frame_counts=args.frame_counts or (96,), dtype=args.dtype or "bf16")]


def table(records: list) -> str:
    rows = ["| backend | kernel | frames | ctas | resident/SM | balance | issued TFLOP | live TFLOP | "
            "L2 GB | HBM GB | predicted ms | live TF/s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        frames = r["frames"]
        shown = f"{frames[0]}x{len(frames)}" if len(set(frames)) == 1 else ",".join(map(str, frames))
        kernel = r["kernel"] + (f" ({r['config']})" if r["backend"] == "triton" and "config" in r else "")
        live = f"{r['live_tflop']:.3f}" if "live_tflop" in r else ""
        if r["kernel"] == "merge":
            kernel = f"merge ({r['merge']}, {r['kernels']} kernels)"
        balance = "" if r["balance"] is None else f"{r['balance']:.2f}"
        live_rate = f"{r['live_tflop'] / r['predicted_ms'] * 1e3:.0f}" if "live_tflop" in r else ""
        cells = [r["backend"], kernel, shown, r["ctas"], r.get("resident_per_sm", ""), balance,
                 f"{r['issued_tflop']:.3f}", live, f"{r['l2_bytes'] / 1e9:.2f}", f"{r['hbm_bytes'] / 1e9:.2f}",
                 f"{r['predicted_ms']:.3f}", live_rate]
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse(argv)
    rates = {"cuda": args.rate_cuda, "cuda_sm90": args.rate_cuda_sm90, "triton": args.rate_triton}
    backends = tuple(args.backend or BACKENDS)
    merges = {b: args.merge for b in backends} if args.merge else None
    records = [r for s in shapes_of(args) for r in predict(s, backends, args.sms, rates, merges)]
    if args.json:
        json.dump(records, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(table(records))
        print(f"\nRates (stated, not measured): cuda {rates['cuda']:g} TF/s, cuda_sm90 {rates['cuda_sm90']:g} TF/s, "
              f"triton {rates['triton']:g} TF/s of "
              f"issued tensor FLOPs; HBM {machine.HBM_BYTES_PER_S / 1e12:g} TB/s; {args.sms} SMs. docs/gpu.md.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
