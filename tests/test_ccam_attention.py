"""ccam_attention (docs/reference.md §3, §6, §7) against the independent float64 oracle of tests/oracle.py.

Implementations under test: the "reference" and "torch" backends through the public
``ccam_attention``, and the torch backend's two engines ("flash", "explicit") directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import ccam_kernels
from ccam_kernels import attention as attention_module
from ccam_kernels import ccam_attention
from ccam_kernels.backends.torch_prefix import ccam_attention_torch
from ccam_kernels.checks import check_attention_args

from conftest import rel_err
from oracle import attention_oracle, oracle_frame_of_query

# (dtype, tolerance on ||out - ref|| / ||ref||) from docs/reference.md §7; gradients get twice that.
DTYPES = [
    pytest.param(torch.float64, 1e-10, id="float64"),
    pytest.param(torch.float32, 1e-5, id="float32"),
    pytest.param(torch.float16, 2e-3, id="float16"),
    pytest.param(torch.bfloat16, 1e-2, id="bfloat16"),
]


def run_backend(backend):
    def run(q, k, v, frame_counts, P, scale=None):
        return ccam_attention(q, k, v, frame_counts, P, scale=scale, backend=backend)

    return run


def run_engine(engine, seed=None):
    def run(q, k, v, frame_counts, P, scale=None, dropout_p=0.0):
        problem = check_attention_args(q, k, v, frame_counts, P, scale, dropout_p)
        return ccam_attention_torch(q, k, v, problem, variant=engine,
                                    seed=None if seed is None else torch.tensor(seed))

    return run


IMPLS = {
    "reference": run_backend("reference"),
    "torch": run_backend("torch"),
    "torch-flash": run_engine("flash"),
    "torch-explicit": run_engine("explicit"),
}
IMPL_NAMES = list(IMPLS)


@dataclass(frozen=True)
class Case:
    N: int
    P: int
    T: tuple
    H: int
    Hkv: int
    D: int
    scale: float | None = None

    @property
    def id(self) -> str:
        s = f"N{self.N}-P{self.P}-T[{','.join(map(str, self.T))}]-H{self.H}-Hkv{self.Hkv}-D{self.D}"
        return s if self.scale is None else s + f"-scale{self.scale}"

    @property
    def L(self) -> int:
        return sum(self.T) * self.P


CASES = [
    Case(37, 7, (5, 3, 9), 4, 2, 16),  # ragged, odd sizes, GQA 2
    Case(37, 7, (1,), 2, 2, 24),  # T = 1: plain cross-attention
    Case(37, 5, (1, 6, 1), 4, 1, 16),  # T = 1 inside a ragged batch, GQA 4 (MQA)
    Case(16, 3, (40,), 1, 1, 16),  # T > N: the last frames are seen by no query
    Case(16, 2, (40, 3), 4, 1, 16, 0.3),  # T > N ragged, MQA, explicit scale
    Case(37, 5, (16,), 4, 1, 40),  # D = 40
    Case(24, 4, (7, 12), 2, 1, 64),  # D = 64, T not dividing N
    Case(1, 3, (4, 1), 2, 2, 16),  # N = 1: the only query sees frame 0
    Case(37, 1, (37, 36), 2, 1, 24),  # P = 1, T close to N
    Case(64, 8, (32,), 1, 1, 16),  # many segments with straddling rows
    Case(37, 2, (100,), 2, 2, 16),  # T > N, many segments
    Case(9, 300, (16, 3), 1, 1, 16),  # long frames (several frames per segment cap)
]


def make_inputs(case: Case, dtype, shared: bool, requires_grad=True, device="cpu"):
    B = len(case.T)
    q_shape = (case.N, case.H, case.D) if shared else (B, case.N, case.H, case.D)
    q = torch.randn(q_shape, dtype=torch.float32, device=device).to(dtype)
    k = torch.randn(case.L, case.Hkv, case.D, dtype=torch.float32, device=device).to(dtype)
    v = torch.randn(case.L, case.Hkv, case.D, dtype=torch.float32, device=device).to(dtype)
    dout = torch.randn(B, case.N, case.H, case.D, dtype=torch.float32, device=device).to(dtype)
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, dout


def oracle_with_grads(q, k, v, dout, frame_counts, P, scale=None):
    """Oracle output and gradients, on the same (possibly rounded) inputs upcast to float64."""
    q64, k64, v64 = (t.detach().to(torch.float64).requires_grad_(True) for t in (q, k, v))
    ref = attention_oracle(q64, k64, v64, frame_counts, P, scale)
    ref.backward(dout.to(torch.float64))
    return ref.detach(), q64.grad, k64.grad, v64.grad


def assert_close(name, got, ref, tol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rel_err(got, ref)
    assert err <= tol, f"{name}: rel err {err:.3e} > {tol:.1e}"


# ---------------------------------------------------------------------------------------------
# Output and every gradient vs the oracle.


@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "batched_q"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_output_and_gradients_match_oracle(impl, dtype, tol, case, shared, nan_poison):
    q, k, v, dout = make_inputs(case, dtype, shared)
    before = [t.detach().clone() for t in (q, k, v)]
    out = IMPLS[impl](q, k, v, list(case.T), case.P, case.scale)

    B = len(case.T)
    assert out.shape == (B, case.N, case.H, case.D)
    assert out.dtype == dtype
    assert out.device == q.device
    out.backward(dout)
    for name, t, b in zip("qkv", (q, k, v), before):
        assert torch.equal(t.detach(), b), f"input {name} was modified"
        assert t.grad is not None and t.grad.shape == t.shape and t.grad.dtype == dtype, name

    ref, dq, dk, dv = oracle_with_grads(q, k, v, dout, case.T, case.P, case.scale)
    assert_close("out", out, ref, tol)
    assert_close("dq", q.grad, dq, 2 * tol)
    assert_close("dk", k.grad, dk, 2 * tol)
    assert_close("dv", v.grad, dv, 2 * tol)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_large_logits_stay_finite_and_accurate(impl, dtype, tol):
    """Logits in the thousands (docs/reference.md §7): no overflow in exp, no NaN, and accurate outputs.

    Rounding a logit s in the accumulation precision (unit roundoff u: 2**-24 for float32 and
    the 16-bit types, 2**-53 for float64) moves it by ~u*|s|, which changes the softmax weights
    by that much relatively: even an exact-but-for-that evaluation is off by ~u*max|s| (~4e-4
    for float32 here). So out and dv are bounded by the tolerance of docs/reference.md §7 plus u*max|s|. dq and dk
    are ~0 on the (nearly one-hot) rows, so their relative error says nothing: finite only.
    """
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    q, k, v, dout = make_inputs(case, dtype, shared=False)
    scale = 500.0  # q.k has std ~4 at D=16: logits of std ~2000
    with torch.no_grad():
        max_logit = (torch.einsum("bnhd,lhd->bnhl", q.double(), k.double()[:, [0, 0, 1, 1]]) * scale).abs().max()
    assert max_logit > 1000
    out = IMPLS[impl](q, k, v, list(case.T), case.P, scale)
    out.backward(dout)
    for name, t in (("out", out), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)):
        assert torch.isfinite(t).all(), f"{name}: non-finite values"
    ref, _, _, dv = oracle_with_grads(q, k, v, dout, case.T, case.P, scale)
    unit_roundoff = 2.0**-53 if dtype == torch.float64 else 2.0**-24
    conditioning = unit_roundoff * float(max_logit)
    assert_close("out", out, ref, tol + conditioning)
    assert_close("dv", v.grad, dv, 2 * (tol + conditioning))


def test_nan_poison_fixture_poisons_allocations(nan_poison):
    """The fixture the oracle tests use: uninitialized float memory reads as NaN."""
    assert torch.isnan(torch.empty(3, 4)).all()
    assert torch.isnan(torch.empty_like(torch.ones(2, dtype=torch.bfloat16))).all()
    assert torch.empty(2, dtype=torch.int64).dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# Structure of the result.


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_keys_seen_by_no_query_get_zero_gradient(impl):
    """T > N: frames after frame_of_query(N-1, T) are seen by no query: exactly zero dk, dv."""
    case = Case(16, 3, (40, 5), 2, 1, 16)
    q, k, v, dout = make_inputs(case, torch.float64, shared=True)
    out = IMPLS[impl](q, k, v, list(case.T), case.P)
    out.backward(dout)
    last_seen = int(oracle_frame_of_query(case.N, 40)[-1])
    assert last_seen < 39
    unseen = slice((last_seen + 1) * case.P, 40 * case.P)
    assert torch.count_nonzero(k.grad[unseen]) == 0
    assert torch.count_nonzero(v.grad[unseen]) == 0
    # Every seen key of both samples does get a gradient.
    seen = torch.cat([k.grad[: (last_seen + 1) * case.P], k.grad[40 * case.P :]])
    assert bool((seen.abs().sum(dim=(1, 2)) > 0).all())


@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_shared_query_equals_expanded_query_and_sums_per_sample_gradients(impl):
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    B = len(case.T)
    q, k, v, dout = make_inputs(case, torch.float64, shared=True)
    out = IMPLS[impl](q, k, v, list(case.T), case.P)
    out.backward(dout)

    # The same queries given per sample (expand: no copy) give the same output and dq.
    q_exp = q.detach().clone().requires_grad_(True)
    out_exp = IMPLS[impl](q_exp.expand(B, *q_exp.shape), k.detach(), v.detach(), list(case.T), case.P)
    out_exp.backward(dout)
    assert rel_err(out_exp, out) <= 1e-12
    assert rel_err(q_exp.grad, q.grad) <= 1e-12

    # The shared query's gradient is the sum of the per-sample gradients.
    total = torch.zeros_like(q)
    start = 0
    for b, t in enumerate(case.T):
        qb = q.detach().clone().requires_grad_(True)
        kb = k.detach()[start : start + t * case.P]
        vb = v.detach()[start : start + t * case.P]
        start += t * case.P
        ob = IMPLS[impl](qb, kb, vb, [t], case.P)
        assert rel_err(ob[0], out[b]) <= 1e-12
        ob.backward(dout[b : b + 1])
        total += qb.grad
    assert rel_err(q.grad, total) <= 1e-12


def _transposed_layout(case):
    """(B, H, N, D).transpose(1, 2) queries, (Hkv, L, D).transpose(0, 1) keys/values."""
    B = len(case.T)
    q = torch.randn(B, case.H, case.N, case.D, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(case.Hkv, case.L, case.D, dtype=torch.float64).transpose(0, 1)
    v = torch.randn(case.Hkv, case.L, case.D, dtype=torch.float64).transpose(0, 1)
    assert not q.is_contiguous() and not k.is_contiguous()
    return q, k, v


def _strided_head_dim_layout(case):
    """The last (head) dim not unit-stride. PyTorch's fused CPU attention kernel misreads such
    rows (torch 2.13), so the torch backend must hand it unit-stride ones."""
    q = torch.randn(case.N, case.D, case.H, dtype=torch.float64).transpose(1, 2)
    k = torch.randn(case.L, case.D, case.Hkv, dtype=torch.float64).transpose(1, 2)
    v = torch.randn(case.D, case.L, case.Hkv, dtype=torch.float64).permute(1, 2, 0)
    assert q.stride(-1) != 1 and k.stride(-1) != 1 and v.stride(-1) != 1
    return q, k, v


@pytest.mark.parametrize("layout", [_transposed_layout, _strided_head_dim_layout], ids=["transposed", "strided-D"])
@pytest.mark.parametrize("impl", IMPL_NAMES)
def test_non_contiguous_inputs(impl, layout):
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    q, k, v = (x.requires_grad_(True) for x in layout(case))
    dout = torch.randn(len(case.T), case.H, case.N, case.D, dtype=torch.float64).transpose(1, 2)
    out = IMPLS[impl](q, k, v, list(case.T), case.P)
    out.backward(dout)
    ref, dq, dk, dv = oracle_with_grads(q, k, v, dout, case.T, case.P)
    assert_close("out", out, ref, 1e-10)
    assert_close("dq", q.grad, dq, 2e-10)
    assert_close("dk", k.grad, dk, 2e-10)
    assert_close("dv", v.grad, dv, 2e-10)


def test_numpy_integers_are_accepted():
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    q, k, v, _ = make_inputs(case, torch.float64, shared=True, requires_grad=False)
    want = ccam_attention(q, k, v, list(case.T), case.P)
    got = ccam_attention(q, k, v, np.array(case.T), np.int32(case.P))
    assert torch.equal(got, want)
    assert torch.equal(ccam_attention(q, k, v, [np.int64(t) for t in case.T], case.P), want)


def test_auto_without_usable_backend_names_the_usable_ones():
    q = torch.empty(8, 2, 16, device="meta")
    k = torch.empty(2 * 3, 2, 16, device="meta")
    with pytest.raises(RuntimeError, match=r"no backend can run.*Usable backends: \[.*'torch'"):
        ccam_attention(q, k, k, [2], 3)


@pytest.mark.parametrize("backend", ["reference", "torch", "auto"])
def test_frame_counts_as_int64_tensor(backend):
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    q, k, v, _ = make_inputs(case, torch.float64, shared=False, requires_grad=False)
    a = ccam_attention(q, k, v, torch.tensor(case.T, dtype=torch.int64), case.P, backend=backend)
    b = ccam_attention(q, k, v, tuple(case.T), case.P, backend=backend)
    assert torch.equal(a, b)
    assert_close("out", a, attention_oracle(q, k, v, case.T, case.P), 1e-10)


def test_default_scale_is_inverse_sqrt_head_dim():
    case = Case(37, 7, (5, 3), 2, 2, 24)
    q, k, v, _ = make_inputs(case, torch.float64, shared=True, requires_grad=False)
    for backend in ("reference", "torch"):
        default = ccam_attention(q, k, v, list(case.T), case.P, backend=backend)
        explicit = ccam_attention(q, k, v, list(case.T), case.P, scale=1 / math.sqrt(case.D), backend=backend)
        assert rel_err(default, explicit) <= 1e-14


def test_auto_picks_torch_on_cpu():
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    q, k, v, _ = make_inputs(case, torch.float32, shared=True, requires_grad=False)
    problem = check_attention_args(q, k, v, list(case.T), case.P)
    assert attention_module.resolve_backend("auto", q, problem).name == "torch"
    if not torch.cuda.is_available():
        # triton is usable on CPU only in its interpreter (the test session's setting), and
        # "auto" never picks it for CPU tensors.
        interp = ["triton"] if ccam_kernels.backends.triton_backend.interpreting() else []
        assert ccam_kernels.available_backends() == interp + ["torch", "reference"]
    auto = ccam_attention(q, k, v, list(case.T), case.P)
    torch_out = ccam_attention(q, k, v, list(case.T), case.P, backend="torch")
    assert torch.equal(auto, torch_out)


def test_available_backends_lists_usable_backends_in_auto_order():
    names = ccam_kernels.available_backends()
    assert isinstance(names, list) and all(isinstance(n, str) for n in names)
    assert "torch" in names and "reference" in names
    order = [n for n in ("cuda", "triton", "torch") if n in names]
    assert names[: len(order)] == order


# ---------------------------------------------------------------------------------------------
# gradcheck (float64).


@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "batched_q"])
@pytest.mark.parametrize("engine", ["flash", "explicit"])
def test_gradcheck_torch_backend(engine, shared):
    case = Case(4, 2, (3, 2), 2, 1, 16)
    q, k, v, _ = make_inputs(case, torch.float64, shared)
    run = run_engine(engine)
    assert torch.autograd.gradcheck(lambda q, k, v: run(q, k, v, list(case.T), case.P), (q, k, v))


def test_gradcheck_with_dropout_and_fixed_seed():
    case = Case(4, 2, (3, 2), 2, 1, 16)
    q, k, v, _ = make_inputs(case, torch.float64, shared=True)
    run = run_engine("explicit", seed=123)
    fn = lambda q, k, v: run(q, k, v, list(case.T), case.P, dropout_p=0.3)  # noqa: E731
    with torch.no_grad():
        assert torch.equal(fn(q, k, v), fn(q, k, v)), "a fixed seed must fix the dropout masks"
        assert not torch.allclose(fn(q, k, v), run(q, k, v, list(case.T), case.P))
    # fast mode: each evaluation recomputes the Philox masks (a few ms); the slow mode's
    # per-element evaluations would take half a minute.
    assert torch.autograd.gradcheck(fn, (q, k, v), fast_mode=True)


# ---------------------------------------------------------------------------------------------
# Dropout on the attention probabilities.


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_dropout_is_reproducible_under_manual_seed(backend):
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    q, k, v, _ = make_inputs(case, torch.float32, shared=True, requires_grad=False)
    args = (q, k, v, list(case.T), case.P)
    torch.manual_seed(2024)
    a = ccam_attention(*args, dropout_p=0.3, backend=backend)
    torch.manual_seed(2024)
    b = ccam_attention(*args, dropout_p=0.3, backend=backend)
    c = ccam_attention(*args, dropout_p=0.3, backend=backend)
    plain = ccam_attention(*args, dropout_p=0.0, backend=backend)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.allclose(a, plain, atol=1e-3)
    assert torch.isfinite(a).all()


def test_flash_engine_refuses_dropout():
    case = Case(8, 2, (4,), 1, 1, 16)
    q, k, v, _ = make_inputs(case, torch.float32, shared=True, requires_grad=False)
    with pytest.raises(RuntimeError, match="dropout"):
        run_engine("flash")(q, k, v, list(case.T), case.P, dropout_p=0.3)


def test_dropout_mean_approaches_no_dropout_output():
    """E[dropout(P) / (1 - p)] = P: the mean over many independent draws tends to the plain
    output. Draws are independent samples x heads of one batch (the same keys repeated)."""
    N, P, T, D, samples, heads, p = 8, 2, 4, 8, 30, 100, 0.3
    q = torch.randn(N, 1, D, dtype=torch.float64)
    k1 = torch.randn(T * P, 1, D, dtype=torch.float64)
    v1 = torch.randn(T * P, 1, D, dtype=torch.float64)
    k, v = k1.repeat(samples, 1, 1), v1.repeat(samples, 1, 1)
    out = ccam_attention(q.expand(N, heads, D), k, v, [T] * samples, P, dropout_p=p, backend="torch")
    plain = attention_oracle(q, k1, v1, [T], P)[0]
    assert rel_err(out[0, :, :1], plain) > 0.02, "a single draw should differ from the mean"
    assert rel_err(out.mean(dim=(0, 2), keepdim=True)[0], plain) < 0.06


# ---------------------------------------------------------------------------------------------
# Memory: no N x L tensor outside the reference.


class LargestOutput(TorchDispatchMode):
    """Records the numel of every tensor an ATen op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), func
        return out


def _largest_tensor(impl):
    """The largest tensor that a backend's forward and backward implementations create. They
    are called directly: under a dispatch mode a custom op is one opaque call, its inside unseen."""
    case = Case(64, 8, (32,), 1, 1, 16)
    q, k, v, dout = make_inputs(case, torch.float32, shared=True)
    backend, _, variant = impl.partition("-")
    run = attention_module.BACKENDS[backend].run
    scale = case.D ** -0.5
    with torch.no_grad(), LargestOutput() as mode:
        out, lse, _ = run.forward_impl(q, k, v, case.T, case.P, scale, 0.0, 0, False, variant)
        run.backward_impl(dout, q, k, v, out, lse, case.T, case.P, scale, 0.0, 0, variant)
    return mode, case.N * case.L


@pytest.mark.parametrize("impl", ["torch", "torch-flash", "torch-explicit"])
def test_torch_backend_never_allocates_n_by_l(impl):
    mode, n_by_l = _largest_tensor(impl)
    assert mode.largest < n_by_l / 2, f"{mode.op} returned a tensor of {mode.largest} elements (N*L = {n_by_l})"


def test_n_by_l_detector_sees_the_reference_mask():
    mode, n_by_l = _largest_tensor("reference")
    assert mode.largest >= n_by_l


# ---------------------------------------------------------------------------------------------
# GPU (skipped without CUDA).


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_cuda_matches_oracle(backend, dtype, tol):
    case = Case(37, 7, (5, 3, 9), 4, 2, 16)
    q, k, v, dout = make_inputs(case, dtype, shared=True, device="cuda")
    out = ccam_attention(q, k, v, list(case.T), case.P, backend=backend)
    assert out.device.type == "cuda" and out.dtype == dtype
    out.backward(dout)
    ref, dq, dk, dv = oracle_with_grads(q.cpu(), k.cpu(), v.cpu(), dout.cpu(), case.T, case.P)
    assert_close("out", out, ref, tol)
    assert_close("dq", q.grad, dq, 2 * tol)
    assert_close("dk", k.grad, dk, 2 * tol)
    assert_close("dv", v.grad, dv, 2 * tol)
