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
with it (a base case measured during a load spike carried the spike into every later estimate).
So each finished case's times are scaled by its rate over the rate around the last finished
case (the machine's speed now), and when the rates seen so far differ by more than
LOAD_MOVES_PCT the note also gives the range those rates imply: the load's future is what the
estimate cannot know, and it says so.

Nothing here is a prior guess: a bench's cases get no number before one of its cases
finished (the progress line counts them instead). How well it does is measured in
docs/benchmarks.md (the progress paragraph): within 1.3x before 8 of the 13 measured cases
(CPU runs), never short, and too high, up to 2.4x, when the base case ran during a load spike
of the shared machine (the same call's time varied 1.7-2.0x between runs there) or a T=1 case
was the base (the dense reference ran 15-60% cheaper per FLOP at T=16 than at T=1). Not
modelled: ``--max-minutes`` lowering the repeats (the estimate then counts the base case's repeats,
too many), and any GPU run (not measured: no GPU in this work).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Contestants that compute the dense masked scores: their work is the dense attention FLOPs.
DENSE = ("reference", "sdpa-efficient", "sdpa-cudnn", "sdpa-flash")
# Calls whose cost does not grow with the case: the GEMM ceiling measured around each case.
FIXED = ("ceiling",)
# When the GEMM rates measured so far differ by more than this, the note gives a range too.
LOAD_MOVES_PCT = 20.0


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


def _work(case, name: str) -> float:
    """Contestant ``name``'s attention work in ``case``: live FLOPs for ours and flex; for the
    dense-mask contestants the geometric mean of the dense and the live FLOPs. Measured on the
    2-core CPU machine (--quick, this commit): from T=1 to T=16 the reference (SDPA with the
    mask, no LSE) grew 8.7x and sdpa-flash 11.7x, between the live (8.5x) and the dense (16x)
    ratios, and the dense ratio alone overestimated every later case."""
    if name.split(" ")[0] in DENSE:  # ("reference p=0.1": a contestant with dropout, runner._label)
        return (case.attention_work(dense=True) * case.attention_work(dense=False)) ** 0.5
    return case.attention_work(dense=False)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0


class Progress:
    """``input_bytes(case)``: the bytes of a case's rotated inputs (the rest of a case's time
    scales with it); a constant when not given."""

    def __init__(self, input_bytes=None):
        self.done: list[Finished] = []
        self.input_bytes = input_bytes or (lambda case: 1.0)

    def finished(self, case, seconds: float, spent: dict | None = None, rates=()) -> None:
        """``rates``: the GEMM rates measured around the case (runner.run_case's ceilings)."""
        spent = {n: s for n, s in (spent or {}).items() if s.calls > 0}
        rates = tuple(r for r in rates if r and r > 0)
        self.done.append(Finished(case, seconds, spent, self.input_bytes(case), rates))

    def rate_now(self) -> float | None:
        """The machine's speed now: the GEMM rate around the last finished case that measured it."""
        return next((f.rate for f in reversed(self.done) if f.rate), None)

    def _slow(self, f: Finished) -> float:
        """How much slower the machine is now than during ``f``: its times scale by this. On a
        shared machine the load moves the GEMM rate by tens of % within minutes, and every
        call's time moves with it."""
        now = self.rate_now()
        return f.rate / now if f.rate and now else 1.0

    def rate_range(self) -> tuple | None:
        """(lowest, highest) GEMM rate measured around the finished cases, or None."""
        rates = [r for f in self.done for r in f.rates]
        return (min(rates), max(rates)) if rates else None

    def _base(self, case, name: str | None = None) -> Finished | None:
        """The finished case of ``case``'s bench with the most work (of ``name``, when given,
        among the cases it ran calls in); the same pass and dtype first."""
        same = [f for f in self.done if f.case.bench == case.bench
                and (name is None or name in f.spent)]
        alike = [f for f in same if (f.case.pass_, f.case.dtype) == (case.pass_, case.dtype)]
        pool = alike or same
        if not pool:
            return None
        return max(pool, key=lambda f: _work(f.case, name) if name else f.case.flops())

    def per_call(self, name: str, case) -> float | None:
        """Estimated seconds of one call of contestant ``name`` on ``case``."""
        base = self._base(case, name)
        if base is None:
            return None
        measured = base.spent[name].per_call * self._slow(base)
        if name in FIXED:
            return measured
        if case.bench == "attention":
            return measured * _ratio(_work(case, name), _work(base.case, name))
        attn_here = self.per_call(name, dataclasses.replace(case, bench="attention"))
        attn_base = self.per_call(name, dataclasses.replace(base.case, bench="attention"))
        if attn_here is None or attn_base is None:
            return measured * _ratio(case.gemm_flops() + _work(case, name),
                                     base.case.gemm_flops() + _work(base.case, name))
        return attn_here + max(measured - attn_base, 0.0) * _ratio(case.gemm_flops(), base.case.gemm_flops())

    def extra_s(self, name: str) -> float:
        """Mean compile and warm-up time of ``name`` per finished case that ran it, its first
        case left out once there are others."""
        seen = [f.spent[name].extra_s * self._slow(f) for f in self.done if name in f.spent]
        # The first case a contestant runs in also pays its once-per-process costs (the torch
        # backend's first call took 4.2 s at T=1, then ~0 s; flex's first compile 6.9-28 s, then
        # 1-3 s): once later cases exist, they alone say what a case pays.
        seen = seen[1:] or seen
        return sum(seen) / len(seen) if seen else 0.0

    def estimate(self, case) -> float | None:
        """Estimated seconds of ``case``; None while its bench has no finished case."""
        base = self._base(case)
        if base is None:
            return None
        total = base.rest_s * self._slow(base) * _ratio(self.input_bytes(case), base.input_bytes)
        for name, spent in base.spent.items():
            total += spent.calls * self.per_call(name, case) + self.extra_s(name)
        return max(total, 0.0)

    def seconds_left(self, remaining) -> float | None:
        """Estimated seconds for those of the ``remaining`` cases whose bench has a finished
        case; None when there is none."""
        known = [e for e in map(self.estimate, remaining) if e is not None]
        return sum(known) if known else None

    def note(self, remaining) -> str:
        """", about 75 s left (from 1 finished case)", with "+ 2 projector cases not yet
        measured" for cases that have no estimate; "" before any case finished."""
        if not self.done:
            return ""
        left = self.seconds_left(remaining)
        unknown = {}
        for case in remaining:
            if self._base(case) is None:
                unknown[case.bench] = unknown.get(case.bench, 0) + 1
        parts = []
        if left is not None:
            parts.append(f"about {left:.0f} s left")
            span, now = self.rate_range(), self.rate_now()
            if span and now and span[1] > span[0] * (1 + LOAD_MOVES_PCT / 100):
                # The load has moved the machine's speed: the estimate holds only if it stays
                # at the last case's level. Say so, with what the range seen so far implies.
                parts[-1] += (f" ({left * now / span[1]:.0f}-{left * now / span[0]:.0f} s as the load goes: the "
                              f"GEMM rate has ranged {span[0]:.3g}-{span[1]:.3g} TFLOP/s in this run)")
        parts += [f"{n} {bench} case{'s' if n != 1 else ''} not yet measured" for bench, n in unknown.items()]
        n = len(self.done)
        return f", {' + '.join(parts)} (from {n} finished case{'s' if n != 1 else ''})"
