"""The GPU suite's benchmark results: merge its ccam-bench runs into one results.json, and say
which backend won each benchmark row.

    python benchmarks/suite_table.py merge OUT.json RUN1.json [RUN2.json ...]
    python benchmarks/suite_table.py winners results.json     # markdown table on stdout, and
                                                              # the name to commit the run under

The suite runs ccam-bench once per benchmark (attention rows, projector rows: the cross
product of one call's flags would time rows nobody needs); ``merge`` joins their rows into one
document of the result format of docs/reference.md §9 (each run's own header is kept under "runs"). A missing
or unreadable run is left out with a note on stderr: a run cut short still wrote its finished
rows, and the rest must still be reported. ``winners`` groups the rows that were timed ("ok")
by case (bench, pass, frames, batch, dtype) and names the fastest backend, the fastest of ours
and the fastest anchor (the reference included), with the ratio of the two.
"""

from __future__ import annotations

import json
import re
import sys

CASE_KEYS = ("bench", "pass", "frame_counts", "batch", "dtype")


def merge(paths: list[str]) -> dict:
    docs = []
    for path in paths:
        try:
            with open(path) as f:
                docs.append(json.load(f))
        except (OSError, ValueError) as exc:
            print(f"suite_table: leaving out {path}: {exc}", file=sys.stderr)
    if not docs:
        raise SystemExit("suite_table: no benchmark results to merge")
    for key in ("commit", "device"):
        if len({d.get(key) for d in docs}) > 1:
            raise SystemExit(f"suite_table: the runs differ in {key}: {[d.get(key) for d in docs]}")
    merged = {k: v for k, v in docs[0].items() if k != "rows"}
    merged["complete"] = all(d.get("complete", False) for d in docs)
    merged["elapsed_s"] = sum(d.get("elapsed_s") or 0.0 for d in docs)
    merged["runs"] = [{k: v for k, v in d.items() if k != "rows"} for d in docs]
    merged["rows"] = [row for d in docs for row in d["rows"]]
    return merged


def _frames(row) -> str:
    counts = row.get("frame_counts") or [row["frames"]]
    return str(counts[0]) if len(set(counts)) == 1 else "ragged " + "/".join(map(str, counts))


def winners(doc: dict) -> str:
    cases: dict = {}
    for row in doc["rows"]:
        if row.get("status") == "ok" and row.get("median_ms") is not None:
            key = tuple(json.dumps(row.get(k)) for k in CASE_KEYS)
            cases.setdefault(key, []).append(row)
    lines = ["| bench | pass | frames | batch | dtype | fastest | ours: best ms | anchors: best ms | best anchor / ours |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rows in cases.values():
        first = rows[0]
        fastest = min(rows, key=lambda r: r["median_ms"])
        ours = [r for r in rows if r["kind"] == "ours"]
        anchors = [r for r in rows if r["kind"] != "ours"]
        best_ours = min(ours, key=lambda r: r["median_ms"]) if ours else None
        best_anchor = min(anchors, key=lambda r: r["median_ms"]) if anchors else None
        ratio = (f"{best_anchor['median_ms'] / best_ours['median_ms']:.2f}x" if best_ours and best_anchor else "-")
        lines.append(" | ".join([
            f"| {first['bench']}", first["pass"], _frames(first), str(first["batch"]), first["dtype"],
            f"**{fastest['backend']}**" + (" (ours)" if fastest["kind"] == "ours" else ""),
            f"{best_ours['backend']} {best_ours['median_ms']:.3f}" if best_ours else "-",
            f"{best_anchor['backend']} {best_anchor['median_ms']:.3f}" if best_anchor else "-",
            ratio + " |"]))
    if len(lines) == 2:
        return "(no benchmark row was timed)"
    return "\n".join(lines)


def results_stem(doc: dict) -> str:
    """benchmarks/results/ naming: <device>_<date>_<commit>, e.g. h200_2026-11-21_8bdbce1."""
    device = re.sub(r"[^a-z0-9]+", "-", doc.get("device", "unknown").lower().replace("nvidia", "")).strip("-")
    return f"{device}_{str(doc.get('date', ''))[:10]}_{str(doc.get('commit', 'unknown'))[:7]}"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 3 and argv[0] == "merge":
        with open(argv[1], "w") as f:
            json.dump(merge(argv[2:]), f, indent=1)
        return 0
    if len(argv) == 2 and argv[0] == "winners":
        with open(argv[1]) as f:
            doc = json.load(f)
        stem = results_stem(doc)
        print(winners(doc))
        print(f"\nCommit this run as benchmarks/results/{stem}.json (this results.json) and "
              f"benchmarks/results/{stem}.md (this SUITE.md).")
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
