"""The time-left estimate of a ccam-bench run: a cost model built from the finished cases.

What a case's time is made of (measured on the 2-core CPU machine, docs/benchmarks.md): its
contestants' calls (the error anchor, one more reference call; each contestant's checked call,
warm-ups and timed calls), the compiles, and the rest (building the rotated input copies,
each contestant's native copies, the error checks). The calls dominate, and they do not grow
alike: the reference (and SDPA with a mask) computes every (query, key) pair, masked or not,
so its time grows with the dense FLOPs (16x from T=1 to T=16), while ours and FlexAttention
grow with the live FLOPs (8.5x). The old estimate scaled the whole case by the live FLOPs and
so came out 1.5 to 3x short once the reference dominated.

So the runner records, per case and contestant, how many calls it ran and their wall time
(``Spent``), and a remaining case is estimated as

    sum over the contestants of the base case:  calls x per-call time scaled to this case
    + each contestant's compile estimate + the rest, scaled by the bytes of the inputs.

The base case is the finished case of the same bench with the most work (the same pass and
dtype when there is one). A per-call time scales with that contestant's own work measure:
dense attention FLOPs for the reference and the SDPA anchors, live FLOPs for ours and flex.
A projector call is its attention plus its GEMMs, which run at very different rates (the
dense reference attention at 6-12% of the GEMM ceiling, the GEMMs at 60-80%); its attention
part is the same contestant's attention-bench call at that shape (estimated as above), and the
rest scales with the GEMM FLOPs. Without a finished attention case for that contestant, the
whole call scales with GEMM + attention FLOPs.

Compiles: the first compile of a contestant in the process also loads and warms the compiler
(9.4 s for FlexAttention's first shape on CPU; a later shape took 0.2-1 s, and a shape compiled
before costs nothing), so it is not carried forward: a remaining case gets the mean compile
time of that contestant's later cases, 0 before there is one.

Nothing here is a prior guess: before a case of a bench finishes, that bench's cases get no
number (the progress line counts them instead). Not modelled: ``--max-minutes`` lowering the
repeats (the estimate then counts the base case's repeats: too high), and the machine's own
drift (other processes on a shared machine: the 20-90% round-to-round spreads of the CPU runs).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

# Contestants that compute the dense masked scores: their work is the dense attention FLOPs.
DENSE = ("reference", "sdpa-efficient", "sdpa-cudnn", "sdpa-flash")


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

    @property
    def rest_s(self) -> float:
        """What no contestant's calls or compiles account for: inputs, copies, checks."""
        return max(self.seconds - sum(s.seconds for s in self.spent.values()), 0.0)


def _work(case, name: str) -> float:
    """Contestant ``name``'s attention work in ``case``."""
    return case.attention_work(dense=name in DENSE)


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else 1.0


class Progress:
    """``input_bytes(case)``: the bytes of a case's rotated inputs (the rest of a case's time
    scales with it); a constant when not given."""

    def __init__(self, input_bytes=None):
        self.done: list[Finished] = []
        self.input_bytes = input_bytes or (lambda case: 1.0)

    def finished(self, case, seconds: float, spent: dict | None = None) -> None:
        spent = {n: s for n, s in (spent or {}).items() if s.calls > 0}
        self.done.append(Finished(case, seconds, spent, self.input_bytes(case)))

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
        measured = base.spent[name].per_call
        if case.bench == "attention":
            return measured * _ratio(_work(case, name), _work(base.case, name))
        attn_here = self.per_call(name, dataclasses.replace(case, bench="attention"))
        attn_base = self.per_call(name, dataclasses.replace(base.case, bench="attention"))
        if attn_here is None or attn_base is None:
            return measured * _ratio(case.gemm_flops() + _work(case, name),
                                     base.case.gemm_flops() + _work(base.case, name))
        return attn_here + max(measured - attn_base, 0.0) * _ratio(case.gemm_flops(), base.case.gemm_flops())

    def extra_s(self, name: str) -> float:
        """Mean compile and warm-up time of ``name`` per finished case that ran it."""
        seen = [f.spent[name].extra_s for f in self.done if name in f.spent]
        return sum(seen) / len(seen) if seen else 0.0

    def estimate(self, case) -> float | None:
        """Estimated seconds of ``case``; None while its bench has no finished case."""
        base = self._base(case)
        if base is None:
            return None
        total = base.rest_s * _ratio(self.input_bytes(case), base.input_bytes)
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
        parts = [f"about {left:.0f} s left"] if left is not None else []
        parts += [f"{n} {bench} case{'s' if n != 1 else ''} not yet measured" for bench, n in unknown.items()]
        n = len(self.done)
        return f", {' + '.join(parts)} (from {n} finished case{'s' if n != 1 else ''})"
