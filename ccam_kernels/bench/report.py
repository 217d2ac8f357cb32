"""Turning benchmark results into the SPEC 5 JSON, a text/markdown table and a plot."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timezone

import torch

COLUMNS = [
    ("bench", "bench", "{}"), ("pass", "pass", "{}"), ("frames", "frames", "{}"), ("batch", "B", "{}"),
    ("backend", "backend", "{}"), ("median_ms", "median ms", "{:.2f}"), ("tflops", "TFLOP/s", "{:.3f}"),
    ("pct_of_ceiling", "% ceiling", "{:.1f}"), ("speedup_vs_reference", "x ref", "{:.2f}"),
    ("max_rel_err", "rel err", "{:.1e}"), ("peak_mem_mb", "peak MB", "{:.0f}"),
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


def build_result(result: dict, device: torch.device) -> dict:
    """The SPEC 5 document."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    sha, dirty = git_commit()
    return {
        "schema": 1,
        "commit": sha,
        "commit_dirty": dirty,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "ceilings": result["ceilings"],
        "rows": result["rows"],
    }


def _cell(row, key, fmt):
    value = row.get(key)
    if value is None:
        return row.get("status", "-") if key == "median_ms" else "-"
    return fmt.format(value)


def format_table(rows, markdown: bool = False) -> str:
    header = [title for _, title, _ in COLUMNS]
    body = [[_cell(r, key, fmt) for key, _, fmt in COLUMNS] for r in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in body)) if body else len(h) for i, h in enumerate(header)]
    fmt_line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([fmt_line(header), fmt_line(["-" * w for w in widths])] + [fmt_line(c) for c in body])


def write_markdown(doc: dict, path: str) -> None:
    c = doc["ceilings"]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"# ccam-bench results\n\n{doc['date']} · commit `{doc['commit'][:12]}`"
                f"{' (dirty tree)' if doc.get('commit_dirty') else ''} · {doc['device']} · torch {doc['torch']}\n\n")
        f.write(f"Ceilings measured in this run: GEMM {c['matmul_tflops']:.3f} TFLOP/s ({c['matmul_dtype']}), "
                f"copy {c['copy_gbps']:.1f} GB/s. TFLOP/s counts live FLOPs only (masked pairs excluded); "
                f"'x ref' is the speedup over the reference backend; 'rel err' is the largest of "
                f"||x - x_ref|| / ||x_ref|| over the output (and gradients for fwd+bwd) against the reference.\n\n")
        f.write(format_table(doc["rows"], markdown=True) + "\n")


def write_plot(doc: dict, path: str) -> bool:
    """Latency vs frames, one line per backend, one panel per (bench, pass). False when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in doc["rows"] if r.get("median_ms") is not None and isinstance(r["frames"], int)]
    panels = sorted({(r["bench"], r["pass"], r["batch"], r["dtype"]) for r in rows})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (bench, pass_, batch, dtype) in zip(axes[0], panels):
        sel = [r for r in rows if (r["bench"], r["pass"], r["batch"], r["dtype"]) == (bench, pass_, batch, dtype)]
        for backend in sorted({r["backend"] for r in sel}):
            pts = sorted((r["frames"], r["median_ms"]) for r in sel if r["backend"] == backend)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
        ax.set_title(f"{bench} {pass_}, B={batch}, {dtype}")
        ax.set_xlabel("frames per video")
        ax.set_ylabel("median latency (ms)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(f"ccam-bench · {doc['device']} · {doc['commit'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_outputs(doc: dict, out_dir: str) -> dict:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md"),
             "plot": os.path.join(out_dir, "latency.png")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    write_markdown(doc, paths["markdown"])
    if not write_plot(doc, paths["plot"]):
        paths.pop("plot")
    return paths
