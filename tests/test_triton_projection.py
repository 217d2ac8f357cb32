"""The fused LayerNorm + K/V projection kernel, and the whole projector on the triton backend,
against float64 evaluations: outputs and every gradient. On CPU in Triton's interpreter (see
conftest), compiled on a GPU."""

import pytest
import torch
import torch.nn.functional as F

from ccam_kernels import CCAMConfig, CCAMProjector
from conftest import CUDA, rel_err
from conftest import TRITON_DEVICE as DEVICE, TRITON_DTYPES as DTYPES, TRITON_TOLERANCE as TOL
from oracle import projector_oracle

pytest.importorskip("triton", reason="triton is not installed")
from ccam_kernels.backends import triton_projection  # noqa: E402

pytestmark = pytest.mark.triton


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,K,C,offset", [(37, 72, 40, 0.0), (16, 24, 16, 0.0), (50, 100, 48, 100.0)],
                         ids=["odd", "one-tile", "large-mean"])
def test_layernorm_kv_matches_float64(M, K, C, offset, dtype, nan_poison):
    """Odd sizes (rows, reduction and each half's columns not multiples of the blocks), a large
    mean (the variance must not cancel), outputs NaN-poisoned before the kernel writes them."""
    x = (torch.randn(M, K) * 2 + offset).to(DEVICE, dtype).requires_grad_()
    gamma = (torch.randn(K) * 0.5 + 1).to(DEVICE, dtype).requires_grad_()
    beta = torch.randn(K).to(DEVICE, dtype).requires_grad_()
    w_k, w_v = ((torch.randn(C, K) / K ** 0.5).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    b_k, b_v = (torch.randn(C).to(DEVICE, dtype).requires_grad_() for _ in range(2))
    inputs = (x, gamma, beta, w_k, w_v, b_k, b_v)
    out = triton_projection.layernorm_kv(*inputs, 1e-5)
    assert out.shape == (M, 2 * C) and out.dtype == dtype
    dout = torch.randn_like(out)
    out.backward(dout)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    z = F.layer_norm(ref_in[0], (K,), ref_in[1], ref_in[2], 1e-5)
    ref = torch.cat([F.linear(z, ref_in[3], ref_in[5]), F.linear(z, ref_in[4], ref_in[6])], 1)
    ref.backward(dout.double())
    tol = TOL[dtype]
    assert rel_err(out, ref) <= tol
    for name, got, want in zip(("x", "gamma", "beta", "w_k", "w_v", "b_k", "b_v"), inputs, ref_in):
        assert got.grad.dtype == dtype and rel_err(got.grad, want.grad) <= 2 * tol, name


def test_layernorm_kv_saves_float32_statistics():
    x = torch.randn(21, 40, device=DEVICE) * 3 + 5
    w = torch.randn(32, 40, device=DEVICE)
    _, mean, rstd = triton_projection.layernorm_kv_op(x, torch.ones(40, device=DEVICE), torch.zeros(40, device=DEVICE),
                                                      w, w.clone(), None, None, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    assert (mean - x.mean(1)).abs().max() < 1e-5
    assert (rstd - (x.var(1, unbiased=False) + 1e-5).rsqrt()).abs().max() < 1e-5


def test_layernorm_kv_opcheck():
    x = torch.randn(18, 24, device=DEVICE, requires_grad=True)
    args = (x, torch.rand(24, device=DEVICE, requires_grad=True), torch.randn(24, device=DEVICE, requires_grad=True),
            torch.randn(40, 24, device=DEVICE, requires_grad=True), torch.randn(40, 24, device=DEVICE, requires_grad=True),
            torch.randn(40, device=DEVICE, requires_grad=True), torch.randn(40, device=DEVICE, requires_grad=True), 1e-5)
    torch.library.opcheck(triton_projection.layernorm_kv_op, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


SMALL = CCAMConfig(num_query=24, hidden_size=64, cross_hidden_size=40, num_heads=4, num_key_value_heads=2,
                   intermediate_size=96, output_size=48, attention_dropout=0.0, dropout=0.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_projector_matches_float64(dtype, monkeypatch):
    """The whole projector on the triton backend (fused projection + Triton attention), ragged
    batch, forward and the gradients of the features and of every parameter."""
    calls = []
    real = triton_projection.layernorm_kv
    monkeypatch.setattr(triton_projection, "layernorm_kv", lambda *a: calls.append(1) or real(*a))
    proj = CCAMProjector(SMALL, backend="triton").to(DEVICE)
    with torch.no_grad():
        for p in proj.parameters():  # non-trivial norms and biases
            p.add_(0.1 * torch.randn_like(p))
    proj = proj.to(dtype)
    splits = [3, 1, 4]
    features = torch.randn(sum(splits), 5, SMALL.cross_hidden_size, device=DEVICE, dtype=dtype, requires_grad=True)
    out = proj(features, splits)
    assert calls == [1]  # the fused kernel ran
    dout = torch.randn_like(out)
    out.backward(dout)
    state = {name: p.detach().double().requires_grad_() for name, p in proj.named_parameters()}
    x64 = features.detach().double().requires_grad_()
    ref = projector_oracle(state, SMALL, x64, splits)
    ref.backward(dout.double())
    tol = 4 * TOL[dtype]
    assert rel_err(out, ref) <= tol
    assert rel_err(features.grad, x64.grad) <= 2 * tol
    # k_proj.bias has a zero gradient in exact arithmetic (a per-key constant shift of the
    # scores cancels in the softmax): measure every error against the largest gradient.
    scale = max(float(t.grad.double().norm()) for t in state.values())
    for name, p in proj.named_parameters():
        err = float((p.grad.double() - state[name].grad).norm())
        assert err <= 2 * tol * max(float(state[name].grad.norm()), 1e-2 * scale), name


@pytest.mark.skipif(CUDA, reason="checks the CPU side of auto")
def test_auto_projector_on_cpu_never_uses_the_fused_kernel(monkeypatch):
    monkeypatch.setattr(triton_projection, "layernorm_kv", lambda *a: pytest.fail("fused kernel used on CPU auto"))
    proj = CCAMProjector(SMALL).eval()
    with torch.no_grad():
        proj(torch.randn(3, 5, SMALL.cross_hidden_size), [3])


def test_training_with_attention_dropout_stays_on_triton():
    """Attention dropout in training runs in the Triton kernels (no fallback, no warning) and
    gives the torch projector's output and gradients under the same manual seed."""
    import warnings

    cfg = CCAMConfig(**{**SMALL.to_dict(), "attention_dropout": 0.5})
    proj = CCAMProjector(cfg, backend="triton").to(DEVICE).train()
    ref = CCAMProjector(cfg, backend="torch").to(DEVICE).train()
    ref.load_state_dict(proj.state_dict())
    features = torch.randn(4, 5, cfg.cross_hidden_size, device=DEVICE)
    outs = []
    for module in (proj, ref):
        torch.manual_seed(11)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = module(features, [1, 3])
        out.square().sum().backward()
        outs.append(out)
    assert rel_err(outs[0], outs[1]) < 1e-4
    for (name, a), b in zip(proj.named_parameters(), ref.parameters()):
        if name != "attn.k_proj.bias":  # its gradient is 0 up to rounding
            assert rel_err(a.grad, b.grad) < 1e-3, name
