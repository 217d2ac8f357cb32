"""Turning benchmark results into the results JSON (docs/reference.md §9), a text/markdown table and a plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone

import torch

from .plots import write_plots

COLUMNS = [
    ("bench", "bench", "{}"), ("pass", "pass", "{}"), ("frames", "frames", "{}"), ("batch", "B", "{}"),
    ("dtype", "dtype", "{}"), ("backend", "backend", "{}"), ("dropout_p", "dropout", "{:g}"),
    ("median_ms", "median ms", "{:.3f}"), ("no_dropout_ms", "ms w/o dropout", "{:.3f}"),
    ("dropout_cost", "x w/o dropout", "{:.2f}"),
    ("spread_pct", "spread %", "{:.1f}"), ("tflops", "TFLOP/s", "{:.3f}"),
    ("pct_of_ceiling", "% ceiling", "{:.1f}"), ("speedup_vs_dense", "x dense", "{:.2f}"),
    ("dense_peer", "dense peer", "{}"), ("speedup_vs_flex", "x flex", "{:.2f}"),
    ("x_floor", "x floor", "{:.2f}"), ("max_rel_err", "rel err", "{:.1e}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
    ("compile_s", "compile s", "{:.1f}"), ("ceiling_tflops", "ceiling TFLOP/s", "{:.3g}"),
    ("noisy", "noisy", "{}"),
]


def git_commit() -> tuple[str, bool]:
    """(sha of HEAD, whether the tree has uncommitted changes) of the source checkout."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {model} ({torch.get_num_threads()} threads)"


_BENCH_ORDER = {"attention": 0, "projector": 1}
_PASS_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def sorted_rows(rows: list) -> list:
    """Rows in reading order: bench, pass, dtype, uniform batches by (B, frames), then ragged
    ones; backends keep their run order (reference first)."""
    def key(row):
        ragged = len(set(row["frame_counts"])) > 1
        return (_BENCH_ORDER.get(row["bench"], 9), _PASS_ORDER.get(row["pass"], 9), row["dtype"], ragged,
                row["batch"], row["frame_counts"])
    return sorted(rows, key=key)


def build_result(result: dict, device: torch.device, commit: tuple | None = None) -> dict:
    """The results document (docs/reference.md §9.1). ``commit`` = git_commit() taken when the run started (what was
    measured); by default it is read now."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    sha, dirty = commit or git_commit()
    return {
        "schema": 2,
        "commit": sha,
        "commit_dirty": dirty,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "ceilings": result["ceilings"],
        "settings": result.get("settings"),
        "elapsed_s": result.get("elapsed_s"),
        "complete": result.get("complete", True),
        "progress": result.get("progress", []),
        "rows": sorted_rows(result["rows"]),
    }


def _cell(row, key, fmt):
    value = row.get(key)
    if key == "noisy":
        return "NOISY" if value else "-"
    if value is None:
        return row.get("status", "-") if key == "median_ms" else "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return fmt.format(value)


DROPOUT_COLUMNS = ("dropout_p", "no_dropout_ms", "dropout_cost")


def _columns(rows) -> list:
    """COLUMNS, without the dropout ones when no row has dropout (a run without --dropout)."""
    if any(r.get("dropout_p") for r in rows):
        return COLUMNS
    return [c for c in COLUMNS if c[0] not in DROPOUT_COLUMNS]


def format_table(rows, markdown: bool = False) -> str:
    columns = _columns(rows)
    header = [title for _, title, _ in columns]
    body = [[_cell(r, key, fmt) for key, _, fmt in columns] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]
    fmt_line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt_line(header), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in body])


def markdown_text(doc: dict) -> str:
    """results.md: the run described, then every row with every column."""
    out = []
    c = doc["ceilings"]
    rates = ", ".join(f"{k} {v:.2f}" for k, v in c.get("matmul_tflops_by_dtype", {c["matmul_dtype"]: c["matmul_tflops"]}).items())
    failed = [r for r in doc["rows"] if r.get("status", "ok") != "ok"]
    out.append(f"# ccam-bench results\n\n{doc['date']} · commit `{doc['commit'][:12]}`"
            f"{' (dirty tree)' if doc.get('commit_dirty') else ''} · {doc['device']} · torch {doc['torch']}"
            f" · triton {doc.get('triton')}\n\n")
    if not doc.get("complete", True):
        out.append("**Partial run**: written after a case finished; the run did not reach its end.\n\n")
    out.append(f"Ceilings measured at the start of this run: GEMM TFLOP/s {rates}; copy {c['copy_gbps']:.1f} GB/s.\n\n"
            "TFLOP/s counts live FLOPs only (masked pairs excluded), the same count for every backend; "
            "'% ceiling' divides it by 'ceiling TFLOP/s', the GEMM rate of the row's dtype measured "
            "before and after its own case (the better of the two). 'noisy' marks a row whose case's "
            "ceiling moved more than 20% between those two, or above 100% of its ceiling: its numbers "
            "do not hold. 'spread %' is how far apart the "
            "medians of the interleaved timing rounds are. 'x dense' is the speedup over the fastest dense-mask peer of the "
            "same case ('dense peer': an SDPA anchor with the dense mask where one ran, else the reference, "
            "the same SDPA call per sample); 'x flex' the speedup over FlexAttention. The reference anchors "
            "the errors, not the speed (its ratio stays in the JSON as speedup_vs_reference). "
            "'x floor' (projector) is the latency over the roofline floor, every FLOP at the GEMM rate. "
            "'rel err' is the largest ||x - x_ref|| / ||x_ref|| over the output (and, when the pass has a "
            "backward, the input gradients: q, k, v; for the projector the features, query and k_proj "
            "weight) against the reference evaluated in float32 in the same run. 'peak MB' is the peak "
            "memory of a call above its inputs; 'compile s' is the first call of a compiled anchor.\n\n")
    if any(r.get("dropout_p") for r in doc["rows"]):
        out.append("With --dropout every contestant ran twice in the same interleaved rounds: without dropout and "
                   "with attention dropout 'dropout' (ours and the reference with the library's mask, SDPA with its "
                   "own, whose 'rel err' is therefore not measured; flex has none). 'ms w/o dropout' is the same "
                   "contestant's median without it and 'x w/o dropout' the ratio: the cost of dropout "
                   "(1.25 = +25%). Speedups compare rows of the same dropout.\n\n")
    out.append(format_table(doc["rows"], markdown=True) + "\n")
    noisy = [r for r in doc["rows"] if r.get("noisy")]
    if noisy:
        out.append("\nNoisy rows (their numbers do not hold; run them again on a quieter machine):\n\n")
        for r in noisy:
            out.append(f"- {r['bench']} {r['pass']} T={r['frames']} B={r['batch']} {r['dtype']} "
                    f"{r['backend']}: {r.get('noisy_reason')}\n")
    if failed:
        out.append("\nRows without a time:\n\n")
        for r in failed:
            out.append(f"- {r['bench']} {r['pass']} T={r['frames']} B={r['batch']} {r['dtype']} "
                    f"{r['backend']}: {r['status']} ({r.get('reason')})\n")
    return "".join(out)


def _replace(path: str, write) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        write(f)
    os.replace(tmp, path)


def _ms(value: float) -> str:
    """Three significant digits without exponents: 2517, 84.2, 0.731."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def format_summary(doc: dict) -> str:
    """The short table: one line per case, one column per backend, "median ms (x dense)";
    for projector rows also the roofline floor. Markdown."""
    rows = doc["rows"]

    def column(r):  # one column per contestant, and per dropout with --dropout
        return f"{r['backend']} dropout {r['dropout_p']:g}" if r.get("dropout_p") else r["backend"]

    backends = list(dict.fromkeys(column(r) for r in sorted(rows, key=lambda r: r["kind"] != "reference")))
    cases = list(dict.fromkeys((r["bench"], r["pass"], _cell(r, "frames", "{}"), r["batch"], r["dtype"]) for r in rows))
    cells = {}
    floors = {}
    for r in rows:
        case = (r["bench"], r["pass"], _cell(r, "frames", "{}"), r["batch"], r["dtype"])
        if r.get("median_ms") is None:
            text = r.get("status", "-")
        else:
            text = _ms(r["median_ms"])
            if r.get("speedup_vs_dense") and r["backend"] != r.get("dense_peer"):
                text += f" ({r['speedup_vs_dense']:.2f}x)"
            if r.get("dropout_cost"):
                text += f" [{r['dropout_cost']:.2f}x w/o dropout]"
            if r.get("noisy"):
                text += " NOISY"
        cells[case, column(r)] = text
        if r.get("floor_ms"):
            floors[case] = _ms(r["floor_ms"])
    header = ["bench", "pass", "frames", "B", "dtype", *backends] + (["floor ms"] if floors else [])
    c = doc["ceilings"]
    lines = [
        f"ccam-bench · {doc['date'][:10]} · commit `{doc['commit'][:10]}` · {doc['device']} · "
        f"GEMM {c['matmul_tflops']:.3g} TFLOP/s ({c['matmul_dtype']}), copy {c['copy_gbps']:.0f} GB/s",
        "",
        "Median ms per call; (Nx) = speedup over the case's fastest dense-mask peer in the same run "
        "(an sdpa-* anchor where one ran, else the reference: SDPA with the dense mask), results.md "
        "names it and gives the speedup over flex."
        + (" floor ms = all FLOPs of the projector at the measured GEMM rate." if floors else "")
        + " NOISY = the GEMM ceiling moved >20% during the case, or the row exceeds 100% of it (results.md says which)."
        + (" [Nx w/o dropout] = the cost of dropout: this median over the same contestant's without dropout, "
           "timed in the same rounds." if any(r.get("dropout_p") for r in rows) else ""),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for case in cases:
        line = [str(x) for x in case] + [cells.get((case, b), "") for b in backends]
        if floors:
            line.append(floors.get(case, ""))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines) + "\n"


def write_outputs(doc: dict, out_dir: str, plots: bool = True) -> dict:
    """results.json, results.md (every column), summary.md (the short table) and the plots (latency, speedup, % of ceiling, peak memory)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    # Each file is written whole, then renamed over the old one: a run killed mid-write never
    # leaves a truncated results.json.
    _replace(paths["json"], lambda f: (json.dump(doc, f, indent=1), f.write("\n")))
    _replace(paths["markdown"], lambda f: f.write(markdown_text(doc)))
    paths["summary"] = os.path.join(out_dir, "summary.md")
    _replace(paths["summary"], lambda f: f.write(format_summary(doc)))
    if plots:
        paths.update(write_plots(doc, out_dir))
    return paths
