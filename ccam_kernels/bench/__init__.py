"""``ccam-bench``: latency of the attention op and of the whole projector, every backend side
by side, with live-FLOP rates and errors against the reference measured in the same run."""

from .runner import BenchCase, run_suite

__all__ = ["BenchCase", "run_suite"]
