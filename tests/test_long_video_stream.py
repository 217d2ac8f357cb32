"""Streaming projector (proj.stream): equal to the one-shot projector for any chunking, and
clear errors that say whether the stream is still usable."""

from __future__ import annotations

import random

import pytest
import torch

from conftest import rel_err
from long_video_helpers import features, make_projector, stream_in_random_chunks


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("total", [1, 5, 13, 30])  # T = 1, T not dividing N = 13, T = N, T > N
@pytest.mark.parametrize("backend", ["torch", "reference", "auto"])
def test_stream_equals_one_shot(dtype, tol, total, backend, seed):
    rng = random.Random(seed)
    proj = make_projector(backend=backend, dtype=dtype, seed=seed).eval()
    x = features(total, 3, dtype=dtype, seed=seed + 1)
    with torch.no_grad():
        want = proj(x, [total])
    got = stream_in_random_chunks(proj, x, rng)
    assert got.shape == want.shape == (1, 13, 20) and got.dtype == dtype
    assert rel_err(got, want) <= tol


def test_stream_one_frame_at_a_time_under_inference_mode():
    proj = make_projector().eval()
    x = features(9, 2)
    with torch.inference_mode():
        want = proj(x, [9])
        s = proj.stream(9)
        for f in range(9):
            s.push(x[f:f + 1])
        got = s.finish()
    assert rel_err(got, want) <= 1e-12


def test_refuses_a_mode_switch_mid_stream():
    proj = make_projector()
    s = proj.eval().stream(4)
    proj.train()
    with pytest.raises(RuntimeError, match="training mode.*started in eval mode.*still usable"):
        s.push(features(1, 2))
    proj.eval()
    s.push(features(4, 2))
    assert s.finish().shape == (1, 13, 20)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_stream_in_training_mode_equals_one_shot_with_dropout(backend, seed):
    """Training mode: the same output (attention and hidden dropout) and the same gradient of
    every parameter and of the features as the one-shot projector, under the same manual seed."""
    proj = make_projector(backend=backend, seed=seed, attention_dropout=0.3, dropout=0.2).train()
    x = features(7, 3, seed=seed + 1).requires_grad_()
    w = torch.randn(1, 13, 20, dtype=torch.float64)
    torch.manual_seed(seed)
    want = proj(x, [7])
    want_grads = torch.autograd.grad((want * w).sum(), [x, *proj.parameters()])
    torch.manual_seed(seed)
    got = stream_in_random_chunks(proj, x, random.Random(seed))
    got_grads = torch.autograd.grad((got * w).sum(), [x, *proj.parameters()])
    assert rel_err(got, want) <= 1e-12
    for g, r in zip(got_grads, want_grads):  # (k_proj.bias's gradient is 0 up to rounding)
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    proj.eval()
    with torch.no_grad():
        assert rel_err(proj(x, [7]), want) > 1e-3, "dropout must have changed the training output"


def test_bad_chunks_leave_the_stream_usable():
    proj = make_projector().eval()
    x = features(6, 2)
    with torch.no_grad():
        want = proj(x, [6])
    s = proj.stream(6)
    s.push(x[:2])
    bad = [
        (x[2:4].reshape(-1, 12), ValueError, r"\(t, P, Cv\), got shape"),
        (torch.zeros(1, 2, 11, dtype=torch.float64), ValueError, "cross_hidden_size=12, got 11"),
        (x[2:4].float(), ValueError, "dtype must match"),
        (torch.zeros(1, 3, 12, dtype=torch.float64), ValueError, "P=2 tokens per frame"),
        (x[2:3][:0], ValueError, "t >= 1"),
        (features(5, 2), ValueError, "5 frames but only 4 of total_frames=6 remain"),
        (x.numpy(), TypeError, "must be a torch.Tensor"),
    ]
    for chunk, exc, match in bad:
        with pytest.raises(exc, match=match) as info:
            s.push(chunk)
        assert "still usable" in str(info.value)
    with pytest.raises(RuntimeError, match="after 2 of total_frames=6.*still usable"):
        s.finish()
    s.push(x[2:6])
    assert rel_err(s.finish(), want) <= 1e-12
    with pytest.raises(RuntimeError, match="closed"):
        s.push(x[:1])
    with pytest.raises(RuntimeError, match="closed"):
        s.finish()


def test_parameter_change_closes_the_stream():
    proj = make_projector().eval()
    s = proj.stream(3)
    s.push(features(1, 2))
    with torch.no_grad():
        proj.attn.k_proj.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="parameters changed.*closed"):
        s.push(features(1, 2))
    with pytest.raises(RuntimeError, match="closed"):
        s.finish()


@pytest.mark.parametrize("backend,match", [
    ("cuda", "cannot run partial attention for this projector"),  # 16-bit only; not on CPU unless emulated
    ("triton", "cannot run partial attention for this projector"),  # not for this float64, D = 8 module
])
def test_backends_that_cannot_stream_are_refused_up_front(backend, match):
    proj = make_projector().eval()
    proj.backend = backend
    with pytest.raises(RuntimeError, match=match):
        proj.stream(3)


def test_bad_total_frames():
    proj = make_projector().eval()
    with pytest.raises(ValueError, match="total_frames must be >= 1, got 0"):
        proj.stream(0)
    with pytest.raises(TypeError, match="total_frames must be an int"):
        proj.stream(2.0)
