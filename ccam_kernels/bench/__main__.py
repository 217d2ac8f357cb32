"""ccam-bench: benchmark the attention op and the projector across frame counts.

    ccam-bench                      # v1.2 shapes, 16..96 frames, forward, every usable backend
    ccam-bench --backward           # also forward+backward
    ccam-bench --quick              # a reduced sweep (about a minute on 2 CPU cores)
    ccam-bench --frames 96 --backends reference,torch --bench attention --dtype float32
"""

from __future__ import annotations

import argparse
import sys

import torch

from ..attention import BACKENDS, available_backends
from ..config import CCAMConfig
from .report import format_table, write_outputs, build_result
from .runner import BENCHES, BenchCase, run_suite

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_FRAMES = (16, 32, 48, 64, 96)
QUICK_FRAMES = (1, 16)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1, got {text!r}")
    return values


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return int(text)
    return parse


def _name_list(choices):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(x.strip() for x in text.split(",") if x.strip())
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected names from {list(choices)}, got {text!r}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ccam-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"reduced sweep: frames {QUICK_FRAMES}, 2 repeats")
    p.add_argument("--frames", type=_int_list, help=f"frames per video, comma-separated (default {DEFAULT_FRAMES})")
    p.add_argument("--batch", type=_int_list, default=(1,), help="videos per batch, comma-separated (default 1)")
    p.add_argument("--backends", type=_name_list(tuple(BACKENDS)),
                   help="comma-separated backends (default: every usable one)")
    p.add_argument("--bench", type=_name_list(BENCHES), default=BENCHES, help="attention, projector or both")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--backward", action="store_true", help="also time forward+backward")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--repeats", type=_int_at_least(1), help="timed calls per row (default 3 on CPU, 20 on GPU)")
    p.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed calls before timing (default 1)")
    p.add_argument("--tokens-per-frame", type=_int_at_least(1), default=729, help="P (default 729)")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ccam-bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    frames = args.frames or (QUICK_FRAMES if args.quick else DEFAULT_FRAMES)
    repeats = args.repeats or (2 if args.quick else (20 if device.type == "cuda" else 3))
    usable = available_backends()
    backends = args.backends or tuple(usable)
    unusable = [b for b in backends if b not in usable]
    if unusable:
        print(f"ccam-bench: backends {unusable} are not usable here; usable: {usable}", file=sys.stderr)
        return 2
    backends = sorted(backends, key=lambda b: b != "reference")  # the anchor first
    passes = ("fwd", "fwd+bwd") if args.backward else ("fwd",)
    cfg = CCAMConfig()
    cases = [
        BenchCase(bench, pass_, (t,) * b, dtype, cfg, args.tokens_per_frame)
        for bench in args.bench for pass_ in passes for b in args.batch for t in frames
    ]
    print(f"ccam-bench: {len(cases)} cases x {len(backends)} backends {list(backends)} on {device}, "
          f"{str(dtype).replace('torch.', '')}, {repeats} timed calls each", file=sys.stderr)
    result = run_suite(cases, backends, device, warmup=args.warmup, repeats=repeats)
    doc = build_result(result, device)
    print()
    print(format_table(doc["rows"]))
    paths = write_outputs(doc, args.out)
    print("\nwrote " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
