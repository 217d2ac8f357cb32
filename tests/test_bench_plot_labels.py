"""The figures read at a glance (issue 16.5), checked on the Figure objects: log axes carry
plain-number major labels inside the view and no minor labels (so none is larger than a major
one and no panel shows only minor ones), the legend marks our backends "(ours)" and leaves the
anchors unmarked, and the title names device, dtype, date and commit. Also the long-video figure."""

import random
import re

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install -e '.[test]')")

from ccam_kernels.bench.long_video import long_figure  # noqa: E402
from ccam_kernels.bench.plots import MAX_LOG_TICKS, build_figures, legend_label, log_ticks, plain_number  # noqa: E402
from test_bench_outputs import make_doc, make_row  # noqa: E402

PLAIN = re.compile(r"^\d+(\.\d+)?$")
OURS = ("reference", "torch", "triton", "cuda")
ANCHORS = ("flex", "sdpa-flash")


def spans_doc():
    """Latency panels spanning four decades, a narrow band (the case that used to show only
    minor labels), and sub-millisecond values; peak memory too."""
    rows = []
    spans = {"attention": (1.0, 5000.0), "projector": (93.0, 118.0)}
    for bench, (lo, hi) in spans.items():
        for i, backend in enumerate(OURS + ANCHORS):
            for j, frames in enumerate((1, 16, 96)):
                t = lo * (hi / lo) ** ((i + j) / (len(OURS + ANCHORS) + 1))
                rows.append(make_row(backend, frames, bench=bench, median_ms=t, peak_mem_mb=t * 3))
    for backend in ("torch", "flex"):
        for frames, t in ((1, 0.05), (16, 0.2), (96, 0.4)):
            rows.append(make_row(backend, frames, pass_="fwd+bwd", median_ms=t, peak_mem_mb=t))
    return make_doc(rows, device="NVIDIA H200")


def _log_axes(figures):
    for kind in ("latency", "peak_memory"):
        for ax in figures[kind].get_axes():
            assert ax.get_yscale() == "log"
            yield kind, ax


def test_log_axes_show_plain_major_labels_and_no_minor_labels():
    figures = build_figures(spans_doc())
    assert {"latency", "peak_memory"} <= set(figures)
    checked = 0
    for kind, ax in _log_axes(figures):
        ax.figure.canvas.draw()
        lo, hi = ax.get_ylim()
        major = [(t, lab) for t, lab in zip(ax.get_yticks(), ax.get_yticklabels()) if lo <= t <= hi]
        texts = [lab.get_text() for _, lab in major]
        assert len(texts) >= 3, (kind, ax.get_title(), texts)
        assert all(PLAIN.match(t) for t in texts), (kind, ax.get_title(), texts)
        assert [float(t) for t in texts] == pytest.approx([t for t, _ in major])
        assert all(lab.get_text() == "" for lab in ax.get_yticklabels(minor=True)), (kind, ax.get_title())
        sizes = {lab.get_fontsize() for _, lab in major}
        assert len(sizes) == 1
        checked += 1
    assert checked == 6  # attention fwd, attention fwd+bwd, projector fwd: latency and peak memory


def test_frame_axis_labels_are_the_plain_frame_counts():
    fig = build_figures(spans_doc())["latency"]
    fig.canvas.draw()
    for ax in fig.get_axes():
        assert [lab.get_text() for lab in ax.get_xticklabels()] == ["1", "16", "96"]


def test_legend_marks_our_backends_and_not_the_anchors():
    figures = build_figures(spans_doc())
    for fig in figures.values():
        labels = {t.get_text() for t in fig.legends[0].get_texts()}  # one legend, below the panels
        assert labels <= {f"{b} (ours)" for b in OURS} | set(ANCHORS), labels
        assert "torch (ours)" in labels and "flex" in labels
    assert legend_label("flex", "anchor") == "flex" and legend_label("cuda", "ours") == "cuda (ours)"
    assert legend_label("reference", "reference") == "reference (ours)"
    # A document written before rows had a kind: our backend names are still marked.
    assert legend_label("triton") == "triton (ours)" and legend_label("sdpa-cudnn") == "sdpa-cudnn"


def test_title_names_device_dtype_date_and_commit():
    rows = [make_row(b, f, dtype=d, median_ms=float(f)) for b in ("reference", "torch") for f in (1, 16)
            for d in ("bfloat16", "float16")]
    doc = make_doc(rows, device="NVIDIA H200")
    doc["commit_dirty"] = True
    for kind, fig in build_figures(doc).items():
        title = fig._suptitle.get_text().replace("\n", " ")  # wrapped to the figure's width
        assert title.endswith(" · NVIDIA H200 · bfloat16, float16 · 2025-01-02 · commit 0123456789 (dirty)"), title


def test_log_ticks_on_random_ranges():
    """Fresh random ranges from 1e-3 to 1e6 wide and narrow: sorted plain values inside the
    range, at least 3 of them, at most MAX_LOG_TICKS."""
    rng = random.Random()
    for _ in range(300):
        lo = 10 ** rng.uniform(-3, 5)
        hi = lo * 10 ** rng.choice([rng.uniform(0.01, 0.1), rng.uniform(0.1, 1), rng.uniform(1, 6)])
        ticks = log_ticks(lo, hi)
        assert ticks == sorted(ticks) and all(lo <= t <= hi for t in ticks), (lo, hi, ticks)
        assert len(ticks) >= 3, (lo, hi, ticks)
        assert len(ticks) <= MAX_LOG_TICKS, (lo, hi, ticks)
        assert all(PLAIN.match(plain_number(t)) for t in ticks), (lo, hi, ticks)


@pytest.mark.parametrize("value,text", [(2000.0, "2000"), (0.5, "0.5"), (1e6, "1000000"), (1.5, "1.5"),
                                        (1e-4, "0.0001"), (250.0, "250"), (12345678.0, "12345678")])
def test_plain_number(value, text):
    assert plain_number(value) == text


def test_long_video_figure_legend_and_title():
    rows = []
    for frames, one_shot, stream in ((96, 7.0, 2.5), (512, 32.0, 2.5), (1024, 64.0, 2.6)):
        rows.append({"status": "ok", "mode": "one-shot", "frames": frames, "peak_mem_mb": one_shot,
                     "median_ms": frames * 0.3, "chunk_frames": None})
        rows.append({"status": "ok", "mode": "stream", "frames": frames, "peak_mem_mb": stream,
                     "median_ms": frames * 0.28, "chunk_frames": 32})
    rows.append({"status": "ok", "mode": "frame-parallel", "frames": 512, "peak_mem_mb": None, "median_ms": 5.0})
    doc = {"commit": "994896d84758e54b9d7a00f983346e0104164d3e", "commit_dirty": False,
           "date": "2026-12-01T11:37:39+00:00", "device": "CPU Test (1 threads)", "rows": rows,
           "settings": {"config": {"num_query": 256, "hidden_size": 256}, "tokens_per_frame": 16,
                        "dtype": "float32"}}
    fig = long_figure(doc)
    title = fig._suptitle.get_text().replace("\n", " ")
    assert title == ("CCAMProjector, N=256, C=256, P=16 · CPU Test (1 threads) · float32 · 2026-12-01 · "
                     "commit 994896d847")
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["one-shot (ours)", "stream, 32 frames/push (ours)"]
    memory, time_ = fig.get_axes()
    # the table's units: peak MB and median ms, the values as long.json has them
    assert "MB" in memory.get_ylabel() and time_.get_ylabel() == "median ms"
    assert list(time_.get_lines()[0].get_ydata()) == [r["median_ms"] for r in rows if r["mode"] == "one-shot"]
    for ax in fig.get_axes():
        assert ax.get_legend() is None  # clear of the lines
        assert [len(line.get_xdata()) for line in ax.get_lines()] == [3, 3]
    assert long_figure({**doc, "rows": rows[-1:]}) is None
