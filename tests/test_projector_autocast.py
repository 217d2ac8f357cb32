"""The projector under torch.autocast (issue 13.2, projector side).

* Under autocast, features in another dtype than the module's (float16, bfloat16, float32 on
  either side) are cast to the autocast dtype, as nn.Linear casts its input; float64 is never
  cast; outside autocast a dtype mismatch stays a ValueError naming features.
* A plain forward after an autocast forward, and the reverse, give the same results as
  before (nothing from one mode is reused in the other).
* Accuracy: compared with a float64 evaluation of the same float32 parameters, a backend's
  error under autocast is at most 3x that of the reference backend (plain PyTorch: dense mask
  + SDPA) under the same autocast, plus a small floor; gradients reach the float32
  parameters in float32.
* The fused LayerNorm + K/V op (ccam_kernels::layernorm_kv) under autocast behaves like the
  unfused LayerNorm + two Linears: output in the autocast dtype, float32 gradients for float32
  weights, errors within 3x of the unfused pair's.

CPU: bfloat16 on reference and torch; float16 on triton (Triton's interpreter computes
bfloat16 dots wrong). GPU-marked: float16 and bfloat16 on triton and cuda.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from ccam_kernels import CCAMConfig, CCAMProjector, available_backends
from conftest import TRITON_DEVICE, rel_err
from oracle import projector_oracle

CFG = CCAMConfig(num_query=19, hidden_size=32, cross_hidden_size=24, num_heads=2, num_key_value_heads=1,
                 intermediate_size=40, output_size=24, attention_dropout=0.0, dropout=0.0)
SPLITS = [1, 3]  # ragged; 19 queries over 3 frames: T does not divide N
P = 5

CPU_CASES = [
    pytest.param("torch", torch.bfloat16, id="torch-bfloat16"),
    pytest.param("reference", torch.bfloat16, id="reference-bfloat16"),
    pytest.param("triton", torch.float16, id="triton-float16", marks=pytest.mark.triton),
]


def make(backend, device="cpu"):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    proj = CCAMProjector(CFG, backend=backend)
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return proj.to(device).eval()


def float64_output(proj, x):
    state = {k: v.detach().double() for k, v in proj.state_dict().items()}
    with torch.no_grad():
        return projector_oracle(state, CFG, x.detach().double(), SPLITS)


def autocast_output(proj, x, dtype, backend=None):
    """proj's eval output under autocast (with ``backend`` swapped in when given)."""
    saved = proj.backend
    proj.backend = backend or saved
    try:
        with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
            return proj(x, SPLITS)
    finally:
        proj.backend = saved


@pytest.mark.parametrize("backend,dtype", CPU_CASES)
def test_autocast_features_into_a_float32_module(backend, dtype, monkeypatch):
    proj = make(backend, TRITON_DEVICE if backend == "triton" else "cpu")
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size, device=proj.query.device)
    want = float64_output(proj, x.to(dtype))  # the features as given, the float32 parameters
    calls = []
    if backend == "triton":
        from ccam_kernels.backends import triton_projection

        real = triton_projection.layernorm_kv
        monkeypatch.setattr(triton_projection, "layernorm_kv", lambda *a: calls.append(1) or real(*a))
    out = autocast_output(proj, x.to(dtype), dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert calls or backend != "triton", "the fused projection did not run"
    plain = autocast_output(proj, x.to(dtype), dtype, backend="reference")  # plain PyTorch
    assert rel_err(plain, want) <= 3e-2  # a sanity bound: autocast precision
    assert rel_err(out, want) <= 3 * rel_err(plain, want) + 1e-3
    # float32 features under autocast work too
    out32 = autocast_output(proj, x, dtype)
    assert out32.dtype == dtype and rel_err(out32, float64_output(proj, x)) <= 3 * rel_err(plain, want) + 1e-3


@pytest.mark.parametrize("backend,dtype", CPU_CASES)
def test_plain_after_autocast_and_autocast_after_plain(backend, dtype):
    """The issue's repro: in eval under no_grad, a forward under autocast after a plain one
    raised "q, k and v must share one dtype" (the query side was cached in float32), and the
    reverse. Each mode must give what it gives in a fresh module."""
    proj = make(backend, TRITON_DEVICE if backend == "triton" else "cpu")
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size, device=proj.query.device)
    with torch.no_grad():
        plain = proj(x, SPLITS)
    auto = autocast_output(proj, x, dtype)
    auto_low = autocast_output(proj, x.to(dtype), dtype)
    with torch.no_grad():
        assert torch.equal(proj(x, SPLITS), plain)
    assert torch.equal(autocast_output(proj, x, dtype), auto)
    assert torch.equal(autocast_output(proj, x.to(dtype), dtype), auto_low)
    assert plain.dtype == torch.float32 and auto.dtype == auto_low.dtype == dtype


@pytest.mark.parametrize("backend,dtype", CPU_CASES)
def test_training_under_autocast_gives_float32_gradients(backend, dtype):
    """Gradients of every float32 parameter under autocast: float32, finite, and within 3x of
    plain PyTorch's (the reference backend's) error against the float32 module's gradients."""
    proj = make(backend, TRITON_DEVICE if backend == "triton" else "cpu").train()
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size, device=proj.query.device)
    dout = torch.randn(len(SPLITS), CFG.num_query, CFG.output_size, device=x.device)

    def grads(backend_name, autocast):
        proj.zero_grad()
        proj.backend = backend_name
        with torch.autocast(x.device.type, dtype=dtype, enabled=autocast):
            out = proj(x.to(dtype) if autocast else x, SPLITS)
        out.float().backward(dout)
        return {name: p.grad.clone() for name, p in proj.named_parameters()}

    exact = grads("reference", False)
    plain = grads("reference", True)
    got = grads(backend, True)
    scale = max(float(g.norm()) for g in exact.values())
    for name, g in got.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        # k_proj.bias has a zero gradient in exact arithmetic: measure against the largest one.
        ref_norm = max(float(exact[name].norm()), 1e-2 * scale)
        err, err_plain = (float((t - exact[name]).norm()) / ref_norm for t in (g, plain[name]))
        assert err <= 3 * err_plain + 1e-3, f"{name}: {err:.2e} vs plain {err_plain:.2e}"


def test_feature_dtype_mismatch_is_refused_outside_autocast():
    proj = make("torch")
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size)
    with pytest.raises(ValueError, match=r"features dtype must match the module's \(torch.float32\).*bfloat16"):
        proj(x.bfloat16(), SPLITS)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        with pytest.raises(ValueError, match="features dtype"):
            proj(x.bfloat16(), SPLITS)
    low = make("torch").bfloat16()
    with pytest.raises(ValueError, match=r"features dtype must match the module's \(torch.bfloat16\).*float32"):
        low(x, SPLITS)
    with warnings.catch_warnings():  # without CUDA, torch warns that it disables this autocast
        warnings.simplefilter("ignore", UserWarning)
        with torch.autocast("cuda", dtype=torch.float16):  # autocast for another device type
            with pytest.raises(ValueError, match="features dtype"):
                low(x, SPLITS)


def test_float64_is_never_cast_under_autocast():
    """autocast leaves float64 alone (nn.Linear of float64 input and float32 weights fails under
    it too): a float64 side next to a lower-precision one stays an error, naming why; so does a
    module in the other 16-bit dtype."""
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(ValueError, match=r"module's \(torch.float32\).*float64.*float64 is never cast"):
            make("torch")(x.double(), SPLITS)
        with pytest.raises(ValueError, match=r"module's \(torch.float64\).*float32.*float64 is never cast"):
            make("torch").double()(x, SPLITS)
        # a float16 module under bfloat16 autocast: its LayerNorms cannot take bfloat16
        with pytest.raises(ValueError, match=r"module's \(torch.float16\).*float32 or torch.bfloat16 module"):
            make("torch").half()(x, SPLITS)
        out = make("torch").double()(x.double(), SPLITS)  # one dtype: nothing to cast
    assert out.dtype == torch.float64


# (module dtype, features dtype) under autocast("cpu", bfloat16): issue 21, item 10. The first
# was refused before ("features dtype must match the module's (torch.bfloat16)").
MIXED = [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float32, torch.float16),
         (torch.bfloat16, torch.float16)]


CAST_CASES = [pytest.param("torch", m, f, id=f"torch-{str(m)[6:]}-module-{str(f)[6:]}-features") for m, f in MIXED]
CAST_CASES.append(pytest.param("reference", *MIXED[0], id="reference-bfloat16-module-float32-features"))


@pytest.mark.parametrize("backend,module_dtype,feature_dtype", CAST_CASES)
def test_autocast_casts_features_to_the_autocast_dtype(backend, module_dtype, feature_dtype):
    """As nn.Linear under autocast: the features are used in the autocast dtype, so the output is
    exactly that of features given in it, and close to the float64 evaluation of the module's
    parameters on the features as given. Gradients reach the features in their own dtype."""
    dtype = torch.bfloat16
    proj = make(backend).to(module_dtype)
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size).to(feature_dtype)
    out = autocast_output(proj, x, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, autocast_output(proj, x.to(dtype), dtype))
    assert rel_err(out, float64_output(proj, x)) <= 3e-2  # bfloat16 precision
    leaf = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        proj(leaf, SPLITS).float().square().sum().backward()
    assert leaf.grad.dtype == feature_dtype and torch.isfinite(leaf.grad).all()
    assert all(p.grad.dtype == module_dtype for p in proj.parameters())


@pytest.mark.triton
def test_layernorm_kv_under_autocast_behaves_like_the_unfused_pair():
    """float32 inputs under autocast(float16): output float16, float32 gradients, and errors
    against float64 within 3x of F.layer_norm + F.linear under the same autocast."""
    pytest.importorskip("triton", reason="triton is not installed")
    from ccam_kernels.backends import triton_projection

    M, K, C, dtype = 29, 40, 24, torch.float16
    leaves = [
        (torch.randn(M, K) * 2 + 1), torch.randn(K) * 0.5 + 1, torch.randn(K),
        torch.randn(C, K) / K ** 0.5, torch.randn(C, K) / K ** 0.5, torch.randn(C), torch.randn(C),
    ]
    leaves = [t.to(TRITON_DEVICE).requires_grad_() for t in leaves]
    dout = torch.randn(M, 2 * C, device=TRITON_DEVICE)

    def run(fn, autocast):
        for t in leaves:
            t.grad = None
        with torch.autocast(TRITON_DEVICE, dtype=dtype, enabled=autocast):
            out = fn(*leaves)
        out.float().backward(dout)
        return out, [t.grad for t in leaves]

    def unfused(x, gamma, beta, w_k, w_v, b_k, b_v):
        z = F.layer_norm(x, (K,), gamma, beta, 1e-5)
        return torch.cat([F.linear(z, w_k, b_k), F.linear(z, w_v, b_v)], 1)

    exact = [t.detach().double().requires_grad_() for t in leaves]
    want = unfused(*exact)
    want.backward(dout.double())
    fused_out, fused_grads = run(lambda *a: triton_projection.layernorm_kv(*a, 1e-5), True)
    plain_out, plain_grads = run(unfused, True)
    assert fused_out.dtype == plain_out.dtype == dtype
    assert rel_err(fused_out, want) <= 3 * rel_err(plain_out, want) + 2e-4
    names = ("x", "gamma", "beta", "w_k", "w_v", "b_k", "b_v")
    for name, g, gp, t, e in zip(names, fused_grads, plain_grads, leaves, exact):
        assert g.dtype == t.dtype == torch.float32, name
        assert rel_err(g, e.grad) <= 3 * rel_err(gp, e.grad) + 2e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_autocast_on_cuda(backend, dtype):
    if backend not in available_backends():
        pytest.skip(f"the {backend} backend is not usable on this GPU machine: {available_backends()}")
    proj = make(backend, "cuda")
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size, device="cuda")
    want = float64_output(proj, x.to(dtype))
    plain = autocast_output(proj, x.to(dtype), dtype, backend="reference")
    for features in (x, x.to(dtype)):
        out = autocast_output(proj, features, dtype)
        assert out.dtype == dtype
        assert rel_err(out, float64_output(proj, features)) <= 3 * rel_err(plain, want) + 1e-3
    if backend == "triton":  # cuda runs 16-bit tensors only: no plain float32 forward
        with torch.no_grad():
            assert proj(x, SPLITS).dtype == torch.float32  # plain after autocast


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_float32_features_into_a_16_bit_module_on_cuda(backend, dtype):
    """Issue 21 item 10 on the GPU backends: a module in the autocast dtype takes float32
    features under autocast, exactly as if they were given in that dtype."""
    if backend not in available_backends():
        pytest.skip(f"the {backend} backend is not usable on this GPU machine: {available_backends()}")
    proj = make(backend, "cuda").to(dtype)
    x = torch.randn(sum(SPLITS), P, CFG.cross_hidden_size, device="cuda")
    out = autocast_output(proj, x, dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert torch.equal(out, autocast_output(proj, x.to(dtype), dtype))
    assert rel_err(out, float64_output(proj, x)) <= 3e-2
