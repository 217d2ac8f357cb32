"""ccam-bench --bench long: long videos, one-shot projector vs streaming vs frame-parallel.

    python -m ccam_kernels.bench --bench long                   # 96, 512, 1024, 3600 frames; 1, 2, 4 processes
    python -m ccam_kernels.bench --bench long --frames 96,512 --procs 1,2 --out bench-out

Memory/time rows: each (mode, frames) point runs in a fresh Python process, so no point sees
another's allocator state. A point builds the projector (eval, no grad), warms up on a short
video, then generates the video's features as an encoder would hand them over and runs the
projector: "one-shot" holds all frames and calls ``proj(x, [T])``; "stream" generates one
chunk at a time and pushes it. ``peak_mem_mb`` is the peak resident set (VmHWM, reset through
/proc/self/clear_refs) above the resident set at the start of that call, so it counts the
features, K/V and every temporary; on CUDA it is ``max_memory_allocated`` above the start.
``median_ms`` times the same call (feature generation included in both modes).
``max_rel_err`` compares each stream's output with the one-shot output of the same features.

Frame-parallel rows: ``procs`` processes (gloo on CPU) spawned here, each holding an equal
share of the frames, time ``proj(local, splits, group=WORLD)`` (fwd, and fwd+bwd in training
mode) and report the bytes each rank contributes to the two all-reduces of one forward:
the LSE max (B*H*N floats) and the partials' sum (B*N*H*(D+1) floats).

On CPU the config is reduced (CPU_CONFIG, P = CPU_TOKENS_PER_FRAME, float32) so a run ends in
minutes; on CUDA the Video-CCAM v1.2 config in bfloat16 with P = 729.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

import torch

from .arg_types import int_at_least, int_list
from .names import LONG, is_long_request  # noqa: F401  (torch-free, for the command line)
from .oom import is_oom_message
from .out_dir import check_out_dir

DEFAULT_FRAMES = (96, 512, 1024, 3600)
DEFAULT_PROCS = (1, 2, 4)
CPU_CONFIG = dict(num_query=256, hidden_size=256, cross_hidden_size=256, num_heads=4, num_key_value_heads=4,
                  intermediate_size=512, output_size=256, attention_dropout=0.0, dropout=0.0)
CPU_TOKENS_PER_FRAME = 16
GPU_TOKENS_PER_FRAME = 729
CHUNK_FRAMES = 32
WARMUP_FRAMES = 2 * CHUNK_FRAMES
PARALLEL_FRAMES = 512


def build_parser():
    p = argparse.ArgumentParser(prog="ccam-bench --bench long", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", choices=[LONG], required=True)
    p.add_argument("--frames", type=int_list, default=DEFAULT_FRAMES, help=f"default {DEFAULT_FRAMES}")
    p.add_argument("--chunk", type=int_at_least(1), default=CHUNK_FRAMES, help=f"frames per push (default {CHUNK_FRAMES})")
    p.add_argument("--procs", type=int_list, default=DEFAULT_PROCS, help=f"frame-parallel world sizes (default {DEFAULT_PROCS})")
    p.add_argument("--parallel-frames", type=int_at_least(1), default=PARALLEL_FRAMES,
                   help=f"frames of the frame-parallel video (default {PARALLEL_FRAMES})")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed calls per point (default 3)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when present")
    p.add_argument("--threads", type=int_at_least(1), help="torch threads per point, split over the ranks of a "
                   "frame-parallel run (default: torch's default)")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    return p


# ------------------------------------------------------------------------------------------
# Setup shared by every worker.


def _setup(device: str):
    from ..config import CCAMConfig
    from ..projector import CCAMProjector

    gpu = device == "cuda"
    cfg = CCAMConfig(attention_dropout=0.0, dropout=0.0) if gpu else CCAMConfig(**CPU_CONFIG)
    dtype = torch.bfloat16 if gpu else torch.float32
    torch.manual_seed(0)
    proj = CCAMProjector(cfg, backend="torch").to(device=device, dtype=dtype).eval()
    tokens = GPU_TOKENS_PER_FRAME if gpu else CPU_TOKENS_PER_FRAME
    return proj, cfg, dtype, tokens


def _chunks(total, chunk):
    for start in range(0, total, chunk):
        yield min(chunk, total - start)


def _features(gen, frames, tokens, cfg, dtype, device):
    return torch.randn(frames, tokens, cfg.cross_hidden_size, generator=gen, device=device).to(dtype)


def _run(mode, proj, cfg, dtype, tokens, frames, chunk, device):
    """One projector call on a freshly generated video; the features come chunk by chunk from
    one seeded generator in both modes, so both see the same values."""
    gen = torch.Generator(device=device).manual_seed(1234)
    with torch.no_grad():
        if mode == "one-shot":
            x = torch.cat([_features(gen, t, tokens, cfg, dtype, device) for t in _chunks(frames, chunk)])
            return proj(x, [frames])
        s = proj.stream(frames)
        for t in _chunks(frames, chunk):
            s.push(_features(gen, t, tokens, cfg, dtype, device))
        return s.finish()


class _Peak:
    """Peak memory of a region above its start: VmHWM on CPU, max_memory_allocated on CUDA."""

    def __init__(self, device):
        self.device = device

    @staticmethod
    def _status(field):
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(f"/proc/self/status has no {field}")

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = self._status("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.peak_mb = (self._status("VmHWM") - self.base) / 2**20


def _memory_worker(spec: dict) -> dict:
    """One fresh process, one mode: warm up, then the peak memory of one call."""
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    proj, cfg, dtype, tokens = _setup(device)
    mode, frames, chunk = spec["mode"], spec["frames"], spec["chunk"]
    _run(mode, proj, cfg, dtype, tokens, min(frames, WARMUP_FRAMES), chunk, device)  # warm-up
    with _Peak(device) as peak:
        y = _run(mode, proj, cfg, dtype, tokens, frames, chunk, device)
    torch.save(y.float().cpu(), spec["output"])
    return {"peak_mem_mb": peak.peak_mb, "tokens_per_frame": tokens, "config": cfg.to_dict(),
            "dtype": str(dtype).replace("torch.", ""), "threads": torch.get_num_threads()}


def _timing_worker(spec: dict) -> dict:
    """One process, both modes alternating call by call, so load on a shared machine hits
    both alike: {mode: [ms, ...]}."""
    device = spec["device"]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    proj, cfg, dtype, tokens = _setup(device)
    times = {mode: [] for mode in spec["modes"]}
    for i in range(spec["repeats"] + 1):  # round 0 warms up
        for mode in spec["modes"]:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            _run(mode, proj, cfg, dtype, tokens, spec["frames"], spec["chunk"], device)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times[mode].append((time.perf_counter() - t0) * 1e3)
    return times


def _spawn_point(spec: dict) -> dict:
    cmd = [sys.executable, "-m", "ccam_kernels.bench.long_video", "--worker", json.dumps(spec)]
    # For memory points, a fixed glibc mmap threshold makes every allocation of 64 KiB or more
    # its own mapping, unmapped on free: the resident set then follows the live tensors instead
    # of the heap's high-water mark, for both modes alike. Timing runs with the default malloc.
    env = dict(os.environ)
    if "modes" not in spec:
        env["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------
# Frame-parallel.


def _parallel_worker(rank, world, init_file, spec, result_file):
    import torch.distributed as dist

    from ..long_video.distributed import allreduce_bytes

    torch.set_num_threads(max(1, spec["threads"] // world))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        proj, cfg, dtype, tokens = _setup("cpu")
        frames = spec["frames"]
        share = [frames // world + (r < frames % world) for r in range(world)]
        gen = torch.Generator().manual_seed(99)
        full = torch.randn(frames, tokens, cfg.cross_hidden_size, generator=gen).to(dtype)
        first = sum(share[:rank])
        local = full[first:first + share[rank]].clone()
        del full
        result = {}
        for pass_ in ("fwd", "fwd+bwd"):
            proj.train(pass_ != "fwd")
            times = []
            for i in range(spec["repeats"] + 1):  # the first call warms up
                dist.barrier()
                t0 = time.perf_counter()
                if pass_ == "fwd":
                    with torch.no_grad():
                        y = proj(local, [share[rank]], group=dist.group.WORLD)
                else:
                    proj.zero_grad(set_to_none=True)
                    proj(local, [share[rank]], group=dist.group.WORLD).square().mean().backward()
                dist.barrier()
                if i:
                    times.append((time.perf_counter() - t0) * 1e3)
            result[pass_] = times
        if rank == 0:
            proj.eval()
            full = torch.randn(frames, tokens, cfg.cross_hidden_size, generator=torch.Generator().manual_seed(99)).to(dtype)
            with torch.no_grad():
                y = proj(local, [share[rank]], group=dist.group.WORLD)
                ref = proj(full, [frames])
            err = ((y - ref).norm() / ref.norm()).item()
            item = torch.empty((), dtype=torch.float32).element_size()
            result.update(max_rel_err=err, shares=share,
                          allreduce_bytes=allreduce_bytes(1, cfg.num_query, cfg.num_heads, cfg.head_dim, item),
                          threads_per_rank=torch.get_num_threads())
            with open(result_file, "w", encoding="utf-8") as f:
                json.dump(result, f)
        else:
            with torch.no_grad():
                proj.eval()(local, [share[rank]], group=dist.group.WORLD)  # rank 0's check needs every rank
    finally:
        dist.destroy_process_group()


def _run_parallel(world: int, frames: int, repeats: int, threads) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.json")
        spec = {"frames": frames, "repeats": repeats, "threads": threads or torch.get_num_threads()}
        mp.spawn(_parallel_worker, args=(world, os.path.join(tmp, "store"), spec, result_file), nprocs=world, join=True)
        with open(result_file, encoding="utf-8") as f:
            return json.load(f)


# ------------------------------------------------------------------------------------------


def _row(**fields):
    row = {"bench": LONG, "pass": "fwd", "backend": "torch", "batch": 1, "status": "ok", "reason": None,
           "median_ms": None, "peak_mem_mb": None, "max_rel_err": None}
    row.update(fields)
    return row


def long_figure(doc: dict):
    """The Figure of peak memory and time vs frames, one-shot against stream (both modes of our
    CCAMProjector, so both "(ours)"); None without matplotlib or without such rows."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from .plots import figure_title, legend_label, wrap_title

    rows = [r for r in doc["rows"] if r["status"] == "ok" and r["mode"] in ("one-shot", "stream")]
    if not rows:
        return None
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for mode, color in (("one-shot", "#d62728"), ("stream", "#1f77b4")):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["frames"])
        if not mine:
            continue
        name = mode if mode == "one-shot" else f"stream, {mine[0]['chunk_frames']} frames/push"
        label = legend_label(name, "ours")
        axes[0].plot([r["frames"] for r in mine], [r["peak_mem_mb"] for r in mine], "o-", color=color, label=label)
        axes[1].plot([r["frames"] for r in mine], [r["median_ms"] for r in mine], "o-", color=color, label=label)
    # The axes in the table's units (long.json and the printed table: peak MB, median ms).
    axes[0].set(xlabel="frames", ylabel="peak MB (above the call's start)", title="peak memory")
    axes[1].set(xlabel="frames", ylabel="median ms", title="time")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, frameon=False)
    s = doc["settings"]
    what = (f"CCAMProjector, N={s['config']['num_query']}, C={s['config']['hidden_size']}, "
            f"P={s['tokens_per_frame']}")
    fig.suptitle(wrap_title(figure_title(what, doc, [s["dtype"]]), 9.7, 10), fontsize=10)
    return fig


def write_plot(doc: dict, path: str) -> bool:
    """Save long_figure(doc) as a PNG. False without matplotlib (or nothing to plot)."""
    fig = long_figure(doc)
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    return True


def main(argv=None) -> int:
    from .report import device_name, git_commit

    args = build_parser().parse_args(argv)  # a bad value exits with code 2 here, before any case
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("ccam-bench: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    try:
        check_out_dir(args.out)  # as ccam-bench: an unusable --out is refused now, not after the run
    except ValueError as exc:
        print(f"ccam-bench: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)  # what the points run with, so the device name says it
    commit, dirty = git_commit()
    started = time.perf_counter()
    rows, settings = [], {}
    chunk = args.chunk
    with tempfile.TemporaryDirectory() as tmp:
        for frames in args.frames:
            outputs, points = {}, {}
            for mode in ("one-shot", "stream"):
                spec = {"mode": mode, "frames": frames, "chunk": chunk, "device": device, "threads": args.threads,
                        "output": os.path.join(tmp, f"{mode}-{frames}.pt")}
                print(f"long: {mode} T={frames}: peak memory ...", file=sys.stderr, flush=True)
                points[mode] = _spawn_point(spec)
                if "error" not in points[mode]:
                    outputs[mode] = torch.load(spec["output"])
                    settings = {key: points[mode][key] for key in ("tokens_per_frame", "config", "dtype", "threads")}
            live = [m for m in ("one-shot", "stream") if "error" not in points[m]]
            print(f"long: T={frames}: timing {', '.join(live)} alternately ...", file=sys.stderr, flush=True)
            times = _spawn_point({"modes": live, "frames": frames, "chunk": chunk, "device": device,
                                  "threads": args.threads, "repeats": args.repeats}) if live else {}
            for mode in ("one-shot", "stream"):
                row = _row(mode=mode, frames=frames, chunk_frames=chunk if mode == "stream" else None,
                           dtype=settings.get("dtype"))
                got = points[mode]
                if "error" in got or "error" in times:
                    why = got.get("error") or times["error"]
                    row.update(status="oom" if is_oom_message(why) else "error", reason=why)
                    rows.append(row)
                    continue
                row.update(median_ms=statistics.median(times[mode]), min_ms=min(times[mode]), times_ms=times[mode],
                           peak_mem_mb=got["peak_mem_mb"])
                if mode == "stream" and "one-shot" in outputs:
                    y, ref = outputs["stream"], outputs["one-shot"]
                    row["max_rel_err"] = ((y - ref).norm() / ref.norm()).item()
                    if "one-shot" in times:
                        row["time_vs_one_shot"] = row["median_ms"] / statistics.median(times["one-shot"])
                rows.append(row)
                print(f"long:   {mode}: {row['median_ms']:.0f} ms, peak {row['peak_mem_mb']:.1f} MB",
                      file=sys.stderr, flush=True)
    if device == "cpu":
        for world in args.procs:
            print(f"long: frame-parallel on {world} processes, T={args.parallel_frames} ...", file=sys.stderr, flush=True)
            try:
                got = _run_parallel(world, args.parallel_frames, args.repeats, args.threads)
            except Exception as exc:  # a failed spawn is a row, not a lost run
                why = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                rows.append(_row(mode="frame-parallel", procs=world, frames=args.parallel_frames,
                                 status="oom" if is_oom_message(why) else "error", reason=why))
                continue
            for pass_ in ("fwd", "fwd+bwd"):
                rows.append(_row(mode="frame-parallel", procs=world, frames=args.parallel_frames, **{"pass": pass_},
                                 dtype=settings.get("dtype", "float32"), median_ms=statistics.median(got[pass_]),
                                 times_ms=got[pass_], max_rel_err=got["max_rel_err"] if pass_ == "fwd" else None,
                                 frames_per_rank=got["shares"], allreduce_bytes=got["allreduce_bytes"],
                                 threads_per_rank=got["threads_per_rank"]))
    doc = {"schema": 1, "commit": commit, "commit_dirty": dirty,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "device": device_name(torch.device(device)), "torch": torch.__version__,
           "triton": _version("triton"), "cuda": torch.version.cuda,
           "settings": {**settings, "chunk_frames": args.chunk, "repeats": args.repeats, "procs": list(args.procs),
                        "parallel_frames": args.parallel_frames},
           "elapsed_s": time.perf_counter() - started, "rows": rows}
    path = os.path.join(args.out, "long.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    plot = os.path.join(args.out, "long-memory.png")
    wrote_plot = bool(settings) and write_plot(doc, plot)
    print(format_table(rows))
    print("\nwrote " + path + (", " + plot if wrote_plot else ""))
    return 1 if any(r["status"] == "error" for r in rows) else 0


def _version(name):
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return None


def format_table(rows) -> str:
    head = f"{'mode':15} {'pass':8} {'frames':>6} {'chunk':>5} {'procs':>5} {'median ms':>10} {'peak MB':>8} {'rel err':>8}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        def fmt(v, spec):
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        note = r["reason"] or (f"{r['time_vs_one_shot']:.2f}x one-shot time" if "time_vs_one_shot" in r else "")
        if "allreduce_bytes" in r:
            note = f"all-reduce bytes/rank: max {r['allreduce_bytes']['max_lse']}, sum {r['allreduce_bytes']['sum_partials']}"
        lines.append(f"{r['mode']:15} {r['pass']:8} {r['frames']:>6} {fmt(r.get('chunk_frames'), 'd'):>5} "
                     f"{fmt(r.get('procs'), 'd'):>5} {fmt(r['median_ms'], '.1f'):>10} {fmt(r['peak_mem_mb'], '.1f'):>8} "
                     f"{fmt(r['max_rel_err'], '.1e'):>8}  {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        job = json.loads(sys.argv[2])
        print(json.dumps(_timing_worker(job) if "modes" in job else _memory_worker(job)))
        sys.exit(0)
    sys.exit(main())
