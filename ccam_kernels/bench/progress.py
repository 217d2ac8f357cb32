"""The time-left estimate of a ccam-bench run: a cost model built from the finished cases.

What a case's time is made of (measured on the 2-core CPU machine): its contestants' calls
(the error anchor, one more reference call; each contestant's checked call, warm-ups and timed
calls), compiles and first-call warm-ups, and the rest (the rotated input copies, each
contestant's native copies, the error checks: about 1 s a case there). The calls dominate,
and they do not grow alike: the reference (and SDPA with a mask) computes every (query, key)
pair, masked or not, so its calls grow with the dense FLOPs (16x from T=1 to T=16), ours and
FlexAttention's with the live FLOPs (8.5x). The reference is most of a case's time at T=16
(4.1-7.2 s of a 6.5-11 s round of the four contestants). The estimate this replaces scaled
a whole case by its live FLOPs, so it came out short once the reference dominated (3x short
before the last --quick case in the lead's run).

So the runner records, per case and contestant, the calls run and their wall time
(``Spent``), and a remaining case is estimated as

    sum over the contestants of its bench's base case:
        calls x warm per-call time scaled to this case + mean compile and warm-up per case
    + the base case's rest, scaled by the bytes of the rotated inputs.

The base case is the finished case of the same bench with the most work (the same pass and
dtype when there is one). The warm per-call time is the mean timed call. It scales with that
contestant's own work (_work): for the reference and the SDPA anchors the geometric mean of the
dense and the live attention FLOPs, live FLOPs for ours and flex. A projector call is its attention plus its GEMMs, which run at very
different rates (in these CPU runs the reference attention bench at 4-12% of the GEMM ceiling,
the projector with our attention at 51-78%, mostly GEMMs): its attention part is the same
contestant's attention-bench call at that shape (estimated as above) and the rest scales with
the GEMM FLOPs; without a finished attention case for that contestant the whole call scales
with GEMM + attention FLOPs. The compile and warm-up part (a first call's time beyond a warm
call) is averaged over every finished case that ran the contestant: FlexAttention's compile of
a new shape took 15-16 s, one found in inductor's disk cache 1-3 s, the first of the process
6-12 s (measured in these runs), so no case is special.

The machine's speed: every case measures the GEMM rate before and after it (runner.py, for its
ceiling), and on a shared machine that rate moves by tens of % within minutes, every call's time
with it. So each finished case's times are scaled by its rate over the rate around the last
finished case (the machine's speed now).

What it cannot know, it says. One finished case of a contestant cannot tell its fixed costs
(per call: dispatch, allocation, threads) from its costs per FLOP, and scaling a T=1 case by
its work to T=16 came out 1.2-2.5x high on the shared machine (docs/benchmarks.md), so every
estimate is an interval [lo, hi]:

* a contestant's per-call time from one finished case of work w0 and time t0, at work w: between
  t0 (all fixed) and t0 w / w0 (all per FLOP);
* from two or more finished cases: the straight line a + b w through the two nearest (between
  them it interpolates, a point; beyond the largest the interval runs from that line to the
  proportional scaling of the largest);
* never below the case's live FLOPs at 1.25x the GEMM rate measured now: nothing computes them
  faster than the GEMM ceiling;
* when the GEMM rates seen so far differ by more than LOAD_MOVES_PCT, the interval widens by
  the range of speeds they imply: the load's future is unknown too.

The note gives a number, "about E s left", only when the interval is narrow enough that one
number is within 0.8-1.5x of every time in it (hi <= 1.875 lo; E = sqrt(lo hi), moved into
[0.8 hi, 1.5 lo] when it is not there); otherwise
it prints the interval and why it cannot know closer. A bench with no finished case gets
no number at all ("+ 2 projector cases not yet measured").

Each estimate printed and each case's measured parts go into results.json ("progress"), so a
run can be replayed through this model and the estimates checked against what followed:
``python -m ccam_kernels.bench.progress_check results.json``. Not modelled: ``--max-minutes``
lowering the repeats (the estimate then counts the base case's repeats, too many), and any GPU
run (not measured: no GPU in this work).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

# Contestants that compute the dense masked scores: their work is the dense attention FLOPs.
DENSE = ("reference", "sdpa-efficient", "sdpa-cudnn", "sdpa-flash")
# Calls whose cost does not grow with the case: the GEMM ceiling measured around each case.
FIXED = ("ceiling",)
# When the GEMM rates measured so far differ by more than this, the interval widens with them.
LOAD_MOVES_PCT = 20.0
# A number is given when it is within 0.8-1.5x of every time in the interval: hi <= WIDEST * lo.
LOW, HIGH = 0.8, 1.5
WIDEST = HIGH / LOW
# No contestant computes its live FLOPs faster than this many times the measured GEMM rate.
CEILING_SLACK = 1.25


@dataclass
class Spent:
    """One contestant's wall time in one case (the runner fills it). Wall time of whole
    calls, untimed setups (the backward's forward) included."""

    calls: int = 0  # passes run: error anchor (reference), checked call, warm-ups, timed calls
    seconds: float = 0.0  # their wall time
    timed: int = 0  # of which timed calls
    timed_s: float = 0.0

    def add(self, calls: int, seconds: float, timed: bool = False) -> None:
        self.calls += calls
        self.seconds += seconds
        if timed:
            self.timed += calls
            self.timed_s += seconds

    @property
    def per_call(self) -> float:
        """A warm call: the mean timed call (the first calls can compile or warm up)."""
        return self.timed_s / self.timed if self.timed else self.seconds / max(self.calls, 1)

    @property
    def extra_s(self) -> float:
        """The time beyond calls x per_call: compiles and first-call warm-ups."""
        return self.seconds - self.calls * self.per_call


@dataclass(frozen=True)
class Finished:
    case: object
    seconds: float  # the whole case
    spent: dict = field(default_factory=dict)  # contestant -> Spent
    input_bytes: float = 1.0
    rates: tuple = ()  # the GEMM rates measured before and after the case (the machine's speed)

    @property
    def rate(self) -> float | None:
        return sum(self.rates) / len(self.rates) if self.rates else None

    @property
    def rest_s(self) -> float:
        """What no contestant's calls or compiles account for: inputs, copies, checks."""
        return max(self.seconds - sum(s.seconds for s in self.spent.values()), 0.0)


@dataclass(frozen=True)
class Span:
    """An interval of seconds [lo, hi]."""

    lo: float
    hi: float

    def __add__(self, other: "Span") -> "Span":
        return Span(self.lo + other.lo, self.hi + other.hi)

    def __mul__(self, k: float) -> "Span":
        return Span(self.lo * k, self.hi * k)

    @property
    def mid(self) -> float:
        return math.sqrt(self.lo * self.hi) if self.lo > 0 else (self.lo + self.hi) / 2

    @property
    def point(self) -> float | None:
        """One number within 0.8-1.5x of every time in the interval, or None when none is."""
        if self.hi > WIDEST * self.lo:
            return None
        # the geometric middle, moved into [0.8 hi, 1.5 lo] when it is not there (hi > 1.5625 lo)
        return min(max(self.mid, LOW * self.hi), HIGH * self.lo)


def exact(seconds: float) -> Span:
    return Span(seconds, seconds)


def _work(case, name: str) -> float:
    """Contestant ``name``'s attention work in ``case``: live FLOPs for ours and flex; for the
    dense-mask contestants the geometric mean of the dense and the live FLOPs. Measured on the
    2-core CPU machine (--quick): from T=1 to T=16 the reference (SDPA with the mask, no LSE)
    grew 8.7x and sdpa-flash 11.7x, between the live (8.5x) and the dense (16x) ratios."""
    if name.split(" ")[0] in DENSE:  # ("reference p=0.1": a contestant with dropout, runner._label)
        return (case.attention_work(dense=True) * case.attention_work(dense=False)) ** 0.5
    return case.attention_work(dense=False)


def span_at(points, w: float) -> Span:
    """Seconds per call at work ``w`` from measured (work, seconds) ``points`` (see the module
    doc): one point gives [fixed, proportional]; two or more a line through the nearest two
    (a point between them; beyond the largest, from the line to proportional; below the
    smallest, from proportional to fixed)."""
    by_work = {}
    for pw, pt in points:
        by_work.setdefault(pw, []).append(pt)
    pts = sorted((pw, sum(ts) / len(ts)) for pw, ts in by_work.items())
    below = [p for p in pts if p[0] <= w]
    above = [p for p in pts if p[0] >= w]

    def prop(p):
        return p[1] * w / p[0] if p[0] > 0 else p[1]

    if not below:  # smaller than every finished case: at most its time, at least proportional
        return Span(min(prop(above[0]), above[0][1]), above[0][1])
    if len(pts) == 1 or not above and len(below) == 1:
        a, b = sorted((below[-1][1], prop(below[-1])))
        return Span(a, b)
    if above:
        (w1, t1), (w2, t2) = below[-1], above[0]
        if w2 == w1:
            return exact(t1)
        return exact(t1 + (t2 - t1) * (w - w1) / (w2 - w1))
    (w1, t1), (w2, t2) = below[-2], below[-1]
    slope = max((t2 - t1) / (w2 - w1), 0.0)
    line = t2 + slope * (w - w2)
    a, b = sorted((line, prop(below[-1])))
    return Span(a, b)


def record(f: Finished, started: float | None, left: Span | None) -> dict:
    """A finished case as results.json keeps it: enough to replay the estimate (progress_check)."""
    c = f.case
    return {"label": c.label, "bench": c.bench, "pass": c.pass_, "dtype": str(c.dtype).replace("torch.", ""),
            "live_flops": c.attention_work(dense=False), "dense_flops": c.attention_work(dense=True),
            "gemm_flops": c.gemm_flops(), "flops": c.flops(), "input_bytes": f.input_bytes,
            "started_s": started, "seconds": f.seconds, "rates_tflops": list(f.rates),
            "spent": {n: [s.calls, s.seconds, s.timed, s.timed_s] for n, s in f.spent.items()},
            "left_before_s": None if left is None else [left.lo, left.point, left.hi]}


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0


class Progress:
    """``input_bytes(case)``: the bytes of a case's rotated inputs (the rest of a case's time
    scales with it); a constant when not given."""

    def __init__(self, input_bytes=None):
        self.done: list[Finished] = []
        self.input_bytes = input_bytes or (lambda case: 1.0)

        self.records: list[dict] = []  # what results.json keeps ("progress"): one per finished case

    def finished(self, case, seconds: float, spent: dict | None = None, rates=(), *, started: float | None = None,
                 left: Span | None = None) -> None:
        """``rates``: the GEMM rates measured around the case (runner.run_case's ceilings);
        ``started``: the run's elapsed seconds when it began; ``left``: the estimate printed
        before it (both only recorded)."""
        spent = {n: s for n, s in (spent or {}).items() if s.calls > 0}
        rates = tuple(r for r in rates if r and r > 0)
        self.done.append(Finished(case, seconds, spent, self.input_bytes(case), rates))
        self.records.append(record(self.done[-1], started, left))

    def rate_now(self) -> float | None:
        """The machine's speed now: the GEMM rate around the last finished case that measured it."""
        return next((f.rate for f in reversed(self.done) if f.rate), None)

    def _slow(self, f: Finished) -> float:
        """How much slower the machine is now than during ``f``: its times scale by this."""
        now = self.rate_now()
        return f.rate / now if f.rate and now else 1.0

    def rate_range(self) -> tuple | None:
        """(lowest, highest) GEMM rate measured around the finished cases, or None."""
        rates = [r for f in self.done for r in f.rates]
        return (min(rates), max(rates)) if rates else None

    def load_moved(self) -> bool:
        span = self.rate_range()
        return bool(span) and span[1] > span[0] * (1 + LOAD_MOVES_PCT / 100)

    def _pool(self, case, name: str | None = None) -> list:
        """The finished cases of ``case``'s bench (that ran ``name``, when given); those of the
        same pass and dtype when there are any."""
        same = [f for f in self.done if f.case.bench == case.bench and (name is None or name in f.spent)]
        alike = [f for f in same if (f.case.pass_, f.case.dtype) == (case.pass_, case.dtype)]
        return alike or same

    def _base(self, case, name: str | None = None) -> Finished | None:
        """The finished case of the pool with the most work."""
        pool = self._pool(case, name)
        if not pool:
            return None
        return max(pool, key=lambda f: _work(f.case, name) if name else f.case.flops())

    def _floor(self, case) -> float:
        """The least time a call of ``case`` can take: its live FLOPs at the GEMM ceiling."""
        now = self.rate_now()
        return case.flops() / (CEILING_SLACK * now * 1e12) if now else 0.0

    def per_call(self, name: str, case) -> Span | None:
        """Seconds of one call of contestant ``name`` on ``case``, as an interval."""
        pool = self._pool(case, name)
        if not pool:
            return None
        if name in FIXED:
            base = self._base(case, name)
            return exact(base.spent[name].per_call * self._slow(base))
        if case.bench == "attention":
            got = span_at([(_work(f.case, name), f.spent[name].per_call * self._slow(f)) for f in pool],
                          _work(case, name))
        else:
            got = self._projector_call(name, case, pool)
        floor = self._floor(case)
        return Span(max(got.lo, floor), max(got.hi, floor))

    def _projector_call(self, name: str, case, pool) -> Span:
        """A projector call: the same contestant's attention-bench call at that shape plus the
        rest (GEMMs, norms), which scales with the GEMM FLOPs; without an attention case the
        whole call scales with GEMM + attention FLOPs."""
        def attention(c):
            return self.per_call(name, dataclasses.replace(c, bench="attention"))

        here = attention(case)
        theirs = [(f, attention(f.case)) for f in pool]
        if here is None or any(a is None for _, a in theirs):
            return span_at([(f.case.gemm_flops() + _work(f.case, name), f.spent[name].per_call * self._slow(f))
                            for f in pool], case.gemm_flops() + _work(case, name))
        rest = span_at([(f.case.gemm_flops(), max(f.spent[name].per_call * self._slow(f) - a.mid, 0.0))
                        for f, a in theirs], case.gemm_flops())
        return here + rest

    def extra_s(self, name: str) -> Span:
        """Compile and warm-up time of ``name`` per case: the mean over the finished cases that
        ran it, its first case left out once there are others. The first case a contestant
        runs in also pays its once-per-process costs (the torch backend's first call took 4.2 s
        at T=1, then ~0 s; flex's first compile 6.9-28 s, then 1-3 s), so from that case alone
        a later case pays between nothing and as much."""
        seen = [f.spent[name].extra_s * self._slow(f) for f in self.done if name in f.spent]
        if len(seen) == 1:
            return Span(0.0, max(seen[0], 0.0))
        later = seen[1:]
        return exact(max(sum(later) / len(later), 0.0)) if later else exact(0.0)

    def estimate(self, case) -> Span | None:
        """Seconds of ``case`` as an interval; None while its bench has no finished case."""
        base = self._base(case)
        if base is None:
            return None
        total = exact(base.rest_s * self._slow(base) * _ratio(self.input_bytes(case), base.input_bytes))
        for name, spent in base.spent.items():
            total = total + self.per_call(name, case) * spent.calls + self.extra_s(name)
        return total

    def seconds_left(self, remaining, load: bool = True) -> Span | None:
        """Seconds for those of the ``remaining`` cases whose bench has a finished case, as an
        interval (widened by the load's range when it moved and ``load``); None when none has."""
        known = [e for e in map(self.estimate, remaining) if e is not None]
        if not known:
            return None
        total = sum(known[1:], known[0])
        span, now = self.rate_range(), self.rate_now()
        if load and now and self.load_moved():
            total = Span(total.lo * now / span[1], total.hi * now / span[0])
        return total

    def note(self, remaining) -> str:
        """", about 75 s left (from 1 finished case)"; when no one number is within 0.8-1.5x of
        the interval, the interval and why; "+ 2 projector cases not yet measured" for cases
        that have no estimate; "" before any case finished."""
        if not self.done:
            return ""
        left = self.seconds_left(remaining)
        unknown = {}
        for case in remaining:
            if self._base(case) is None:
                unknown[case.bench] = unknown.get(case.bench, 0) + 1
        parts = []
        if left is not None:
            if left.point is not None:
                parts.append(f"about {left.point:.0f} s left")
            else:
                why = []
                if self.seconds_left(remaining, load=False).point is None:
                    why.append("the finished cases cannot yet tell the calls' fixed costs from their costs per FLOP")
                if self.load_moved():
                    lo, hi = self.rate_range()
                    why.append(f"the load moved the GEMM rate {lo:.3g}-{hi:.3g} TFLOP/s in this run")
                parts.append(f"{left.lo:.0f}-{left.hi:.0f} s left, cannot know closer: {'; '.join(why)}")
        parts += [f"{n} {bench} case{'s' if n != 1 else ''} not yet measured" for bench, n in unknown.items()]
        n = len(self.done)
        return f", {' + '.join(parts)} (from {n} finished case{'s' if n != 1 else ''})"
