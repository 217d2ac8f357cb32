"""What transformers code asks of a model (docs/reference.md §4.2): .dtype, .device,
num_parameters(), a read-only .config, gradient checkpointing (same gradients, fewer saved
activations); and padded batches, (B, T_max, P, Cv) with the true frame counts."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ccam_kernels import CCAMProjector

from test_projector import P, SMALL, make_config, make_projector, oracle_of


def test_dtype_device_num_parameters_and_read_only_config():
    proj = make_projector(dtype=torch.float64)
    assert proj.dtype == torch.float64 and proj.device == torch.device("cpu")
    total = sum(p.numel() for p in proj.parameters())
    assert proj.num_parameters() == total
    proj.query.requires_grad_(False)
    assert proj.num_parameters(only_trainable=True) == total - proj.query.numel()
    with pytest.raises(AttributeError):
        proj.config = make_config(num_query=3)
    smaller = CCAMProjector(dataclasses.replace(proj.config, num_query=3))
    assert smaller.query.shape == (3, SMALL["hidden_size"])


def _grads(proj, x, splits, seed):
    torch.manual_seed(seed)  # the same dropout masks in both runs
    x = x.detach().requires_grad_(True)
    proj.zero_grad(set_to_none=True)
    y = proj(x, splits)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in proj.named_parameters()}


def _saved_bytes(proj, x, splits) -> int:
    """Bytes of the tensors autograd keeps for the backward (the activation memory)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        proj(x.detach().requires_grad_(True), splits)
    return total


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradient_checkpointing_gives_the_same_gradients(dropout):
    proj = make_projector(dtype=torch.float64, attention_dropout=dropout, dropout=dropout).train()
    splits = [3, 1, 5]
    x = torch.randn(sum(splits), P, SMALL["cross_hidden_size"], dtype=torch.float64)
    y0, gx0, g0 = _grads(proj, x, splits, seed=5)
    plain = _saved_bytes(proj, x, splits)
    assert not proj.is_gradient_checkpointing
    proj.gradient_checkpointing_enable()
    assert proj.is_gradient_checkpointing
    y1, gx1, g1 = _grads(proj, x, splits, seed=5)
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx1, gx0, rtol=1e-10, atol=1e-12)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12, msg=name)
    assert _saved_bytes(proj, x, splits) < plain / 2
    proj.gradient_checkpointing_disable()
    assert _saved_bytes(proj, x, splits) == plain
    with pytest.raises(TypeError, match="gradient_checkpointing_kwargs must be a dict or None, got"):
        proj.gradient_checkpointing_enable(gradient_checkpointing_kwargs=[1])


def _padded(x: torch.Tensor, splits, t_max: int) -> torch.Tensor:
    out = torch.full((len(splits), t_max, *x.shape[1:]), float("nan"), dtype=x.dtype)
    for b, part in enumerate(x.split(list(splits))):
        out[b, :part.shape[0]] = part
    return out


@pytest.mark.parametrize("splits,t_max", [([3, 1, 5], 5), ([2, 2], 6), ([1], 1), ([4, 7, 1, 7], 7)])
def test_padded_batch_equals_packed_and_computes_no_padding_kv(splits, t_max):
    proj = make_projector(dtype=torch.float64)
    x = torch.randn(sum(splits), P, SMALL["cross_hidden_size"], dtype=torch.float64)
    # NaN padding: any read of a padding frame would show in the output or the gradients.
    frames = _padded(x, splits, t_max).requires_grad_(True)
    seen = []

    def spy(q, k, v, frame_counts, tokens_per_frame, *, dropout_p):
        seen.append(k.shape[0])
        return proj_torch(q, k, v, frame_counts, tokens_per_frame, dropout_p=dropout_p)

    from ccam_kernels import ccam_attention

    proj_torch = lambda *a, **kw: ccam_attention(*a, backend="torch", **kw)  # noqa: E731
    proj.backend = spy
    y = proj(frames, splits)
    assert seen == [sum(splits) * P]  # K/V for the real frames only
    proj.backend = "torch"
    packed = x.clone().requires_grad_(True)
    y_packed = proj(packed, splits)
    torch.testing.assert_close(y, y_packed, rtol=0, atol=0)
    torch.testing.assert_close(y, oracle_of(proj, x, splits), rtol=1e-10, atol=1e-10)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_packed * w).sum().backward()
    for b, t in enumerate(splits):
        torch.testing.assert_close(frames.grad[b, :t], packed.grad.split(splits)[b])
        assert (frames.grad[b, t:] == 0).all()
    # counts given as a tensor, and as the full T_max (no padding)
    torch.testing.assert_close(proj(frames.detach(), torch.tensor(splits)), y.detach())


def test_padded_batch_errors():
    proj = make_projector()
    frames = torch.randn(2, 4, P, SMALL["cross_hidden_size"])
    with pytest.raises(ValueError, match=r"split_sizes has 3 videos but padded features \(B, T_max, P, Cv\) has B=2"):
        proj(frames, [1, 2, 3])
    with pytest.raises(ValueError, match=r"split_sizes \[2, 5\] must be <= T_max=4"):
        proj(frames, [2, 5])
    with pytest.raises(ValueError, match="split_sizes must be >= 1 for every sample"):
        proj(frames, [0, 2])
