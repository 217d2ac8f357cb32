"""The benchmark suite (ccam-bench) at tiny shapes: every contestant against the float64
oracle, the FlexAttention block mask against the dense rule, timing, budgets, failures as rows,
and the command end to end."""

import json
import time

import pytest
import torch

from ccam_kernels import CCAMConfig
from ccam_kernels.bench import contestants as C
from ccam_kernels.bench.__main__ import main
from ccam_kernels.bench.flex import FlexCCAMAttention, block_tables, packed_key_ranges, BLOCK
from ccam_kernels.bench.flops import attention_flops, projector_flops
from ccam_kernels.bench.runner import BenchCase, Settings, run_case, run_suite
from ccam_kernels.bench.timing import Timer, rotation_count, summarize
from ccam_kernels.mask import key_offsets

from oracle import attention_oracle, oracle_visibility

TINY = dict(num_query=13, hidden_size=32, cross_hidden_size=12, num_heads=2, num_key_value_heads=1,
            intermediate_size=24, output_size=10)
CPU = torch.device("cpu")
# The ragged batch of the contestant tests and of the end-to-end run: FlexAttention compiles one
# kernel per shape (each a C++ compile on a cold cache, seconds apiece), so the tests share it.
SHARED_COUNTS = (3, 1, 5)


# -- FLOP counts ---------------------------------------------------------------------------


def test_attention_flops_counts_live_pairs_only():
    N, H, D, P, counts = 10, 3, 8, 4, (3, 7)
    live = 0
    for T in counts:  # brute force over every (query, key) pair
        live += sum(1 for i in range(N) for j in range(T * P) if j // P <= (i * T) // N)
    assert attention_flops(N, H, D, counts, P, "fwd") == 4 * H * D * live
    assert attention_flops(N, H, D, counts, P, "bwd") == 2.5 * 4 * H * D * live
    assert attention_flops(N, H, D, counts, P, "fwd+bwd") == 3.5 * 4 * H * D * live


def test_projector_flops_v12_at_96_frames():
    # The numbers: K/V projection 330 GFLOP, live attention ~148 GFLOP, rest ~35 GFLOP.
    cfg = CCAMConfig()
    total = projector_flops(cfg, (96,), 729, "fwd") / 1e9
    kv = 2 * 96 * 729 * 1152 * 2048 / 1e9
    attn = attention_flops(1024, 16, 64, (96,), 729, "fwd") / 1e9
    assert 325 < kv < 335 and 140 < attn < 155
    assert 30 < total - kv - attn < 40


# -- FlexAttention block mask ---------------------------------------------------------------


@pytest.mark.parametrize("num_query,counts,P", [(200, (3, 7, 1), 50), (1024, (16,), 729), (5, (9, 2), 31),
                                                (256, (4, 4), 64)])
def test_flex_block_tables_match_the_dense_rule(num_query, counts, P):
    start, end = packed_key_ranges(num_query, counts, P)
    L = key_offsets(counts, P)[-1]
    # The packed batch's dense mask: block-diagonal, each block the rule of one sample.
    dense = torch.zeros(len(counts) * num_query, L, dtype=torch.bool)
    offs = key_offsets(counts, P)
    for b, t in enumerate(counts):
        dense[b * num_query:(b + 1) * num_query, offs[b]:offs[b + 1]] = oracle_visibility(num_query, t, P)
    keys = torch.arange(L)
    assert torch.equal((keys[None] >= start[:, None]) & (keys[None] < end[:, None]), dense)
    partial, full = block_tables(start, end, L)
    assert not (partial & full).any()
    for qb in range(partial.shape[0]):
        for kb in range(partial.shape[1]):
            tile = dense[qb * BLOCK:(qb + 1) * BLOCK, kb * BLOCK:(kb + 1) * BLOCK]
            whole = tile.shape == (BLOCK, BLOCK)
            assert bool(full[qb, kb]) == (whole and bool(tile.all())), (qb, kb)
            if tile.any():  # every live pair lies in a visited block
                assert partial[qb, kb] or full[qb, kb], (qb, kb)


@pytest.mark.parametrize("batched_q", [False, True])
def test_flex_attention_matches_oracle(seed, batched_q):
    # The shapes of TINY and SHARED_COUNTS (GQA, a one-frame video, T not dividing N): the kernel
    # compiled here serves the contestant and end-to-end tests too.
    N, H, Hkv, D, counts, P = TINY["num_query"], TINY["num_heads"], TINY["num_key_value_heads"], 16, SHARED_COUNTS, 3
    L = sum(counts) * P
    q = torch.randn(len(counts), N, H, D) if batched_q else torch.randn(N, H, D)
    k, v = torch.randn(L, Hkv, D), torch.randn(L, Hkv, D)
    got = FlexCCAMAttention()(q, k, v, counts, P)
    want = attention_oracle(q, k, v, counts, P)
    assert got.shape == (len(counts), N, H, D)
    assert (got.double() - want).abs().max() < 1e-5


def test_flex_refuses_dropout():
    q, k = torch.randn(4, 2, 8), torch.randn(6, 2, 8)
    with pytest.raises(NotImplementedError, match="dropout"):
        FlexCCAMAttention()(q, k, k, (2,), 3, dropout_p=0.1)


# -- contestants against the oracle ---------------------------------------------------------


def _attention_case(pass_, counts=SHARED_COUNTS):
    return BenchCase("attention", pass_, counts, torch.float32, CCAMConfig(**TINY), tokens_per_frame=3)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("name", C.default_contestants("attention", CPU, explicit=True))
def test_attention_contestant_matches_oracle(name, pass_):
    """Each contestant's output and gradients, mapped back to our layout, against float64.
    Checks every anchor's plumbing: padding, packing, the shared query's gradient summed over
    the batch, GQA."""
    case = _attention_case(pass_)
    torch.manual_seed(0)
    inputs = C.AttentionInputs(case, CPU, num_sets=2)
    c = C.make_contestant("attention", name)
    if name == "flex" and pass_ != "fwd":
        with pytest.raises(C.Unsupported, match="backward on CPU"):
            c.prepare(inputs)
        return
    c.prepare(inputs)
    got = C.run_once(c, pass_)
    s = inputs.sets[0]
    q, k, v = (s[x].detach().double().requires_grad_() for x in ("q", "k", "v"))
    want = attention_oracle(q, k, v, case.frame_counts, case.tokens_per_frame)
    expected = [want]
    if pass_ != "fwd":
        want.backward(s["dout"].double())
        expected += [q.grad, k.grad, v.grad]
    assert len(got) == len(expected)
    for g, w in zip(got, expected):
        assert g.shape == w.shape
        assert (g.double() - w).abs().max() < 1e-5


@pytest.mark.parametrize("name", C.default_contestants("projector", CPU, explicit=True))
def test_projector_contestants_agree_with_reference(name):
    case = BenchCase("projector", "fwd", SHARED_COUNTS, torch.float32, CCAMConfig(**TINY), tokens_per_frame=3)
    torch.manual_seed(0)
    inputs = C.ProjectorInputs(case, CPU, num_sets=1)
    ref = C.make_contestant("projector", "reference")
    ref.prepare(inputs)
    want = C.run_once(ref, "fwd")
    c = C.make_contestant("projector", name)
    c.prepare(inputs)
    got = C.run_once(c, "fwd")
    assert (got[0] - want[0]).abs().max() < 1e-5
    assert inputs.module.backend == {"flex": C._FLEX, "reference": C.reference_formula}.get(name, name)


def test_pass_functions_time_only_the_backward():
    """bwd: the forward runs in the untimed setup, the timed call is one backward."""
    case = _attention_case("bwd", counts=(2,))
    inputs = C.AttentionInputs(case, CPU, num_sets=2)
    c = C.make_contestant("attention", "torch")
    c.prepare(inputs)
    setup, run = C.pass_functions(c, "bwd", 2)
    setup(3)  # set 1
    assert inputs.sets[1]["q"].grad is None
    run(3)
    assert inputs.sets[1]["q"].grad is not None and inputs.sets[0]["q"].grad is None
    with pytest.raises(KeyError):
        run(3)  # a backward without its forward is a bug, not a silent re-run
    with pytest.raises(ValueError, match="pass"):
        C.pass_functions(c, "sideways", 1)


# -- timing --------------------------------------------------------------------------------


def test_timer_excludes_setup():
    timer = Timer(CPU)
    ms, peak = timer.call(lambda i: time.sleep(0.05), lambda i: time.sleep(0.005), 0)
    assert 4 < ms < 40 and peak is None


def test_summarize_median_and_round_spread():
    s = summarize([[10.0, 10.0, 11.0], [12.0, 12.0, 12.0]], [None, None])
    assert s["median_ms"] == 11.5 and s["min_ms"] == 10.0 and s["max_ms"] == 12.0
    assert s["round_medians_ms"] == [10.0, 12.0]
    assert s["spread_pct"] == pytest.approx(100 * 2 / 11.5)
    assert s["repeats"] == 6 and s["peak_mem_mb"] is None
    assert summarize([[5.0]], [3.0])["spread_pct"] is None


def test_rotation_count_covers_twice_the_cache():
    big = rotation_count(2**40, CPU)
    small = rotation_count(1, CPU)
    assert big == 1 and small == 8
    mid = rotation_count(24 * 2**20, CPU)
    assert 1 <= mid <= 8


# -- failures become rows ------------------------------------------------------------------


def _log(*args, **kwargs):
    pass


def _ceilings():
    return {"matmul_tflops": 1.0, "matmul_dtype": "float32", "matmul_tflops_by_dtype": {"float32": 1.0},
            "copy_gbps": 1.0}


# What the allocators raise when they run out: CUDA's, torch's CPU allocator (POSIX and Windows
# wording), Python's own.
ALLOCATOR_FAILURES = {
    "cuda": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB"),
    "cpu": lambda: RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 35184372088832 bytes. Error code 12 (Cannot allocate memory)"),
    "cpu-windows": lambda: RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9 bytes."),
    "python": lambda: MemoryError(),
}


def test_the_cpu_allocators_message_is_what_the_stub_says():
    """The stub above is the message torch raises today: a real allocation that cannot succeed."""
    with pytest.raises(RuntimeError) as info:
        torch.empty(2**62, dtype=torch.uint8)
    assert "can't allocate memory" in str(info.value) or "not enough memory" in str(info.value)


@pytest.mark.parametrize("failure", sorted(ALLOCATOR_FAILURES))
def test_oom_and_errors_become_rows(monkeypatch, failure):
    def oom(self, i):
        raise ALLOCATOR_FAILURES[failure]()

    def broken(self, i):
        raise ValueError("kaputt")

    original = C.OursAttention.forward
    monkeypatch.setattr(C.SdpaAnchor, "forward", oom)
    monkeypatch.setattr(C.OursAttention, "forward",
                        lambda self, i: broken(self, i) if self.name == "torch" else original(self, i))
    rows = run_case(_attention_case("fwd"), ["reference", "torch", "sdpa-flash"], Timer(CPU),
                    Settings(warmup=0, repeats=2, rounds=2), _ceilings(), _log)
    by = {r["backend"]: r for r in rows}
    assert by["reference"]["status"] == "ok" and by["reference"]["repeats"] == 4
    assert by["torch"]["status"] == "error" and "kaputt" in by["torch"]["reason"]
    assert by["sdpa-flash"]["status"] == "oom" and by["sdpa-flash"]["median_ms"] is None


@pytest.mark.parametrize("failure", sorted(ALLOCATOR_FAILURES))
def test_inputs_that_do_not_fit_become_oom_rows(monkeypatch, failure):
    """An allocation failure while making a case's inputs is a row per contestant, not a traceback."""
    import ccam_kernels.bench.runner as runner

    def no_memory(*args, **kwargs):
        raise ALLOCATOR_FAILURES[failure]()

    monkeypatch.setattr(runner, "AttentionInputs", type("NoMemory", (), {"__new__": no_memory,
                                                                          "bytes_per_set": staticmethod(lambda c: 1)}))
    rows = run_case(_attention_case("fwd"), ["reference", "torch"], Timer(CPU), Settings(warmup=0, repeats=1, rounds=1),
                    _ceilings(), _log)
    assert [(r["backend"], r["status"]) for r in rows] == [("reference", "oom"), ("torch", "oom")]
    assert all(r["median_ms"] is None for r in rows)


def test_other_errors_making_the_inputs_still_raise(monkeypatch):
    import ccam_kernels.bench.runner as runner

    def broken(*args, **kwargs):
        raise ValueError("kaputt")

    monkeypatch.setattr(runner, "AttentionInputs", type("Broken", (), {"__new__": broken,
                                                                        "bytes_per_set": staticmethod(lambda c: 1)}))
    with pytest.raises(ValueError, match="kaputt"):
        run_case(_attention_case("fwd"), ["reference"], Timer(CPU), Settings(warmup=0, repeats=1, rounds=1),
                 _ceilings(), _log)


def test_wrong_results_are_not_timed(monkeypatch):
    original = C.OursAttention.forward

    def nan_in_torch(self, i):
        out = original(self, i)
        return out * float("nan") if self.name == "torch" else out

    monkeypatch.setattr(C.OursAttention, "forward", nan_in_torch)
    rows = run_case(_attention_case("fwd+bwd"), ["reference", "torch"], Timer(CPU),
                    Settings(warmup=0, repeats=1, rounds=1), _ceilings(), _log)
    by = {r["backend"]: r for r in rows}
    assert by["reference"]["status"] == "ok" and by["reference"]["max_rel_err"] < 1e-6
    assert by["torch"]["status"] == "wrong" and by["torch"]["median_ms"] is None
    assert by["torch"]["max_rel_err"] != by["torch"]["max_rel_err"]  # NaN, never a perfect 0.0


def test_rel_err_is_nan_for_non_finite_results():
    from ccam_kernels.bench.runner import _rel_err

    ref = [torch.ones(5)]
    assert _rel_err([torch.full((5,), float("nan"))], ref) != _rel_err([torch.full((5,), float("nan"))], ref)
    assert _rel_err([torch.full((5,), float("inf"))], ref) != 0.0
    assert _rel_err([torch.ones(5) * 1.1], ref) == pytest.approx(0.1)


def test_lost_cuda_context_skips_the_rest(monkeypatch):
    def lost(self, i):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(C.SdpaAnchor, "forward", lost)
    cases = [_attention_case("fwd", (t,)) for t in (1, 2)]
    written = []
    result = run_suite(cases, {"attention": ["reference", "sdpa-flash"]}, CPU,
                       Settings(warmup=0, repeats=1, rounds=1), log=_log, on_case=written.append)
    status = [(r["frame_counts"], r["backend"], r["status"]) for r in result["rows"]]
    assert status == [([1], "reference", "error"), ([1], "sdpa-flash", "error"),
                      ([2], "reference", "skipped"), ([2], "sdpa-flash", "skipped")]
    assert "illegal memory access" in result["rows"][3]["reason"]
    assert len(written) == 2 and written[-1]["complete"]


def test_time_budget_skips_cases_but_keeps_rows():
    cases = [_attention_case("fwd", (t,)) for t in (1, 2)]
    result = run_suite(cases, {"attention": ["reference", "torch"]}, CPU,
                       Settings(warmup=0, repeats=1, rounds=1, max_seconds=1e-9), log=_log)
    assert [r["status"] for r in result["rows"]] == ["skipped"] * 4
    assert all(r["reason"] == "time budget spent" for r in result["rows"])


# -- the command ---------------------------------------------------------------------------


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"projector_config": TINY}))
    return str(path)


def test_ccam_bench_end_to_end(tmp_path, tiny_config, capsys):
    out = tmp_path / "bench"
    rc = main(["--config", tiny_config, "--frames", "1", "--ragged", "3,1,5", "--tokens-per-frame", "3",
               "--pass", "fwd,bwd,fwd+bwd", "--repeats", "2", "--rounds", "2", "--warmup", "1", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    for key in ("schema", "commit", "date", "device", "torch", "triton", "cuda", "ceilings", "rows", "settings"):
        assert key in doc
    assert doc["schema"] == 2 and doc["complete"] is True
    assert doc["settings"]["tokens_per_frame"] == 3 and doc["settings"]["config"]["num_query"] == 13
    assert doc["ceilings"]["matmul_tflops"] > 0 and doc["ceilings"]["copy_gbps"] > 0
    att, proj = C.default_contestants("attention", CPU), C.default_contestants("projector", CPU)
    assert len(doc["rows"]) == 3 * 2 * (len(att) + len(proj))  # passes x shapes x contestants
    seen = set()
    for row in doc["rows"]:
        seen.add((row["bench"], row["backend"]))
        if row["backend"] == "flex" and row["pass"] != "fwd":
            assert row["status"] == "unsupported" and "backward" in row["reason"]
            continue
        assert row["status"] == "ok", row
        assert row["median_ms"] > 0 and row["tflops"] > 0 and row["pct_of_ceiling"] > 0
        # each row's % of ceiling is against its own case's ceiling, measured around the case
        assert row["ceiling_tflops"] == max(row["ceiling_before_tflops"], row["ceiling_after_tflops"]) > 0
        assert row["pct_of_ceiling"] == pytest.approx(100 * row["tflops"] / row["ceiling_tflops"])
        assert isinstance(row["noisy"], bool)
        assert row["repeats"] == 4 and row["spread_pct"] is not None
        assert row["max_rel_err"] < 1e-5, row
        assert row["frame_counts"] in ([1], list(SHARED_COUNTS)) and row["dtype"] == "float32"
        if row["backend"] == "reference":
            assert row["speedup_vs_reference"] == 1.0
        # speed is against the fastest dense-mask peer: sdpa-flash on CPU for attention; the
        # projector has no SDPA anchor, so its reference (SDPA with the dense mask) stands in
        peer = "sdpa-flash" if row["bench"] == "attention" and "sdpa-flash" in att else "reference"
        assert row["dense_peer"] == peer and row["speedup_vs_dense"] > 0
        if row["bench"] == "projector":
            assert row["floor_ms"] > 0 and row["x_floor"] == pytest.approx(row["median_ms"] / row["floor_ms"])
        if row["backend"] == "flex":
            assert row["compile_s"] > 0
    assert seen == {("attention", n) for n in att} | {("projector", n) for n in proj}
    md = (out / "results.md").read_text()
    assert "| backend |" in md and "unsupported" in md
    for plot in ("latency", "speedup", "pct_of_ceiling"):
        assert (out / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "median ms" in printed and "sdpa-flash" in printed

    # compare the run with itself through the same command: every comparable row is "same"
    assert main(["compare", str(out), str(out / "results.json")]) == 0
    printed = capsys.readouterr().out
    assert "slower" not in printed.split("\n", 3)[-1].replace("0 slower", "")


@pytest.mark.parametrize("argv", [["--backends", "nope"], ["--frames", "0"], ["--dtype", "int8"],
                                  ["--tokens-per-frame", "0"], ["--repeats", "x"], ["--warmup", "-1"],
                                  ["--quick", "--full"], ["--pass", "sideways"], ["--max-minutes", "0"],
                                  ["--ragged", "3,x"]])
def test_ccam_bench_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_ccam_bench_reports_unreadable_config(tmp_path, capsys):
    assert main(["--config", str(tmp_path / "missing.json"), "--out", str(tmp_path)]) == 2
    assert "cannot read --config" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a backend unusable on CPU")
@pytest.mark.parametrize("name", ["triton", "sdpa-cudnn"])
def test_ccam_bench_refuses_unusable_backend(capsys, tmp_path, name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # triton is usable on CPU only there
    assert main(["--backends", name, "--out", str(tmp_path)]) == 2
    assert "not usable here" in capsys.readouterr().err


def test_full_with_backward_and_duplicate_shapes():
    from ccam_kernels.bench.__main__ import build_cases, build_parser

    cases = build_cases(build_parser().parse_args(["--full", "--backward", "--frames", "4,4", "--batch", "1",
                                                   "--bench", "attention"]), CPU)
    assert sorted({c.pass_ for c in cases}) == ["fwd", "fwd+bwd"]  # explicit flags beat --full
    assert [c.frame_counts for c in cases if c.pass_ == "fwd"] == [(4,), (16, 96, 33, 64)]


def test_backends_that_run_no_bench_are_refused(capsys, tmp_path):
    assert main(["--bench", "projector", "--backends", "sdpa-flash", "--out", str(tmp_path)]) == 2
    assert "none of --backends" in capsys.readouterr().err


def test_compare_warns_on_different_problems_and_unknown_filters(tmp_path, capsys):
    from ccam_kernels.bench.compare import main as compare_main

    row = {"bench": "attention", "pass": "fwd", "backend": "torch", "kind": "ours", "dtype": "float32",
           "frames": 1, "frame_counts": [1], "batch": 1, "status": "ok", "median_ms": 1.0, "spread_pct": 1.0}
    docs = []
    for p in (3, 729):
        doc = {"schema": 1, "commit": "x" * 40, "date": "2026-11-21", "device": "cpu",
               "ceilings": {"matmul_tflops": 1.0, "copy_gbps": 1.0}, "settings": {"tokens_per_frame": p},
               "rows": [row]}
        path = tmp_path / f"p{p}.json"
        path.write_text(json.dumps(doc))
        docs.append(str(path))
    assert compare_main(docs) == 0
    assert "different tokens_per_frame (3 vs 729)" in capsys.readouterr().out
    assert compare_main(docs + ["--backend", "trition"]) == 2
    assert "in neither run" in capsys.readouterr().err


def test_speedups_against_the_fastest_dense_peer_and_flex():
    """Injected medians: the fastest sdpa-* row is the peer (the reference is not, even when
    faster); without an sdpa row the reference is; flex gives its own column."""
    from ccam_kernels.bench.runner import add_speedups

    def rows(**ms):
        return [{"backend": b.replace("_", "-"), "median_ms": m} for b, m in ms.items()]

    case = rows(reference=2.0, torch=4.0, sdpa_efficient=8.0, sdpa_cudnn=6.0, flex=12.0, triton=None)
    add_speedups(case)
    by = {r["backend"]: r for r in case}
    assert by["torch"]["dense_peer"] == "sdpa-cudnn" and by["torch"]["speedup_vs_dense"] == 1.5
    assert by["torch"]["speedup_vs_flex"] == 3.0 and by["torch"]["speedup_vs_reference"] == 0.5
    assert by["sdpa-efficient"]["speedup_vs_dense"] == 0.75
    assert "speedup_vs_dense" not in by["triton"]  # no time, no ratio
    proj = rows(reference=10.0, torch=5.0)
    add_speedups(proj)
    assert proj[1]["dense_peer"] == "reference" and proj[1]["speedup_vs_dense"] == 2.0
    assert "speedup_vs_flex" not in proj[1]
    none = rows(torch=5.0)
    add_speedups(none)
    assert "dense_peer" not in none[0]


def test_reference_contestant_times_the_reference_formula_without_its_lse():
    """The reference row's function is the reference backend's output and gradients, exactly
    (float64, GQA, a ragged batch), minus the LSE the op also computes."""
    from ccam_kernels import ccam_attention
    from ccam_kernels.bench.contestants import reference_formula

    counts, P = (3, 1, 2), 4
    q = torch.randn(5, 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(counts) * P, 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(counts) * P, 2, 8, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(len(counts), 5, 4, 8, dtype=torch.float64)
    results = []
    for fn in (reference_formula, lambda *a: ccam_attention(*a, backend="reference")):
        out = fn(q, k, v, counts, P)
        results.append([out.detach(), *torch.autograd.grad(out, (q, k, v), dout)])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)  # float64: the same math
