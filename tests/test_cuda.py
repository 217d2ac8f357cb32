"""The "cuda" backend (csrc/ kernels) against the float64 oracle: forward and every gradient,
the same cases as the Triton backend's tests, plus what is specific to these kernels (every
padded head-dim instantiation, the 16-byte row alignment path, the C++ argument checks, block
and thread schedules, the real geometry).

Where there is no GPU, every test here runs on CPU tensors under the emulator
(CCAM_CUDA_EMULATE=1, set per test: csrc/emu, built with g++ at first use), which executes
every thread of the same kernel sources and checks barriers, warp collectives, cp.async
waits, bounds and shared-memory races; an emulator that cannot be built fails these tests.
On a GPU they run on the device and need the built extension: where it is not built they skip
with the reason, unless CCAM_REQUIRE_CUDA_BACKEND=1 (the GPU suite sets it), which turns that
skip into a failure."""

import os

import pytest
import torch

from ccam_kernels import CCAMConfig, CCAMProjector, available_backends, ccam_attention
from ccam_kernels.backends import cuda_backend, tiling
from conftest import rel_err
from kernel_cases import CASES, check_against_oracle, check_deterministic, check_lse, make_inputs
from kernel_cases import (DROPOUT_CASES, DROPOUT_SPLIT_CASE, check_dropout_against_reference,
                          check_dropout_with_splits_and_partials, run_seeded)
from oracle import attention_oracle

GPU = torch.cuda.is_available()
DEVICE = "cuda" if GPU else "cpu"
DTYPES = [torch.float16, torch.bfloat16]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # docs/reference.md §7; gradients within twice that


@pytest.fixture(autouse=True)
def cuda_backend_here(cuda_here):
    """Every test of this file (and of those importing this fixture) runs the cuda ops."""


def _inputs(N, H, Hkv, D, counts, P, shared, dtype, scale_q=1.0):
    return make_inputs(N, H, Hkv, D, counts, P, shared, dtype, DEVICE, scale_q)


def _check(q, k, v, dout, counts, P, dtype, scale=None):
    check_against_oracle("cuda", q, k, v, dout, counts, P, dtype, TOLERANCE[dtype], scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,Hkv,D,counts,P,shared", CASES)
def test_cuda_matches_oracle(N, H, Hkv, D, counts, P, shared, dtype, nan_poison):
    """Outputs and gradients are NaN-poisoned before the kernels write them (nan_poison)."""
    _check(*_inputs(N, H, Hkv, D, counts, P, shared, dtype), counts, P, dtype)


@pytest.mark.parametrize("D", list(range(16, 129, 8)))
def test_cuda_every_head_dim(D):
    """Every multiple of 8 from 16 to 128, i.e. every padded instantiation (32/64/96/128) with
    and without zero-padded columns; several query and key tiles, ragged, GQA."""
    counts, P = (3, 8), 23
    _check(*_inputs(100, 2, 1, D, counts, P, D % 16 == 0, torch.bfloat16), counts, P, torch.bfloat16)


def test_cuda_real_geometry_forward():
    """One forward at the real geometry: N=1024 queries, P=729 tokens, D=64, 16 frames, one
    head (test_gpu.py runs all 16 heads and the gradients on a GPU)."""
    counts, P = (16,), 729
    q, k, v, _ = _inputs(1024, 1, 1, 64, counts, P, True, torch.bfloat16)
    out = ccam_attention(q, k, v, counts, P, backend="cuda")
    assert rel_err(out, attention_oracle(q.double(), k.double(), v.double(), counts, P)) <= TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("schedule", ["reverse", "random:1", "random:2"])
def test_cuda_block_and_thread_orders(schedule, monkeypatch):
    """Other block orders (reversed, shuffled) and thread interleavings give the same bits as
    the linear order, and pass the oracle. Emulator only: a GPU picks its own order."""
    if GPU:
        pytest.skip("the block and thread order is the emulator's choice (CCAM_EMU_SCHEDULE); a GPU has its own")
    counts, P = (5, 3, 9), 11
    q, k, v, dout = _inputs(70, 4, 2, 40, counts, P, False, torch.float16)
    runs = []
    for order in ("linear", schedule):
        monkeypatch.setenv("CCAM_EMU_SCHEDULE", order)
        if order != "linear":
            _check(q.clone(), k.clone(), v.clone(), dout, counts, P, torch.float16)
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = ccam_attention(*x, counts, P, backend="cuda")
        out.backward(dout)
        runs.append([out.detach()] + [t.grad for t in x])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_emulated_cuda_is_listed_but_never_auto_nor_timed():
    """Under CCAM_CUDA_EMULATE=1 "cuda" is usable on CPU tensors when asked for by name, but
    "auto" never picks it and ccam-bench never times it (even when named)."""
    if GPU:
        pytest.skip("about the CPU emulation only")
    from ccam_kernels.attention import resolve_backend
    from ccam_kernels.bench.contestants import default_contestants, never_timed
    from ccam_kernels.checks import check_attention_args

    assert "cuda" in available_backends()
    q, k, v, _ = _inputs(20, 2, 2, 16, (2,), 5, True, torch.float16)
    assert resolve_backend("auto", q, check_attention_args(q, k, v, (2,), 5)).name != "cuda"
    for explicit in (False, True):
        assert "cuda" not in default_contestants("attention", torch.device("cpu"), explicit=explicit)
        assert "cuda" not in default_contestants("projector", torch.device("cpu"), explicit=explicit)
    assert "emulator" in never_timed("cuda", "cpu") and never_timed("cuda", "cuda") is None


def test_cuda_large_logits():
    q, k, v, dout = _inputs(96, 2, 2, 64, (4, 7), 33, True, torch.float16, scale_q=40.0)
    _check(q, k, v, dout, (4, 7), 33, torch.float16)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_cuda_split_kv_forward(splits, monkeypatch):
    """Forced key splits (incl. splits that see nothing live for some rows, and more splits
    than key tiles) merge to the same result."""
    monkeypatch.setattr(tiling, "FORCE_SPLITS", splits)
    for N, H, Hkv, D, counts, P, shared in [(137, 4, 2, 32, (5, 3, 9), 37, True), (70, 3, 3, 64, (1, 4), 20, False)]:
        _check(*_inputs(N, H, Hkv, D, counts, P, shared, torch.bfloat16), counts, P, torch.bfloat16)


def test_cuda_custom_scale_strided_and_misaligned_inputs():
    """Row strides that are not multiples of 8 elements and a data pointer off a 16-byte
    boundary: the host copies those once (cp.async needs aligned rows); q with strided rows
    and k/v halves of one projection (the projector's layout) are read in place."""
    N, H, D, counts, P = 70, 2, 32, (3, 4), 6
    L = sum(counts) * P
    q = torch.randn(H, N, D, device=DEVICE, dtype=torch.float16).transpose(0, 1)
    kv = torch.randn(L, H, 2 * D, device=DEVICE, dtype=torch.float16)
    k, v = kv[..., :D], kv[..., D:]
    assert cuda_backend._rows_aligned(k) is k and cuda_backend._rows_aligned(v) is v
    dout = torch.randn(len(counts), N, H, D, device=DEVICE, dtype=torch.float16)
    _check(q, k, v, dout, counts, P, torch.float16, scale=0.3)
    odd = torch.randn(L * H * D + 3, device=DEVICE, dtype=torch.float16)[3:].view(L, H, D)  # 6-byte offset
    assert cuda_backend._rows_aligned(odd) is not odd
    want = attention_oracle(q.double(), odd.double(), odd.double(), counts, P)
    assert rel_err(ccam_attention(q, odd, odd, counts, P, backend="cuda"), want) <= 2e-3


def test_cuda_backward_is_deterministic():
    check_deterministic("cuda", *_inputs(140, 4, 2, 64, (5, 9, 2), 46, True, torch.bfloat16), (5, 9, 2), 46)


def test_cuda_lse_is_the_natural_log_sum_exp():
    N, H, D, counts, P = 90, 2, 64, (3, 5), 24
    q, k, v, _ = _inputs(N, H, 1, D, counts, P, True, torch.float16)
    _, lse, _ = cuda_backend.cuda_attention(q, k, v, torch.tensor(counts), P, D ** -0.5)
    check_lse(lse, q, k, counts, P, D ** -0.5, 1e-3)


def test_cuda_refuses_float32_and_odd_head_dims():
    q = torch.randn(8, 2, 16, device=DEVICE)
    k = torch.randn(6, 2, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match="16-bit tensor cores"):
        ccam_attention(q, k, k, (2,), 3, backend="cuda")
    q, k = q[..., :12].half(), k[..., :12].half()
    with pytest.raises(RuntimeError, match="multiples of 8"):
        ccam_attention(q, k, k, (2,), 3, backend="cuda")


def test_cuda_ops_check_their_arguments():
    """The C++ ops check before launching (docs/reference.md §8 style: the argument, the expectation, the value)."""
    q, k, v, _ = _inputs(32, 2, 2, 64, (2,), 8, True, torch.float16)
    plan = tiling.window_plan((2,), ((0, 2),), 8, 64, q.device)[:4]  # frames, key_start, first/end frame
    out = torch.empty(1, 32, 2, 64, device=DEVICE, dtype=torch.float16)
    lse = torch.empty(1, 2, 32, device=DEVICE)
    ops = torch.ops.ccam_kernels
    with pytest.raises(ValueError, match="k and v must both be"):
        ops.cuda_fwd(q, k[:, :, :32], v, *plan, 8, 0.1, 1, out, lse)
    with pytest.raises(ValueError, match="share one dtype"):
        ops.cuda_fwd(q, k.bfloat16(), v, *plan, 8, 0.1, 1, out, lse)
    with pytest.raises(ValueError, match="lse must be"):
        ops.cuda_fwd(q, k, v, *plan, 8, 0.1, 1, out, lse[:, :1])
    padded = torch.randn(k.shape[0], 2, 68, device=DEVICE, dtype=torch.float16)[..., :64]  # row stride 68
    with pytest.raises(ValueError, match="multiples of 8 elements"):
        ops.cuda_fwd(q, padded, padded, *plan, 8, 0.1, 1, out, lse)
    with pytest.raises(ValueError, match="num_splits must be in 1..64"):
        ops.cuda_fwd(q, k, v, *plan, 8, 0.1, 0, out, lse)
    with pytest.raises(ValueError, match="head dim must be a multiple of 8"):
        ops.cuda_fwd(q[..., :12], k[..., :12], v[..., :12], *plan, 8, 0.1, 1, out, lse)
    if GPU:  # (under emulation a tensor on another device dispatches elsewhere: nothing to check)
        with pytest.raises(ValueError, match="CUDA tensor"):
            ops.cuda_fwd(q.cpu(), k, v, *plan, 8, 0.1, 1, out, lse)


def test_projector_compiles_through_cuda_without_graph_breaks():
    cfg = CCAMConfig(num_query=64, hidden_size=128, cross_hidden_size=96, num_heads=2, num_key_value_heads=2,
                     intermediate_size=192, output_size=80, attention_dropout=0.0, dropout=0.0)
    proj = CCAMProjector(cfg, backend="cuda").to(DEVICE).half()
    want = CCAMProjector(cfg, backend="reference").to(DEVICE).half()
    want.load_state_dict(proj.state_dict())
    features = torch.randn(5, 11, 96, device=DEVICE, dtype=torch.float16, requires_grad=True)
    compiled = torch.compile(proj, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    out = compiled(features, [2, 3])
    assert rel_err(out, want(features, [2, 3])) <= 1e-2
    out.float().sum().backward()
    assert features.grad is not None and proj.query.grad is not None


# A wider random sweep, opt-in: CCAM_CUDA_SWEEP=N adds N random shapes (defined only then, so
# the default run neither runs nor skips it). Under emulation each draws its block order too.
SWEEP = int(os.environ.get("CCAM_CUDA_SWEEP", "0") or 0)
if SWEEP:

    @pytest.mark.parametrize("case", range(SWEEP))
    def test_cuda_random_sweep(case, seed, monkeypatch):
        gen = torch.Generator().manual_seed(seed + case)

        def pick(*options):
            return options[int(torch.randint(len(options), (1,), generator=gen))]

        def draw(lo, hi):
            return int(torch.randint(lo, hi + 1, (1,), generator=gen))

        Hkv = pick(1, 2)
        H, D = Hkv * pick(1, 2, 3), 8 * draw(2, 16)
        counts = tuple(draw(1, 12) for _ in range(draw(1, 4)))
        N, P, shared, dtype = draw(1, 200), draw(1, 50), pick(True, False), pick(*DTYPES)
        monkeypatch.setattr(tiling, "FORCE_SPLITS", pick(None, 2, 3, 7))
        if not GPU:
            monkeypatch.setenv("CCAM_EMU_SCHEDULE", pick("linear", "reverse", f"random:{seed + case}"))
        print(dict(N=N, H=H, Hkv=Hkv, D=D, counts=counts, P=P, shared=shared, dtype=dtype))
        _check(*_inputs(N, H, Hkv, D, counts, P, shared, dtype), counts, P, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,Hkv,D,counts,P,shared", DROPOUT_CASES)
def test_cuda_dropout_matches_reference(N, H, Hkv, D, counts, P, shared, dtype):
    """Attention dropout: forward and every gradient against the reference with the same seed."""
    q, k, v, dout = _inputs(N, H, Hkv, D, counts, P, shared, dtype)
    check_dropout_against_reference("cuda", q, k, v, dout, counts, P, dtype, TOLERANCE[dtype])


@pytest.mark.parametrize("D", [64, 96])
def test_cuda_negative_scale_with_and_without_dropout(D):
    """A negative scale: the forward scales the raw scores by |scale| after negating Q (in
    registers; in shared memory where dropout at head dims > 64 leaves Q there). Output and
    gradients against the float64 oracle, and with dropout against the reference, same seed."""
    counts, P, scale, dtype = (3, 5), 7, -0.2, torch.float16
    q, k, v, dout = _inputs(37, 2, 1, D, counts, P, False, dtype)
    _check(q, k, v, dout, counts, P, dtype, scale=scale)
    seed = int(torch.randint(0, 2**62, ()))
    out = run_seeded("cuda", q, k, v, counts, P, 0.3, seed, scale)
    want = run_seeded("reference", q.double(), k.double(), v.double(), counts, P, 0.3, seed, scale)
    assert rel_err(out.cpu(), want) <= TOLERANCE[dtype]
    assert rel_err(out.cpu(), run_seeded("reference", q.double(), k.double(), v.double(), counts, P, 0.3, seed,
                                         -scale)) > 0.05  # the sign matters


def test_cuda_dropout_with_splits_and_partials(monkeypatch):
    """Split-KV programs and frame windows draw the same mask (keys counted from the video's start)."""
    dtype = DTYPES[-1]
    q, k, v, dout = _inputs(*DROPOUT_SPLIT_CASE, dtype)
    check_dropout_with_splits_and_partials("cuda", q, k, v, dout, dtype, TOLERANCE[dtype], monkeypatch)