"""The GPU suite's benchmark results: merge its ccam-bench runs into one results.json, and say
which backend won each benchmark row.

    python benchmarks/suite_table.py merge OUT.json RUN1.json [RUN2.json ...]
    python benchmarks/suite_table.py winners results.json     # markdown table on stdout, and
                                                              # the name to commit the run under
    python benchmarks/suite_table.py predicted results.json   # the performance model's time next
                                                              # to each timed row of our kernels

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


_MODEL_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}


def predicted(doc: dict) -> str:
    """Each timed attention row of the cuda and triton backends (16-bit) with the performance
    model's prediction for its shape (ccam_kernels.perf_model, the Video-CCAM config's N, H, D
    and the row's P): the forward's kernel and its split merge for "fwd", dQ + dK/dV for "bwd",
    both for "fwd+bwd"."""
    from ccam_kernels import perf_model
    from ccam_kernels.config import CCAMConfig

    cfg = CCAMConfig()
    lines = ["| pass | frames | batch | dtype | backend | measured ms | predicted ms | measured / predicted |",
             "|---|---|---|---|---|---|---|---|"]
    cache: dict = {}
    for row in doc["rows"]:
        if (row.get("bench") != "attention" or row.get("backend") not in ("cuda", "triton") or row.get("status") != "ok"
                or row.get("dtype") not in _MODEL_DTYPES or row.get("median_ms") is None):
            continue
        counts = tuple(row.get("frame_counts") or [row["frames"]] * row["batch"])
        shape = perf_model.Shape(num_query=cfg.num_query, heads=cfg.num_heads, kv_heads=cfg.num_heads,
                                 head_dim=cfg.head_dim, tokens_per_frame=row.get("tokens_per_frame", 729),
                                 frame_counts=counts, dtype=_MODEL_DTYPES[row["dtype"]])
        if shape not in cache:
            cache[shape] = {(r["backend"], r["kernel"]): r["predicted_ms"] for r in perf_model.predict(shape)}
        model = cache[shape]
        kernels = {"fwd": ("fwd", "merge"), "bwd": ("bwd",), "fwd+bwd": ("fwd", "merge", "bwd")}.get(row["pass"], ())
        if not kernels:
            continue
        want = sum(model.get((row["backend"], k), 0.0) for k in kernels)  # "merge": only when the forward splits
        lines.append(f"| {row['pass']} | {_frames(row)} | {row['batch']} | {row['dtype']} | {row['backend']} | "
                     f"{row['median_ms']:.3f} | {want:.3f} | {row['median_ms'] / want:.2f} |")
    if len(lines) == 2:
        return "(no timed row of the cuda or triton kernels)"
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
    if len(argv) == 2 and argv[0] == "predicted":
        with open(argv[1]) as f:
            print(predicted(json.load(f)))
        return 0
    print(__doc__.split("\n\n")[1], file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
