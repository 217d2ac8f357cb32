"""The time-left estimate of a ccam-bench run, from the measured time of its finished cases.

A case's time is split in two: its compiles (FlexAttention compiles once per new shape; the
runner measures each one) and the rest, which grows with the case's work. A remaining case is
estimated from the finished case of the same bench with the most work, scaled by the FLOP
ratio, plus that bench's mean measured compile time per case. With no finished case of its
bench, it takes the seconds per FLOP of all finished cases. Nothing here is a prior guess:
before the first case finishes there is no estimate.

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

    def _estimate(self, case) -> float:
        same = [f for f in self.done if f.bench == case.bench]
        if same:
            base = max(same, key=lambda f: f.flops)
            work = (base.seconds - base.compile_s) * case.flops() / max(base.flops, 1.0)
            return work + sum(f.compile_s for f in same) / len(same)
        rate = sum(f.seconds for f in self.done) / max(sum(f.flops for f in self.done), 1.0)
        return rate * case.flops()

    def seconds_left(self, remaining) -> float | None:
        """Estimated seconds for the ``remaining`` cases; None before any case finished."""
        if not self.done:
            return None
        return sum(self._estimate(c) for c in remaining)

    def note(self, remaining) -> str:
        left = self.seconds_left(remaining)
        if left is None:
            return ""
        n = len(self.done)
        return f", about {left:.0f} s left (from {n} finished case{'s' if n != 1 else ''})"
