"""ccam-bench: our attention and projector against every anchor, across frame counts.

    ccam-bench                         # v1.2 shapes, 16..96 frames, forward, every contestant
    ccam-bench --quick                 # frames 1 and 16 only (1 min 49 s on 2 CPU cores, measured)
    ccam-bench --full                  # every sweep: 1..512 frames, B 1/4/8, ragged, all passes
    ccam-bench --pass fwd,bwd,fwd+bwd --frames 96 --batch 1,8 --backends reference,torch,flex
    ccam-bench --ragged 16,96,33,64    # add a ragged batch (repeat the flag for more)
    ccam-bench --max-minutes 6         # fit a time budget: fewer repeats, then skip cases
    ccam-bench --pass fwd+bwd --dropout 0.1   # attention with and without dropout: its cost
                                       # (run order: dtype, --pass, --batch, --frames, ragged last)
    ccam-bench compare A.json B.json   # per-row ratio of two runs (files or output folders)

Explicit flags override what --quick and --full choose.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import TYPE_CHECKING

# No torch import at the top: `ccam-bench --help` (and a bad flag) answer without it; what runs
# cases imports it where it is used.
from .names import ALL_NAMES, BENCHES, DTYPE_NAMES, PASSES, is_long_request

from .arg_types import int_at_least, int_list

if TYPE_CHECKING:
    import torch

    from .runner import BenchCase
DEFAULT_FRAMES = (16, 32, 48, 64, 96)
QUICK_FRAMES = (1, 16)
FULL_FRAMES = (1, 16, 32, 48, 64, 96, 128, 256, 512)
FULL_BATCHES = (1, 4, 8)
FULL_RAGGED = ((16, 96, 33, 64),)


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not (value > 0 and math.isfinite(value)):  # nan and inf would disable the budget
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text!r}")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a dropout probability in (0, 1), got {text!r}")
    return value


def _name_list(choices):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"expected names from {list(choices)}, got {text!r}")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ccam-bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="ccam-bench [options]              (the options below)\n"
              "       ccam-bench --bench long [options]   (long videos: ccam-bench --bench long --help)\n"
              "       ccam-bench compare A B [options]    (two runs: ccam-bench compare --help)",
    )
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help=f"frames {QUICK_FRAMES}, 2 repeats per round")
    preset.add_argument("--full", action="store_true",
                        help=f"frames {FULL_FRAMES}, batches {FULL_BATCHES}, ragged {FULL_RAGGED[0]}, "
                             "every pass, bf16 and fp16 on GPU")
    p.add_argument("--bench", type=_name_list(BENCHES), help="attention, projector or both (default both); `--bench long` is the long-video benchmark, with its own flags: ccam-bench --bench long --help")
    p.add_argument("--pass", dest="passes", type=_name_list(PASSES), help="fwd, bwd, fwd+bwd (default fwd)")
    p.add_argument("--backward", action="store_true", help="shorthand for --pass fwd,fwd+bwd")
    p.add_argument("--frames", type=int_list, help=f"frames per video, comma-separated (default {DEFAULT_FRAMES})")
    p.add_argument("--batch", type=int_list, help="videos per batch, comma-separated (default 1)")
    p.add_argument("--ragged", type=int_list, action="append", metavar="T1,T2,...",
                   help="a ragged batch given by its frame counts; repeat for more")
    p.add_argument("--backends", type=_name_list(ALL_NAMES),
                   help=f"comma-separated, from {list(ALL_NAMES)} (default: every one that runs here)")
    p.add_argument("--dtype", type=_name_list(DTYPE_NAMES),
                   help="comma-separated; default bfloat16 on GPU (--full: bfloat16,float16), float32 on CPU")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--repeats", type=int_at_least(1),
                   help="timed calls per backend per round, at most (default 2 on CPU, 15 on GPU)")
    p.add_argument("--rounds", type=int_at_least(1), default=2,
                   help="interleaved timing rounds; the spread column compares them (default 2)")
    p.add_argument("--warmup", type=int_at_least(0), default=None, help="untimed calls (default 1 CPU, 3 GPU)")
    p.add_argument("--max-minutes", type=_positive_float,
                   help="time budget: repeats shrink to fit, cases past the budget become 'skipped' rows")
    p.add_argument("--config", metavar="PATH",
                   help="projector config JSON (flat or under projector_config); default Video-CCAM v1.2")
    p.add_argument("--tokens-per-frame", type=int_at_least(1), default=729, help="P (default 729)")
    p.add_argument("--dropout", type=_probability, metavar="P",
                   help="attention bench only (the default --bench then): every contestant timed with attention "
                        "dropout P and without it, interleaved; the table gives the cost (ms with / without). "
                        "Ours and the reference apply our mask, SDPA its own; flex has none (unsupported)")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    return p


def build_cases(args, device: "torch.device") -> "list[BenchCase]":
    import torch

    from ..config import CCAMConfig
    from .runner import BenchCase

    gpu = device.type == "cuda"
    config = CCAMConfig.from_json_file(args.config) if args.config else CCAMConfig()
    frames = args.frames or (QUICK_FRAMES if args.quick else FULL_FRAMES if args.full else DEFAULT_FRAMES)
    batches = args.batch or (FULL_BATCHES if args.full else (1,))
    ragged = tuple(args.ragged or (FULL_RAGGED if args.full else ()))
    if args.passes:
        passes = args.passes
    elif args.backward:
        passes = ("fwd", "fwd+bwd")
    else:
        passes = PASSES if args.full else ("fwd",)
    if args.dtype:
        dtypes = args.dtype
    else:
        dtypes = (("bfloat16", "float16") if args.full else ("bfloat16",)) if gpu else ("float32",)
    benches = args.bench or (("attention",) if args.dropout else BENCHES)  # (main refuses --dropout for projector)
    shapes = list(dict.fromkeys([(t,) * b for b in batches for t in frames] + [tuple(r) for r in ragged]))
    # Run order = priority order when a time budget cuts the tail: dtypes, passes, batches and
    # frames in the order given (ragged batches last), attention and projector side by side.
    # Tables sort anyway.
    return [
        BenchCase(bench, pass_, counts, getattr(torch, dtype), config, args.tokens_per_frame, args.dropout or 0.0)
        for dtype in dtypes for pass_ in passes for counts in shapes for bench in benches
    ]


def _why_not_here(name: str, device: "torch.device") -> str:
    from ..attention import BACKENDS
    from .contestants import SDPA_ANCHORS

    if name in BACKENDS:
        return BACKENDS[name].refuses_placement(device.type) or "not available"
    if name in SDPA_ANCHORS:
        return f"it runs on {', '.join(SDPA_ANCHORS[name][1])}, not {device.type}"
    return "not available"


def choose_contestants(args, device: "torch.device", benches) -> dict:
    """bench -> names, "reference" first; raises ValueError naming what cannot run here."""
    from .contestants import ATTENTION_CONTESTANTS, PROJECTOR_CONTESTANTS, default_contestants

    chosen = {}
    for bench in benches:
        here = default_contestants(bench, device, explicit=bool(args.backends))
        allowed = PROJECTOR_CONTESTANTS if bench == "projector" else ATTENTION_CONTESTANTS
        if args.backends:
            names = [n for n in args.backends if n in allowed]
            unusable = [n for n in names if n not in here]
            if unusable:
                why = "; ".join(f"{n}: {_why_not_here(n, device)}" for n in unusable)
                raise ValueError(f"backends {unusable} are not usable here ({why}); usable for {bench}: {here}")
            if not names:
                raise ValueError(f"none of --backends {list(args.backends)} runs the {bench} bench "
                                 f"(it runs {list(allowed)}); add one or drop {bench} from --bench")
        else:
            names = here
        chosen[bench] = sorted(names, key=lambda n: n != "reference")
    return chosen


def skipped_notes(contestants: dict, device: torch.device) -> list[str]:
    """One line per backend of ours that no bench runs here, with the reason (e.g. triton not
    installed, with the command that installs it), so a missing row is never a silent one."""
    from ..attention import BACKENDS
    from .contestants import OURS

    running = {n for names in contestants.values() for n in names}
    return [f"ccam-bench: no {name} rows: {BACKENDS[name].refuses_placement(device.type, auto=True)}"
            for name in OURS if name not in running and BACKENDS[name].refuses_placement(device.type, auto=True)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        from .compare import main as compare_main

        return compare_main(argv[1:])
    if is_long_request(argv):  # its own runner and flags: see bench/long_video.py
        from .long_video import main as long_main

        return long_main(argv)
    args = build_parser().parse_args(argv)
    import torch

    from .out_dir import check_out_dir
    from .report import build_result, format_table, git_commit, write_outputs
    from .runner import Settings, run_suite

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("ccam-bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    gpu = device.type == "cuda"
    if args.dropout and args.bench and "projector" in args.bench:
        print("ccam-bench: --dropout times the attention bench only (the projector bench runs its module in eval "
              "mode): give --bench attention", file=sys.stderr)
        return 2
    try:
        cases = build_cases(args, device)
    except (OSError, ValueError, TypeError) as exc:
        print(f"ccam-bench: cannot read --config {args.config}: {exc}", file=sys.stderr)
        return 2
    try:
        contestants = choose_contestants(args, device, sorted({c.bench for c in cases}, key=BENCHES.index))
    except ValueError as exc:
        print(f"ccam-bench: {exc}", file=sys.stderr)
        return 2
    try:
        check_out_dir(args.out)
    except ValueError as exc:
        print(f"ccam-bench: {exc}", file=sys.stderr)
        return 2
    settings = Settings(
        warmup=args.warmup if args.warmup is not None else (3 if gpu else 1),
        repeats=args.repeats or (2 if args.quick or not gpu else 15),
        rounds=args.rounds,
        max_seconds=args.max_minutes * 60 if args.max_minutes else None,
    )
    summary = "; ".join(f"{bench}: {', '.join(names)}" for bench, names in contestants.items())
    print(f"ccam-bench: {len(cases)} cases on {device} ({summary}); {settings.rounds} rounds of up to "
          f"{settings.repeats} timed calls per row", file=sys.stderr)
    for note in skipped_notes(contestants, device):
        print(note, file=sys.stderr)
    commit = git_commit()  # the code measured is the code at the start

    def document(result):  # the problem measured goes with the numbers
        doc = build_result(result, device, commit)
        doc["settings"].update(tokens_per_frame=args.tokens_per_frame, config=cases[0].config.to_dict())
        return doc

    def checkpoint(partial):  # every finished case is on disk at once, in case the run is cut short
        write_outputs(document(partial), args.out, plots=False)

    doc = document(run_suite(cases, contestants, device, settings, on_case=checkpoint))
    print()
    print(format_table(doc["rows"]))
    paths = write_outputs(doc, args.out)
    print("\nwrote " + ", ".join(paths.values()))
    broken = [r for r in doc["rows"] if r["status"] in ("error", "wrong") and r["kind"] != "anchor"]
    for row in (r for r in doc["rows"] if r["status"] in ("error", "wrong")):
        print(f"ccam-bench: error in {row['backend']} ({row['bench']} {row['pass']} T={row['frames']} "
              f"B={row['batch']}): {row['reason']}", file=sys.stderr)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
