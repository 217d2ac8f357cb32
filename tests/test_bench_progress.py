"""ccam-bench's progress lines: a line when a compile starts and when it ends (with its
seconds), and the time-left estimate from the finished cases' measured times. Fake clocks and
fake cases only: nothing here asserts anything about real time."""

from dataclasses import dataclass

import pytest
import torch

from ccam_kernels import CCAMConfig
from ccam_kernels.bench import contestants as C
from ccam_kernels.bench import runner
from ccam_kernels.bench.progress import Progress
from ccam_kernels.bench.runner import BenchCase, Settings, run_case, run_suite
from ccam_kernels.bench.timing import Timer

TINY = dict(num_query=5, hidden_size=16, cross_hidden_size=12, num_heads=2, num_key_value_heads=1,
            intermediate_size=24, output_size=10)


@dataclass(frozen=True)
class FakeCase:
    bench: str
    work: float
    label: str = "fake"
    dtype: torch.dtype = torch.float32

    def flops(self):
        return self.work


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Log:
    """Collects what the runner logs, as the lines a terminal would show."""

    def __init__(self):
        self.text = ""

    def __call__(self, msg="", end="\n"):
        self.text += msg + end

    @property
    def lines(self):
        return self.text.splitlines()


# -- the estimate ----------------------------------------------------------------------------


def test_no_estimate_before_a_case_finished():
    p = Progress()
    assert p.seconds_left([FakeCase("attention", 1e9)]) is None and p.note([FakeCase("attention", 1.0)]) == ""


def test_estimate_scales_the_largest_finished_case_of_the_bench_and_adds_its_compiles():
    p = Progress()
    p.finished(FakeCase("attention", 1e9), seconds=26.0, compile_s=16.0)  # 10 s of work, 16 s compiling
    # 8x the work: 8 * 10 s, plus the bench's mean compile per case (16 s).
    assert p.seconds_left([FakeCase("attention", 8e9)]) == pytest.approx(8 * 10 + 16)
    p.finished(FakeCase("attention", 4e9), seconds=30.0, compile_s=6.0)  # the larger case is the base now
    assert p.seconds_left([FakeCase("attention", 8e9)]) == pytest.approx(2 * 24 + (16 + 6) / 2)
    assert p.note([FakeCase("attention", 8e9)]) == ", about 59 s left (from 2 finished cases)"
    # A bench with no finished case gets no number (another bench's seconds per FLOP would be
    # a guess): it is counted instead.
    assert p.seconds_left([FakeCase("projector", 1e9)]) is None
    remaining = [FakeCase("attention", 8e9), FakeCase("projector", 1e9), FakeCase("projector", 2e9)]
    assert p.seconds_left(remaining) == pytest.approx(59)
    assert p.note(remaining) == ", about 59 s left + 2 projector cases not yet measured (from 2 finished cases)"
    assert p.note(remaining[1:2]) == ", 1 projector case not yet measured (from 2 finished cases)"


def test_compile_seconds_are_clipped_to_the_case():
    p = Progress()
    p.finished(FakeCase("attention", 1.0), seconds=5.0, compile_s=9.0)
    assert p.seconds_left([FakeCase("attention", 2.0)]) == pytest.approx(5.0)


def test_run_suite_prints_estimates_from_the_measured_cases(monkeypatch):
    """Fake cases whose times the fake clock sets: the lines show elapsed time since the start
    (the ceilings included) and the estimate from the finished cases only."""
    clock = FakeClock()
    durations = {"a1": (20.0, 15.0), "a2": (40.0, 0.0), "p1": (7.0, 0.0), "p2": (1.0, 0.0)}  # (s, compile s)
    cases = [FakeCase("attention", 1.0, "a1"), FakeCase("attention", 4.0, "a2"), FakeCase("projector", 2.0, "p1"),
             FakeCase("projector", 4.0, "p2")]

    def ceilings(device, dtypes):
        clock.t += 30.0  # the ceilings take time that no case pays again
        return {"matmul_tflops_by_dtype": {}, "copy_gbps": 1.0}

    def fake_run_case(case, names, timer, settings, ceilings, log, budget, clock):
        seconds, compile_s = durations[case.label]
        clock.t += seconds
        return [{"bench": case.bench, "pass": "fwd", "frame_counts": [1], "dtype": "float32",
                 "compile_s": compile_s or None}]

    monkeypatch.setattr(runner, "measure_ceilings", ceilings)
    monkeypatch.setattr(runner, "run_case", fake_run_case)
    log = Log()
    run_suite(cases, {"attention": ["reference"], "projector": ["reference"]}, "cpu", Settings(), log=log,
              clock=clock)
    heads = [line for line in log.lines if line.startswith("[")]
    assert heads[0] == "[1/4] a1  (elapsed 30 s)"
    # After a1: a2 = 4x a1's 5 s of work + a1's 15 s compile = 35; no projector case measured yet.
    assert heads[1] == ("[2/4] a2  (elapsed 50 s, about 35 s left + 2 projector cases not yet measured "
                        "(from 1 finished case))")
    assert heads[2] == "[3/4] p1  (elapsed 90 s, 2 projector cases not yet measured (from 2 finished cases))"
    # After p1: p2 = 2x p1's 7 s.
    assert heads[3] == "[4/4] p2  (elapsed 97 s, about 14 s left (from 3 finished cases))"


# -- compile lines ---------------------------------------------------------------------------


def _tiny_case():
    return BenchCase("attention", "fwd", (2, 3), torch.float32, CCAMConfig(**TINY), tokens_per_frame=3)


def _run_with_fake_compile(monkeypatch, compiled_graphs):
    """run_case on a tiny real case where "torch" pretends its first call compiles for 13 s
    (on the fake clock); ``compiled_graphs`` = what torch.compile's counter reads before and after."""
    clock = FakeClock()

    class Compiling(C.OursAttention):
        calls = 0

        def compile_note(self):
            return "a fake compile"

        def forward(self, i):
            if Compiling.calls == 0:
                clock.t += 13.0
            Compiling.calls += 1
            return super().forward(i)

    real = C.make_contestant
    monkeypatch.setattr(runner, "make_contestant",
                        lambda bench, name: Compiling(name) if name == "torch" else real(bench, name))
    counts = iter(compiled_graphs)
    monkeypatch.setattr(runner, "graphs_compiled", lambda: next(counts))
    log = Log()
    timer = Timer(torch.device("cpu"))
    ceilings = {"matmul_tflops_by_dtype": {"float32": 0.1}, "matmul_tflops": 0.1}
    rows = run_case(_tiny_case(), ["reference", "torch"], timer, Settings(warmup=0, repeats=1, rounds=1),
                    ceilings, log, clock=clock)
    return rows, log.lines


def test_a_compile_prints_a_line_when_it_starts_and_when_it_ends(monkeypatch):
    rows, lines = _run_with_fake_compile(monkeypatch, [4, 5])
    i = lines.index("  torch           compiling: a fake compile ...")
    assert lines[i + 1] == "  torch           compile done in 13.0 s"
    assert lines[i + 2].startswith("  torch           checked (err ") and lines[i + 2].endswith("first call 13.00 s)")
    assert [r["status"] for r in rows] == ["ok", "ok"]
    # The reference, which compiles nothing, gets no compile line.
    assert not any("reference" in line and "compil" in line for line in lines)


def test_a_first_call_that_found_its_graph_compiled_says_so(monkeypatch):
    _, lines = _run_with_fake_compile(monkeypatch, [5, 5])
    assert "  torch           compile done in 13.0 s (nothing new: its graph was compiled before)" in lines


def test_a_failed_compile_keeps_the_error_under_the_contestants_name(monkeypatch):
    def broken(self, i):
        raise RuntimeError("the compiler broke")

    monkeypatch.setattr(C.OursAttention, "forward", broken)
    rows, lines = _run_with_fake_compile(monkeypatch, [4, 4])
    i = lines.index("  torch           compiling: a fake compile ...")
    assert lines[i + 1] == "  torch           compile failed after 13.0 s"
    assert lines[i + 2].startswith("  torch           ERROR RuntimeError: the compiler broke")
    assert rows[1]["status"] == "error"


def test_flex_and_gpu_triton_declare_their_compiles():
    case = _tiny_case()
    inputs = C.AttentionInputs(case, torch.device("cpu"), 1)
    flex = C.make_contestant("attention", "flex")
    flex.prepare(inputs)
    assert "torch.compile of FlexAttention" in flex.compile_note()
    torch_row = C.make_contestant("attention", "torch")
    torch_row.prepare(inputs)
    assert torch_row.compile_note() is None
    proj = C.make_contestant("projector", "flex")
    assert "FlexAttention" in proj.compile_note()
    triton = C.make_contestant("projector", "triton")
    triton.inputs = inputs  # on CPU (the interpreter) nothing is compiled
    assert triton.compile_note() is None
