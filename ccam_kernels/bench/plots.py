"""PNG figures of a ccam-bench result document: latency, speedup, % of ceiling, peak memory.

Every figure has one panel per (bench, pass, batch, dtype) combination, frames on the x axis
and one line per backend, with the spread of its timed calls as a band around it (the
interquartile range of the calls; for the ratios, the same range carried through the row's own
latency). A contestant has one fixed colour in every figure of every run (CONTESTANT_COLORS),
so two runs' plots read alike. The legend sits below the panels, one for the figure, so it
never covers a line; the title wraps to the figure's width, so it is never clipped.
Only rows with status "ok", an int ``frames`` (ragged batches are left to the tables) and a
value for the plotted metric are drawn; a panel or figure without such rows is left out.

Read at a glance: the legend marks this library's backends "(ours)" (the reference too; the
anchors are unmarked), the title gives device, dtype, date and commit, and log axes carry
plain-number labels (in the axis' unit) at 1-2-5 steps, denser when the data spans less, with
unlabeled minor ticks, so no panel shows only minor labels or minor labels larger than major ones.
"""

from __future__ import annotations

import math
import os

# (kind, row key, y-axis label, what (suptitle), log y axis)
FIGURES = (
    ("latency", "median_ms", "median latency (ms)", "median latency", True),
    ("speedup", "speedup_vs_dense", "speedup vs fastest dense-mask peer (x)", "speedup vs the fastest dense-mask peer", False),
    ("pct_of_ceiling", "pct_of_ceiling", "% of GEMM ceiling", "% of measured GEMM ceiling", False),
    ("peak_memory", "peak_mem_mb", "peak memory (MB)", "peak memory", True),
)

REFERENCE_COLOR = "#000000"
# One colour per contestant, the same in every run: ours in strong colours, the anchors apart.
CONTESTANT_COLORS = {
    "reference": REFERENCE_COLOR, "torch": "#1f77b4", "triton": "#ff7f0e", "cuda": "#2ca02c",
    "flex": "#d62728", "sdpa-efficient": "#9467bd", "sdpa-cudnn": "#8c564b", "sdpa-flash": "#e377c2",
}
# For a name not above (a future contestant): a colour picked by the name itself, never by
# which other contestants ran.
PALETTE = ("#17becf", "#bcbd22", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5")
MAX_COLUMNS = 3
_PASS_ORDER = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}


def contestant_color(name: str) -> str:
    """The fixed colour of a contestant: CONTESTANT_COLORS, else one chosen by the name's CRC."""
    import zlib

    return CONTESTANT_COLORS.get(name) or PALETTE[zlib.crc32(name.encode()) % len(PALETTE)]


def backend_colors(backends) -> dict[str, str]:
    """{backend: its fixed colour}, whatever else is in ``backends``."""
    return {b: contestant_color(b) for b in set(backends)}


_INVERSE = ("speedup_vs_dense", "pct_of_ceiling")  # metrics that scale as 1 / the row's latency


def spread_band(row: dict, key: str):
    """(low, high) of a plotted metric over the row's interquartile range of calls, or None:
    latency from q1_ms to q3_ms (median +- iqr_ms / 2 for rows without them); a ratio over the
    row's latency carried through the same range."""
    median = row.get("median_ms")
    if key not in ("median_ms", *_INVERSE) or not median:
        return None
    q1, q3 = row.get("q1_ms"), row.get("q3_ms")
    if q1 is None or q3 is None:
        iqr = row.get("iqr_ms")
        if iqr is None:
            return None
        q1, q3 = median - iqr / 2, median + iqr / 2
    if key == "median_ms":
        return q1, q3
    if q1 <= 0:
        return None
    return row[key] * median / q3, row[key] * median / q1


def wrap_title(text: str, width_in: float, fontsize: float) -> str:
    """``text`` broken at its spaces into lines that fit ``width_in`` inches at ``fontsize``
    points (a character is at most ~0.62 em wide in the default sans font)."""
    import textwrap

    chars = max(20, int(width_in * 72 / (0.62 * fontsize)))
    return "\n".join(textwrap.wrap(text, chars, break_on_hyphens=False))


OURS_KINDS = ("ours", "reference")
_OUR_NAMES = ("reference", "torch", "triton", "cuda")  # for documents written before rows had a kind
# Mantissas of log-axis ticks, sparsest first; the first set giving at least MIN_LOG_TICKS
# labels inside the view wins.
_MANTISSAS = ((1,), (1, 2, 5), (1, 2, 3, 5, 7), (1, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9))
MIN_LOG_TICKS = 4
MAX_LOG_TICKS = 8


def legend_label(backend: str, kind: str | None = None) -> str:
    """"torch (ours)" for this library's backends and its reference; anchors as they are."""
    ours = kind in OURS_KINDS if kind else backend in _OUR_NAMES
    return f"{backend} (ours)" if ours else backend


def plain_number(value: float) -> str:
    """A tick label without exponents: 2000, 150, 0.5."""
    text = f"{value:.6g}"
    if "e" in text:
        text = f"{value:.0f}" if abs(value) >= 1 else f"{value:.12f}".rstrip("0").rstrip(".")
    return text


def log_ticks(lo: float, hi: float) -> list[float]:
    """Tick values for a log axis showing [lo, hi] (0 < lo < hi): 1-2-5 style, as sparse as
    gives MIN_LOG_TICKS inside, at most MAX_LOG_TICKS (every k-th kept when a wide range gives
    more); for a narrow range (less than a 1-2-3-4-5 step), evenly spaced round values."""
    first, last = math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1
    for mantissas in _MANTISSAS:
        ticks = [round(m * 10.0 ** e, 12) for e in range(first, last + 1) for m in mantissas]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= MIN_LOG_TICKS:
            step = math.ceil(len(ticks) / MAX_LOG_TICKS)
            return ticks[::step]
    from matplotlib.ticker import MaxNLocator

    for bins in (4, 6, 8):
        ticks = [float(t) for t in MaxNLocator(nbins=bins, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= MIN_LOG_TICKS:
            break
    return ticks


def label_log_axis(axis, lo: float, hi: float) -> None:
    """Plain-number major labels at log_ticks(lo, hi); minor ticks (the grid's) unlabeled."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    axis.set_major_locator(FixedLocator(log_ticks(lo, hi)))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: plain_number(v)))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10))))
    axis.set_minor_formatter(NullFormatter())


def figure_title(what: str, doc: dict, dtypes) -> str:
    """What, device, dtype(s), date and commit of a document's figure."""
    device = doc.get("device", "unknown device")
    date = str(doc.get("date") or "unknown date")[:10]
    commit = str(doc.get("commit") or "unknown")[:10] + (" (dirty)" if doc.get("commit_dirty") else "")
    return f"{what} · {device} · {', '.join(sorted(set(dtypes)))} · {date} · commit {commit}"


def _plottable(row: dict, key: str, log_y: bool) -> bool:
    frames = row.get("frames")
    value = row.get(key)
    if row.get("status") != "ok" or not isinstance(frames, int) or isinstance(frames, bool):
        return False
    if row.get("dropout_p"):  # the rows with dropout (--dropout) are in the tables only
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
    figures = build_figures(doc)
    written = {}
    for kind, fig in figures.items():
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"{kind}.png")
        fig.savefig(path, dpi=110)
        written[kind] = path
    return written


def build_figures(doc: dict) -> dict:
    """{kind: matplotlib Figure} of ``doc`` (what write_plots saves); {} without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    except ImportError:
        return {}

    rows = doc.get("rows", [])
    colors = backend_colors({r["backend"] for r in rows})
    kinds = {r["backend"]: r.get("kind") for r in rows}
    figures = {}
    for kind, key, ylabel, what, log_y in FIGURES:
        sel = [r for r in rows if _plottable(r, key, log_y)]
        panels = sorted({_panel_key(r) for r in sel}, key=_panel_order)
        if not panels:
            continue
        ncols = min(MAX_COLUMNS, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        width = 4.4 * ncols
        title = wrap_title(figure_title(what, doc, [p[3] for p in panels]), width - 0.3, 9)
        # room for the title's lines and the legend below the panels
        fig = Figure(figsize=(width, 3.3 * nrows + 0.25 * title.count("\n") + 1.0), dpi=110, layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            fig.delaxes(ax)
        for ax, panel in zip(axes, panels):
            bench, pass_, batch, dtype = panel
            in_panel = [r for r in sel if _panel_key(r) == panel]
            for backend in sorted({r["backend"] for r in in_panel}):
                mine = sorted((r for r in in_panel if r["backend"] == backend), key=lambda r: r["frames"])
                ax.plot([r["frames"] for r in mine], [r[key] for r in mine], marker="o", markersize=3,
                        linewidth=1.2, color=colors[backend], label=legend_label(backend, kinds.get(backend)))
                bands = [(r["frames"], spread_band(r, key)) for r in mine]
                bands = [(f, b) for f, b in bands if b is not None and (not log_y or b[0] > 0)]
                if bands:
                    ax.fill_between([f for f, _ in bands], [b[0] for _, b in bands], [b[1] for _, b in bands],
                                    color=colors[backend], alpha=0.18, linewidth=0)
            if kind == "speedup":
                ax.axhline(1.0, color="#555555", linestyle="--", linewidth=0.9)
            frames = sorted({r["frames"] for r in in_panel})
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator(frames))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: plain_number(v)))
            if len(frames) == 1:
                ax.set_xlim(frames[0] / 1.5, frames[0] * 1.5)
            if log_y:
                ax.set_yscale("log")
                ax.autoscale_view()
                label_log_axis(ax.yaxis, *ax.get_ylim())
            ax.tick_params(axis="both", which="both", labelsize=7)
            ax.set_title(f"{bench} {pass_}, B={batch}, {dtype}", fontsize=8)
            ax.set_xlabel("frames per video", fontsize=7)
            ax.set_ylabel(ylabel, fontsize=7)
            ax.grid(True, which="both", alpha=0.3, linewidth=0.5)
        handles = {}
        for ax in axes[:len(panels)]:
            for line in ax.get_lines():
                if not line.get_label().startswith("_"):
                    handles.setdefault(line.get_label(), line)
        fig.legend(list(handles.values()), list(handles), loc="outside lower center", fontsize=7,
                   ncols=min(len(handles), 4 * ncols), frameon=False,
                   title="line: median; band: middle half of the timed calls" if kind != "peak_memory" else None,
                   title_fontsize=7)
        fig.suptitle(title, fontsize=9)
        figures[kind] = fig
    return figures
