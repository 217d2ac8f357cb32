"""pytest-benchmark smoke set: the suite's own timed calls, at small shapes on CPU, so the
benchmark code never rots. Each benchmark also checks its result against the reference:
a timing of a wrong answer is worth nothing. The numbers are not claims (speed claims live in
ccam-bench runs); run ``python -m pytest tests/test_bench_smoke.py`` to see the table."""

import itertools

import pytest
import torch

from ccam_kernels import CCAMConfig
from ccam_kernels.bench import contestants as C
from ccam_kernels.bench.runner import BenchCase

CPU = torch.device("cpu")
SMALL = CCAMConfig(num_query=24, hidden_size=64, cross_hidden_size=48, num_heads=4, num_key_value_heads=2,
                   intermediate_size=128, output_size=32)
COUNTS = (2, 5)  # a ragged batch
P = 8


def _cases():
    for bench, pass_ in itertools.product(("attention", "projector"), ("fwd", "bwd", "fwd+bwd")):
        # explicit: under the test session's Triton interpreter, the triton backend too
        for name in C.default_contestants(bench, CPU, explicit=True):
            if name == "flex" and pass_ != "fwd":
                continue  # no FlexAttention backward on CPU (a tested "unsupported" row)
            yield pytest.param(bench, pass_, name, id=f"{bench}-{pass_}-{name}")


@pytest.mark.parametrize("bench,pass_,name", list(_cases()))
def test_smoke(benchmark, bench, pass_, name):
    case = BenchCase(bench, pass_, COUNTS, torch.float32, SMALL, tokens_per_frame=P)
    torch.manual_seed(0)
    inputs = (C.AttentionInputs if bench == "attention" else C.ProjectorInputs)(case, CPU, num_sets=2)
    ref = C.make_contestant(bench, "reference")
    ref.prepare(inputs)
    want = C.run_once(ref, pass_)
    contestant = C.make_contestant(bench, name)
    contestant.prepare(inputs)
    got = C.run_once(contestant, pass_)
    for g, w in zip(got, want, strict=True):
        assert (g - w).abs().max() <= 1e-4 * w.abs().max()

    setup, run = C.pass_functions(contestant, pass_, num_sets=2)
    calls = itertools.count()

    def fresh_call():
        i = next(calls)
        setup(i)
        return (i,), {}

    benchmark.group = f"{bench} {pass_}"
    benchmark.pedantic(run, setup=fresh_call, rounds=3, iterations=1, warmup_rounds=1)
    # Under --benchmark-disable the pass runs once, untimed; otherwise three timed rounds.
    assert next(calls) == (1 if benchmark.disabled else 4)
    if not benchmark.disabled:
        assert benchmark.stats.stats.median > 0
