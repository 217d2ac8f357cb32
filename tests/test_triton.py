"""The "triton" backend against the float64 oracle: forward and every gradient.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, which conftest
sets for the session), at small shapes. With a GPU the same cases run compiled on CUDA, bfloat16
included (the interpreter computes bfloat16 dots wrong, so CPU runs refuse it)."""

import pytest
import torch

from ccam_kernels import CCAMConfig, CCAMProjector, ccam_attention
from ccam_kernels.backends import tiling, triton_backend
from conftest import CUDA, rel_err
from conftest import TRITON_DEVICE as DEVICE, TRITON_DTYPES as DTYPES, TRITON_TOLERANCE as TOLERANCE
from kernel_cases import CASES, check_against_oracle, check_deterministic, check_lse, make_inputs
from kernel_cases import (DROPOUT_CASES, DROPOUT_SPLIT_CASE, check_dropout_against_reference,
                          check_dropout_with_splits_and_partials)
from oracle import attention_oracle

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_here")]


def _inputs(N, H, Hkv, D, counts, P, shared, dtype, scale_q=1.0):
    return make_inputs(N, H, Hkv, D, counts, P, shared, dtype, DEVICE, scale_q)


def _check(q, k, v, dout, counts, P, dtype):
    check_against_oracle("triton", q, k, v, dout, counts, P, dtype, TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,Hkv,D,counts,P,shared", CASES)
def test_triton_matches_oracle(N, H, Hkv, D, counts, P, shared, dtype, nan_poison):
    """Outputs and gradients are NaN-poisoned before the kernels write them (nan_poison)."""
    q, k, v, dout = _inputs(N, H, Hkv, D, counts, P, shared, dtype)
    _check(q, k, v, dout, counts, P, dtype)


def test_triton_large_logits():
    q, k, v, dout = _inputs(24, 2, 2, 16, (4, 7), 5, True, torch.float32, scale_q=40.0)
    _check(q, k, v, dout, (4, 7), 5, torch.float32)


def test_triton_custom_scale_and_strided_inputs():
    N, H, D, counts, P = 19, 2, 32, (3, 4), 6
    L = sum(counts) * P
    q = torch.randn(H, N, D, device=DEVICE).transpose(0, 1)  # strided rows
    kv = torch.randn(L, H, 2 * D, device=DEVICE)
    k, v = kv[..., :D], kv[..., D:]  # row stride 2*D
    out = ccam_attention(q, k, v, counts, P, scale=0.3, backend="triton")
    assert rel_err(out, attention_oracle(q.double(), k.double(), v.double(), counts, P, scale=0.3)) <= 1e-5


def test_triton_backward_is_deterministic():
    check_deterministic("triton", *_inputs(40, 4, 2, 16, (5, 9, 2), 6, True, torch.float32), (5, 9, 2), 6)


def test_triton_refusals_are_clear():
    q = torch.randn(8, 2, 12, device=DEVICE)
    k = torch.randn(6, 2, 12, device=DEVICE)
    with pytest.raises(RuntimeError, match="head dims that are multiples of 8"):
        ccam_attention(q, k, k, (2,), 3, backend="triton")
    if not CUDA:
        q, k = q[..., :8].repeat(1, 1, 2).bfloat16(), k[..., :8].repeat(1, 1, 2).bfloat16()
        with pytest.raises(RuntimeError, match="bfloat16"):
            ccam_attention(q, k, k, (2,), 3, backend="triton")


@pytest.mark.skipif(CUDA, reason="checks the CPU side of auto")
def test_auto_never_picks_triton_for_cpu_tensors(monkeypatch):
    calls = []
    monkeypatch.setattr(triton_backend, "ccam_attention_triton", lambda *a: calls.append(a))
    q = torch.randn(8, 2, 16)
    k = torch.randn(6, 2, 16)
    ccam_attention(q, k, k, (2,), 3)
    assert calls == []


def test_projector_compiles_through_triton_without_graph_breaks():
    cfg = CCAMConfig(num_query=16, hidden_size=32, cross_hidden_size=24, num_heads=2, num_key_value_heads=2,
                     intermediate_size=48, output_size=20, attention_dropout=0.0, dropout=0.0)
    proj = CCAMProjector(cfg, backend="triton").to(DEVICE)
    features = torch.randn(5, 3, 24, device=DEVICE, requires_grad=True)
    want = CCAMProjector(cfg, backend="reference").to(DEVICE)
    want.load_state_dict(proj.state_dict())
    compiled = torch.compile(proj, fullgraph=True, backend="aot_eager")  # fullgraph: a break raises
    out = compiled(features, [2, 3])
    ref = want(features, [2, 3])
    assert rel_err(out, ref) <= 1e-5
    out.sum().backward()
    assert features.grad is not None and proj.query.grad is not None


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_split_kv_forward(splits, dtype, monkeypatch):
    """Key ranges split across programs and merged by log-sum-exp: the same result, including
    splits that see nothing live for some rows (T=1 rows, splits past a row's limit) and more
    splits than key tiles."""
    monkeypatch.setattr(tiling, "FORCE_SPLITS", splits)
    for N, H, Hkv, D, counts, P, shared in [(37, 2, 1, 16, (5, 3, 9), 7, True), (33, 3, 3, 64, (1, 4), 4, False)]:
        q, k, v, dout = _inputs(N, H, Hkv, D, counts, P, shared, dtype)
        _check(q, k, v, dout, counts, P, dtype)


def test_triton_lse_is_the_natural_log_sum_exp():
    N, H, D, counts, P = 21, 2, 16, (3, 5), 4
    q, k, v, _ = _inputs(N, H, 1, D, counts, P, True, torch.float32)
    _, lse, _ = triton_backend.triton_attention(q, k, v, torch.tensor(counts), P, D ** -0.5)
    check_lse(lse, q, k, counts, P, D ** -0.5, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,Hkv,D,counts,P,shared", DROPOUT_CASES)
def test_triton_dropout_matches_reference(N, H, Hkv, D, counts, P, shared, dtype):
    """Attention dropout: forward and every gradient against the reference with the same seed."""
    q, k, v, dout = _inputs(N, H, Hkv, D, counts, P, shared, dtype)
    check_dropout_against_reference("triton", q, k, v, dout, counts, P, dtype, TOLERANCE[dtype])


def test_triton_dropout_with_splits_and_partials(monkeypatch):
    """Split-KV programs and frame windows draw the same mask (keys counted from the video's start)."""
    dtype = DTYPES[0]
    q, k, v, dout = _inputs(*DROPOUT_SPLIT_CASE, dtype)
    check_dropout_with_splits_and_partials("triton", q, k, v, dout, dtype, TOLERANCE[dtype], monkeypatch)

def test_triton_dkdv_row_tile_apart_from_the_other_kernels(monkeypatch):
    """dK/dV walks rows in its own tile (on a GPU 32 rows at head dim 128 where the others take
    64: triton_kernels.gpu_block_sizes), over the shared key-tile plan: here 32 rows against
    16-key tiles, the other kernels at 16 rows; every gradient still the oracle's."""
    from ccam_kernels.backends import triton_kernels

    real = triton_kernels.block_sizes
    monkeypatch.setattr(triton_kernels, "block_sizes",
                        lambda d, kernel="fwd": (32, *real(d, kernel)[1:]) if kernel == "dkdv" else real(d, kernel))
    dtype = DTYPES[-1]
    q, k, v, dout = _inputs(45, 2, 1, 24, (3, 7, 1), 5, False, dtype)
    _check(q, k, v, dout, (3, 7, 1), 5, dtype)
