"""Streaming projector (proj.stream): equal to the one-shot projector for any chunking, and
clear errors that say whether the stream is still usable."""

from __future__ import annotations

import random
import re

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
    with pytest.raises(RuntimeError, match=r"parameters changed.*\(attn\.k_proj\.weight changed values\).*closed"):
        s.push(features(1, 2))
    with pytest.raises(RuntimeError, match="closed"):
        s.finish()


def _double_data(p):
    p.data = p.data * 2


# Every way to change a parameter the pushes read (issue 21, item 2): the writes through .data
# leave the version counter alone, so only a comparison of the values sees them.
PUSH_SIDE_CHANGES = [
    ("data.mul_", lambda proj: proj.attn.k_proj.weight.data.mul_(2), "attn.k_proj.weight changed values"),
    ("data =", lambda proj: _double_data(proj.attn.v_proj.weight), "attn.v_proj.weight changed values"),
    ("query data", lambda proj: proj.query.data.add_(1), "query changed values"),
    ("q_proj bias", lambda proj: proj.attn.q_proj.bias.data.neg_(), "attn.q_proj.bias changed values"),
    ("norm weight", lambda proj: proj.feature_norm.weight.data[0].add_(1e-12), "feature_norm.weight changed values"),
    ("sign of zero", lambda proj: proj.feature_norm.bias.data.__setitem__(0, -0.0 if
                                                                            float(proj.feature_norm.bias[0]) == 0 else 0.0),
     "feature_norm.bias changed values"),
    ("load_state_dict", lambda proj: proj.load_state_dict(make_projector(seed=5).state_dict()), "changed values"),
    ("new Parameter", lambda proj: setattr(proj.attn.k_proj, "weight", torch.nn.Parameter(proj.attn.k_proj.weight * 3)),
     "attn.k_proj.weight changed values"),
    ("float()", lambda proj: proj.float(), "query changed dtype from torch.float64 to torch.float32"),
    ("half()", lambda proj: proj.half(), "changed dtype from torch.float64 to torch.float16"),
    ("to(bf16)", lambda proj: proj.to(torch.bfloat16), "changed dtype from torch.float64 to torch.bfloat16"),
    ("to(meta)", lambda proj: proj.to("meta"), "query moved from cpu to meta"),
    ("bias removed", lambda proj: setattr(proj.attn.k_proj, "bias", None), "attn.k_proj.bias was removed"),
]


@pytest.mark.parametrize("when", ["before a push", "before finish"])
@pytest.mark.parametrize("change,match", [(c, m) for _, c, m in PUSH_SIDE_CHANGES],
                         ids=[name for name, _, _ in PUSH_SIDE_CHANGES])
def test_every_push_side_change_is_an_error_naming_it(change, match, when):
    proj = make_projector().eval()
    x = features(6, 2)
    s = proj.stream(6)
    s.push(x[:3])
    if when == "before finish":
        s.push(x[3:])
    with torch.no_grad():
        change(proj)
    call = "push()" if when == "before a push" else "finish()"
    with pytest.raises(RuntimeError, match=re.escape(call) + ".*parameters changed.*" + re.escape(match)
                       + ".*this stream is closed"):
        s.push(x[3:].to(proj.query.dtype)) if when == "before a push" else s.finish()
    with pytest.raises(RuntimeError, match="this stream is closed"):
        s.finish()


def test_float32_module_made_double_mid_stream_names_the_change():
    proj = make_projector(dtype=torch.float32).eval()
    x = features(4, 2, dtype=torch.float32)
    s = proj.stream(4)
    s.push(x[:2])
    proj.double()
    with pytest.raises(RuntimeError, match=r"query changed dtype from torch\.float32 to torch\.float64"):
        s.push(x[2:].double())


def test_a_change_undone_before_the_next_push_is_exact():
    """Nothing read the changed weights, so the result is the output of the weights at finish()."""
    proj = make_projector().eval()
    x = features(6, 2)
    with torch.no_grad():
        want = proj(x, [6])
    s = proj.stream(6)
    s.push(x[:3])
    proj.attn.k_proj.weight.data.mul_(2)
    proj.attn.k_proj.weight.data.div_(2)  # exact: a power of two
    same = torch.nn.Parameter(proj.attn.v_proj.weight.detach().clone())
    proj.attn.v_proj.weight = same  # a new Parameter with the same values
    s.push(x[3:])
    assert rel_err(s.finish(), want) <= 1e-12


def test_finish_reads_the_head_parameters_as_they_are_then():
    """o_proj, the MLP and out_proj are read only by finish(): changing them mid-stream gives
    exactly the output of the weights at finish()."""
    proj = make_projector().eval()
    x = features(6, 2)
    s = proj.stream(6)
    s.push(x[:3])
    proj.attn.o_proj.weight.data.mul_(2)
    proj.mlp.up_proj.weight.data = proj.mlp.up_proj.weight.data * 3
    s.push(x[3:])
    proj.out_proj.bias.data.add_(1)
    got = s.finish()
    with torch.no_grad():
        want = proj(x, [6])
    assert rel_err(got, want) <= 1e-12


def test_nan_weights_are_not_a_change():
    """Bits are compared, so a NaN weight (NaN != NaN) is no false alarm."""
    proj = make_projector().eval()
    proj.attn.k_proj.weight.data[0, 0] = float("nan")
    proj.query.data[1, 2] = float("nan")
    x = features(4, 2)
    results = []
    for _ in range(2):
        s = proj.stream(4)
        s.push(x[:2])
        s.push(x[2:])
        results.append(s.finish())
    assert results[0].isnan().any()  # the NaN reached the output: the weights were read as they are
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0, equal_nan=True)


def test_inference_parameters_streamed_outside_inference_mode():
    with torch.inference_mode():
        proj = make_projector().eval()
    x = features(5, 2)
    with torch.no_grad():
        want = proj(x, [5])
    s = proj.stream(5)
    s.push(x[:2])
    s.push(x[2:])
    assert rel_err(s.finish(), want) <= 1e-12


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


@pytest.mark.parametrize("start,push", [(True, False), (False, True), (True, True)],
                         ids=["started-inside-pushed-outside", "started-outside-pushed-inside", "inside"])
def test_inference_mode_on_either_side(start, push):
    """A stream started under torch.inference_mode can be pushed to and finished outside it
    (the state is plain tensors; before, the in-place merge raised "Inplace update to
    inference tensor outside InferenceMode"), and the reverse."""
    proj = make_projector().eval()
    x = features(5, 2)
    with torch.no_grad():
        want = proj(x, [5])
    with torch.inference_mode(start):
        s = proj.stream(5)
        s.push(x[:2])
    with torch.inference_mode(push):
        s.push(x[2:])
        got = s.finish()
    assert rel_err(got, want) <= 1e-12


def test_a_change_under_inference_mode_is_seen():
    """Inference tensors have no version counter: the old check missed this change."""
    with torch.inference_mode():
        proj = make_projector().eval()
    x = features(4, 2)
    s = proj.stream(4)
    s.push(x[:2])
    with torch.inference_mode():
        proj.attn.v_proj.weight.mul_(2)
    with pytest.raises(RuntimeError, match=r"\(attn\.v_proj\.weight changed values\)"):
        s.push(x[2:])
