"""ccam-bench outputs built from synthetic result documents: the PNG figures and the
comparison of two runs (``ccam-bench compare``)."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest

from ccam_kernels.bench import compare as cmp
from ccam_kernels.bench.plots import CONTESTANT_COLORS, PALETTE, REFERENCE_COLOR, backend_colors, write_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_row(backend, frames, *, bench="attention", pass_="fwd", dtype="bfloat16", batch=1,
             status="ok", median_ms=1.0, spread_pct=None, peak_mem_mb=None, speedup=None):
    counts = list(frames) if isinstance(frames, list) else [frames] * batch
    ok = status == "ok"
    return {
        "bench": bench, "pass": pass_, "backend": backend,
        "kind": "reference" if backend == "reference" else "ours" if backend in ("torch", "triton", "cuda") else "anchor",
        "frames": frames, "frame_counts": counts, "batch": len(counts), "dtype": dtype, "gflop": 1.0,
        "status": status, "reason": None if ok else "CUDA out of memory",
        "median_ms": median_ms if ok else None, "min_ms": median_ms if ok else None,
        "max_ms": median_ms if ok else None, "spread_pct": spread_pct if ok else None,
        "repeats": 3, "tflops": 1.0 / median_ms if ok else None, "pct_of_ceiling": 10.0 / median_ms if ok else None,
        "peak_mem_mb": peak_mem_mb if ok else None, "max_rel_err": 1e-3 if ok else None,
        "speedup_vs_reference": (speedup if speedup is not None else 1.0) if ok else None, "compile_s": None,
        "speedup_vs_dense": (speedup if speedup is not None else 1.0) if ok else None,
        "dense_peer": "reference" if ok else None, "speedup_vs_flex": None,
    }


def make_doc(rows, *, device="CPU Test Processor (4 threads)", commit="0123456789abcdef0123"):
    return {
        "schema": 1, "commit": commit, "commit_dirty": False, "date": "2025-01-02T03:04:05+00:00",
        "device": device, "torch": "2.13.0", "triton": None, "cuda": None,
        "ceilings": {"matmul_tflops": 1.5, "matmul_dtype": "float32", "copy_gbps": 12.5},
        "rows": rows,
    }


def sweep_doc(gpu: bool) -> dict:
    """attention fwd and projector fwd at 1/16/32 frames for three backends, plus a ragged batch
    and an out-of-memory row; peak memory only on the GPU-like document."""
    rows = []
    for bench in ("attention", "projector"):
        for backend, scale in (("reference", 4.0), ("torch", 2.0), ("flex", 1.0)):
            for frames in (1, 16, 32):
                if (bench, backend, frames) == ("attention", "flex", 32):
                    rows.append(make_row(backend, frames, bench=bench, status="oom"))
                    continue
                rows.append(make_row(backend, frames, bench=bench, median_ms=scale * frames,
                                     speedup=4.0 / scale, peak_mem_mb=10.0 * frames if gpu else None))
    rows.append(make_row("torch", [3, 7], median_ms=5.0, peak_mem_mb=70.0 if gpu else None))
    return make_doc(rows, device="NVIDIA H200" if gpu else "CPU Test Processor (4 threads)")


def png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read(24)
    assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def saved_figures(monkeypatch):
    """The matplotlib Figure objects write_plots saves, in order."""
    from matplotlib.figure import Figure

    figures = []
    original = Figure.savefig

    def record(self, *args, **kwargs):
        figures.append(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


# ---------------------------------------------------------------------------------- plots


def test_write_plots_cpu_doc_files_and_no_peak_memory(tmp_path):
    paths = write_plots(sweep_doc(gpu=False), str(tmp_path))
    assert set(paths) == {"latency", "speedup", "pct_of_ceiling"}
    for kind, path in paths.items():
        assert path == str(tmp_path / f"{kind}.png")
        assert open(path, "rb").read(8) == PNG_MAGIC
        # two panels (attention fwd B=1, projector fwd B=1) side by side at dpi 110
        width, height = png_size(path)  # the height grows with the title's lines and the legend
        assert width == round(2 * 4.4 * 110) and round(3.3 * 110) < height < round(5 * 110)
    assert not (tmp_path / "peak_memory.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latency.png", "pct_of_ceiling.png", "speedup.png"]


def test_write_plots_gpu_doc_writes_peak_memory(tmp_path):
    paths = write_plots(sweep_doc(gpu=True), str(tmp_path / "new" / "dir"))
    assert set(paths) == {"latency", "speedup", "pct_of_ceiling", "peak_memory"}
    assert open(paths["peak_memory"], "rb").read(8) == PNG_MAGIC


def test_write_plots_panels_lines_and_colors(tmp_path, saved_figures):
    doc = sweep_doc(gpu=True)
    paths = write_plots(doc, str(tmp_path))
    assert len(saved_figures) == 4
    by_kind = dict(zip(paths, saved_figures))
    colors = backend_colors({"reference", "torch", "flex"})
    for kind, fig in by_kind.items():
        assert fig._suptitle.get_text().replace("\n", " ").endswith(
            " · NVIDIA H200 · bfloat16 · 2025-01-02 · commit 0123456789")
        axes = fig.get_axes()
        # the ragged row (B=2) makes no panel; the oom row is not a point
        assert [ax.get_title() for ax in axes] == ["attention fwd, B=1, bfloat16", "projector fwd, B=1, bfloat16"]
        for ax in axes:
            assert ax.get_xlabel() == "frames per video"
            lines = {ln.get_label().removesuffix(" (ours)"): ln for ln in ax.get_lines()
                     if not ln.get_label().startswith("_")}
            assert set(lines) == {"reference", "torch", "flex"}
            for backend, line in lines.items():
                assert line.get_color() == colors[backend]
                assert line.get_marker() == "o"
                expected_x = [1, 16] if (ax.get_title().startswith("attention") and backend == "flex") else [1, 16, 32]
                assert list(line.get_xdata()) == expected_x
        assert axes[0].get_yscale() == ("log" if kind in ("latency", "peak_memory") else "linear")
    latency = {ln.get_label(): list(ln.get_ydata()) for ln in by_kind["latency"].get_axes()[1].get_lines()}
    assert latency["torch (ours)"] == [2.0, 32.0, 64.0]
    dashed = [ln for ln in by_kind["speedup"].get_axes()[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [1.0, 1.0]
    assert by_kind["latency"]._suptitle.get_text().startswith("median latency · ")


def test_write_plots_grid_at_most_three_columns(tmp_path, saved_figures):
    rows = [make_row(b, f, bench=bench, pass_=p, median_ms=float(f))
            for bench in ("attention", "projector") for p in ("fwd", "fwd+bwd")
            for b in ("reference", "torch") for f in (1, 16)]
    paths = write_plots(make_doc(rows), str(tmp_path))
    width, height = png_size(paths["latency"])
    assert width == round(3 * 4.4 * 110) and height >= round(2 * 3.3 * 110)
    titles = [ax.get_title() for ax in saved_figures[0].get_axes()]
    assert titles == ["attention fwd, B=1, bfloat16", "attention fwd+bwd, B=1, bfloat16",
                      "projector fwd, B=1, bfloat16", "projector fwd+bwd, B=1, bfloat16"]


def test_write_plots_skips_ragged_and_failed_rows_without_error(tmp_path):
    doc = make_doc([make_row("torch", [3, 7], median_ms=2.0), make_row("torch", 16, status="oom"),
                    make_row("flex", 16, status="unsupported")])
    assert write_plots(doc, str(tmp_path)) == {}
    assert list(tmp_path.iterdir()) == []


def test_write_plots_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert write_plots(sweep_doc(gpu=True), str(tmp_path)) == {}
    assert list(tmp_path.iterdir()) == []


def test_backend_colors_fixed_per_contestant_across_runs():
    """A contestant's colour does not depend on which others ran: the same in every run."""
    colors = backend_colors({"triton", "reference", "flex", "torch"})
    assert colors["reference"] == REFERENCE_COLOR
    assert backend_colors({"flex"}) == {"flex": colors["flex"]}
    assert backend_colors({"torch", "sdpa-flash"})["torch"] == colors["torch"]
    assert len(set(CONTESTANT_COLORS.values())) == len(CONTESTANT_COLORS)  # all distinct
    from ccam_kernels.bench.names import ATTENTION_CONTESTANTS, PROJECTOR_CONTESTANTS
    assert set(ATTENTION_CONTESTANTS) | set(PROJECTOR_CONTESTANTS) <= set(CONTESTANT_COLORS)
    new = backend_colors({"new-kernel"})["new-kernel"]
    assert new in PALETTE and backend_colors({"new-kernel", "torch"})["new-kernel"] == new


def test_plots_show_the_spread_and_keep_title_and_legend_clear(tmp_path):
    """Each line has a band over its rows' interquartile range (q1..q3; median +- iqr/2 for old
    rows); a ratio's band carries the row's own range through 1/latency. Drawn: the (long)
    title lies inside the figure and the legend overlaps no panel."""
    from matplotlib.collections import PolyCollection

    from ccam_kernels.bench.plots import build_figures, spread_band

    row = make_row("torch", 16, median_ms=10.0)
    row.update(q1_ms=8.0, q3_ms=12.5, pct_of_ceiling=40.0, speedup_vs_dense=2.0)
    assert spread_band(row, "median_ms") == (8.0, 12.5)
    assert spread_band(row, "pct_of_ceiling") == pytest.approx((32.0, 50.0))
    assert spread_band(row, "speedup_vs_dense") == pytest.approx((1.6, 2.5))
    assert spread_band(row, "peak_mem_mb") is None
    old = make_row("torch", 16, median_ms=10.0)
    old["iqr_ms"] = 2.0
    assert spread_band(old, "median_ms") == (9.0, 11.0)
    rows = []
    for backend, ms in (("reference", 4.0), ("torch", 2.0), ("flex", 1.0)):
        for frames in (1, 16, 32):
            r = make_row(backend, frames, median_ms=ms * frames)
            r.update(q1_ms=0.9 * ms * frames, q3_ms=1.2 * ms * frames)
            rows.append(r)
    doc = make_doc(rows, device="A device with a very long name " * 3)  # one panel: the narrowest figure
    for kind, fig in build_figures(doc).items():
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        ax = fig.get_axes()[0]
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        if kind != "peak_memory":
            assert len(bands) == 3, kind
            assert {tuple(b.get_facecolor()[0][:3]) for b in bands} == {
                tuple(int(backend_colors({n})[n][i:i + 2], 16) / 255 for i in (1, 3, 5)) for n in ("reference", "torch", "flex")}
        fig_box = fig.bbox
        title = fig._suptitle.get_window_extent(renderer)
        assert title.x0 >= fig_box.x0 and title.x1 <= fig_box.x1 and title.y1 <= fig_box.y1, kind
        legend = fig.legends[0].get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer)), kind
        assert {t.get_text() for t in fig.legends[0].get_texts()} == {"reference (ours)", "torch (ours)", "flex"}


# -------------------------------------------------------------------------------- compare


def compare_docs(device_b="CPU Test Processor (4 threads)"):
    a = make_doc([
        make_row("torch", 16, median_ms=10.0, spread_pct=1.0),
        make_row("reference", 16, median_ms=10.0),
        make_row("flex", 16, median_ms=10.0, spread_pct=2.0),
        make_row("torch", 1, median_ms=2.0),
        make_row("triton", 32, median_ms=3.0),
        make_row("flex", 32, median_ms=4.0),
        make_row("torch", [3, 7], median_ms=5.0),
        make_row("torch", 16, median_ms=10.0, dtype="float32"),
    ], commit="aaaaaaaaaaaaaaaa")
    b = make_doc([
        make_row("torch", 16, median_ms=8.0, spread_pct=0.5),       # 20% faster
        make_row("reference", 16, median_ms=12.0),                  # 20% slower
        make_row("flex", 16, median_ms=10.5, spread_pct=6.0),       # +5%, within 6% noise
        make_row("torch", 1, median_ms=2.04),                       # +2%, within the 3% threshold
        make_row("flex", 32, status="oom"),
        make_row("torch", [3, 7], median_ms=10.0),                  # 2x slower
        make_row("sdpa-cudnn", 16, median_ms=1.0),
        make_row("torch", 16, median_ms=10.0, dtype="bfloat16", bench="projector"),
    ], commit="bbbbbbbbbbbbbbbb", device=device_b)
    b["ceilings"] = {"matmul_tflops": 1.5, "matmul_dtype": "float32", "copy_gbps": 20.0}  # same machine speed
    return a, b


def test_row_key():
    row = make_row("torch", [3, 7], pass_="fwd+bwd", dtype="float16")
    assert cmp.row_key(row) == ("attention", "fwd+bwd", "torch", "float16", (3, 7))
    assert cmp.row_key(make_row("flex", 16, batch=2)) == ("attention", "fwd", "flex", "bfloat16", (16, 16))


def test_compare_ratios_and_verdicts():
    a, b = compare_docs()
    entries = cmp.compare(a, b)
    got = {(e["backend"], e["bench"], e["dtype"], e["key"][4]): e for e in entries}
    assert len(entries) == 10

    torch16 = got[("torch", "attention", "bfloat16", (16,))]
    assert torch16["a_ms"] == 10.0 and torch16["b_ms"] == 8.0
    assert torch16["ratio"] == pytest.approx(0.8) and torch16["speedup"] == pytest.approx(1.25)
    assert torch16["noise_pct"] == 1.0 and torch16["verdict"] == "faster"
    assert (torch16["frames"], torch16["batch"], torch16["pass"]) == (16, 1, "fwd")

    ref = got[("reference", "attention", "bfloat16", (16,))]
    assert ref["ratio"] == pytest.approx(1.2) and ref["noise_pct"] is None and ref["verdict"] == "slower"

    flex = got[("flex", "attention", "bfloat16", (16,))]
    assert flex["ratio"] == pytest.approx(1.05) and flex["noise_pct"] == 6.0 and flex["verdict"] == "same"

    small = got[("torch", "attention", "bfloat16", (1,))]
    assert small["ratio"] == pytest.approx(1.02) and small["verdict"] == "same"

    ragged = got[("torch", "attention", "bfloat16", (3, 7))]
    assert ragged["frames"] == [3, 7] and ragged["batch"] == 2
    assert ragged["ratio"] == pytest.approx(2.0) and ragged["speedup"] == pytest.approx(0.5)
    assert ragged["verdict"] == "slower"

    assert got[("triton", "attention", "bfloat16", (32,))]["verdict"] == "only in A"
    assert got[("sdpa-cudnn", "attention", "bfloat16", (16,))]["verdict"] == "only in B"
    assert got[("torch", "attention", "float32", (16,))]["verdict"] == "only in A"
    assert got[("torch", "projector", "bfloat16", (16,))]["verdict"] == "only in B"
    oom = got[("flex", "attention", "bfloat16", (32,))]
    assert oom["verdict"] == "not comparable (ok/oom)"
    assert oom["a_ms"] == 4.0 and oom["b_ms"] is None and oom["ratio"] is None and oom["speedup"] is None
    # A's rows first, in A's order, then B's extra rows
    assert [e["verdict"] for e in entries][-2:] == ["only in B", "only in B"]


def test_compare_threshold_and_noise():
    a = make_doc([make_row("torch", 16, median_ms=10.0)])
    b = make_doc([make_row("torch", 16, median_ms=10.5)])
    assert cmp.compare(a, b)[0]["verdict"] == "slower"                      # 5% > default 3%
    assert cmp.compare(a, b, threshold_pct=5.5)[0]["verdict"] == "same"
    b["rows"][0]["spread_pct"] = 5.0                                         # noise covers the 5% change
    entry = cmp.compare(a, b)[0]
    assert entry["noise_pct"] == 5.0 and entry["verdict"] == "same"
    b["rows"][0].update(median_ms=9.4, spread_pct=None)
    assert cmp.compare(a, b)[0]["verdict"] == "faster"


def test_format_comparison_text():
    a, b = compare_docs()
    entries = cmp.compare(a, b)
    text = cmp.format_comparison(entries, a, b)
    lines = text.splitlines()
    assert lines[0] == ("A: aaaaaaaaaa · 2025-01-02T03:04:05+00:00 · CPU Test Processor (4 threads) · "
                        "ceilings: GEMM 1.500 TFLOP/s (float32), copy 12.5 GB/s")
    assert lines[1].startswith("B: bbbbbbbbbb · ")
    assert "GEMM 1.500 TFLOP/s" in lines[1] and "copy 20.0 GB/s" in lines[1]
    assert "WARNING" not in text
    header = next(line for line in lines if line.startswith("bench"))
    assert header.split() == ["bench", "pass", "frames", "B", "dtype", "backend",
                              "A", "ms", "B", "ms", "raw", "B/A", "B/A", "verdict"]
    torch_line = next(line for line in lines if " 10.000 " in line and "8.000" in line)
    assert torch_line.split() == ["attention", "fwd", "16", "1", "bfloat16", "torch",
                                  "10.000", "8.000", "0.800", "0.800", "faster"]
    ragged_line = next(line for line in lines if "3,7" in line)
    assert ragged_line.split()[-5:] == ["5.000", "10.000", "2.000", "2.000", "slower"]
    oom_line = next(line for line in lines if "oom" in line)
    assert oom_line.split() == ["attention", "fwd", "32", "1", "bfloat16", "flex", "4.000", "oom", "-", "-",
                                "not", "comparable", "(ok/oom)"]
    geomean = math.exp((math.log(1.25) + math.log(10 / 12) + math.log(10 / 10.5) + math.log(2 / 2.04)
                        + math.log(0.5)) / 5)
    assert lines[-1] == (f"5 compared: 1 faster, 2 slower, 2 same; geometric-mean speedup of B over A "
                         f"{geomean:.3f}x; 2 only in A, 2 only in B, 1 not comparable")
    # columns line up: every table line is as wide as the separator or narrower
    sep = next(line for line in lines if set(line) <= {"-", " "} and line)
    table = lines[lines.index(header):lines.index(header) + 2 + len(entries)]
    assert all(len(line) <= len(sep) for line in table)


def test_format_comparison_warns_on_device_mismatch():
    a, b = compare_docs(device_b="NVIDIA H200")
    text = cmp.format_comparison(cmp.compare(a, b), a, b)
    warning = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warning) == 1
    assert "CPU Test Processor (4 threads) vs NVIDIA H200" in warning[0] and "different machines" in warning[0]


def write_json(path, doc):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_main_on_folders(tmp_path, capsys):
    a, b = compare_docs()
    write_json(tmp_path / "before" / "results.json", a)
    write_json(tmp_path / "after" / "results.json", b)
    assert cmp.main([str(tmp_path / "before"), str(tmp_path / "after")]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("A: aaaaaaaaaa")
    assert "5 compared: 1 faster, 2 slower, 2 same" in out
    assert "only in A" in out and "only in B" in out and "not comparable (ok/oom)" in out


def test_main_on_files_with_filters_and_threshold(tmp_path, capsys):
    a, b = compare_docs()
    fa = write_json(tmp_path / "a.json", a)
    fb = write_json(tmp_path / "b.json", b)
    assert cmp.main([str(fa), str(fb), "--backend", "torch,reference", "--bench", "attention",
                     "--threshold", "25"]) == 0
    out = capsys.readouterr().out
    assert "flex" not in out and "projector" not in out and "sdpa-cudnn" not in out
    # with a 25% threshold only the 2x slower ragged row stands out (torch 16 is 20% faster,
    # reference 20% slower, torch 1 2% slower: all "same")
    assert "4 compared: 0 faster, 1 slower, 3 same" in out
    assert "1 only in A" in out


def test_main_markdown(tmp_path, capsys):
    a, b = compare_docs()
    fa = write_json(tmp_path / "a.json", a)
    fb = write_json(tmp_path / "b.json", b)
    assert cmp.main([str(fa), str(fb), "--markdown", "--backend", "torch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| bench | pass | frames | B | dtype | backend | A ms | B ms | raw B/A | B/A | verdict |"
    assert "| attention | fwd | 16 | 1 | bfloat16 | torch | 10.000 | 8.000 | 0.800 | 0.800 | faster |" in table
    assert len(table) == 2 + 5  # header, separator, five torch entries


def test_main_missing_file(tmp_path, capsys):
    fa = write_json(tmp_path / "a.json", make_doc([]))
    assert cmp.main([str(fa), str(tmp_path / "nope.json")]) == 2
    captured = capsys.readouterr()
    assert "no such file" in captured.err and "nope.json" in captured.err and captured.out == ""
    assert cmp.main([str(tmp_path / "empty_dir_missing"), str(fa)]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize("content", [json.dumps({"rows": []}), json.dumps({"schema": 1}), json.dumps([1, 2]),
                                     json.dumps({"schema": 1, "rows": [{"bench": "attention"}]}), "{not json"])
def test_main_rejects_non_result_json(tmp_path, capsys, content):
    fa = write_json(tmp_path / "a.json", make_doc([]))
    bad = tmp_path / "other.json"
    bad.write_text(content)
    assert cmp.main([str(fa), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ccam-bench compare: error: ") and "other.json" in err


def test_main_rejects_bad_threshold(tmp_path):
    fa = write_json(tmp_path / "a.json", make_doc([]))
    with pytest.raises(SystemExit) as exc:
        cmp.main([str(fa), str(fa), "--threshold", "-1"])
    assert exc.value.code == 2


# -- compare: normalized by each run's GEMM ceilings; dtypes matched on request --------------


def test_compare_normalizes_by_each_rows_ceiling():
    """Identical code on a machine half as fast: B's latency doubles, and so does A's ceiling
    over B's; the normalized ratio is 1 ("same"), the raw one 2, and a warning names the gap."""
    a = make_doc([make_row("torch", 16, median_ms=10.0), make_row("flex", 16, median_ms=4.0)])
    b = make_doc([make_row("torch", 16, median_ms=20.0), make_row("flex", 16, median_ms=8.0)])
    b["ceilings"] = {"matmul_tflops": 0.75, "matmul_dtype": "float32", "copy_gbps": 12.5}
    a["rows"][0]["ceiling_tflops"], b["rows"][0]["ceiling_tflops"] = 1.6, 0.8  # the case's own ceilings
    torch_e, flex_e = cmp.compare(a, b)
    assert torch_e["raw_ratio"] == pytest.approx(2.0) and torch_e["ratio"] == pytest.approx(1.0)
    assert torch_e["verdict"] == "same"
    # flex has no case ceiling: the runs' rates stand in (1.5 vs 0.75)
    assert flex_e["ceiling_a"] == 1.5 and flex_e["ceiling_b"] == 0.75 and flex_e["ratio"] == pytest.approx(1.0)
    raw = cmp.compare(a, b, normalize=False)
    assert raw[0]["ratio"] == pytest.approx(2.0) and raw[0]["verdict"] == "slower"
    text = cmp.format_comparison(cmp.compare(a, b), a, b)
    warnings = [line for line in text.splitlines() if line.startswith("WARNING")]
    assert len(warnings) == 2 and "differ by 50%" in warnings[0] and "2 of 2 matched rows" in warnings[1]


def test_compare_no_ceiling_warning_within_ten_percent():
    a = make_doc([make_row("torch", 16, median_ms=10.0)])
    b = make_doc([make_row("torch", 16, median_ms=10.0)])
    b["ceilings"] = {"matmul_tflops": 1.5 * 1.09, "matmul_dtype": "float32", "copy_gbps": 12.5}
    assert "WARNING" not in cmp.format_comparison(cmp.compare(a, b), a, b)


def test_compare_across_dtypes_when_asked(tmp_path, capsys):
    a = make_doc([make_row("torch", 16, median_ms=10.0, dtype="float32"),
                  make_row("torch", 16, median_ms=9.0, dtype="bfloat16")])
    b = make_doc([make_row("torch", 16, median_ms=5.0, dtype="bfloat16")])
    plain = cmp.compare(a, b)
    assert [e["verdict"] for e in plain] == ["only in A", "faster"]  # bfloat16 with bfloat16 only
    across = cmp.compare(a, b, dtypes=("float32", "bfloat16"))
    assert len(across) == 1 and across[0]["raw_ratio"] == pytest.approx(0.5) and across[0]["verdict"] == "faster"
    fa, fb = write_json(tmp_path / "a.json", a), write_json(tmp_path / "b.json", b)
    assert cmp.main([str(fa), str(fb), "--dtypes", "float32:bfloat16"]) == 0
    assert "1 compared: 1 faster" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cmp.main([str(fa), str(fb), "--dtypes", "float32"])


def test_noisy_rows_are_marked_in_the_tables():
    from ccam_kernels.bench.report import format_summary, markdown_text
    from ccam_kernels.bench.timing import case_ceiling, noisy_reason

    drift = make_row("torch", 16, median_ms=10.0)
    drift.update(case_ceiling(1.0, 0.7))  # the machine slowed 30% during the case
    over = make_row("flex", 16, median_ms=4.0)
    over.update(case_ceiling(1.0, 0.9), pct_of_ceiling=127.8)
    fine = make_row("reference", 16, median_ms=20.0)
    fine.update(case_ceiling(1.0, 0.85))  # 15%: within the 20% allowed
    assert drift["ceiling_tflops"] == 1.0 and drift["ceiling_drift_pct"] == pytest.approx(30.0)
    for row in (drift, over, fine):
        row["noisy_reason"] = noisy_reason(row)
        row["noisy"] = row["noisy_reason"] is not None
    assert "moved 30%" in drift["noisy_reason"] and over["noisy_reason"] == "128% of the ceiling"
    assert fine["noisy"] is False
    doc = make_doc([fine, drift, over])
    doc["ceilings"]["matmul_tflops_by_dtype"] = {"float32": 1.5}
    md = markdown_text(doc)
    assert md.count("| NOISY |") == 2 and "moved 30% during the case" in md
    summary = format_summary(doc)
    assert summary.count("NOISY") == 3  # two cells and the legend line
