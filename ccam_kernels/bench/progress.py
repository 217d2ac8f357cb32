"""The time-left estimate of a ccam-bench run, from the measured time of its finished cases.

A case's time is split in two: its compiles (FlexAttention compiles once per new shape; the
runner measures each one) and the rest, which grows with the case's work. A remaining case is
estimated from the finished case of the same bench with the most work, scaled by the FLOP
ratio, plus that bench's mean measured compile time per case. A case whose bench has no
finished case yet gets no number (the attention and projector benches differ too much in
seconds per FLOP for one to stand for the other); the line counts it instead. Nothing here is
a prior guess: before the first case finishes there is no estimate.

The whole-run average (elapsed / cases done) that this replaces counted the ceilings'
measurement and the first shape's compile as if every case paid them, and gave a T=1 case the
same weight as a T=96 one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Finished:
    bench: str
    flops: float
    seconds: float  # the whole case, its compiles included
    compile_s: float  # the part spent compiling


class Progress:
    def __init__(self):
        self.done: list[Finished] = []

    def finished(self, case, seconds: float, compile_s: float = 0.0) -> None:
        compile_s = min(max(compile_s, 0.0), seconds)
        self.done.append(Finished(case.bench, case.flops(), seconds, compile_s))

    def _estimate(self, case) -> float | None:
        same = [f for f in self.done if f.bench == case.bench]
        if not same:
            return None
        base = max(same, key=lambda f: f.flops)
        work = (base.seconds - base.compile_s) * case.flops() / max(base.flops, 1.0)
        return work + sum(f.compile_s for f in same) / len(same)

    def seconds_left(self, remaining) -> float | None:
        """Estimated seconds for those of the ``remaining`` cases whose bench has a finished
        case; None when there is none."""
        known = [e for e in map(self._estimate, remaining) if e is not None]
        return sum(known) if known else None

    def note(self, remaining) -> str:
        """", about 75 s left (from 1 finished case)", with "+ 2 projector cases not yet
        measured" for cases that have no estimate; "" before any case finished."""
        if not self.done:
            return ""
        left = self.seconds_left(remaining)
        unknown = {}
        for case in remaining:
            if self._estimate(case) is None:
                unknown[case.bench] = unknown.get(case.bench, 0) + 1
        parts = [f"about {left:.0f} s left"] if left is not None else []
        parts += [f"{n} {bench} case{'s' if n != 1 else ''} not yet measured" for bench, n in unknown.items()]
        n = len(self.done)
        return f", {' + '.join(parts)} (from {n} finished case{'s' if n != 1 else ''})"
