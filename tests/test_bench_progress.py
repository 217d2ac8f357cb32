"""ccam-bench's progress lines: a line when a compile starts and when it ends (with its
seconds), and the time-left estimate from the finished cases' measured times. Fake clocks and
fake cases only: nothing here asserts anything about real time."""

from dataclasses import dataclass

import pytest
import torch

from ccam_kernels import CCAMConfig
from ccam_kernels.bench import contestants as C
from ccam_kernels.bench import runner
from ccam_kernels.bench.progress import Progress, Span, Spent, span_at
from ccam_kernels.bench.runner import BenchCase, Settings, run_case, run_suite
from ccam_kernels.bench.timing import Timer

TINY = dict(num_query=5, hidden_size=16, cross_hidden_size=12, num_heads=2, num_key_value_heads=1,
            intermediate_size=24, output_size=10)


@dataclass(frozen=True)
class FakeCase:
    """A case with chosen work measures: ``live``/``dense`` attention FLOPs, ``gemm`` FLOPs."""

    bench: str
    live: float
    dense: float | None = None  # default: live (no masked pairs)
    gemm: float = 0.0
    label: str = "fake"
    pass_: str = "fwd"
    dtype: torch.dtype = torch.float32

    def flops(self):
        return self.live + self.gemm

    def attention_work(self, dense):
        return self.dense if dense and self.dense is not None else self.live

    def gemm_flops(self):
        return self.gemm


def spent_of(**calls):
    """name=(calls, seconds, timed calls, timed seconds) -> {name: Spent}."""
    out = {}
    for name, (n, s, timed, timed_s) in calls.items():
        out[name] = Spent()
        out[name].add(n - timed, s - timed_s)
        out[name].add(timed, timed_s, timed=True)
    return out


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


def test_one_finished_case_gives_an_interval_from_fixed_to_proportional():
    """The reference computes the dense masked scores, ours only the live pairs. From T=1
    (dense = live) to a case with 32x the dense and 8x the live work, one finished case cannot
    tell a call's fixed costs from its costs per FLOP: the reference's call is between its
    T=1 time (all fixed) and 16x it (the geometric mean of dense and live work, all per FLOP),
    torch's between 1x and 8x. Every call counts at the warm (timed) per-call time."""
    p = Progress()
    # reference: 7 calls in 10 s, of which 4 timed in 4 s (1 s each: the others warmed up);
    # torch: 6 calls, 4 timed in 2 s. The rest of the case: 3 s.
    p.finished(FakeCase("attention", 1e9), 25.0, spent_of(reference=(7, 10.0, 4, 4.0), torch=(6, 12.0, 4, 2.0)))
    big = FakeCase("attention", 8e9, dense=32e9)
    assert p.per_call("reference", big) == Span(1.0, 16.0)
    assert p.per_call("torch", big) == Span(0.5, 4.0)
    # Plus the first calls' time beyond a warm call (3 s and 9 s: compiles, warm-ups; a later
    # case pays 0 s up to as much) and the rest (3 s).
    left = p.seconds_left([big])
    assert (left.lo, left.hi) == pytest.approx((7 * 1 + 6 * 0.5 + 3, 7 * 16 + 6 * 4 + 3 + 9 + 3))
    assert left.point is None  # 13-151 s: no one number is within 0.8-1.5x of all of it
    assert p.note([big]) == (", 13-151 s left, cannot know closer: the finished cases cannot yet tell the calls' "
                             "fixed costs from their costs per FLOP (from 1 finished case)")
    # A case of the same work: its calls are known, its compiles not.
    assert p.seconds_left([FakeCase("attention", 1e9)]) == Span(13.0, 25.0)


def test_a_number_only_when_it_is_within_the_goal_of_every_time_in_the_interval():
    assert Span(10.0, 10.0).point == 10.0
    assert Span(10.0, 15.0).point == pytest.approx(150 ** 0.5)  # the geometric middle
    # hi > 1.5625 lo: the middle would be under 0.8 hi, so 0.8 hi (still <= 1.5 lo)
    assert Span(10.0, 18.0).point == pytest.approx(14.4)
    assert Span(10.0, 18.75).point == pytest.approx(15.0)  # 1.875x: 0.8 hi = 1.5 lo
    assert Span(10.0, 18.8).point is None
    for lo, hi in [(1.0, 1.0), (3.0, 4.0), (2.0, 3.5), (5.0, 9.3)]:
        e = Span(lo, hi).point
        assert 0.8 <= e / hi and e / lo <= 1.5


def test_two_finished_cases_give_a_line_between_and_an_interval_beyond():
    pts = [(1.0, 3.0), (4.0, 6.0)]  # a call: 2 s fixed + 1 s per unit of work
    assert span_at(pts, 2.0) == Span(4.0, 4.0)  # between: the line
    assert span_at(pts, 4.0) == Span(6.0, 6.0)
    assert span_at(pts, 8.0) == Span(10.0, 12.0)  # beyond: from the line (10) to proportional (12)
    assert span_at(pts, 0.5) == Span(1.5, 3.0)  # below the smallest: proportional to fixed
    assert span_at([(2.0, 4.0)], 6.0) == Span(4.0, 12.0)
    assert span_at([(2.0, 4.0)], 1.0) == Span(2.0, 4.0)
    # A call that got cheaper with more work (noise) never extrapolates downwards.
    assert span_at([(1.0, 5.0), (2.0, 4.0)], 4.0) == Span(4.0, 8.0)
    p = Progress()
    p.finished(FakeCase("attention", 1.0), 21.0, spent_of(flex=(3, 20.0, 2, 2.0)))  # 1 s a call, 17 s compiling
    p.finished(FakeCase("attention", 4.0), 20.0, spent_of(flex=(3, 18.0, 2, 8.0)))  # 4 s a call, 6 s compiling
    p.finished(FakeCase("attention", 2.0), 9.0, spent_of(flex=(3, 8.0, 2, 4.0)))  # 2 s a call, 2 s compiling
    # Calls: the line through the two largest (2, 2) and (4, 4) gives 8 s at 8, as does
    # proportional scaling; compiles: the mean per case, the first case (which also paid the
    # once-per-process costs) left out: (6 + 2) / 2; the rest of the base (the 4.0 case): 2 s.
    assert p.seconds_left([FakeCase("attention", 8.0)]) == Span(3 * 8 + 4 + 2, 3 * 8 + 4 + 2)
    first_only = Progress()
    first_only.finished(FakeCase("attention", 1.0), 21.0, spent_of(flex=(3, 20.0, 2, 2.0)))
    # From its first case alone (which also paid the process's once-only costs), a later case
    # pays between nothing and as much.
    assert first_only.extra_s("flex") == Span(0.0, 17.0)


def test_no_call_is_faster_than_its_flops_at_the_gemm_ceiling():
    p = Progress()
    p.finished(FakeCase("attention", 1e9), 2.0, spent_of(torch=(2, 2.0, 2, 2.0)), rates=(0.01, 0.01))
    # 8e9 FLOPs at 1.25 x 0.01 TFLOP/s take at least 0.64 s: below "all fixed" (1 s); 50e9 at
    # least 4 s, which raises the interval's low end.
    assert p.per_call("torch", FakeCase("attention", 8e9)) == Span(1.0, 8.0)
    assert p.per_call("torch", FakeCase("attention", 50e9)) == Span(4.0, 50.0)


def test_the_rest_of_a_case_scales_with_its_input_bytes():
    p = Progress(input_bytes=lambda case: case.live)
    p.finished(FakeCase("attention", 1.0), 5.0, spent_of(torch=(2, 2.0, 2, 2.0)))  # 3 s of rest
    assert p.seconds_left([FakeCase("attention", 2.0)]) == Span(2 * 1 + 3 * 2, 2 * 2 + 3 * 2)


def test_a_projector_call_is_its_attention_from_the_attention_bench_plus_its_gemms():
    p = Progress()
    p.finished(FakeCase("attention", 1.0, dense=1.0), 4.0, spent_of(reference=(4, 4.0, 4, 4.0)))  # 1 s a call
    p.finished(FakeCase("attention", 8.0, dense=32.0), 64.0, spent_of(reference=(4, 64.0, 4, 64.0)))  # 16 s
    p.finished(FakeCase("projector", 1.0, dense=1.0, gemm=10.0), 12.0, spent_of(reference=(4, 12.0, 4, 12.0)))
    big = FakeCase("projector", 8.0, dense=32.0, gemm=20.0)
    # 3 s a call: 1 s of attention (the attention bench's reference at this shape) + 2 s of
    # GEMMs. At the attention bench's measured 16 s and 2x the GEMMs (2-4 s): 18-20 s a call.
    assert p.per_call("reference", big) == Span(18.0, 20.0)
    assert p.seconds_left([big]) == Span(4 * 18, 4 * 20)
    # Without an attention case, the whole call scales with GEMM + attention FLOPs.
    alone = Progress()
    alone.finished(FakeCase("projector", 1.0, dense=1.0, gemm=10.0), 12.0, spent_of(reference=(4, 12.0, 4, 12.0)))
    assert alone.per_call("reference", big) == Span(3.0, 3.0 * (20 + 16) / (10 + 1))


def test_a_bench_without_a_finished_case_is_counted_not_guessed():
    p = Progress()
    p.finished(FakeCase("attention", 1.0), 2.0, spent_of(torch=(2, 2.0, 2, 2.0)))
    assert p.seconds_left([FakeCase("projector", 1.0, gemm=5.0)]) is None
    remaining = [FakeCase("attention", 1.5), FakeCase("projector", 1.0), FakeCase("projector", 2.0)]
    assert p.seconds_left(remaining) == Span(2.0, 3.0)
    assert p.note(remaining) == ", about 2 s left + 2 projector cases not yet measured (from 1 finished case)"
    assert p.note(remaining[1:2]) == ", 1 projector case not yet measured (from 1 finished case)"


def test_the_same_pass_and_dtype_is_the_base_when_there_is_one():
    p = Progress()
    p.finished(FakeCase("attention", 1.0, pass_="fwd+bwd"), 8.0, spent_of(torch=(2, 8.0, 2, 8.0)))
    p.finished(FakeCase("attention", 0.5), 1.0, spent_of(torch=(2, 1.0, 2, 1.0)))
    assert p.per_call("torch", FakeCase("attention", 0.5)) == Span(0.5, 0.5)
    assert p.per_call("torch", FakeCase("attention", 1.0, pass_="fwd+bwd")) == Span(4.0, 4.0)
    # No case of that dtype: every case of the bench.
    assert p.per_call("torch", FakeCase("attention", 1.0, dtype=torch.float16)) == Span(4.0, 4.0)


def test_run_suite_prints_estimates_from_the_measured_cases(monkeypatch):
    """Fake cases whose times the fake clock sets: the lines show elapsed time since the start
    (the ceilings included) and the estimate from what run_case reported spending."""
    clock = FakeClock()
    # label -> (case seconds, the reference's (calls, seconds, timed calls, timed seconds))
    durations = {"a1": (20.0, (3, 15.0, 2, 2.0)), "a2": (40.0, (3, 36.0, 2, 24.0)),
                 "p1": (31.0, (3, 30.0, 2, 20.0)), "p2": (1.0, (1, 1.0, 1, 1.0))}
    cases = [FakeCase("attention", 1.0, label="a1"), FakeCase("attention", 4.0, label="a2"),
             FakeCase("projector", 2.0, gemm=2.0, label="p1"), FakeCase("projector", 4.0, gemm=4.0, label="p2")]

    def ceilings(device, dtypes):
        clock.t += 30.0  # the ceilings take time that no case pays again
        return {"matmul_tflops_by_dtype": {}, "copy_gbps": 1.0}

    def fake_run_case(case, names, timer, settings, ceilings, log, budget, clock, spent):
        seconds, reference = durations[case.label]
        clock.t += seconds
        spent.update(spent_of(reference=reference))
        return [{"bench": case.bench, "pass": "fwd", "frame_counts": [1], "dtype": "float32", "compile_s": None}]

    monkeypatch.setattr(runner, "measure_ceilings", ceilings)
    monkeypatch.setattr(runner, "run_case", fake_run_case)
    monkeypatch.setattr(runner, "input_bytes", lambda case, device: 1.0)
    log = Log()
    run_suite(cases, {"attention": ["reference"], "projector": ["reference"]}, "cpu", Settings(), log=log,
              clock=clock)
    heads = [line for line in log.lines if line.startswith("[")]
    assert heads[0] == "[1/4] a1  (elapsed 30 s)"
    # After a1: a2 = 3 calls at 1-4x a1's warm 1 s + 0 s up to a1's 12 s beyond its warm calls
    # (a compile: it may have been the process's first) + a1's 5 s of rest = 8-29 s; no
    # projector case yet.
    assert heads[1] == ("[2/4] a2  (elapsed 50 s, 8-29 s left, cannot know closer: the finished cases cannot yet "
                        "tell the calls' fixed costs from their costs per FLOP + 2 projector cases not yet measured "
                        "(from 1 finished case))")
    assert heads[2] == "[3/4] p1  (elapsed 90 s, 2 projector cases not yet measured (from 2 finished cases))"
    # After p1 (10 s a call: 4.67 s of attention, a2's line between a1 and a2 at work 2, + 5.33 s
    # of GEMMs): p2 = 3 calls of (12 s attention, as a2 + 5.33-10.67 s of GEMMs at 2x) + the
    # reference's mean compile and warm-up per case after its first (0, 0; a1's 12 s was the
    # process's first) + p1's 1 s of rest = 53-69 s, said as sqrt(53 x 69).
    assert heads[3] == "[4/4] p2  (elapsed 121 s, about 60 s left (from 3 finished cases))"


def test_the_work_measures_of_a_real_case():
    """Dense work counts every pair of each sample; at T=1 every pair is live. A projector's
    FLOPs are its GEMMs plus its live attention."""
    cfg = CCAMConfig(**TINY)
    P, H, D = 3, cfg.num_heads, cfg.head_dim
    one = BenchCase("attention", "fwd", (1,), torch.float32, cfg, tokens_per_frame=P)
    assert one.attention_work(dense=True) == one.attention_work(dense=False) == one.flops()
    ragged = BenchCase("attention", "fwd+bwd", (7, 2), torch.float32, cfg, tokens_per_frame=P)
    assert ragged.attention_work(dense=True) == pytest.approx(3.5 * 4 * H * D * cfg.num_query * 9 * P)
    assert ragged.attention_work(dense=False) < ragged.attention_work(dense=True)
    assert ragged.gemm_flops() == 0.0
    proj = BenchCase("projector", "fwd+bwd", (7, 2), torch.float32, cfg, tokens_per_frame=P)
    assert proj.gemm_flops() + proj.attention_work(dense=False) == pytest.approx(proj.flops())
    assert proj.attention_work(dense=False) == ragged.attention_work(dense=False)


def test_run_case_reports_every_call_it_ran():
    """What the estimate is built from: per contestant the calls run (the reference's error
    anchor, each checked call, warm-ups, timed calls) and their seconds on the case's clock.
    The fake clock moves 1 s per reading, so every reading pair counts as >= 1 s."""
    clock = FakeClock()

    def ticking():
        clock.t += 1.0
        return clock.t

    spent = {}
    settings = Settings(warmup=2, repeats=3, rounds=2)
    ceilings = {"matmul_tflops_by_dtype": {"float32": 0.1}, "matmul_tflops": 0.1}
    rows = run_case(_tiny_case(), ["reference", "torch"], Timer(torch.device("cpu")), settings, ceilings, Log(),
                    clock=ticking, spent=spent, gemm_rate=lambda device, dtype: 0.1)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    ceiling = spent.pop("ceiling")  # the GEMM rate, once before the case and once after
    assert ceiling.calls == 2 and ceiling.timed == 0 and ceiling.seconds >= 2
    timed = settings.rounds * settings.repeats
    assert spent["reference"].calls == 1 + 1 + settings.warmup + timed  # the anchor is a reference call
    assert spent["torch"].calls == 1 + settings.warmup + timed
    for s in spent.values():
        assert s.timed == timed and s.timed_s >= settings.rounds  # one clock pair per round
        assert s.seconds >= s.timed_s > 0


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
                        lambda bench, name, dropout_p=0.0: (Compiling(name, dropout_p) if name == "torch"
                                                            else real(bench, name, dropout_p)))
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


# -- the machine's speed: the GEMM rate measured around each case ----------------------------


def test_times_scale_with_the_machines_speed_and_a_moving_load_gives_a_range():
    """A case measured while the machine ran at half its later speed predicts half its time
    now; every part (warm calls, the rest, the ceiling's own GEMMs) scales alike. When the
    rates seen differ by more than 20% the interval widens by the speeds they imply."""
    p = Progress()
    spent = spent_of(torch=(3, 12.0, 3, 12.0), ceiling=(2, 2.0, 0, 0.0))  # 4 s a warm call
    p.finished(FakeCase("attention", 1.0), 18.0, spent, rates=(0.01, 0.01))
    same = (3 * 4.0 + 2 * 1.0 + 4.0)  # 3 warm calls, 2 ceiling calls, 4 s of rest
    assert p.seconds_left([FakeCase("attention", 1.0)]) == Span(same, same)
    p.finished(FakeCase("attention", 0.5), 0.0, {}, rates=(0.02, 0.02))  # the load dropped: twice as fast now
    assert p.rate_now() == 0.02 and p.rate_range() == (0.01, 0.02)
    assert p.seconds_left([FakeCase("attention", 1.0)], load=False) == Span(same / 2, same / 2)
    # The load may go back to where it was: up to twice as long.
    assert p.seconds_left([FakeCase("attention", 1.0)]) == Span(same / 2, same)
    assert p.note([FakeCase("attention", 1.0)]) == (
        f", {same / 2:.0f}-{same:.0f} s left, cannot know closer: the load moved the GEMM rate 0.01-0.02 TFLOP/s "
        "in this run (from 2 finished cases)")
    steady = Progress()
    steady.finished(FakeCase("attention", 1.0), 18.0, spent, rates=(0.01, 0.0115))  # within 20%: no range
    assert steady.note([FakeCase("attention", 1.0)]) == f", about {same:.0f} s left (from 1 finished case)"
    unmeasured = Progress()
    unmeasured.finished(FakeCase("attention", 1.0), 18.0, spent)
    assert unmeasured.seconds_left([FakeCase("attention", 1.0)]) == Span(same, same)

# -- the record in results.json, and the check of a run's estimates --------------------------


def _records(durations, cases, ceilings_s=30.0):
    """run_suite over fake cases whose times a fake clock sets; its "progress" records."""
    clock = FakeClock()

    def ceilings(device, dtypes):
        clock.t += ceilings_s
        return {"matmul_tflops_by_dtype": {}, "copy_gbps": 1.0}

    def fake_run_case(case, names, timer, settings, ceilings, log, budget, clock, spent):
        seconds, reference = durations[case.label]
        clock.t += seconds
        spent.update(spent_of(reference=reference))
        return [{"bench": case.bench, "pass": "fwd", "frame_counts": [1], "dtype": "float32", "compile_s": None}]

    import pytest as _pytest
    mp = _pytest.MonkeyPatch()
    try:
        mp.setattr(runner, "measure_ceilings", ceilings)
        mp.setattr(runner, "run_case", fake_run_case)
        mp.setattr(runner, "input_bytes", lambda case, device: 1.0)
        result = run_suite(cases, {"attention": ["reference"], "projector": ["reference"]}, "cpu", Settings(),
                           log=Log(), clock=clock)
    finally:
        mp.undo()
    return result["progress"]


def test_each_finished_case_is_recorded_with_the_estimate_printed_before_it():
    durations = {"a1": (20.0, (3, 15.0, 2, 2.0)), "a2": (40.0, (3, 36.0, 2, 24.0))}
    cases = [FakeCase("attention", 1.0, label="a1"), FakeCase("attention", 4.0, label="a2")]
    recs = _records(durations, cases)
    assert [r["label"] for r in recs] == ["a1", "a2"]
    assert recs[0]["started_s"] == 30.0 and recs[1]["started_s"] == 50.0
    assert recs[0]["seconds"] == 20.0 and recs[0]["left_before_s"] is None
    assert recs[0]["spent"]["reference"] == [3, 15.0, 2, 2.0]
    lo, point, hi = recs[1]["left_before_s"]  # 8-29 s (see the run_suite test above)
    assert (lo, hi) == (8.0, 29.0) and point is None
    assert recs[1]["live_flops"] == 4.0 and recs[1]["bench"] == "attention" and recs[1]["dtype"] == "float32"


def test_the_check_compares_each_estimate_with_the_time_that_followed(tmp_path, capsys):
    import json

    from ccam_kernels.bench import progress_check
    durations = {"a1": (20.0, (3, 15.0, 2, 2.0)), "a2": (40.0, (3, 36.0, 2, 24.0)),
                 "p1": (31.0, (3, 30.0, 2, 20.0)), "a3": (30.0, (3, 28.0, 2, 18.0))}
    cases = [FakeCase("attention", 1.0, label="a1"), FakeCase("attention", 4.0, label="a2"),
             FakeCase("projector", 2.0, gemm=2.0, label="p1"), FakeCase("attention", 3.0, label="a3")]
    recs = _records(durations, cases)
    rows = progress_check.check(recs)
    # Before a1 nothing was said; before a2 the attention cases left took 40 + 30 = 70 s, not
    # inside the printed 8-29 + ...; the projector case is not counted (not yet measured then).
    assert rows[0]["held"] is None
    assert rows[1]["actual_s"] == 70.0 and rows[1]["held"] is False and "cannot know closer" in rows[1]["said"]
    # Before a3: a line between a1 and a2 (1 s and 12 s a call) at work 3: 8.33 s a call, 3
    # calls, no compile (a2, the only case after the first, had none), a2's 4 s of rest: 29 s.
    assert rows[3]["actual_s"] == 30.0 and rows[3]["said"] == "29 s (0.97x)" and rows[3]["held"] is True
    assert progress_check.check(recs, replay=True) == rows  # the model has not changed since
    doc = tmp_path / "run"
    doc.mkdir()
    (doc / "results.json").write_text(json.dumps({"schema": 2, "progress": recs}))
    assert progress_check.main([str(doc)]) == 0  # the numbers held; the interval only said "cannot know"
    out = capsys.readouterr().out
    assert "| run | before case | actual | said | held |" in out
    assert 'numbers: 2 of 2 within 0.8-1.5x of the actual; "cannot know closer": 1, of which 0 intervals held' in out
    recs[3]["seconds"] = 60.0  # a number 2x off: the estimate failed
    (doc / "results.json").write_text(json.dumps({"schema": 2, "progress": recs}))
    assert progress_check.main([str(doc)]) == 1
    (doc / "results.json").write_text(json.dumps({"schema": 2, "rows": []}))
    assert progress_check.main([str(doc)]) == 2
