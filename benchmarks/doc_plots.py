"""Regenerate every docs/*.png from the committed result JSONs in benchmarks/results/.

    python benchmarks/doc_plots.py           # from the repository root; needs matplotlib

The figures are the ones ccam-bench writes next to its results (bench/plots.py, and
bench/long_video.py for --bench long), drawn again from the JSON, so a change of the plotting
code reaches the README's pictures without re-measuring anything.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
DOCS = os.path.join(ROOT, "docs")

# docs file -> (results JSON, figure kind); kind "long" is the long-video figure.
PLOTS = {
    "cpu-latency.png": ("cpu-epyc-2threads_2026-11-21_958b00f.json", "latency"),
    "cpu-speedup.png": ("cpu-epyc-2threads_2026-11-21_958b00f.json", "speedup"),
    "cpu-pct-of-ceiling.png": ("cpu-epyc-2threads_2026-11-21_958b00f.json", "pct_of_ceiling"),
    "long-video-memory.png": ("cpu-xeon-1thread_long_2026-12-01_994896d.json", "long"),
}


def figure(doc: dict, kind: str):
    if kind == "long":
        from ccam_kernels.bench.long_video import long_figure

        return long_figure(doc)
    from ccam_kernels.bench.plots import build_figures

    return build_figures(doc).get(kind)


def main() -> int:
    for name, (source, kind) in PLOTS.items():
        with open(os.path.join(RESULTS, source), encoding="utf-8") as f:
            doc = json.load(f)
        fig = figure(doc, kind)
        if fig is None:
            print(f"doc_plots: nothing to draw for {name} (is matplotlib installed?)", file=sys.stderr)
            return 1
        path = os.path.join(DOCS, name)
        fig.savefig(path, dpi=110)
        print(f"wrote {os.path.relpath(path, ROOT)} from benchmarks/results/{source}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
