"""``ccam-bench``: latency of the attention op and of the whole projector, every backend side
by side, with live-FLOP rates and errors against the reference measured in the same run.

``BenchCase`` and ``run_suite`` (bench/runner.py) load on first use, so the command line's
``--help`` never imports torch."""

__all__ = ["BenchCase", "run_suite"]


def __getattr__(name: str):
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
