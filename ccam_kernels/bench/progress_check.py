"""How good were a run's time-left estimates? Reads the "progress" records of results.json
files (each finished case: its work, its measured parts, the estimate printed before it) and
compares every estimate with the time the run then took; ``--replay`` recomputes the estimates
with the model as it is now (ccam_kernels/bench/progress.py), so a change of the model can be
judged on runs already made.

    python -m ccam_kernels.bench.progress_check RESULTS.json [RESULTS.json ...] [--replay]

The actual time left before case i counts the cases i, i+1, ... whose bench had a finished case
before i: the ones the estimate covered (the others it reports as "not yet measured").
A number holds when it is within 0.8-1.5x of the actual; an interval ("cannot know closer")
holds when it holds the actual. Exit status 1 when a number did not hold (an interval said it
could not know: counted, not failed), 2 for a file without progress records.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from dataclasses import dataclass

from .progress import HIGH, LOW, Progress, Span, Spent


@dataclass(frozen=True)
class RecordedCase:
    """A finished case as results.json recorded it: what the estimate reads of a case."""

    label: str
    bench: str
    pass_: str
    dtype: str
    live: float
    dense: float
    gemm: float
    total: float

    def attention_work(self, dense: bool) -> float:
        return self.dense if dense else self.live

    def gemm_flops(self) -> float:
        return self.gemm

    def flops(self) -> float:
        return self.total


def _case(r: dict) -> RecordedCase:
    return RecordedCase(r["label"], r["bench"], r["pass"], r["dtype"], r["live_flops"], r["dense_flops"],
                        r["gemm_flops"], r["flops"])


def _spent(r: dict) -> dict:
    out = {}
    for name, (calls, seconds, timed, timed_s) in r["spent"].items():
        s = Spent()
        s.add(calls - timed, seconds - timed_s)
        s.add(timed, timed_s, timed=True)
        out[name] = s
    return out


def verdict(left: Span | None, actual: float) -> tuple[str, str | None, bool | None]:
    """(what was said, "number" or "interval", whether it held) for an estimate ``left`` of
    ``actual`` seconds. A number holds within 0.8-1.5x of the actual; an interval (said with
    "cannot know closer") when it holds the actual."""
    if left is None:
        return "-", None, None
    if left.point is not None:
        ratio = left.point / actual
        return f"{left.point:.0f} s ({ratio:.2f}x)", "number", LOW <= ratio <= HIGH
    return f"{left.lo:.0f}-{left.hi:.0f} s (cannot know closer)", "interval", left.lo <= actual <= left.hi


def check(records: list[dict], replay: bool = False) -> list[dict]:
    """One row per case: the seconds left after its start (actual), what was said before it,
    and whether that held. ``replay``: the estimates of the current model instead of the
    printed ones."""
    progress = Progress(lambda case: by_label[case.label]["input_bytes"])
    by_label = {r["label"]: r for r in records}
    rows = []
    for i, r in enumerate(records):
        measured = {q["bench"] for q in records[:i]}
        actual = sum(q["seconds"] for q in records[i:] if q["bench"] in measured)
        if replay:
            left = progress.seconds_left([_case(q) for q in records[i:]])
        else:
            lo, _, hi = r["left_before_s"] or (None, None, None)
            left = None if lo is None else Span(lo, hi)
        said, kind, held = verdict(left if measured else None, actual)
        rows.append({"case": r["label"], "actual_s": actual, "said": said, "kind": kind, "held": held})
        progress.finished(_case(r), r["seconds"], _spent(r), r["rates_tflops"])
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ccam_kernels.bench.progress_check", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="results.json files (or folders holding one)")
    ap.add_argument("--replay", action="store_true", help="the current model's estimates, not the printed ones")
    args = ap.parse_args(argv)
    counts = {"number": [0, 0], "interval": [0, 0]}  # kind -> [held, said]
    print("| run | before case | actual | said | held |\n|---|---|---:|---|---|")
    for name in args.results:
        path = pathlib.Path(name)
        path = path / "results.json" if path.is_dir() else path
        doc = json.loads(path.read_text())
        if not doc.get("progress"):
            print(f"{path}: no progress records (written by an older ccam-bench?)", file=sys.stderr)
            return 2
        first = True
        for i, row in enumerate(check(doc["progress"], args.replay)):
            if row["held"] is None:
                continue
            counts[row["kind"]][0] += row["held"]
            counts[row["kind"]][1] += 1
            print(f"| {path.parent.name if first else ''} | {i + 1}: {row['case']} | {row['actual_s']:.0f} | "
                  f"{row['said']} | {'yes' if row['held'] else 'NO'} |")
            first = False
    (nh, n), (ih, i_) = counts["number"], counts["interval"]
    print(f"\nnumbers: {nh} of {n} within {LOW}-{HIGH}x of the actual; \"cannot know closer\": {i_}, "
          f"of which {ih} intervals held the actual")
    # A number outside 0.8-1.5x is the estimate failing; an interval said it could not know.
    return 0 if nh == n else 1


if __name__ == "__main__":
    sys.exit(main())
