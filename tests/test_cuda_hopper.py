"""The sm_90a forward (csrc/ccam/fwd_sm90.cuh: a TMA producer warp, two wgmma consumer
warpgroups, mbarrier rings) run by the CPU emulator against the float64 oracle: the case grid
of the mma.sync kernels (tests/kernel_cases.py: ragged batches, GQA, T = 1, T not dividing N,
T > N, shared and batched q) at head dims up to 64 and 128, large logits, forced splits, and a
partial call over frame windows; then mutation tests (a wrong swizzle, a missing wgmma wait, a
wrong mbarrier parity, an expect_tx byte count off by one tile, a mask off by one in the hot
loop, the NaN rule's sanitizer broken), each of which must be caught. Built with g++ through
ctypes (tests/emu_lib.py). Then, through the cuda backend's op with the emulator standing for
an sm_90 GPU: the NaN rule (docs/reference.md §7) and dropout (the reference's mask, same seed),
and the dispatch with its CCAM_CUDA_SM90=0 switch."""

from __future__ import annotations

import concurrent.futures
import os
import pathlib

import pytest
import torch

import emu_lib
from conftest import rel_err
from kernel_cases import CASES
from oracle import attention_oracle, attention_rows_oracle

TOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


Sm90 = emu_lib.Sm90


@pytest.fixture(scope="module")
def sm90():
    return Sm90(emu_lib.hopper_library())


def inputs(N, H, Hkv, D, counts, P, shared, dtype, gen, logit_scale=1.0):
    L, B = sum(counts) * P, len(counts)
    q = torch.randn(*(() if shared else (B,)), N, H, D, generator=gen) * logit_scale
    k, v = torch.randn(L, Hkv, D, generator=gen), torch.randn(L, Hkv, D, generator=gen)
    return [x.to(dtype) for x in (q, k, v)]


def check(sm90, q, k, v, counts, P, dtype, splits=1):
    scale = q.shape[-1] ** -0.5
    out, lse = sm90.forward(q, k, v, counts, P, scale, splits=splits)
    want = attention_oracle(q.double(), k.double(), v.double(), counts, P, scale=scale)
    assert out.dtype == (dtype if splits == 1 else torch.float32)
    err = rel_err(out, want)
    assert err <= TOL[dtype], err
    assert torch.isfinite(lse).all()


@pytest.mark.parametrize("dims", [64, 128], ids=lambda d: f"DP{d}")
@pytest.mark.parametrize("N,H,Hkv,D,counts,P,shared", CASES)
def test_forward_matches_the_oracle_on_the_case_grid(sm90, N, H, Hkv, D, counts, P, shared, dims, generator):
    """The grid's shapes; at DP 128 the head dim is the grid's plus 64 (kernels for 64 and 128)."""
    D = D if dims == 64 else D + 64
    dtype = torch.bfloat16 if N % 2 else torch.float16
    check(sm90, *inputs(N, H, Hkv, D, counts, P, shared, dtype, generator), counts, P, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_forward_large_logits_and_forced_splits(sm90, dtype, generator):
    counts, P = (4, 7), 19
    q, k, v = inputs(150, 2, 1, 64, counts, P, False, dtype, generator, logit_scale=8.0)
    check(sm90, q, k, v, counts, P, dtype)
    check(sm90, q, k, v, counts, P, dtype, splits=3)


@pytest.mark.parametrize("schedule", [1, 2], ids=["reverse", "random"])
def test_forward_is_the_same_in_any_thread_order(sm90, schedule, generator):
    """Reversed and shuffled block and thread orders (the producer may run ahead of the
    consumers or behind them) give bitwise the same output and LSE as the linear order."""
    counts, P = (3, 8), 37
    q, k, v = inputs(70, 2, 1, 32, counts, P, False, torch.float16, generator)
    base = sm90.forward(q, k, v, counts, P, 0.2, splits=2)
    seed = int(torch.randint(0, 2**31, (1,), generator=generator))
    other = sm90.forward(q, k, v, counts, P, 0.2, splits=2, schedule=schedule, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(base, other))


def test_forward_over_frame_windows(sm90, generator):
    """A partial call: rows before a window, a window starting mid-video, windows cut mid-tile."""
    from ccam_kernels.long_video import ccam_partial_attention
    from test_long_video_partial import keys_of_ranges

    counts, P, ranges = (3, 8), 37, ((1, 3), (2, 7))
    q, k, v = inputs(70, 2, 1, 32, counts, P, False, torch.float16, generator)
    kr, vr = (keys_of_ranges(x, counts, P, ranges) for x in (k, v))
    scale = 32 ** -0.5
    want, want_lse = ccam_partial_attention(q.double(), kr.double(), vr.double(), counts, P, ranges, scale=scale,
                                            backend="reference")
    out, lse = sm90.forward(q, kr, vr, counts, P, scale, splits=2, ranges=ranges)
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isneginf(lse), ~seen)
    assert rel_err(out, want) <= TOL[torch.float16]
    assert rel_err(lse[seen], want_lse[seen]) <= TOL[torch.float16]


# ---- the sm_90a dQ pass (bwd_dq_sm90.cuh; emulator only, not dispatched) -------------------


def dq_oracle(q, k, v, dout, counts, P, scale, rows=False):
    """dQ of the float64 oracle (per sample for a shared q, as dq_rows holds it summed)."""
    q64 = q.detach().double().requires_grad_()
    oracle = attention_rows_oracle if rows else attention_oracle
    out = oracle(q64, k.double(), v.double(), counts, P, scale=scale)
    (grad,) = torch.autograd.grad(out, q64, dout.double())
    return grad


def run_dq(lib, q, k, v, dout, counts, P, scale, dq_splits=1):
    """The emulated sm_90a forward's (out, lse), then the sm_90a dQ pass; a shared q's
    per-sample rows summed (as cuda_backend does)."""
    out, lse = lib.forward(q, k, v, counts, P, scale, splits=2)  # float32 output, as the backend keeps
    dq = lib.dq(dout, q, k, v, out, lse, counts, P, scale, dq_splits=dq_splits)
    return dq.sum(0) if q.dim() == 3 else dq


DQ_CASES = [  # (N, H, Hkv, D, frame counts, P, shared q, dq splits)
    pytest.param(70, 2, 1, 32, (3, 8), 37, False, 3, id="ragged-gqa-splits"),
    # Two query tiles (the second's second warpgroup holds no row) whose key tiles are whole
    # ones, then straddling ones (two ring barriers in turn); with and without splits.
    pytest.param(150, 2, 2, 64, (12,), 40, True, 1, id="two-query-tiles-shared-q"),
    pytest.param(150, 2, 1, 16, (12,), 40, False, 3, id="two-query-tiles-gqa-splits"),
    pytest.param(5, 2, 1, 104, (9, 1), 13, False, 2, id="T-over-N-T1-DP128"),
]


@pytest.mark.parametrize("N,H,Hkv,D,counts,P,shared,dq_splits", DQ_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_dq_pass_matches_float64(sm90, N, H, Hkv, D, counts, P, shared, dq_splits, dtype, generator):
    q, k, v = inputs(N, H, Hkv, D, counts, P, shared, dtype, generator)
    dout = torch.randn(len(counts), N, H, D, generator=generator).to(dtype)
    scale = D ** -0.5
    got = run_dq(sm90, q, k, v, dout, counts, P, scale, dq_splits)
    want = dq_oracle(q, k, v, dout, counts, P, scale)
    assert rel_err(got, want) <= 2 * TOL[dtype], rel_err(got, want)


@pytest.mark.parametrize("poison", ["k-nan", "k-inf", "v-nan"])
def test_dq_pass_follows_the_nan_rule(sm90, poison, generator):
    """A NaN or inf in k or v at key 200 (frame 5 of 12: rows 63.. see it), in a straddling key
    tile of the first query tile: dQ is non-finite exactly where the row-by-row oracle's is."""
    N, counts, P, D = 150, (12,), 40, 16
    q, k, v = inputs(N, 2, 1, D, counts, P, True, torch.float16, generator)
    dout = torch.randn(1, N, 2, D, generator=generator).half()
    name, kind = poison.split("-")
    x = k if name == "k" else v
    x[200, 0, int(torch.randint(D, (), generator=generator))] = float("nan") if kind == "nan" else float("inf")
    scale = D ** -0.5
    got = run_dq(sm90, q, k, v, dout, counts, P, scale)  # on the sm_90a forward's (out, lse): tested above
    want = dq_oracle(q, k, v, dout, counts, P, scale, rows=True)
    assert nan_rule_problems(got, want, 2 * TOL[torch.float16]) == []


# ---- mutations -----------------------------------------------------------------------------
# Each is a deliberate break of a copy of csrc/ (path, old text, new text; the old text must
# occur), built small (fp16, D <= 64) and run on MUTATION_CASE; the oracle or the emulator
# must catch it.
MUTANTS = {
    "wrong-swizzle-k": ("ccam/fwd_sm90.cuh", "(kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024, 128);",
                        "(kk / 4) * BN * 128 + (kk % 4) * 32, 16, 1024, 64);"),
    "wrong-swizzle-v": ("ccam/fwd_sm90.cuh", "kk * 16 * 128, BN * 128, 1024, 128);", "kk * 16 * 128, BN * 128, 1024, 0);"),
    "no-wgmma-wait-after-s": ("ccam/fwd_sm90.cuh", "      wgmma_wait<1>();\n      mbarrier_arrive(k_empty + (t + 1)",
                              "      mbarrier_arrive(k_empty + (t + 1)"),
    "no-wgmma-wait-after-pv": ("ccam/fwd_sm90.cuh", "      if (next) wgmma_wait<1>();\n      else wgmma_wait<0>();\n", ""),
    "pv-wait-one-too-few": ("ccam/fwd_sm90.cuh", "      if (next) wgmma_wait<1>();\n      else wgmma_wait<0>();\n",
                            "      if (next) wgmma_wait<2>();\n      else wgmma_wait<1>();\n"),
    "wrong-full-parity": ("ccam/fwd_sm90.cuh", "mbarrier_wait(k_full + s, (t / Tiles::kStages) & 1);",
                          "mbarrier_wait(k_full + s, ((t / Tiles::kStages) & 1) ^ 1);"),
    "wrong-empty-parity": ("ccam/fwd_sm90.cuh", "const uint32_t free_parity = ((t / Tiles::kStages) & 1) ^ 1;",
                           "const uint32_t free_parity = ((t / Tiles::kStages) & 1);"),
    "expect-tx-one-tile-more": ("ccam/fwd_sm90.cuh", "mbarrier_arrive_expect_tx(v_bar, Tiles::kKVBytes);",
                                "mbarrier_arrive_expect_tx(v_bar, Tiles::kKVBytes + BN * 128);"),
    "expect-tx-one-tile-less": ("ccam/fwd_sm90.cuh", "mbarrier_arrive_expect_tx(q_full, Tiles::kQBytes);",
                                "mbarrier_arrive_expect_tx(q_full, Tiles::kQBytes - BM * 128);"),
    "mask-off-by-one": ("ccam/fwd_sm90.cuh", "if (masked && j * 8 + 2 * (lane % 4) + (e & 1) >= cut) x = -INFINITY;",
                        "if (masked && j * 8 + 2 * (lane % 4) + (e & 1) > cut) x = -INFINITY;"),
    "consumer-rows-not-offset": ("ccam/fwd_sm90.cuh", "cw * 64 * 128 + (kk % 4) * 32", "(kk % 4) * 32"),
    # The NaN rule: the sanitizer never flags a tile (rows that do not see a NaN get it), the
    # consumers skip the NaN their rows see, they wait on the sanitized stage with the wrong
    # parity, the sanitizer's zeroes are not fenced for the wgmma.
    "nan-never-flagged": ("ccam/fwd_sm90.cuh", "const bool flagged = warp_any(!finite);", "const bool flagged = false;"),
    "nan-seen-not-added": ("ccam/fwd_sm90.cuh", "if (load(v_flag + s)) {", "if (false && load(v_flag + s)) {"),
    "nan-clean-wrong-parity": ("ccam/fwd_sm90.cuh", "mbarrier_wait(v_clean + s, ((t - n_full) / Tiles::kStages) & 1);",
                               "mbarrier_wait(v_clean + s, (((t - n_full) / Tiles::kStages) & 1) ^ 1);"),
    "nan-no-proxy-fence": ("ccam/fwd_sm90.cuh", "          fence_proxy_async();  // the wgmma", "          // the wgmma"),
}

# Ragged, GQA, batched q, three key tiles of 128 per sample (a ring stage is reused), two
# consumer warpgroups (70 rows), frame boundaries inside tiles; splits; a frame-window call;
# and a NaN in v at key 150 of sample 1 (frame 4: rows 35.. see it), in its second key tile,
# which straddles the rows' limits (every tile of that sample does).
MUTATION_CASE = dict(N=70, H=2, Hkv=1, D=32, counts=(3, 8), P=37, ranges=((1, 3), (2, 7)), nan_key=3 * 37 + 150)


def nan_rule_problems(out: torch.Tensor, want: torch.Tensor, tol: float = TOL[torch.float16]) -> list[str]:
    """The NaN rule: NaN exactly where the row-by-row oracle has it, the rest within tol."""
    bad, bad_want = ~torch.isfinite(out), ~torch.isfinite(want)
    if not torch.equal(bad, bad_want):
        return [f"NaN rule: {int((bad & ~bad_want).sum())} non-finite outputs where the formula is finite, "
                f"{int((~bad & bad_want).sum())} finite where it is not"]
    err = rel_err(out[~bad], want[~bad_want])
    return [] if err <= tol else [f"NaN rule: rel err {err:.3g}"]


def problems_found(lib: Sm90, seed: int) -> list[str]:
    """The forward on MUTATION_CASE (fp16) whole, in 3 splits, and over frame windows: every
    check that fails against the float64 oracle, or the emulator's error."""
    from ccam_kernels.long_video import ccam_partial_attention
    from test_long_video_partial import keys_of_ranges

    c = MUTATION_CASE
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(c["N"], c["H"], c["Hkv"], c["D"], c["counts"], c["P"], False, torch.float16, gen)
    scale = c["D"] ** -0.5
    want = attention_oracle(q.double(), k.double(), v.double(), c["counts"], c["P"], scale=scale)
    kr, vr = (keys_of_ranges(x, c["counts"], c["P"], c["ranges"]) for x in (k, v))
    want_w, _ = ccam_partial_attention(q.double(), kr.double(), vr.double(), c["counts"], c["P"], c["ranges"],
                                       scale=scale, backend="reference")
    v_nan = v.clone()
    v_nan[c["nan_key"], 0, int(torch.randint(c["D"], (), generator=gen))] = float("nan")
    want_nan = attention_rows_oracle(q.double(), k.double(), v_nan.double(), c["counts"], c["P"], scale=scale)
    try:
        got = [("out", lib.forward(q, k, v, c["counts"], c["P"], scale)[0], want),
               ("out (3 splits)", lib.forward(q, k, v, c["counts"], c["P"], scale, splits=3)[0], want),
               ("window out", lib.forward(q, kr, vr, c["counts"], c["P"], scale, splits=2, ranges=c["ranges"])[0], want_w)]
        out_nan = lib.forward(q, k, v_nan, c["counts"], c["P"], scale)[0]
    except emu_lib.EmulatorError as exc:
        return [f"emulator: {exc}"]
    found = nan_rule_problems(out_nan, want_nan)
    for name, out, ref in got:
        err = rel_err(out, ref)
        if not err <= TOL[torch.float16]:  # NaN fails too
            found.append(f"{name}: rel err {err:.3g}")
    return found


def build_small(src: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    emu_lib._gxx([*emu_lib.FLAGS, "-DCCAM_EMU_SM90_FP16_D64_ONLY", "-shared", "-Wl,-Bsymbolic",
                  str(src / "emu" / "capi_hopper.cpp"), *(str(o) for o in emu_lib.machine_objects()), "-o", str(out)])
    return out


def test_unmutated_forward_passes_the_mutation_case(sm90, seed):
    assert problems_found(sm90, seed) == []


@pytest.fixture(scope="module")
def mutant_libraries(tmp_path_factory):
    root = tmp_path_factory.mktemp("sm90_mutants")
    emu_lib.machine_objects()

    def make(name):
        rel, old, new = MUTANTS[name]
        src = emu_lib.csrc_copy(root / name, {rel: (old, new)})
        return name, Sm90(build_small(src, root / f"{name}.so"))

    with concurrent.futures.ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        return dict(pool.map(make, MUTANTS))


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_each_mutation_is_caught(mutant, mutant_libraries, seed):
    found = problems_found(mutant_libraries[mutant], seed)
    assert found, f"mutant {mutant} passed every check"
    print(f"{mutant}: {found}")


def test_dq_pass_compiles_for_sm90a_to_hgmma_and_tma(tmp_path):
    """csrc/sm90/check/bwd_dq_sm90.cu (nvcc, sm_90a): no spills, and in the SASS per key tile
    the wgmma k-steps of S = Q K^T and dP = dO V^T (DP / 16 each, m64n64k16) and of dS K (4,
    m64nDPk16); TMA loads of Q and dO (4-d) and K and V (3-d), per 64-column block."""
    import shutil

    from ccam_kernels import cuda_build

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on the PATH: the sm_90a dQ pass cannot be compile-checked here")
    src = emu_lib.CSRC / "sm90" / "check" / "bwd_dq_sm90.cu"
    result = cuda_build.compile_one(src, ("90a",), tmp_path)
    assert result.ok, result.log[-4000:]
    for kernel, res in result.kernels.items():
        assert res["spill_stores"] == res["spill_loads"] == res["stack"] == 0, (kernel, res)
    sass = cuda_build.sass_mma_counts(tmp_path / (src.stem + ".o"))
    assert sass[("bwd_dq_sm90_kernel<bf16, 64>", "sm_90a")] == {"HMMA": 0, "HGMMA": 4 + 4 + 4, "UTMALDG": 4}
    assert sass[("bwd_dq_sm90_kernel<fp16, 128>", "sm_90a")] == {"HMMA": 0, "HGMMA": 8 + 8 + 4, "UTMALDG": 8}


# The dQ pass's mutants: dS not zeroed where the row does not see the key, K read K-major in
# dS K, the sanitizer waiting on the ring's K barrier (a parity two phases behind: it passes
# early), the zeroed copy of K not used. Run on DQ_MUTATION_CASE (fp16; two query tiles whose
# key tiles are whole ones, then straddling ones), clean and with an inf in k at key 200.
DQ_MUTANTS = {
    "dq-hidden-not-zeroed": ("ccam/bwd_dq_sm90.cuh", "sc[j][e] = hidden ? 0.f : pr * (dp[j][e] - dlt[half]);",
                             "sc[j][e] = pr * (dp[j][e] - dlt[half]);"),
    "dq-k-read-k-major": ("ccam/bwd_dq_sm90.cuh", "wgmma_rs<T, DP, true>(reinterpret_cast<float(&)[DP / 2]>(dq)",
                          "wgmma_rs<T, DP, false>(reinterpret_cast<float(&)[DP / 2]>(dq)"),
    "dq-sanitizer-on-ring-barrier": ("ccam/bwd_dq_sm90.cuh",
                                     "mbarrier_wait(k_tma + s, ((t - n_full) / Tiles::kStages) & 1);\n        const uint4* kt",
                                     "mbarrier_wait(k_full + s, (t / Tiles::kStages) & 1);\n        const uint4* kt"),
    "dq-zeroed-copy-unused": ("ccam/bwd_dq_sm90.cuh", "        k_b = s_kz + s * Tiles::kKVBytes;\n", ""),
}
DQ_MUTATION_CASE = dict(N=150, H=2, Hkv=1, D=16, counts=(12,), P=40, inf_key=200)


def dq_problems_found(lib, seed: int) -> list[str]:
    c = DQ_MUTATION_CASE
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(c["N"], c["H"], c["Hkv"], c["D"], c["counts"], c["P"], False, torch.float16, gen)
    dout = torch.randn(1, c["N"], c["H"], c["D"], generator=gen).half()
    k_inf = k.clone()
    k_inf[c["inf_key"], 0, int(torch.randint(c["D"], (), generator=gen))] = float("inf")
    scale = c["D"] ** -0.5
    found = []
    for name, kk in (("dq", k), ("dq (inf in k)", k_inf)):
        want = dq_oracle(q, kk, v, dout, c["counts"], c["P"], scale, rows=True)
        try:
            got = run_dq(lib, q, kk, v, dout, c["counts"], c["P"], scale)
        except emu_lib.EmulatorError as exc:
            return [f"emulator: {exc}"]
        found += [f"{name}: {x}" for x in nan_rule_problems(got, want, 2 * TOL[torch.float16])]
    return found


def test_unmutated_dq_pass_passes_the_mutation_case(sm90, seed):
    assert dq_problems_found(sm90, seed) == []


@pytest.fixture(scope="module")
def dq_mutant_libraries(tmp_path_factory):
    root = tmp_path_factory.mktemp("sm90_dq_mutants")
    emu_lib.machine_objects()

    def make(name):
        rel, old, new = DQ_MUTANTS[name]
        src = emu_lib.csrc_copy(root / name, {rel: (old, new)})
        return name, Sm90(build_small(src, root / f"{name}.so"))

    with concurrent.futures.ThreadPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        return dict(pool.map(make, DQ_MUTANTS))


@pytest.mark.parametrize("mutant", sorted(DQ_MUTANTS))
def test_each_dq_mutation_is_caught(mutant, dq_mutant_libraries, seed):
    found = dq_problems_found(dq_mutant_libraries[mutant], seed)
    assert found, f"mutant {mutant} passed every check"
    print(f"{mutant}: {found}")


# ---- dispatch ------------------------------------------------------------------------------


EMULATED_SM90 = pytest.mark.skipif(torch.cuda.is_available(),
                                   reason="the emulator's sm_90 stand-in; a GPU run tests the real dispatch")


def forwards_launched(capfd) -> list[str]:
    """The forward kernels the emulator launched since the last call (CCAM_EMU_TRACE=1)."""
    err = capfd.readouterr().err
    return [line.split()[-1] for line in err.splitlines() if line.startswith("ccam emulator: launch fwd")]


@EMULATED_SM90
@pytest.mark.parametrize("D", [40, 128])
def test_the_cuda_backend_takes_the_sm90_forward_on_sm90(monkeypatch, capfd, D, generator):
    """Through the op (CCAM_CUDA_EMULATE=1): with the emulator standing for an sm_90 GPU
    (CCAM_EMU_SM90=1) the forward launches fwd_sm90_kernel by default and fwd_kernel with
    CCAM_CUDA_SM90=0 (the switch that forces mma.sync), as on any other GPU; all match the
    float64 oracle, and the backward (mma.sync kernels) runs on the sm_90 forward's LSE."""
    from ccam_kernels import ccam_attention
    from ccam_kernels.attention import BACKENDS
    from ccam_kernels.backends import cuda_backend

    monkeypatch.setenv(cuda_backend.EMULATE_ENV, "1")
    monkeypatch.setenv("CCAM_EMU_TRACE", "1")
    why = BACKENDS["cuda"].why_unusable()
    assert not why, why
    counts, P = (3, 5), 11
    q, k, v = inputs(37, 2, 1, D, counts, P, False, torch.bfloat16, generator)
    want = attention_oracle(q.double(), k.double(), v.double(), counts, P)
    for sm90, force, kernel in (("1", None, "fwd_sm90_kernel"), ("1", "0", "fwd_kernel"), ("0", None, "fwd_kernel")):
        monkeypatch.setenv("CCAM_EMU_SM90", sm90)
        if force is None:
            monkeypatch.delenv("CCAM_CUDA_SM90", raising=False)
        else:
            monkeypatch.setenv("CCAM_CUDA_SM90", force)
        capfd.readouterr()
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = ccam_attention(*x, counts, P, backend="cuda")
        out.float().sum().backward()
        assert forwards_launched(capfd) == [kernel]
        assert rel_err(out, want) <= TOL[torch.bfloat16]
        assert all(torch.isfinite(t.grad).all() for t in x)


@pytest.fixture
def sm90_op(monkeypatch, capfd, cuda_here):
    """The cuda backend's op with the emulator standing for an sm_90 GPU; returns a check that
    every forward launched since its last call was the sm_90a kernel (and there was one)."""
    monkeypatch.setenv("CCAM_EMU_SM90", "1")
    monkeypatch.delenv("CCAM_CUDA_SM90", raising=False)
    monkeypatch.setenv("CCAM_EMU_TRACE", "1")
    capfd.readouterr()

    def all_sm90():
        launched = forwards_launched(capfd)
        assert launched and set(launched) == {"fwd_sm90_kernel"}, launched

    return all_sm90


# (N, H, Hkv, D, frame counts, P, shared q), poison, the poisoned key (None: anywhere)
NAN_CASES = [
    pytest.param((4, 2, 2, 16, (3,), 2, True), "v-nan", None, id="one-tile-v-nan"),
    pytest.param((21, 4, 2, 16, (7, 2), 3, False), "k-nan", None, id="ragged-gqa-k-nan"),
    pytest.param((5, 2, 1, 16, (8,), 2, True), "v-inf", None, id="T-greater-than-N-v-inf"),
    # Two query tiles of 128 rows, four key tiles: key 200 (frame 5, rows 63.. see it) is in a
    # straddling tile of the first query tile and a whole tile of the second.
    pytest.param((150, 2, 1, 16, (12,), 40, True), "v-nan", 200, id="tiles-v-nan-straddling"),
    pytest.param((150, 2, 1, 16, (12,), 40, True), "q-nan", None, id="tiles-q-nan"),
]


@EMULATED_SM90
@pytest.mark.parametrize("case,poison,key", NAN_CASES)
def test_sm90_forward_follows_the_nan_rule(sm90_op, case, poison, key):
    """tests/test_nan_rule.py's check (output without and with autograd, and the mma.sync
    backward on this forward's LSE) with the forward on the sm_90a kernel: a NaN or inf reaches
    exactly the rows that see it."""
    from test_nan_rule import TOLERANCE, check_nan_rule

    check_nan_rule("cuda", torch.float16, case, poison, TOLERANCE[torch.float16], key=key)
    sm90_op()


@EMULATED_SM90
@pytest.mark.parametrize("poison", ["k-nan", "v-nan"])
def test_sm90_forward_partials_follow_the_nan_rule(sm90_op, poison):
    """tests/test_nan_rule.py's merged partials (frames [0, 2) and [2, 5) of one video, the
    poison in the second range's keys) with their forwards on the sm_90a kernel."""
    from kernel_cases import make_inputs
    from test_nan_rule import TOLERANCE, _merged_partials, _oracle, _poison, _same_nonfinite

    N, T, P = 6, 5, 3
    q, k, v, dout = make_inputs(N, 2, 1, 16, (T,), P, True, torch.float16, "cpu")
    _poison(dict(q=q, k=k, v=v, dout=dout), poison, key=(T - 1) * P + 1)
    got = _merged_partials("cuda", q, k, v, dout, T, P, cut=2)
    want = _oracle(q, k, v, dout, (T,), P)[1:]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _same_nonfinite(f"sm90 partial {poison}: {name}", g, w, True, 2 * TOLERANCE[torch.float16])
    sm90_op()


@EMULATED_SM90
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_sm90_forward_dropout_matches_the_reference(sm90_op, dtype):
    """The same mask as the reference backend on the same seed (dropout.cuh): output and the
    gradients (mma.sync backward); p = 0 is bitwise the call without dropout."""
    from kernel_cases import DROPOUT_CASES, check_dropout_against_reference, make_inputs

    for case in DROPOUT_CASES:
        N, H, Hkv, D, counts, P, shared = case.values
        q, k, v, dout = make_inputs(N, H, Hkv, D, counts, P, shared, dtype, "cpu")
        check_dropout_against_reference("cuda", q, k, v, dout, counts, P, dtype, TOL[dtype])
    sm90_op()


@EMULATED_SM90
def test_sm90_forward_dropout_with_splits_and_partials(sm90_op, monkeypatch):
    """Forced splits and frame windows draw the same mask as one program."""
    from kernel_cases import DROPOUT_SPLIT_CASE, check_dropout_with_splits_and_partials, make_inputs

    dtype = torch.float16
    q, k, v, dout = make_inputs(*DROPOUT_SPLIT_CASE, dtype, "cpu")
    check_dropout_with_splits_and_partials("cuda", q, k, v, dout, dtype, TOL[dtype], monkeypatch)
    sm90_op()
