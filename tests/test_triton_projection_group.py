"""The fused LayerNorm + K/V projection's program order (GROUP_M, issue 14.4) and its two
weight pointers: any GROUP_M gives the same result, bitwise, with every output element and
statistic written (outputs NaN-poisoned), on odd sizes where the last group is short and a
half's columns are not a multiple of BLOCK_N; and with no biases. On CPU in Triton's
interpreter (blocks 16 x 32 x 32), compiled on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from conftest import TRITON_DEVICE as DEVICE, TRITON_DTYPES as DTYPES, TRITON_TOLERANCE as TOL, rel_err

pytest.importorskip("triton", reason="triton is not installed")
from ccam_kernels.backends import triton_projection  # noqa: E402

pytestmark = pytest.mark.triton


def inputs(M, K, C, dtype, bias=True):
    x = (torch.randn(M, K) * 2 + 3).to(DEVICE, dtype)
    gamma = (torch.randn(K) * 0.5 + 1).to(DEVICE, dtype)
    beta = torch.randn(K).to(DEVICE, dtype)
    w_k, w_v = ((torch.randn(C, K) / K ** 0.5).to(DEVICE, dtype) for _ in range(2))
    b_k, b_v = ((torch.randn(C).to(DEVICE, dtype) for _ in range(2)) if bias else (None, None))
    return x, gamma, beta, w_k, w_v, b_k, b_v


def float64_reference(x, gamma, beta, w_k, w_v, b_k, b_v):
    z = F.layer_norm(x.double(), (x.shape[1],), gamma.double(), beta.double(), 1e-5)
    halves = [F.linear(z, w.double(), None if b is None else b.double()) for w, b in ((w_k, b_k), (w_v, b_v))]
    return torch.cat(halves, 1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,C", [(37, 40, 40), (83, 24, 16), (5, 56, 72)],
                         ids=["M37-C40", "M83-C16", "M5-C72"])
def test_every_group_m_gives_the_same_result(M, K, C, dtype, nan_poison):
    """Row blocks: 3, 6 and 1 (M = 37, 83, 5 with BLOCK_M = 16 in the interpreter), so GROUP_M
    = 2, 4 and 5 leave a short last group and GROUP_M = 64 is larger than the grid; column
    blocks per half: 2, 1 and 3 (C = 40 and 72 are not multiples of BLOCK_N = 32)."""
    args = inputs(M, K, C, dtype)
    want = float64_reference(*args)
    first = None
    for group_m in (1, 2, 4, 5, 8, 64):
        out, mean, rstd = triton_projection.ln_kv_forward(*args, 1e-5, group_m=group_m)
        assert not out.isnan().any() and not mean.isnan().any() and not rstd.isnan().any(), group_m
        if first is None:
            first = out
            assert rel_err(out, want) <= TOL[dtype]
        else:
            assert torch.equal(out, first), f"GROUP_M={group_m} changed the result"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_without_biases(dtype, nan_poison):
    """b_k = b_v = None: the kernel's HAS_BIAS=False path, forward and backward."""
    x, gamma, beta, w_k, w_v, _, _ = inputs(21, 40, 24, dtype, bias=False)
    leaves = [t.requires_grad_() for t in (x, gamma, beta, w_k, w_v)]
    out = triton_projection.layernorm_kv(x, gamma, beta, w_k, w_v, None, None, 1e-5)
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref = float64_reference(*ref_leaves, None, None)
    ref.backward(dout.double())
    assert rel_err(out, ref) <= TOL[dtype]
    for name, got, want in zip(("x", "gamma", "beta", "w_k", "w_v"), leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) <= 2 * TOL[dtype], name


def test_opcheck_without_biases():
    args = [t.requires_grad_() for t in inputs(18, 24, 20, torch.float32, bias=False)[:5]]
    torch.library.opcheck(triton_projection.layernorm_kv_op, (*args, None, None, 1e-5),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_bad_weights_are_refused_naming_them():
    x, gamma, beta, w_k, w_v, b_k, b_v = inputs(8, 24, 16, torch.float32)
    with pytest.raises(ValueError, match="w_k and w_v"):
        triton_projection.ln_kv_forward(x, gamma, beta, w_k, w_v[:8], b_k, b_v, 1e-5)
    with pytest.raises(ValueError, match="b_k and b_v"):
        triton_projection.ln_kv_forward(x, gamma, beta, w_k, w_v, b_k, None, 1e-5)
    with pytest.raises(ValueError, match="group_m"):
        triton_projection.ln_kv_forward(x, gamma, beta, w_k, w_v, b_k, b_v, 1e-5, group_m=0)
