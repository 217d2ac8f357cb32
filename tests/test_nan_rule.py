"""The NaN rule (docs/reference.md §7, "NaN and inf"): row i's output is a function of q[i] and of the
keys/values row i sees, nothing else, and so are the gradients. A NaN or inf in an input
reaches exactly the outputs and gradient entries that the formula makes it reach: the same
non-finite entries as the row-by-row float64 oracle (tests/oracle.py, attention_rows_oracle),
NaN where a NaN went in, and the finite entries as close as usual.

Every backend, forward (with and without autograd) and gradients: reference and torch in every
dtype, triton in its interpreter (float32, float16) and cuda under its CPU emulator (float16,
bfloat16) where there is no GPU. The cases put the poisoned key where the kernels load it for
rows that do not see it (a tile that straddles the rows' limits), with several query and key
tiles, GQA, ragged batches, T > N (keys no row sees) and a shared q."""

import pytest
import torch

from ccam_kernels import ccam_attention
from conftest import CUDA, rel_err
from kernel_cases import make_inputs
from oracle import attention_rows_oracle

DEVICE = "cuda" if CUDA else "cpu"
# Relative error of the finite entries against the float64 oracle (gradients: twice that).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# (N, H, Hkv, D, frame counts, P, shared q)
CASES = [
    pytest.param((4, 2, 2, 16, (3,), 2, True), id="issue-repro"),
    pytest.param((21, 4, 2, 16, (7, 2), 3, False), id="ragged-gqa-tiles"),
    pytest.param((5, 2, 1, 16, (8,), 2, True), id="T-greater-than-N"),
]
POISONS = ["q-nan", "k-nan", "v-nan", "k-inf", "v-inf", "dout-nan"]


def _poison(tensors: dict, which: str, key: int = None) -> None:
    """Put one NaN or inf (random sign) at a random place of q, k, v or dout, in place; for k
    and v at key ``key`` when given."""
    name, kind = which.split("-")
    x = tensors[name]
    flat = x.view(-1) if key is None or name in ("q", "dout") else x[key].view(-1)
    value = float("nan") if kind == "nan" else float("inf") * (1 if torch.rand(()) < 0.5 else -1)
    flat[torch.randint(flat.numel(), ())] = value


def _run(backend, q, k, v, dout, counts, P):
    """(out without autograd, out with autograd, dq, dk, dv) of a backend."""
    with torch.no_grad():
        out_plain = ccam_attention(q, k, v, counts, P, backend=backend)
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out = ccam_attention(*leaves, counts, P, backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    return (out_plain, out.detach(), *grads)


def _oracle(q, k, v, dout, counts, P):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = attention_rows_oracle(*leaves, counts, P)
    grads = torch.autograd.grad(out, leaves, dout.double())
    return (out.detach(), out.detach(), *grads)


def _same_nonfinite(name, got, want, nan_in: bool, tol):
    got = got.detach().cpu()
    bad_got, bad_want = ~torch.isfinite(got), ~torch.isfinite(want)
    wrong = (bad_got != bad_want).nonzero().tolist()
    assert not wrong, f"{name}: non-finite where the formula is finite, or the reverse, at {wrong[:8]} ({len(wrong)} in all)"
    if nan_in:  # a NaN in makes NaN out, never an inf or a 0
        assert torch.equal(got.isnan(), want.isnan()), name
    assert rel_err(got[~bad_got], want[~bad_want]) <= tol, name


def check_nan_rule(backend, dtype, case, poison, tol, key=None):
    N, H, Hkv, D, counts, P, shared = case
    q, k, v, dout = make_inputs(N, H, Hkv, D, counts, P, shared, dtype, DEVICE)
    tensors = dict(q=q, k=k, v=v, dout=dout)
    _poison(tensors, poison, key)
    got = _run(backend, q, k, v, dout, counts, P)
    want = _oracle(q, k, v, dout, counts, P)
    for name, g, w, t in zip(("out (no grad)", "out", "dq", "dk", "dv"), got, want, (tol, tol, 2 * tol, 2 * tol, 2 * tol)):
        _same_nonfinite(f"{backend} {dtype} {poison}: {name}", g, w, poison.endswith("nan"), t)


# ---- reference and torch: every dtype ------------------------------------------------------


@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("case", CASES)
def test_plain_backends_follow_the_formula(backend, case, poison):
    check_nan_rule(backend, torch.float32, case, poison, TOLERANCE[torch.float32])


@pytest.mark.parametrize("poison", ["q-nan", "v-nan", "k-inf", "dout-nan"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_plain_backends_follow_the_formula_every_dtype(backend, dtype, poison):
    """16-bit without autograd is the torch backend's fused-kernel path."""
    check_nan_rule(backend, dtype, CASES[1].values[0], poison, TOLERANCE[dtype])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_issue_repro(backend):
    """docs/reference.md §7, "NaN and inf"'s two examples: a NaN in q[0] makes row 0 NaN (the torch backend
    returned 0), and a NaN in the last frame's v leaves the rows that do not see it finite
    (the reference returned NaN everywhere)."""
    q = torch.randn(4, 2, 16)
    k = v = torch.randn(6, 2, 16)
    q[0, 0, 0] = float("nan")
    out = ccam_attention(q, k, v, [3], 2, backend=backend)
    assert out[0, 0, 0].isnan().all() and torch.isfinite(out[0, 1:]).all() and torch.isfinite(out[0, 0, 1]).all()
    v2 = v.clone()
    v2[5] = float("nan")  # frame 2 of 3: seen by row 3 only
    out = ccam_attention(torch.randn(4, 2, 16), k, v2, [3], 2, backend=backend)
    assert torch.isfinite(out[0, :3]).all() and out[0, 3].isnan().all()


def test_torch_backend_many_frames_per_block():
    """Blocks of several frames (T >= 16): rows straddling a block's frames see only some of
    its keys; the poisoned value sits in the frame right after a frame boundary."""
    case = (40, 2, 1, 16, (24,), 3, True)
    for poison in ("k-nan", "v-nan", "q-nan", "dout-nan"):
        check_nan_rule("torch", torch.float32, case, poison, TOLERANCE[torch.float32], key=3 * 7)


# ---- triton (interpreter on CPU) and cuda (emulator on CPU) --------------------------------


@pytest.mark.triton
@pytest.mark.usefixtures("triton_here")
@pytest.mark.parametrize("poison", POISONS)
def test_triton_follows_the_formula(poison):
    """Interpreter tiles are 16 x 16: two query tiles, key tiles straddling frames."""
    pytest.importorskip("triton", reason="triton is not installed")
    check_nan_rule("triton", torch.float32, CASES[1].values[0], poison, TOLERANCE[torch.float32])


@pytest.mark.triton
@pytest.mark.usefixtures("triton_here")
@pytest.mark.parametrize("dtype,poison", [(torch.float32, "k-nan"), (torch.float16, "v-nan")], ids=str)
def test_triton_follows_the_formula_keys_no_row_sees(dtype, poison):
    """T > N: the poisoned key may be one that no row sees (its dK, dV are then 0)."""
    pytest.importorskip("triton", reason="triton is not installed")
    check_nan_rule("triton", dtype, CASES[2].values[0], poison, TOLERANCE[dtype])


@pytest.mark.usefixtures("cuda_here")
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_cuda_follows_the_formula(case, poison):
    check_nan_rule("cuda", torch.float16, case, poison, TOLERANCE[torch.float16])


@pytest.mark.usefixtures("cuda_here")
@pytest.mark.parametrize("poison", ["v-inf", "k-nan", "dout-nan"])
def test_cuda_follows_the_formula_bf16_tiles(poison):
    """Several query tiles (64 rows) and key tiles, bfloat16."""
    check_nan_rule("cuda", torch.bfloat16, (80, 2, 1, 16, (9,), 11, True), poison, TOLERANCE[torch.bfloat16])


# ---- partial attention and its merge (docs/reference.md §5.1) ------------------------------


def _merged_partials(backend, q, k, v, dout, T, P, cut):
    """Frames [0, cut) and [cut, T) of one video as two partials, merged: (out, dq, dk, dv)."""
    from ccam_kernels.long_video import ccam_partial_attention, merge_partials

    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    qq, kk, vv = leaves
    parts = [ccam_partial_attention(qq, kk[f0 * P:f1 * P], vv[f0 * P:f1 * P], (T,), P, [(f0, f1)], backend=backend)
             for f0, f1 in ((0, cut), (cut, T))]
    out, _ = merge_partials(parts)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return (out.detach(), *grads)


@pytest.mark.parametrize("backend,dtype", [("reference", torch.float32), ("torch", torch.float32),
                                           ("triton", torch.float32), ("cuda", torch.float16)], ids=str)
@pytest.mark.parametrize("poison", ["q-nan", "k-nan", "v-nan", "dout-nan"])
def test_merged_partials_follow_the_formula(backend, dtype, poison, request):
    """A NaN in the second range's keys reaches only the rows that see them; its partial's LSE
    carries a NaN row into the merge."""
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
        request.getfixturevalue("triton_here")
    if backend == "cuda":
        request.getfixturevalue("cuda_here")
    N, T, P = 6, 5, 3
    q, k, v, dout = make_inputs(N, 2, 1, 16, (T,), P, True, dtype, DEVICE)
    _poison(dict(q=q, k=k, v=v, dout=dout), poison, key=(T - 1) * P + 1 if poison[0] in "kv" else None)
    got = _merged_partials(backend, q, k, v, dout, T, P, cut=2)
    want = _oracle(q, k, v, dout, (T,), P)[1:]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        _same_nonfinite(f"{backend} partial {poison}: {name}", g, w, True, 2 * TOLERANCE[dtype])
