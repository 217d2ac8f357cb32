"""The performance model (ccam_kernels/perf_model): its work accounting against execution (the
CPU emulator counts the mma.sync instructions each CTA runs; the model predicts them), its
launch geometry against the emulator's launches, its scheduler simulation on cases with a
known answer, its CLI, and its committed resource table against a fresh compile."""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

import emu_lib
from ccam_kernels import perf_model
from ccam_kernels.perf_model import launches, machine, resources
from ccam_kernels.perf_model.__main__ import main as cli_main

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def emu():
    if shutil.which(emu_lib.os.environ.get("CXX", "g++")) is None:
        pytest.skip("g++ is not on the PATH: the emulator cannot be built")
    return emu_lib.cached_library(small=True)


# Odd N, GQA, ragged with T not dividing N, T = 1, T > N; head dim 16 (the small build's fp16 kernels at width 32).
CASES = [
    dict(N=70, H=2, Hkv=1, D=16, counts=(3, 1, 8), P=37),
    dict(N=5, H=1, Hkv=1, D=24, counts=(9,), P=13),
]


@pytest.mark.parametrize("case", CASES, ids=["ragged-gqa", "T-over-N"])
@pytest.mark.parametrize("splits", [1, 3])
def test_emulated_mma_counts_and_geometry_equal_the_model(emu, case, splits):
    """Per CTA, in launch order: the mma.sync warp instructions the emulator executed equal the
    model's; the grid, threads and shared memory equal the model's geometry."""
    c = case
    gen = torch.Generator().manual_seed(1)
    B, L = len(c["counts"]), sum(c["counts"]) * c["P"]
    q = torch.randn(B, c["N"], c["H"], c["D"], generator=gen).half()
    k, v = (torch.randn(L, c["Hkv"], c["D"], generator=gen).half() for _ in range(2))
    dout = torch.randn_like(q)
    scale = c["D"] ** -0.5
    shape = launches.Shape(num_query=c["N"], heads=c["H"], kv_heads=c["Hkv"], head_dim=c["D"],
                           tokens_per_frame=c["P"], frame_counts=c["counts"], dtype="fp16")
    model = launches.cuda_launches(shape, splits=splits)
    out, lse = emu.forward(q, k, v, c["counts"], c["P"], scale, splits=splits)
    ran = {"fwd": emu.grids["ccam_emu_fwd"]}
    if splits == 1:
        emu.backward(dout, q, k, v, out.float(), lse, c["counts"], c["P"], scale)
        ran.update(dq=emu.grids["ccam_emu_bwd_dq"], dkdv=emu.grids["ccam_emu_bwd_dkdv"])
    else:  # the dQ pass with the same key splits (its forward partials are not an output to reuse)
        out1, lse1 = emu.forward(q, k, v, c["counts"], c["P"], scale)
        emu.backward(dout, q, k, v, out1.float(), lse1, c["counts"], c["P"], scale, dq_splits=splits)
        ran["dq"] = emu.grids["ccam_emu_bwd_dq"]
        dq_split = emu.backward(dout, q, k, v, out1.float(), lse1, c["counts"], c["P"], scale, dq_splits=splits)[0]
        dq_whole = emu.backward(dout, q, k, v, out1.float(), lse1, c["counts"], c["P"], scale)[0]
        assert torch.allclose(dq_split, dq_whole, rtol=1e-4, atol=1e-5)  # same sums, another order
    for kernel, got in ran.items():
        want = model[kernel]
        assert got["grid"] == want.grid, kernel
        assert (got["threads"], got["smem_bytes"]) == (want.threads, want.smem_bytes), kernel
        assert got["mma_per_cta"] == want.mma, kernel
        assert sum(want.mma) > 0, kernel


@pytest.mark.parametrize("case", CASES + [dict(N=150, H=2, Hkv=1, D=72, counts=(12, 2), P=40)],
                         ids=["ragged-gqa", "T-over-N", "two-query-tiles-D128"])
@pytest.mark.parametrize("splits", [1, 3])
def test_emulated_wgmma_work_and_geometry_equal_the_model(case, splits):
    """The sm_90a forward (fwd_sm90.cuh): per CTA, in launch order, the wgmma work the emulator
    executed (m64n8k16 steps: each consumer warpgroup over its own key tiles) equals the
    model's; grid, threads and shared memory equal the model's geometry. The last case has
    two 128-row query tiles (one whose second warpgroup holds no row) at padded head dim 128."""
    c = case
    lib = emu_lib.Sm90(emu_lib.hopper_library())
    gen = torch.Generator().manual_seed(1)
    B, L = len(c["counts"]), sum(c["counts"]) * c["P"]
    q = torch.randn(B, c["N"], c["H"], c["D"], generator=gen).half()
    k, v = (torch.randn(L, c["Hkv"], c["D"], generator=gen).half() for _ in range(2))
    shape = launches.Shape(num_query=c["N"], heads=c["H"], kv_heads=c["Hkv"], head_dim=c["D"],
                           tokens_per_frame=c["P"], frame_counts=c["counts"], dtype="fp16")
    want = launches.cuda_sm90_launches(shape, splits=splits)["fwd"]
    lib.forward(q, k, v, c["counts"], c["P"], c["D"] ** -0.5, splits=splits)
    got = lib.launch_record()
    assert got["grid"] == want.grid
    assert (got["threads"], got["smem_bytes"]) == (want.threads, want.smem_bytes)
    assert got["wgmma_n8_per_cta"] == want.mma
    assert sum(want.mma) > 0


def test_schedule_balance_on_known_cases():
    # 264 equal CTAs on 132 SMs x 2 slots: one wave, every slot busy to the end.
    even = machine.schedule([1e9] * 264, resident=2, sms=132, sm_rate_flops=1e12, overhead_s=0)
    assert even["balance"] == pytest.approx(1.0)
    # One long CTA and many short: the long one is the makespan when it starts last...
    last = machine.schedule([1e6] * 264 + [1e9], resident=2, sms=132, sm_rate_flops=1e12, overhead_s=0)
    assert last["makespan_s"] == pytest.approx(1e9 * 2 / 1e12 + 1e6 * 2 / 1e12)
    # ...and starts at 0 when launched first (longest first).
    first = machine.schedule([1e9] + [1e6] * 264, resident=2, sms=132, sm_rate_flops=1e12, overhead_s=0)
    assert first["makespan_s"] == pytest.approx(1e9 * 2 / 1e12)
    assert first["balance"] < 0.01


def test_resident_ctas_by_the_binding_limit():
    assert machine.resident_ctas(registers=128, threads=128, smem_bytes=0) == 4  # 65536 / (128 x 128)
    assert machine.resident_ctas(registers=255, threads=128, smem_bytes=0) == 2  # 256 per thread after rounding
    assert machine.resident_ctas(registers=32, threads=128, smem_bytes=100 * 1024) == 2  # 228 KB / 101 KB
    assert machine.resident_ctas(registers=16, threads=32, smem_bytes=0) == 32  # the block limit


def test_live_flops_are_the_issue_figures():
    """v1.2 at T = 96, B = 1: live forward 148 GFLOP, backward 370 (issue 23)."""
    s = [x for x in perf_model.default_shapes() if x.frame_counts == (96,)][0]
    assert perf_model.live_flops(s, "fwd") / 1e9 == pytest.approx(148, abs=1)
    assert perf_model.live_flops(s, "bwd") / 1e9 == pytest.approx(370, abs=2)


def test_cli_json_has_the_keys_for_every_backend_and_kernel(capsys):
    assert cli_main(["--frame-counts", "5,1,9", "--num-query", "100", "--heads", "4", "--kv-heads", "2",
                     "--tokens-per-frame", "50", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    keys = {"backend", "kernel", "pass", "frames", "batch", "head_dim", "dtype", "ctas", "balance", "predicted_ms"}
    got = {(r["backend"], r["kernel"]) for r in records}
    assert got - {("cuda_sm90", "merge")} == {(b, k) for b in ("cuda", "triton")
                                              for k in ("fwd", "merge", "dq", "dkdv", "bwd")} | {("cuda_sm90", "fwd")}
    for r in records:
        assert keys <= r.keys(), r["kernel"]
        assert r["frames"] == [5, 1, 9] and r["predicted_ms"] > 0
        if r["kernel"] == "merge":  # memory-bound: bytes and launches, no CTA schedule
            assert r["balance"] is None and r["splits"] > 1 and r["hbm_bytes"] > 0
        else:
            assert 0 < r["balance"] <= 1
        if r["backend"] == "cuda" and r["kernel"] not in ("bwd", "merge"):
            assert len(r["mma_per_cta"]) == r["ctas"]
        if r["backend"] == "cuda_sm90" and r["kernel"] != "merge":
            assert len(r["wgmma_n8_per_cta"]) == r["ctas"] and r["resident_per_sm"] == 1


def test_default_shapes_are_the_issue_shapes():
    shapes = perf_model.default_shapes()
    assert {s.frame_counts for s in shapes} == {(t,) * b for t in (16, 32, 64, 96, 512) for b in (1, 4)} | {
        (16, 96, 33, 64)}
    assert {(s.num_query, s.heads, s.kv_heads, s.head_dim, s.tokens_per_frame, s.dtype) for s in shapes} == {
        (1024, 16, 16, 64, 729, "bf16")}


def test_cli_table(capsys):
    assert cli_main(["--frame-counts", "3", "--num-query", "64", "--heads", "2", "--tokens-per-frame", "40"]) == 0
    out = capsys.readouterr().out
    assert "| cuda | fwd | 3x1 |" in out and "| triton | dkdv (w" in out and "stated, not measured" in out
    assert "| cuda_sm90 | fwd | 3x1 |" in out


def test_triton_tune_class_separates_shape_classes():
    from ccam_kernels.backends.triton_kernels import tune_class

    v12 = tune_class(1024, 96 * 729)
    assert v12 == tune_class(1024, 90 * 729)  # one class: T = 90 reuses T = 96's tuning
    assert len({v12, tune_class(1024, 16 * 729), tune_class(20, 3 * 7), tune_class(2048, 96 * 729)}) == 4
    assert all(c % 16 == 0 for c in (v12, tune_class(1, 1), tune_class(20, 21)))


def test_triton_configs_that_spill_on_sm90_are_pruned(monkeypatch):
    import triton

    from ccam_kernels.backends import triton_kernels

    table = {"triton_sm_90": {"dkdv|D64|w4s2": {"spill_stores": 36, "spill_loads": 36},
                              "dkdv|D64|w8s2": {"spill_stores": 0, "spill_loads": 0}}}
    monkeypatch.setattr(resources, "load", lambda: table)
    configs = [triton.Config({}, num_warps=w, num_stages=2) for w in (4, 8)]
    kept = triton_kernels._without_spills("dkdv")(configs, {}, BLOCK_D=64)
    assert [c.num_warps for c in kept] == [8]
    # every config spilling: keep them all rather than leave the kernel nothing to run
    table["triton_sm_90"]["dkdv|D64|w8s2"]["spill_stores"] = 4
    assert len(triton_kernels._without_spills("dkdv")(configs, {}, BLOCK_D=64)) == 2


# (kernel, head dim) whose every sm_90 config spills (ptxas on CPU), so that the prune keeps them
# all. None: dK/dV tunes over 8 warps only and walks 32 rows at a time at head dim 128, where
# 4 warps and 64 rows spilled (docs/gpu.md). An entry here needs its reason in docs/gpu.md.
KNOWN_SPILLING = set()


def test_no_triton_config_kept_for_sm90_spills():
    """With the committed sm_90 table, the prune keeps exactly the configs ptxas reports
    without spills, and every kernel and head dim keeps at least one (but KNOWN_SPILLING)."""
    import triton

    from ccam_kernels.backends import triton_kernels

    table = resources.load()["triton_sm_90"]
    for kernel in ("fwd", "dq", "dkdv"):
        configs = [triton.Config({}, num_warps=w, num_stages=s) for w, s in triton_kernels.KERNEL_CONFIGS[kernel]]
        for block_d in resources.TRITON_HEAD_DIMS:
            kept = triton_kernels._without_spills(kernel)(configs, {}, BLOCK_D=block_d)
            clean = [c for c in configs
                     if not triton_kernels._spills(table[resources.triton_config_key(kernel, block_d, c.num_warps,
                                                                                     c.num_stages)])]
            if (kernel, block_d) in KNOWN_SPILLING:
                assert not clean and kept == configs, (kernel, block_d, "no longer spills: drop it from KNOWN_SPILLING")
                continue
            assert clean, (kernel, block_d, "every config spills on sm_90")
            assert kept == clean, (kernel, block_d)


def test_merge_model_counts_the_fused_kernel_against_the_pytorch_chain():
    """One split forward's merge: the fused kernel reads the partials once (S float32 outputs
    and LSEs in, out and lse written); the PyTorch chain moves more than three times that, in
    8 kernels."""
    from ccam_kernels.perf_model import merge

    S, B, N, H, D = 2, 1, 1024, 16, 64
    o = B * N * H * D * 4
    fused = merge.merge_cost(S, B, N, H, D, 2, "fused")
    assert fused["kernels"] == 1 and fused["hbm_bytes"] == S * o + S * B * H * N * 4 + o // 2 + B * H * N * 4
    assert merge.merge_cost(S, B, N, H, D, 2, "fused", keep_acc=True)["hbm_bytes"] == fused["hbm_bytes"] + o
    chain = merge.merge_cost(S, B, N, H, D, 2, "pytorch")
    assert chain["kernels"] == 8 and chain["hbm_bytes"] > 3 * S * o and chain["seconds"] > fused["seconds"]
    recs = perf_model.predict(launches.Shape(1024, 16, 16, 64, 729, (96,)))
    merged = {r["backend"]: r for r in recs if r["kernel"] == "merge"}
    assert merged["triton"]["merge"] == merged["cuda"]["merge"] == "fused"
    assert merged["triton"]["ctas"] == 16 * 1024 // 64 and merged["cuda"]["ctas"] == 16 * 1024 // 16


def test_the_split_merge_kernel_does_not_spill_on_sm90():
    """backends/triton_merge.py's one config at every head dim, from the committed table."""
    from ccam_kernels.backends import triton_merge

    table = resources.load()["triton_sm_90"]
    for block_d in resources.TRITON_HEAD_DIMS:
        res = table[resources.triton_config_key("merge", block_d, triton_merge.NUM_WARPS, 1)]
        assert res["spill_stores"] == res["spill_loads"] == 0, block_d


def test_every_triton_loop_load_is_pipelined_on_sm90():
    """With the head dim a whole tile (EVEN_D: head dims 16, 32, 64, 128) every kernel's loop
    loads become asynchronous copies for sm_90 in every config (the committed table: TTGIR of
    each compile); before EVEN_D the forward's and dQ's had none (docs/gpu.md)."""
    from ccam_kernels.backends import triton_kernels

    table = resources.load()["triton_sm_90"]
    for kernel in ("fwd", "dq", "dkdv"):
        for block_d in resources.TRITON_HEAD_DIMS:
            for w, s in triton_kernels.KERNEL_CONFIGS[kernel]:
                res = table[resources.triton_config_key(kernel, block_d, w, s)]
                assert res["async_copies"] >= 2 * (s - 1), (kernel, block_d, w, s)  # K and V (q and dO) each stage
