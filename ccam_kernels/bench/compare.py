"""``ccam-bench compare A B``: row-by-row latency comparison of two ccam-bench result files.

    ccam-bench compare before/ after/                 # folders holding results.json
    ccam-bench compare a.json b.json --backend triton --threshold 5 --markdown

Rows are matched on (bench, pass, backend, dtype, frame counts). Ratios read "B relative to A":
B/A < 1 means B is faster. Each latency is first normalized by the GEMM ceiling its run measured
beside it (the row's own case ceiling, else the run's rate of that dtype): B/A is
(B ms x B ceiling) / (A ms x A ceiling), so a machine that was busier during one run does not
read as code that got slower (--raw turns this off). A warning says when the two runs' ceilings
differ by more than 10%. A change within the threshold, or within the run-to-run spread
(spread_pct) of either row, is reported as "same". --dtypes float32:bfloat16 matches A's float32
rows with B's bfloat16 rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

RESULTS_FILE = "results.json"
COLUMNS = ("bench", "pass", "frames", "B", "dtype", "backend", "A ms", "B ms", "raw B/A", "B/A", "verdict")
# Two runs whose GEMM ceilings differ by more than this (%) ran on differently loaded machines.
CEILING_WARN_PCT = 10.0
_ROW_FIELDS = ("bench", "pass", "backend", "dtype", "frame_counts", "status")
_RIGHT_ALIGNED = {"frames", "B", "A ms", "B ms", "raw B/A", "B/A"}


def backend_label(row: dict) -> str:
    """The row's contestant, with its attention dropout when it ran with one (--dropout)."""
    return f"{row['backend']} dropout {row['dropout_p']:g}" if row.get("dropout_p") else row["backend"]


def row_key(row: dict, dtype: str | None = None) -> tuple:
    """(bench, pass, backend (with its dropout), dtype, frame counts): what identifies a
    measurement across runs. ``dtype`` replaces the row's (to match rows of two dtypes)."""
    return (row["bench"], row["pass"], backend_label(row), dtype or row["dtype"], tuple(row["frame_counts"]))


def row_ceiling(row: dict, doc: dict):
    """The GEMM rate (TFLOP/s) a row ran beside: its case's ceiling (schema 2), else its run's
    rate of the row's dtype, else the run's primary rate; None when the run has none."""
    if row.get("ceiling_tflops"):
        return row["ceiling_tflops"]
    ceilings = doc.get("ceilings") or {}
    rate = (ceilings.get("matmul_tflops_by_dtype") or {}).get(row.get("dtype"))
    return rate or ceilings.get("matmul_tflops") or None


def ceiling_warning(doc_a: dict, doc_b: dict, pairs) -> str | None:
    """A warning when the runs' ceilings differ by more than CEILING_WARN_PCT: the run-level GEMM
    rates, and how many matched rows ran beside case ceilings that far apart."""
    lines = []
    ca, cb = (doc_a.get("ceilings") or {}).get("matmul_tflops"), (doc_b.get("ceilings") or {}).get("matmul_tflops")
    if ca and cb and abs(cb / ca - 1) * 100 > CEILING_WARN_PCT:
        lines.append(f"WARNING: the runs' GEMM ceilings differ by {abs(cb / ca - 1) * 100:.0f}% ({ca:.3g} vs "
                     f"{cb:.3g} TFLOP/s): the machine's speed differed; ratios are normalized by each row's ceiling")
    apart = [1 for a, b in pairs if a and b and abs(b / a - 1) * 100 > CEILING_WARN_PCT]
    if apart:
        lines.append(f"WARNING: {len(apart)} of {len(pairs)} matched rows ran beside case ceilings more than "
                     f"{CEILING_WARN_PCT:.0f}% apart")
    return "\n".join(lines) or None


def _ok_ms(row: dict):
    """The row's median latency if it is usable for a ratio, else None."""
    ms = row.get("median_ms")
    if row.get("status") != "ok" or ms is None or not ms > 0:
        return None
    return ms


def _noise(row_a: dict, row_b: dict):
    spreads = [r.get("spread_pct") for r in (row_a, row_b) if r.get("spread_pct") is not None]
    return max(spreads) if spreads else None


def compare(doc_a: dict, doc_b: dict, *, threshold_pct: float = 3.0, normalize: bool = True,
            dtypes: tuple | None = None) -> list[dict]:
    """One entry per row key found in either document, in A's row order then B's extra rows.

    Comparable entries (both rows ok with a median) carry a_ms, b_ms, raw_ratio = b/a, the
    rows' ceilings ceiling_a and ceiling_b (row_ceiling), ratio = raw_ratio x ceiling_b /
    ceiling_a when ``normalize`` and both are known (else raw_ratio), speedup = 1 / ratio,
    noise_pct (the larger spread_pct of the two, None if neither has one) and a verdict
    "faster" / "slower" / "same" for B against A: "same" when
    |ratio - 1| * 100 <= max(noise_pct or 0, threshold_pct). Other entries have ratio and
    speedup None and verdict "only in A", "only in B" or "not comparable (status_a/status_b)".
    ``dtypes`` = (dtype of A, dtype of B): only those rows, matched across the two dtypes.
    """
    rows_a, rows_b = {}, {}
    for side, (rows, doc) in enumerate(((rows_a, doc_a), (rows_b, doc_b))):
        for row in doc["rows"]:
            if dtypes is not None and row["dtype"] != dtypes[side]:
                continue
            label = f"{dtypes[0]}:{dtypes[1]}" if dtypes is not None else None
            rows.setdefault(row_key(row, label), row)  # first occurrence wins on a duplicated key
    entries = []
    for key in list(rows_a) + [k for k in rows_b if k not in rows_a]:
        row_a, row_b = rows_a.get(key), rows_b.get(key)
        row = row_a if row_a is not None else row_b
        entry = {
            "key": key, "bench": row["bench"], "pass": row["pass"], "backend": backend_label(row),
            "dtype": row["dtype"], "frames": row.get("frames"), "batch": row.get("batch"),
            "status_a": row_a.get("status") if row_a else None,
            "status_b": row_b.get("status") if row_b else None,
            "a_ms": _ok_ms(row_a) if row_a else None, "b_ms": _ok_ms(row_b) if row_b else None,
            "ratio": None, "raw_ratio": None, "speedup": None, "noise_pct": None,
            "ceiling_a": row_ceiling(row_a, doc_a) if row_a else None,
            "ceiling_b": row_ceiling(row_b, doc_b) if row_b else None,
            "noisy": bool((row_a or {}).get("noisy") or (row_b or {}).get("noisy")),
        }
        if row_b is None:
            entry["verdict"] = "only in A"
        elif row_a is None:
            entry["verdict"] = "only in B"
        elif entry["a_ms"] is None or entry["b_ms"] is None:
            entry["verdict"] = f"not comparable ({entry['status_a']}/{entry['status_b']})"
        else:
            a_ms, b_ms = entry["a_ms"], entry["b_ms"]
            noise = _noise(row_a, row_b)
            raw = b_ms / a_ms
            ca, cb = entry["ceiling_a"], entry["ceiling_b"]
            ratio = raw * cb / ca if normalize and ca and cb else raw
            entry.update(ratio=ratio, raw_ratio=raw, speedup=1.0 / ratio, noise_pct=noise)
            # the epsilon keeps a change of exactly the limit (10.5 vs 10 ms at 5%) "same"
            if abs(ratio - 1.0) * 100.0 <= max(noise or 0.0, threshold_pct) + 1e-9:
                entry["verdict"] = "same"
            else:
                entry["verdict"] = "faster" if ratio < 1.0 else "slower"
        entries.append(entry)
    return entries


def _fmt_frames(frames) -> str:
    if isinstance(frames, (list, tuple)):
        return ",".join(str(f) for f in frames)
    return "-" if frames is None else str(frames)


def _fmt_ms(entry: dict, side: str) -> str:
    ms = entry[f"{side}_ms"]
    if ms is not None:
        return f"{ms:.3f}"
    status = entry[f"status_{side}"]
    return status if status not in (None, "ok") else "-"


def _cells(entry: dict) -> list[str]:
    ratio = "-" if entry["ratio"] is None else f"{entry['ratio']:.3f}"
    raw = "-" if entry["raw_ratio"] is None else f"{entry['raw_ratio']:.3f}"
    verdict = entry["verdict"] + (" (noisy)" if entry["noisy"] else "")
    return [str(entry["bench"]), str(entry["pass"]), _fmt_frames(entry["frames"]), str(entry["batch"]),
            str(entry["dtype"]), str(entry["backend"]), _fmt_ms(entry, "a"), _fmt_ms(entry, "b"),
            raw, ratio, verdict]


def _describe_run(label: str, doc: dict) -> str:
    commit = str(doc.get("commit", "unknown"))[:10] + (" (dirty)" if doc.get("commit_dirty") else "")
    text = f"{label}: {commit} · {doc.get('date', '?')} · {doc.get('device', '?')}"
    ceilings = doc.get("ceilings") or {}
    parts = []
    if ceilings.get("matmul_tflops") is not None:
        dtype = f" ({ceilings['matmul_dtype']})" if ceilings.get("matmul_dtype") else ""
        parts.append(f"GEMM {ceilings['matmul_tflops']:.3f} TFLOP/s{dtype}")
    if ceilings.get("copy_gbps") is not None:
        parts.append(f"copy {ceilings['copy_gbps']:.1f} GB/s")
    if parts:
        text += " · ceilings: " + ", ".join(parts)
    return text


def summarize(entries: list[dict]) -> str:
    """One line: counts of each verdict and the geometric-mean speedup of B over A."""
    counts = {}
    for e in entries:
        verdict = "not comparable" if e["verdict"].startswith("not comparable") else e["verdict"]
        counts[verdict] = counts.get(verdict, 0) + 1
    speedups = [e["speedup"] for e in entries if e["speedup"] is not None]
    text = (f"{len(speedups)} compared: {counts.get('faster', 0)} faster, {counts.get('slower', 0)} slower, "
            f"{counts.get('same', 0)} same")
    if speedups:
        geomean = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        text += f"; geometric-mean speedup of B over A {geomean:.3f}x"
    extra = [f"{counts[v]} {v}" for v in ("only in A", "only in B", "not comparable") if counts.get(v)]
    if extra:
        text += "; " + ", ".join(extra)
    return text


def device_warning(doc_a: dict, doc_b: dict):
    """A warning line when the two runs come from different devices or measured different
    problem settings (tokens per frame, projector config), else None."""
    warnings = []
    if doc_a.get("device") != doc_b.get("device"):
        warnings.append(f"WARNING: different devices ({doc_a.get('device')} vs {doc_b.get('device')}): "
                        f"the ratios compare different machines, not only different code")
    for key in ("tokens_per_frame", "config"):
        a, b = (doc_a.get("settings") or {}).get(key), (doc_b.get("settings") or {}).get(key)
        if a is not None and b is not None and a != b:
            warnings.append(f"WARNING: the runs measured different {key} ({a} vs {b}): same row names, different problems")
    return "\n".join(warnings) or None


def format_comparison(entries: list[dict], doc_a: dict, doc_b: dict, *, markdown: bool = False) -> str:
    """The comparison as a fixed-width text table (or a markdown table), with both runs
    described above it and a summary line below."""
    header = [_describe_run("A", doc_a), _describe_run("B", doc_b)]
    pairs = [(e["ceiling_a"], e["ceiling_b"]) for e in entries if e["ratio"] is not None]
    for warning in (device_warning(doc_a, doc_b), ceiling_warning(doc_a, doc_b, pairs)):
        if warning:
            header.append(warning)
    header.append("B/A = (B ms x B's GEMM ceiling) / (A ms x A's), the verdict's ratio; raw B/A = B ms / A ms."
                  if any(e["ratio"] != e["raw_ratio"] for e in entries) else "B/A = B ms / A ms (not normalized).")
    body = [_cells(e) for e in entries]
    if markdown:
        header = [line + "  " for line in header]  # markdown line breaks
        table = ["| " + " | ".join(COLUMNS) + " |",
                 "|" + "|".join("---:" if c in _RIGHT_ALIGNED else "---" for c in COLUMNS) + "|"]
        table += ["| " + " | ".join(cells) + " |" for cells in body]
    else:
        widths = [max([len(c)] + [len(cells[i]) for cells in body]) for i, c in enumerate(COLUMNS)]

        def line(cells):
            return "  ".join(cell.rjust(w) if col in _RIGHT_ALIGNED else cell.ljust(w)
                             for cell, w, col in zip(cells, widths, COLUMNS)).rstrip()

        table = [line(COLUMNS), line(["-" * w for w in widths])] + [line(cells) for cells in body]
    return "\n".join(header + [""] + table + ["", summarize(entries)])


class ResultError(Exception):
    """A path that is not a readable ccam-bench result."""


def load_result(path: str) -> dict:
    """The result document at ``path``: a results.json file or a folder holding one."""
    file = os.path.join(path, RESULTS_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ResultError(f"no such file: {file}")
    try:
        with open(file, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ResultError(f"cannot read {file} as JSON: {exc}") from None
    if not isinstance(doc, dict) or "schema" not in doc or not isinstance(doc.get("rows"), list):
        raise ResultError(f"{file} is not a ccam-bench result (no 'schema' and 'rows')")
    for i, row in enumerate(doc["rows"]):
        missing = [k for k in _ROW_FIELDS if not isinstance(row, dict) or k not in row]
        if missing:
            raise ResultError(f"{file}: row {i} lacks {', '.join(missing)}; not a ccam-bench result")
    return doc


def _names(text: str) -> set[str]:
    return {x.strip() for x in text.split(",") if x.strip()}


def _percent(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a percentage, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a percentage >= 0, got {text!r}")
    return value


def _dtype_pair(text: str) -> tuple:
    parts = text.split(":")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise argparse.ArgumentTypeError(f"expected A_DTYPE:B_DTYPE (e.g. float32:bfloat16), got {text!r}")
    return tuple(p.strip() for p in parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ccam-bench compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", metavar="A", help="baseline: a results.json file or a folder holding one")
    p.add_argument("b", metavar="B", help="candidate: a results.json file or a folder holding one")
    p.add_argument("--threshold", type=_percent, default=3.0,
                   help="changes up to this many percent (or the rows' spread, if larger) count as "
                        "'same' (default 3)")
    p.add_argument("--bench", type=_names, help="only these benches, comma-separated (attention, projector)")
    p.add_argument("--backend", type=_names, help="only these backends, comma-separated")
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--raw", action="store_true",
                   help="compare latencies as measured, not normalized by each row's GEMM ceiling")
    p.add_argument("--dtypes", type=_dtype_pair, metavar="A_DTYPE:B_DTYPE",
                   help="compare A's rows of one dtype with B's rows of another, e.g. float32:bfloat16")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        doc_a, doc_b = load_result(args.a), load_result(args.b)
    except ResultError as exc:
        print(f"ccam-bench compare: error: {exc}", file=sys.stderr)
        return 2
    entries = compare(doc_a, doc_b, threshold_pct=args.threshold, normalize=not args.raw, dtypes=args.dtypes)
    for field, wanted in (("bench", args.bench), ("backend", args.backend)):
        if not wanted:
            continue
        present = {e[field] for e in entries}
        unknown = sorted(set(wanted) - present)
        if unknown:
            print(f"ccam-bench compare: error: --{field} {unknown} is in neither run; present: {sorted(present)}",
                  file=sys.stderr)
            return 2
        entries = [e for e in entries if e[field] in wanted]
    print(format_comparison(entries, doc_a, doc_b, markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
