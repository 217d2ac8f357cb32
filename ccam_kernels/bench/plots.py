"""PNG figures of a ccam-bench result document: latency, speedup, % of ceiling, peak memory.

Every figure has one panel per (bench, pass, batch, dtype) combination, frames on the x axis
and one line per backend; a backend keeps its colour across all figures of a document.
Only rows with status "ok", an int ``frames`` (ragged batches are left to the tables) and a
value for the plotted metric are drawn; a panel or figure without such rows is left out.
"""

from __future__ import annotations

import math
import os

# (kind, row key, y-axis label, what (suptitle), log y axis)
FIGURES = (
    ("latency", "median_ms", "median latency (ms)", "median latency", True),
    ("speedup", "speedup_vs_reference", "speedup vs reference (x)", "speedup vs reference", False),
    ("pct_of_ceiling", "pct_of_ceiling", "% of GEMM ceiling", "% of measured GEMM ceiling", False),
    ("peak_memory", "peak_mem_mb", "peak memory (MB)", "peak memory", True),
)

REFERENCE_COLOR = "#000000"
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f",
)
MAX_COLUMNS = 3
_PASS_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def backend_colors(backends) -> dict[str, str]:
    """Colour of each backend: "reference" is always black, the others take the palette in
    sorted-name order (cycling if there are more backends than colours)."""
    others = sorted({b for b in backends if b != "reference"})
    colors = {b: PALETTE[i % len(PALETTE)] for i, b in enumerate(others)}
    if "reference" in backends:
        colors["reference"] = REFERENCE_COLOR
    return colors


def _plottable(row: dict, key: str, log_y: bool) -> bool:
    frames = row.get("frames")
    value = row.get(key)
    if row.get("status") != "ok" or not isinstance(frames, int) or isinstance(frames, bool):
        return False
    if value is None or not math.isfinite(value):
        return False
    return value > 0 if log_y else True


def _panel_key(row: dict) -> tuple:
    return (row["bench"], row["pass"], row["batch"], row["dtype"])


def _panel_order(panel: tuple) -> tuple:
    bench, pass_, batch, dtype = panel
    return (str(bench), _PASS_ORDER.get(pass_, len(_PASS_ORDER)), str(pass_), batch, str(dtype))


def write_plots(doc: dict, out_dir: str) -> dict[str, str]:
    """Write the figures of ``doc`` under ``out_dir``; {kind: path} of the files written
    (kinds: latency, speedup, pct_of_ceiling, peak_memory). {} when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        return {}

    rows = doc.get("rows", [])
    colors = backend_colors({r["backend"] for r in rows})
    device = doc.get("device", "unknown device")
    commit = str(doc.get("commit", "unknown"))[:10]
    written = {}
    for kind, key, ylabel, what, log_y in FIGURES:
        sel = [r for r in rows if _plottable(r, key, log_y)]
        panels = sorted({_panel_key(r) for r in sel}, key=_panel_order)
        if not panels:
            continue
        ncols = min(MAX_COLUMNS, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(4.4 * ncols, 3.3 * nrows + 0.4), dpi=110)
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            fig.delaxes(ax)
        for ax, panel in zip(axes, panels):
            bench, pass_, batch, dtype = panel
            in_panel = [r for r in sel if _panel_key(r) == panel]
            for backend in sorted({r["backend"] for r in in_panel}):
                pts = sorted((r["frames"], r[key]) for r in in_panel if r["backend"] == backend)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3,
                        linewidth=1.2, color=colors[backend], label=backend)
            if kind == "speedup":
                ax.axhline(1.0, color="#555555", linestyle="--", linewidth=0.9)
            frames = sorted({r["frames"] for r in in_panel})
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(frames))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticklabels([str(f) for f in frames], fontsize=6)
            if len(frames) == 1:
                ax.set_xlim(frames[0] / 1.5, frames[0] * 1.5)
            if log_y:
                ax.set_yscale("log")
            ax.tick_params(axis="y", labelsize=6)
            ax.set_title(f"{bench} {pass_}, B={batch}, {dtype}", fontsize=8)
            ax.set_xlabel("frames per video", fontsize=7)
            ax.set_ylabel(ylabel, fontsize=7)
            ax.grid(True, which="both", alpha=0.3, linewidth=0.5)
            ax.legend(fontsize=6, loc="best", frameon=False)
        fig.suptitle(f"{what} · {device} · {commit}", fontsize=9)
        fig.tight_layout()
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{kind}.png")
        fig.savefig(path, dpi=110)
        written[kind] = path
    return written
