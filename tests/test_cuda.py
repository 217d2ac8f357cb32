"""The "cuda" backend (csrc/ kernels) against the float64 oracle: forward and every gradient,
the same cases as the Triton backend's tests, plus what is specific to these kernels (every
padded head-dim instantiation, the 16-byte row alignment path, the C++ argument checks).

Marked ``gpu``: they need a CUDA device and the built extension. Where the extension is not
built they skip with the reason, unless CCAM_REQUIRE_CUDA_BACKEND=1 (the GPU suite sets it),
which turns that skip into a failure."""

import os

import pytest
import torch

from ccam_kernels import CCAMConfig, CCAMProjector, ccam_attention
from ccam_kernels.attention import BACKENDS
from ccam_kernels.backends import cuda_backend, tiling
from conftest import rel_err
from kernel_cases import CASES, check_against_oracle, check_deterministic, check_lse, make_inputs
from oracle import attention_oracle

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}  # docs/reference.md §7; gradients within twice that


@pytest.fixture(autouse=True)
def cuda_backend_here():
    why = BACKENDS["cuda"].why_unusable()
    if why and torch.cuda.is_available():
        if os.environ.get("CCAM_REQUIRE_CUDA_BACKEND") == "1":
            pytest.fail(f"the cuda backend is required here but unusable: {why}")
        pytest.skip(f"cuda backend unusable: {why}")


def _inputs(N, H, Hkv, D, counts, P, shared, dtype, scale_q=1.0):
    return make_inputs(N, H, Hkv, D, counts, P, shared, dtype, "cuda", scale_q)


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
    counts, P = (3, 8), 29
    _check(*_inputs(150, 4, 2, D, counts, P, D % 16 == 0, torch.bfloat16), counts, P, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_v12_shape(dtype):
    """The v1.2 attention shape at 16 frames (N=1024, H=16, D=64, P=729) and a ragged pair."""
    for counts in [(16,), (5, 12)]:
        _check(*_inputs(1024, 16, 16, 64, counts, 729, True, dtype), counts, 729, dtype)


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
    q = torch.randn(H, N, D, device="cuda", dtype=torch.float16).transpose(0, 1)
    kv = torch.randn(L, H, 2 * D, device="cuda", dtype=torch.float16)
    k, v = kv[..., :D], kv[..., D:]
    assert cuda_backend._rows_aligned(k) is k and cuda_backend._rows_aligned(v) is v
    dout = torch.randn(len(counts), N, H, D, device="cuda", dtype=torch.float16)
    _check(q, k, v, dout, counts, P, torch.float16, scale=0.3)
    odd = torch.randn(L * H * D + 3, device="cuda", dtype=torch.float16)[3:].view(L, H, D)  # 6-byte offset
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
    q = torch.randn(8, 2, 16, device="cuda")
    k = torch.randn(6, 2, 16, device="cuda")
    with pytest.raises(RuntimeError, match="16-bit tensor cores"):
        ccam_attention(q, k, k, (2,), 3, backend="cuda")
    q, k = q[..., :12].half(), k[..., :12].half()
    with pytest.raises(RuntimeError, match="multiples of 8"):
        ccam_attention(q, k, k, (2,), 3, backend="cuda")


def test_cuda_ops_check_their_arguments():
    """The C++ ops check before launching (docs/reference.md §8 style: the argument, the expectation, the value)."""
    q, k, v, _ = _inputs(32, 2, 2, 64, (2,), 8, True, torch.float16)
    frames, starts, _, _ = tiling.plan((2,), 8, 64, q.device)
    out = torch.empty(1, 32, 2, 64, device="cuda", dtype=torch.float16)
    lse = torch.empty(1, 2, 32, device="cuda")
    ops = torch.ops.ccam_kernels
    with pytest.raises(ValueError, match="k and v must both be"):
        ops.cuda_fwd(q, k[:, :, :32], v, frames, starts, 8, 0.1, 1, out, lse)
    with pytest.raises(ValueError, match="share one dtype"):
        ops.cuda_fwd(q, k.bfloat16(), v, frames, starts, 8, 0.1, 1, out, lse)
    with pytest.raises(ValueError, match="lse must be"):
        ops.cuda_fwd(q, k, v, frames, starts, 8, 0.1, 1, out, lse[:, :1])
    padded = torch.randn(k.shape[0], 2, 68, device="cuda", dtype=torch.float16)[..., :64]  # row stride 68
    with pytest.raises(ValueError, match="multiples of 8 elements"):
        ops.cuda_fwd(q, padded, padded, frames, starts, 8, 0.1, 1, out, lse)
    with pytest.raises(ValueError, match="CUDA tensor"):
        ops.cuda_fwd(q.cpu(), k, v, frames, starts, 8, 0.1, 1, out, lse)


def test_cuda_opcheck_custom_op():
    q, k, v, _ = _inputs(40, 2, 1, 64, (2, 3), 12, True, torch.float16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    torch.library.opcheck(cuda_backend.cuda_attention, (q, k, v, torch.tensor([2, 3]), 12, 0.125),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_projector_compiles_through_cuda_without_graph_breaks():
    cfg = CCAMConfig(num_query=64, hidden_size=128, cross_hidden_size=96, num_heads=2, num_key_value_heads=2,
                     intermediate_size=192, output_size=80, attention_dropout=0.0, dropout=0.0)
    proj = CCAMProjector(cfg, backend="cuda").cuda().half()
    want = CCAMProjector(cfg, backend="reference").cuda().half()
    want.load_state_dict(proj.state_dict())
    features = torch.randn(5, 11, 96, device="cuda", dtype=torch.float16, requires_grad=True)
    compiled = torch.compile(proj, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    out = compiled(features, [2, 3])
    assert rel_err(out, want(features, [2, 3])) <= 1e-2
    out.float().sum().backward()
    assert features.grad is not None and proj.query.grad is not None
