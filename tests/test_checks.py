"""Bad input (docs/reference.md §8): the right exception type, raised before any kernel runs, with a message
that names the argument."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ccam_kernels
from ccam_kernels import CCAMConfig, CCAMProjector, available_backends, ccam_attention
from ccam_kernels.checks import check_attention_args

N, P, T, H, HKV, D = 5, 3, (2, 4), 4, 2, 16
L = sum(T) * P


def good(dtype=torch.float32):
    q = torch.randn(N, H, D, dtype=dtype)
    k = torch.randn(L, HKV, D, dtype=dtype)
    v = torch.randn(L, HKV, D, dtype=dtype)
    return q, k, v


def test_good_inputs_pass():
    q, k, v = good()
    problem = check_attention_args(q, k, v, list(T), P)
    assert problem.frame_counts == T
    assert (problem.num_query, problem.num_heads, problem.num_kv_heads, problem.head_dim) == (N, H, HKV, D)
    assert problem.shared_query and problem.scale == pytest.approx(1 / math.sqrt(D))
    assert ccam_attention(q, k, v, list(T), P).shape == (len(T), N, H, D)


def _bad(**changes):
    q, k, v = good()
    args = dict(q=q, k=k, v=v, frame_counts=list(T), tokens_per_frame=P)
    args.update(changes)
    return args


BAD_ATTENTION = [
    # (id, changes, exception, message pattern)
    ("q-rank-2", dict(q=torch.randn(N, H * D)), ValueError, r"\bq\b.*shape"),
    ("q-rank-5", dict(q=torch.randn(2, 2, N, H, D)), ValueError, r"\bq\b.*shape"),
    ("q-not-tensor", dict(q=[[1.0]]), TypeError, r"\bq\b"),
    ("k-rank-4", dict(k=torch.randn(1, L, HKV, D)), ValueError, r"\bk\b.*shape"),
    ("k-rank-2", dict(k=torch.randn(L, HKV * D)), ValueError, r"\bk\b.*shape"),
    ("v-rank-2", dict(v=torch.randn(L, HKV * D)), ValueError, r"\bv\b.*shape"),
    ("v-not-tensor", dict(v=None), TypeError, r"\bv\b"),
    ("k-v-shapes-differ", dict(v=torch.randn(L, HKV, D + 8)), ValueError, r"\bk\b.*\bv\b"),
    ("k-v-lengths-differ", dict(v=torch.randn(L + P, HKV, D)), ValueError, r"\bk\b.*\bv\b"),
    ("head-dim-mismatch", dict(q=torch.randn(N, H, D + 8)), ValueError, r"(?i)head dim.*D=24.*D=16"),
    ("H-not-multiple-of-Hkv", dict(q=torch.randn(N, 3, D)), ValueError, r"H=3.*Hkv=2"),
    ("frame_counts-empty", dict(frame_counts=[]), ValueError, r"frame_counts.*empty"),
    ("frame_counts-empty-tensor", dict(frame_counts=torch.tensor([], dtype=torch.int64)), ValueError, "frame_counts"),
    ("frame_counts-zero", dict(frame_counts=[0, 6]), ValueError, r"frame_counts.*>= 1"),
    ("frame_counts-negative", dict(frame_counts=[-2, 8]), ValueError, r"frame_counts.*>= 1"),
    ("frame_counts-sum-too-small", dict(frame_counts=[2, 3]), ValueError, r"frame_counts.*L=18"),
    ("frame_counts-sum-too-large", dict(frame_counts=[2, 4, 1]), ValueError, r"frame_counts.*L=18"),
    ("frame_counts-float-tensor", dict(frame_counts=torch.tensor([2.0, 4.0])), TypeError, r"frame_counts.*float"),
    ("frame_counts-bool-tensor", dict(frame_counts=torch.tensor([True, True])), TypeError, "frame_counts"),
    ("frame_counts-2d-tensor", dict(frame_counts=torch.tensor([[2, 4]])), ValueError, "frame_counts"),
    ("frame_counts-list-of-floats", dict(frame_counts=[2.0, 4.0]), TypeError, r"frame_counts.*float"),
    ("frame_counts-int", dict(frame_counts=6), TypeError, "frame_counts"),
    ("frame_counts-str", dict(frame_counts="24"), TypeError, "frame_counts"),
    ("frame_counts-batch-mismatch-4d-q", dict(q=torch.randn(3, N, H, D)), ValueError, r"batch.*3.*frame_counts.*2"),
    ("tokens_per_frame-zero", dict(tokens_per_frame=0), ValueError, r"tokens_per_frame.*>= 1.*0"),
    ("tokens_per_frame-negative", dict(tokens_per_frame=-3), ValueError, "tokens_per_frame"),
    ("tokens_per_frame-float", dict(tokens_per_frame=3.0), TypeError, r"tokens_per_frame.*float"),
    ("tokens_per_frame-tensor", dict(tokens_per_frame=torch.tensor(3)), TypeError, "tokens_per_frame"),
    ("tokens_per_frame-bool", dict(tokens_per_frame=True), TypeError, "tokens_per_frame"),
    ("dtype-q-vs-kv", dict(q=torch.randn(N, H, D, dtype=torch.float16)), ValueError, r"dtype.*float16.*float32"),
    ("dtype-v-differs", dict(v=torch.randn(L, HKV, D, dtype=torch.bfloat16)), ValueError, r"dtype.*bfloat16"),
    ("dtype-int32", dict(q=torch.ones(N, H, D, dtype=torch.int32)), ValueError, r"\bq\b.*int32"),
    ("dtype-int32-k", dict(k=torch.ones(L, HKV, D, dtype=torch.int32)), ValueError, r"\bk\b.*int32"),
    ("device-mismatch", dict(q=torch.randn(N, H, D, device="meta")), ValueError, r"device.*meta.*cpu"),
]


@pytest.mark.parametrize("changes,exc,pattern", [b[1:] for b in BAD_ATTENTION], ids=[b[0] for b in BAD_ATTENTION])
def test_bad_attention_arguments(changes, exc, pattern):
    args = _bad(**changes)
    with pytest.raises(exc, match=pattern):
        check_attention_args(**args)
    for backend in ("auto", "reference", "torch"):
        with pytest.raises(exc, match=pattern):
            ccam_attention(
                args["q"], args["k"], args["v"], args["frame_counts"], args["tokens_per_frame"], backend=backend
            )


@pytest.mark.parametrize(
    "scale,exc",
    [(float("nan"), ValueError), (float("inf"), ValueError), (-float("inf"), ValueError), ("0.1", TypeError),
     (torch.tensor(0.1), TypeError), (0.0, ValueError)],
    ids=["nan", "inf", "-inf", "str", "tensor", "zero"],
)
def test_bad_scale(scale, exc):
    q, k, v = good()
    with pytest.raises(exc, match="scale"):
        ccam_attention(q, k, v, list(T), P, scale=scale)


@pytest.mark.parametrize("dropout_p,exc", [(1.0, ValueError), (-0.1, ValueError), ("0.1", TypeError),
                                          (float("nan"), ValueError)], ids=["1", "-0.1", "str", "nan"])
def test_bad_dropout(dropout_p, exc):
    q, k, v = good()
    with pytest.raises(exc, match="dropout_p"):
        ccam_attention(q, k, v, list(T), P, dropout_p=dropout_p)


@pytest.mark.parametrize("to_scalar", [np.float64, np.float32, np.float16, np.int64], ids=lambda f: f.__name__)
def test_numpy_scalars_are_numbers(to_scalar):
    """scale and dropout_p take NumPy scalars of every float width (np.float32 is no subclass of
    float, unlike np.float64), as Python numbers; np.bool_ is refused as bool is."""
    q, k, v = good(torch.float64)
    scale = 0.3 if to_scalar is not np.int64 else 1
    want = ccam_attention(q, k, v, list(T), P, scale=float(to_scalar(scale)), backend="reference")
    got = ccam_attention(q, k, v, list(T), P, scale=to_scalar(scale), backend="reference")
    assert torch.equal(got, want)
    assert check_attention_args(q, k, v, list(T), P, scale=to_scalar(scale)).scale == float(to_scalar(scale))
    assert check_attention_args(q, k, v, list(T), P, dropout_p=to_scalar(0)).dropout_p == 0.0
    if to_scalar is not np.int64:
        assert check_attention_args(q, k, v, list(T), P, dropout_p=to_scalar(0.25)).dropout_p == 0.25
    with pytest.raises(TypeError, match="scale must be a float or None, got bool"):
        ccam_attention(q, k, v, list(T), P, scale=np.bool_(True))
    with pytest.raises(TypeError, match="dropout_p must be a float, got bool"):
        ccam_attention(q, k, v, list(T), P, dropout_p=np.bool_(False))


def test_unknown_backend_lists_known_ones():
    q, k, v = good()
    with pytest.raises(ValueError, match="backend") as info:
        ccam_attention(q, k, v, list(T), P, backend="flash3")
    message = str(info.value)
    assert "flash3" in message
    for name in ("auto", "reference", "torch", "triton", "cuda"):
        assert name in message, f"{name!r} missing from: {message}"


def test_backend_not_a_string():
    q, k, v = good()
    with pytest.raises(TypeError, match="backend"):
        ccam_attention(q, k, v, list(T), P, backend=None)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_known_but_unusable_backend_is_a_runtime_error(backend, monkeypatch):
    """CPU tensors: the triton (outside its interpreter) and cuda backends cannot run them;
    the message says why and lists available_backends()."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = good()
    with pytest.raises(RuntimeError, match=backend) as info:
        ccam_attention(q, k, v, list(T), P, backend=backend)
    message = str(info.value)
    assert "torch" in message
    for name in available_backends():
        assert name in message, f"{name!r} missing from: {message}"
    assert str(available_backends()) in message


def test_checks_run_before_any_kernel(monkeypatch):
    """A bad call never reaches a backend."""
    from ccam_kernels import attention

    calls = []
    for name, backend in list(attention.BACKENDS.items()):
        if backend.run is not None:
            monkeypatch.setitem(
                attention.BACKENDS, name, attention.Backend(
                    backend.name, lambda *a, **kw: calls.append(a), backend.why_unusable, backend.dtypes,
                    backend.devices, backend.dropout,
                ),
            )
    q, k, v = good()
    with pytest.raises(ValueError):
        ccam_attention(q, k, v, [2, 3], P, backend="torch")
    with pytest.raises(ValueError):
        ccam_attention(q, k, v, list(T), P, backend="reference", scale=float("nan"))
    assert calls == []


def test_nothing_is_silently_cast():
    q, k, v = good(torch.float64)
    with pytest.raises(ValueError, match="dtype"):
        ccam_attention(q.float(), k, v, list(T), P)


# ---------------------------------------------------------------------------------------------
# Projector inputs.

CFG = CCAMConfig(num_query=5, hidden_size=16, cross_hidden_size=12, num_heads=2, num_key_value_heads=1,
                 intermediate_size=8, output_size=10)


@pytest.fixture(scope="module")
def proj():
    return CCAMProjector(CFG, backend="torch").eval()


BAD_FEATURES = [
    ("features-rank-2", lambda: (torch.randn(6, 12), [6]), ValueError, r"features.*shape"),
    ("features-rank-5", lambda: (torch.randn(1, 2, 3, 4, 12), None), ValueError, r"features.*shape"),
    ("features-not-tensor", lambda: ([[0.0] * 12], [1]), TypeError, "features"),
    ("width-3d", lambda: (torch.randn(6, 3, 11), [2, 4]), ValueError, r"cross_hidden_size=12.*11"),
    ("width-4d", lambda: (torch.randn(2, 3, 3, 13), None), ValueError, r"cross_hidden_size=12.*13"),
    ("split_sizes-sum", lambda: (torch.randn(6, 3, 12), [2, 3]), ValueError, r"split_sizes.*F=6"),
    ("split_sizes-sum-over", lambda: (torch.randn(6, 3, 12), [2, 5]), ValueError, r"split_sizes.*F=6"),
    ("split_sizes-zero", lambda: (torch.randn(6, 3, 12), [0, 6]), ValueError, "split_sizes"),
    ("split_sizes-empty", lambda: (torch.randn(6, 3, 12), []), ValueError, "split_sizes"),
    ("split_sizes-floats", lambda: (torch.randn(6, 3, 12), [2.0, 4.0]), TypeError, "split_sizes"),
    ("split_sizes-float-tensor", lambda: (torch.randn(6, 3, 12), torch.tensor([2.0, 4.0])), TypeError,
     "split_sizes"),
    ("split_sizes-missing-3d", lambda: (torch.randn(6, 3, 12), None), ValueError, "split_sizes"),
    ("split_sizes-above-t-max", lambda: (torch.randn(2, 3, 3, 12), [3, 4]), ValueError, r"split_sizes.*<= T_max=3"),
    ("dtype-float64", lambda: (torch.randn(6, 3, 12, dtype=torch.float64), [2, 4]), ValueError,
     r"features.*dtype.*float32.*float64"),
    ("dtype-bfloat16", lambda: (torch.randn(2, 3, 3, 12, dtype=torch.bfloat16), None), ValueError,
     r"features.*dtype"),
    ("device-meta", lambda: (torch.randn(6, 3, 12, device="meta"), [2, 4]), ValueError, r"features.*device"),
    ("empty-P", lambda: (torch.randn(6, 0, 12), [2, 4]), ValueError, "features"),
]


@pytest.mark.parametrize("make,exc,pattern", [b[1:] for b in BAD_FEATURES], ids=[b[0] for b in BAD_FEATURES])
def test_bad_projector_inputs(proj, make, exc, pattern):
    features, split_sizes = make()
    with pytest.raises(exc, match=pattern):
        proj(features, split_sizes)


def test_projector_bad_constructor_arguments():
    with pytest.raises(ValueError, match=r"backend.*torch"):
        CCAMProjector(CFG, backend="nope")
    with pytest.raises(TypeError, match="backend"):
        CCAMProjector(CFG, backend=3)
    with pytest.raises(TypeError, match="config"):
        CCAMProjector("config.json")


# ---------------------------------------------------------------------------------------------
# CCAMConfig.

BAD_CONFIG = [
    ("hidden-not-multiple-of-heads", dict(hidden_size=30, num_heads=4), ValueError, r"hidden_size.*num_heads"),
    ("heads-not-multiple-of-kv", dict(num_heads=4, num_key_value_heads=3), ValueError,
     r"num_heads.*num_key_value_heads"),
    ("kv-more-than-heads", dict(num_heads=2, num_key_value_heads=4), ValueError, r"num_key_value_heads"),
    ("num_query-0", dict(num_query=0), ValueError, "num_query"),
    ("hidden_size-0", dict(hidden_size=0), ValueError, "hidden_size"),
    ("cross_hidden_size-neg", dict(cross_hidden_size=-1), ValueError, "cross_hidden_size"),
    ("num_heads-0", dict(num_heads=0), ValueError, "num_heads"),
    ("num_key_value_heads-0", dict(num_key_value_heads=0), ValueError, "num_key_value_heads"),
    ("intermediate_size-0", dict(intermediate_size=0), ValueError, "intermediate_size"),
    ("output_size-0", dict(output_size=0), ValueError, "output_size"),
    ("num_query-float", dict(num_query=4.0), TypeError, "num_query"),
    ("hidden_size-str", dict(hidden_size="16"), TypeError, "hidden_size"),
    ("hidden_act-unknown", dict(hidden_act="relu6"), ValueError, r"hidden_act.*relu6"),
    ("attention_dropout-1", dict(attention_dropout=1.0), ValueError, "attention_dropout"),
    ("attention_dropout-neg", dict(attention_dropout=-0.1), ValueError, "attention_dropout"),
    ("dropout-1", dict(dropout=1.0), ValueError, r"\bdropout\b"),
    ("dropout-1.5", dict(dropout=1.5), ValueError, r"\bdropout\b"),
    ("dropout-neg", dict(dropout=-0.5), ValueError, r"\bdropout\b"),
    ("dropout-nan", dict(dropout=float("nan")), ValueError, r"\bdropout\b"),
    ("dropout-str", dict(dropout="0.1"), TypeError, r"\bdropout\b"),
    ("layer_norm_eps-0", dict(layer_norm_eps=0.0), ValueError, "layer_norm_eps"),
    ("attention_bias-str", dict(attention_bias="yes"), TypeError, "attention_bias"),
]


@pytest.mark.parametrize("changes,exc,pattern", [b[1:] for b in BAD_CONFIG], ids=[b[0] for b in BAD_CONFIG])
def test_bad_config(changes, exc, pattern):
    base = dict(num_query=5, hidden_size=16, cross_hidden_size=12, num_heads=2, num_key_value_heads=1,
                intermediate_size=8, output_size=10)
    base.update(changes)
    with pytest.raises(exc, match=pattern):
        CCAMConfig(**base)
    with pytest.raises(exc, match=pattern):
        CCAMConfig.from_dict(base)


def test_default_config_is_the_released_v1_2_projector():
    cfg = CCAMConfig()
    assert (cfg.num_query, cfg.hidden_size, cfg.cross_hidden_size, cfg.num_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.output_size) == (1024, 1024, 1152, 16, 16, 4096, 3584)
    assert cfg.hidden_act == "swiglu" and cfg.attention_bias and cfg.mlp_bias
    assert cfg.layer_norm_eps == 1e-5 and cfg.attention_dropout == 0.1 and cfg.dropout == 0.1
    assert ccam_kernels.CCAMConfig is CCAMConfig


def test_config_from_dict_rejects_non_dicts():
    with pytest.raises(TypeError, match="config"):
        CCAMConfig.from_dict([("num_query", 4)])
    with pytest.raises(TypeError, match="projector_config"):
        CCAMConfig.from_dict({"projector_config": "x"})
