"""No hidden state (issue 13.1, docs/reference.md §7): after anything that changes the parameters, the
projector's eval output equals, bitwise, the output of a fresh module loaded with the same
state_dict. The changes are those that defeated the old version-counter caches: fused,
foreach and for-loop optimizer steps, load_state_dict (assign=True too), parameters replaced
twice between forwards (a freed address can come back), writes through ``.data``, and dtype
round trips. Each change comes after an eval forward (what filled the old caches), and each
check also asserts that the change did change the output, so it cannot pass vacuously.

Backends: torch (float32), and triton in float32 and float16 (Triton's interpreter on CPU),
where K and V come from the fused LayerNorm + K/V projection kernel.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from ccam_kernels import CCAMConfig, CCAMProjector
from conftest import TRITON_DEVICE

CFG = CCAMConfig(num_query=16, hidden_size=32, cross_hidden_size=24, num_heads=2, num_key_value_heads=1,
                 intermediate_size=40, output_size=24, attention_dropout=0.0, dropout=0.0)
SPLITS = [1, 2]  # ragged
P = 3

CASES = [
    pytest.param("torch", torch.float32, id="torch-float32"),
    pytest.param("triton", torch.float32, id="triton-float32", marks=pytest.mark.triton),
    pytest.param("triton", torch.float16, id="triton-float16", marks=pytest.mark.triton),
]


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the fused projection's calls (the triton cases must run it)."""
    calls = []
    try:
        from ccam_kernels.backends import triton_projection
    except ImportError:
        return calls
    real = triton_projection.layernorm_kv
    monkeypatch.setattr(triton_projection, "layernorm_kv", lambda *a: calls.append(1) or real(*a))
    return calls


def make(backend, dtype, cfg=CFG):
    if backend == "triton":
        pytest.importorskip("triton", reason="triton is not installed")
    proj = CCAMProjector(cfg, backend=backend)
    with torch.no_grad():  # random values everywhere, norms and biases included
        for p in proj.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return proj.to(device_of(backend), dtype).eval()


def features(proj):
    return torch.randn(sum(SPLITS), P, proj.config.cross_hidden_size, device=proj.query.device,
                       dtype=proj.query.dtype)


def eval_output(proj, x):
    proj.eval()
    with torch.no_grad():
        return proj(x, SPLITS)


def fresh_output(proj, x):
    """The eval output of a new module of the same config, backend and dtype, loaded with
    proj's state_dict."""
    fresh = CCAMProjector(proj.config, backend=proj.backend).to(proj.query.device, proj.query.dtype)
    fresh.load_state_dict(proj.state_dict())
    return eval_output(fresh, x)


def assert_like_fresh(proj, x, before, *, changed=True):
    out = eval_output(proj, x)
    assert torch.isfinite(out).all()
    assert torch.equal(out, fresh_output(proj, x)), "eval output differs from a fresh module's"
    if changed:
        assert not torch.equal(out, before), "the change did not reach the output (test setup)"
    return out


def check_fused_ran(backend, calls):
    if backend == "triton":
        assert calls, "the triton projector did not run the fused projection"


OPTIMIZERS = [
    (torch.optim.SGD, {"momentum": 0.9}),
    (torch.optim.Adam, {}),
    (torch.optim.AdamW, {}),
    (torch.optim.Adagrad, {}),
]
IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}


@pytest.mark.parametrize("optimizer,options", OPTIMIZERS, ids=[o.__name__ for o, _ in OPTIMIZERS])
@pytest.mark.parametrize("backend,dtype", CASES)
def test_eval_after_optimizer_steps_equals_a_fresh_module(backend, dtype, optimizer, options, fused_calls):
    """The issue's repro: eval forward, a training step, eval forward; for each implementation
    of the step (fused kernels do not bump version counters)."""
    proj = make(backend, dtype)
    x = features(proj)
    before = eval_output(proj, x)
    if dtype == torch.float16 and optimizer is not torch.optim.SGD:
        options = {**options, "eps": 1e-3}  # the default eps is 0 in float16: 0/0 where a gradient is 0
    for impl, flags in IMPLS.items():
        opt = optimizer(proj.parameters(), lr=0.05, **options, **flags)
        proj.train()
        proj(x, SPLITS).square().mean().backward()
        opt.step()
        opt.zero_grad()
        before = assert_like_fresh(proj, x, before)
    check_fused_ran(backend, fused_calls)


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("backend,dtype", CASES)
def test_eval_after_load_state_dict_equals_a_fresh_module(backend, dtype, assign, fused_calls):
    proj = make(backend, dtype)
    x = features(proj)
    before = eval_output(proj, x)
    proj.load_state_dict(make(backend, dtype).state_dict(), assign=assign)
    before = assert_like_fresh(proj, x, before)
    proj.load_state_dict(make(backend, dtype).state_dict(), assign=assign)  # and once more
    assert_like_fresh(proj, x, before)
    check_fused_ran(backend, fused_calls)


# Query side, fused K/V weights and biases, a norm: each kind of parameter an old cache read.
REPLACED = ["query", "attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.bias", "feature_norm.weight"]


def _owner(proj, name):
    *path, leaf = name.split(".")
    module = proj
    for part in path:
        module = getattr(module, part)
    return module, leaf


@pytest.mark.parametrize("backend,dtype", CASES)
def test_eval_after_parameters_replaced_twice_equals_a_fresh_module(backend, dtype, fused_calls):
    """Replaced twice between forwards, the second time by a tensor at the original's address:
    what the allocator may hand back once the first replacement freed the original. The old
    caches keyed on (address, version count) could not tell it from the original. The address
    is reused here on purpose (a new tensor on the original's storage), not left to chance."""
    proj = make(backend, dtype)
    x = features(proj)
    before = eval_output(proj, x)
    for name in REPLACED:
        module, leaf = _owner(proj, name)
        original = getattr(module, leaf)
        storage, version, values = original.untyped_storage(), original._version, original.detach().clone()
        setattr(module, leaf, nn.Parameter(values + 0.5 * torch.randn_like(values)))
        del original
        again = torch.empty(0, dtype=values.dtype, device=values.device)
        again.set_(storage, 0, values.shape, values.stride())
        again.data.copy_(values + 0.5 * torch.randn_like(values))
        with torch.no_grad():
            while again._version < version:  # the same version count as well
                again.add_(0)
        setattr(module, leaf, nn.Parameter(again))
        assert getattr(module, leaf).data_ptr() == storage.data_ptr()
        before = assert_like_fresh(proj, x, before)
    check_fused_ran(backend, fused_calls)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_eval_after_writes_through_data_equals_a_fresh_module(backend, dtype, fused_calls):
    """``p.data`` writes (Hugging Face init, EMA updates) bump no version counter."""
    proj = make(backend, dtype)
    x = features(proj)
    before = eval_output(proj, x)
    params = dict(proj.named_parameters())
    for name in REPLACED:
        params[name].data.add_(0.5 * torch.randn_like(params[name]))
        before = assert_like_fresh(proj, x, before)
    check_fused_ran(backend, fused_calls)


@pytest.mark.parametrize("backend,dtype", CASES)
def test_eval_after_dtype_round_trip_equals_a_fresh_module(backend, dtype, fused_calls):
    """.to(other dtype) and back. float32 -> float16 -> float32 rounds the parameters (the
    output must change); float16 -> float32 -> float16 is exact (it must not)."""
    proj = make(backend, dtype)
    x = features(proj)
    before = eval_output(proj, x)
    other = torch.float16 if dtype == torch.float32 else torch.float32
    proj.to(other).to(dtype)
    out = assert_like_fresh(proj, x, before, changed=dtype == torch.float32)
    if dtype != torch.float32:
        assert torch.equal(out, before)
    check_fused_ran(backend, fused_calls)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
def test_without_biases_after_an_optimizer_step(backend, fused_calls):
    """attention_bias=False: the fused kernel runs without bias pointers."""
    cfg = CCAMConfig(**{**CFG.to_dict(), "attention_bias": False})
    proj = make(backend, torch.float32, cfg)
    assert proj.attn.k_proj.bias is None
    x = features(proj)
    before = eval_output(proj, x)
    opt = torch.optim.AdamW(proj.parameters(), lr=0.05, fused=True)
    proj.train()
    proj(x, SPLITS).square().mean().backward()
    opt.step()
    assert_like_fresh(proj, x, before)
    check_fused_ran(backend, fused_calls)


def test_no_tensor_is_held_outside_parameters_and_buffers():
    """After eval forwards (with and without grad, in inference mode), no module of the
    projector holds a tensor other than its parameters and buffers."""
    proj = make("torch", torch.float32)
    x = features(proj)
    eval_output(proj, x)
    with torch.inference_mode():
        proj(x, SPLITS)
    proj(x, SPLITS).sum().backward()

    def tensors_in(value):
        if isinstance(value, torch.Tensor):
            return [value]
        if isinstance(value, (tuple, list)):
            return [t for item in value for t in tensors_in(item)]
        if isinstance(value, dict):
            return [t for item in value.values() for t in tensors_in(item)]
        return []

    for module_name, module in proj.named_modules():
        for attr, value in vars(module).items():
            if attr in ("_parameters", "_buffers", "_modules"):
                continue
            assert not tensors_in(value), f"{module_name or 'projector'}.{attr} holds a tensor"


def test_invalidate_query_cache_is_a_deprecated_no_op():
    proj = make("torch", torch.float32)
    x = features(proj)
    before = eval_output(proj, x)
    with pytest.warns(DeprecationWarning, match="keeps no cache"):
        proj.invalidate_query_cache()
    assert torch.equal(eval_output(proj, x), before)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert proj.invalidate_query_cache() is None
