"""How one benchmark row is timed, and the machine's ceilings measured in the same run.

A timed call is split in two: ``setup(i)`` runs untimed (clear gradients; for the backward
pass, run the forward that the backward needs) and ``run(i)`` is timed. ``i`` counts calls, and
the callers rotate their inputs on it, so consecutive calls read different tensors.

GPU: each ``run`` is bracketed by CUDA events on the current stream, with the L2 cache
overwritten just before (outside the events), so that no call finds its inputs in L2 whatever
their size. Peak memory is ``max_memory_allocated`` during the call minus what was allocated
before it (the inputs, and for the backward pass what the forward saved).

CPU: each call is one ``timeit.Timer(stmt, setup).timeit(1)`` (what torch.utils.benchmark's
Timer runs underneath, minus the two extra warm-up calls its ``timeit`` makes, which would
break the backward pass's one-forward-one-backward pairing): setup untimed, garbage
collection off while timing.
"""

from __future__ import annotations

import math
import statistics
import time
import timeit

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 size on CUDA; the L3 (or largest) cache on CPU; 32 MiB when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    best = 0
    for index in range(8):
        try:
            with open(f"/sys/devices/system/cpu/cpu0/cache/index{index}/size", encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        best = max(best, int(text.rstrip("KMG")) * scale)
    return best or 32 * 2**20


def rotation_count(bytes_per_set: int, device: torch.device, limit: int = 8) -> int:
    """How many copies of the inputs to rotate through so that together they exceed twice
    the last-level cache (at most ``limit``, and at most ~4 GiB of copies)."""
    want = math.ceil(2 * last_level_cache_bytes(device) / max(bytes_per_set, 1))
    by_memory = max(1, (4 * 2**30) // max(bytes_per_set, 1))
    return max(1, min(want, limit, by_memory))


class Timer:
    """Times ``run(i)`` calls on one device; reusable across rows."""

    def __init__(self, device: torch.device):
        self.device = device
        self._flush = None
        if device.type == "cuda":
            self._flush = torch.empty(2 * last_level_cache_bytes(device), dtype=torch.uint8, device=device)

    def _one_cuda(self, run, i):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._flush.zero_()
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        start.record()
        run(i)
        end.record()
        end.synchronize()
        return start.elapsed_time(end), (torch.cuda.max_memory_allocated(self.device) - base) / 2**20

    def call(self, setup, run, i):
        """(ms, peak MiB above the inputs or None) of one call, after its untimed setup."""
        if self.device.type == "cuda":
            setup(i)
            sync(self.device)
            return self._one_cuda(run, i)
        timer = timeit.Timer(stmt="run(i)", setup="setup(i)", globals={"run": run, "setup": setup, "i": i})
        return timer.timeit(1) * 1e3, None

    def estimate_ms(self, setup, run, first: int, count: int) -> float:
        """Wall time of ``count`` untimed calls (the warm-up), per call."""
        total = 0.0
        for i in range(first, first + count):
            setup(i)
            sync(self.device)
            t0 = time.perf_counter()
            run(i)
            sync(self.device)
            total += time.perf_counter() - t0
        return total * 1e3 / max(count, 1)


def summarize(rounds: list[list[float]], peaks: list) -> dict:
    """Median over every timed call, and the spread between the rounds: the largest
    difference of two rounds' medians as a percentage of the overall median. The rounds of a
    row are interleaved with the other backends' rounds, so the spread shows drift too."""
    times = [t for r in rounds for t in r]
    median = statistics.median(times)
    medians = [statistics.median(r) for r in rounds if r]
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    peaks = [p for p in peaks if p is not None]
    return {
        "median_ms": median,
        "min_ms": min(times),
        "max_ms": max(times),
        "iqr_ms": q[2] - q[0],
        "q1_ms": q[0],
        "q3_ms": q[2],
        "spread_pct": 100.0 * (max(medians) - min(medians)) / median if len(medians) > 1 else None,
        "round_medians_ms": medians,
        "repeats": len(times),
        "peak_mem_mb": max(peaks) if peaks else None,
    }


def measure_ceilings(device: torch.device, dtypes=()) -> dict:
    """The machine's limits, measured now. GEMM rate: bf16 on GPU, float32 on CPU, plus each
    dtype in ``dtypes``, as ``matmul_tflops_by_dtype``; copy bandwidth counts bytes read plus
    bytes written. A ceiling is the best the machine did: the fastest call, not the median."""
    timer = Timer(device)
    primary = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 2048
    rates = {}
    for dtype in dict.fromkeys((primary, *dtypes)):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best_ms = _best_of(timer, lambda i, a=a, b=b: torch.mm(a, b), repeats=10)
        rates[str(dtype).replace("torch.", "")] = 2 * n**3 / (best_ms * 1e-3) / 1e12
    copy_bytes = 2**30 if device.type == "cuda" else 2**28
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_ms = _best_of(timer, lambda i: dst.copy_(src), repeats=10)
    primary_name = str(primary).replace("torch.", "")
    return {
        "matmul_tflops": rates[primary_name],
        "matmul_dtype": primary_name,
        "matmul_tflops_by_dtype": rates,
        "matmul_shape": [n, n, n],
        "copy_gbps": 2 * copy_bytes / (copy_ms * 1e-3) / 1e9,
        "tf32": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
    }


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 3) -> float:
    """One GEMM rate of ``dtype`` now: the best of ``repeats`` n³ products (n = 8192 on GPU, 1024
    on CPU, where the run ceiling's 2048 costs 2.6 s a measurement on a loaded 2-core machine
    and 1024 0.4 s). Measured before and after every case, so each row has the ceiling of the
    minutes it ran in (a shared machine's rate moves with its load)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best_ms = _best_of(Timer(device), lambda i: torch.mm(a, b), repeats=repeats, warmup=1)
    return 2 * n**3 / (best_ms * 1e-3) / 1e12


# A row is "noisy" when the GEMM rate moved more than this between the start and the end of its
# case, or when it claims more than 100% of the ceiling (its ceiling was measured low).
NOISY_DRIFT_PCT = 20.0


def case_ceiling(before: float, after: float) -> dict:
    """The row fields of a case's ceiling: the better of the two rates (a ceiling is the best the
    machine did) and how far they moved, in % of the better."""
    best = max(before, after)
    return {"ceiling_tflops": best, "ceiling_before_tflops": before, "ceiling_after_tflops": after,
            "ceiling_drift_pct": 100.0 * abs(after - before) / best if best > 0 else None}


def noisy_reason(row: dict) -> str | None:
    """Why a timed row's numbers do not hold, or None: its case's ceiling moved more than
    NOISY_DRIFT_PCT, or it exceeds 100% of its ceiling."""
    reasons = []
    drift = row.get("ceiling_drift_pct")
    if drift is not None and drift > NOISY_DRIFT_PCT:
        reasons.append(f"the GEMM ceiling moved {drift:.0f}% during the case")
    pct = row.get("pct_of_ceiling")
    if pct is not None and pct > 100.0:
        reasons.append(f"{pct:.0f}% of the ceiling")
    return "; ".join(reasons) or None


def _best_of(timer: Timer, run, repeats: int, warmup: int = 2) -> float:
    nothing = lambda i: None  # noqa: E731
    timer.estimate_ms(nothing, run, 0, warmup)
    return min(timer.call(nothing, run, i)[0] for i in range(repeats))
