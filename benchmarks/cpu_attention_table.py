"""The CPU table of docs/torch.md (issue 25's goals): the torch backend against SDPA with the
dense mask and the GEMM ceiling, at 1 and 2 threads, float32, v1.2 shapes.

    python benchmarks/cpu_attention_table.py [--threads 1,2] [--frames 1,16,32,48,64,96]
        [--ragged 16,96,33,64] [--backward-frames 16,48] [--projector-frames 96] [--repeats 3]
        [--cpu-time]

Per case, one call of each contestant per round, interleaved with a torch.mm of 1024^3 (the
ceiling, as ccam-bench's case ceiling: the best of the case's rounds), so a change of the
machine's load hits them alike; medians of the rounds. The contestants are ccam-bench's own
(bench/contestants.py): "torch" is ccam_attention(backend="torch"), "sdpa" is SDPA's CPU flash
kernel with the dense additive mask prepared once ("sdpa-flash"), "projector" the whole
CCAMProjector forward on the torch backend, whose floor is every projector FLOP (its GEMMs and
the live attention) at the ceiling. Rows:

    threads  pass  frames  torch ms  sdpa ms  x sdpa  ceiling GFLOP/s  torch GFLOP/s (live)  % ceiling

It prints the load average (os.getloadavg) before and after: numbers from a loaded machine are
ratios, not absolute times. ``--cpu-time`` times the 1-thread rows by the process's CPU time
(time.process_time), which a loaded machine does not stretch: use it when the machine is shared
(the 2-thread rows stay wall time, which is what two threads buy)."""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from ccam_kernels.bench.arg_types import int_list
from ccam_kernels.bench.contestants import AttentionInputs, ProjectorInputs, make_contestant, pass_functions
from ccam_kernels.bench.runner import BenchCase

CEILING_N = 1024


def timed(setup, run, i, clock=time.perf_counter) -> float:
    setup(i)
    t0 = clock()
    run(i)
    return clock() - t0


def measure(case: BenchCase, names, repeats: int, clock=time.perf_counter):
    """{name: median seconds}, and the ceiling (GFLOP/s): the best mm of the rounds."""
    inputs_cls = ProjectorInputs if case.bench == "projector" else AttentionInputs
    inputs = inputs_cls(case, torch.device("cpu"), 1)
    runs = {}
    for name in names:
        c = make_contestant(case.bench, name)
        c.prepare(inputs)
        runs[name] = pass_functions(c, case.pass_, 1)
    a, b = torch.randn(CEILING_N, CEILING_N), torch.randn(CEILING_N, CEILING_N)
    runs["mm"] = (lambda i: None, lambda i: torch.mm(a, b))
    times = {name: [] for name in runs}
    for name, (setup, run) in runs.items():  # warm-up
        timed(setup, run, 0, clock)
    for r in range(repeats):
        order = list(runs)[r % len(runs):] + list(runs)[:r % len(runs)]  # rotate who goes first
        for name in order:
            times[name].append(timed(*runs[name], 0, clock))
    ceiling = 2 * CEILING_N**3 / min(times.pop("mm")) / 1e9
    return {n: statistics.median(t) for n, t in times.items()}, ceiling


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int_list, default=(1, 2))
    p.add_argument("--frames", type=int_list, default=(1, 16, 32, 48, 64, 96))
    p.add_argument("--ragged", type=int_list, action="append", default=None)
    p.add_argument("--backward-frames", type=int_list, default=(16, 48))
    p.add_argument("--projector-frames", type=int_list, default=(96,))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu-time", action="store_true", help="time the 1-thread rows by CPU time (a shared machine)")
    args = p.parse_args()
    ragged = [tuple(r) for r in (args.ragged or [(16, 96, 33, 64)])]
    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}; "
          f"1-thread rows timed by {'CPU' if args.cpu_time else 'wall'} time")
    print("| threads | pass | frames | torch ms | sdpa ms | x sdpa | ceiling GFLOP/s | torch GFLOP/s | % ceiling |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        clock = time.process_time if args.cpu_time and threads == 1 else time.perf_counter
        cases = ([("fwd", (t,)) for t in args.frames] + [("fwd", r) for r in ragged]
                 + [("fwd+bwd", (t,)) for t in args.backward_frames])
        for pass_, counts in cases:
            case = BenchCase("attention", pass_, counts, torch.float32)
            med, ceiling = measure(case, ("torch", "sdpa-flash"), args.repeats, clock)
            rate = case.flops() / med["torch"] / 1e9
            frames = counts[0] if len(counts) == 1 else list(counts)
            print(f"| {threads} | {pass_} | {frames} | {med['torch'] * 1e3:.0f} | {med['sdpa-flash'] * 1e3:.0f} | "
                  f"{med['sdpa-flash'] / med['torch']:.2f} | {ceiling:.0f} | {rate:.1f} | {100 * rate / ceiling:.0f}% |",
                  flush=True)
        for t in args.projector_frames:
            case = BenchCase("projector", "fwd", (t,), torch.float32)
            med, ceiling = measure(case, ("torch",), args.repeats, clock)
            floor = case.flops() / (ceiling * 1e9)
            print(f"| {threads} | projector fwd | {t} | {med['torch'] * 1e3:.0f} | floor {floor * 1e3:.0f} | "
                  f"{med['torch'] / floor:.2f}x floor | {ceiling:.0f} | {case.flops() / med['torch'] / 1e9:.1f} | "
                  f"{100 * floor / med['torch']:.0f}% |", flush=True)
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
