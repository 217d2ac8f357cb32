"""Shared checks of a kernel backend's partial attention ("triton", "cuda") against float64
oracles (tests/test_triton_partial.py, tests/test_cuda_partial.py): random covers of [0, T)
whose merged partials must give the one-shot op, output and the gradients of q, k and v; one
partial against the dense formula; the LSE's gradient; windows with no key; the
streaming projector against the one-shot one."""

from __future__ import annotations

import random

import torch

from ccam_kernels.long_video import ccam_partial_attention, merge_partials
from conftest import rel_err
from oracle import attention_oracle
from long_video_helpers import features, make_projector, stream_in_random_chunks
from test_long_video_partial import check_partial_matches, dense_partial, keys_of_ranges


def kernel_inputs(N, H, Hkv, D, P, counts, dtype, shared, logit_scale=1.0, device="cpu"):
    """Fresh random q (shared (N, H, D) or (B, N, H, D)) and packed whole-video k, v."""
    B, L = len(counts), sum(counts) * P
    q = torch.randn(*(() if shared else (B,)), N, H, D) * logit_scale
    k, v = torch.randn(L, Hkv, D), torch.randn(L, Hkv, D)
    return [x.to(device, dtype) for x in (q, k, v)]


def random_cover(total: int, rng: random.Random, max_cuts: int = 3) -> list[tuple[int, int]]:
    """Consecutive ranges covering [0, total): a few random cut points (empty ranges and
    one-frame chunks likely at these sizes). Few, because every range is a kernel launch."""
    cuts = sorted(rng.randint(0, total) for _ in range(rng.randint(0, max_cuts)))
    edges = [0, *cuts, total]
    return list(zip(edges[:-1], edges[1:]))


def merged_cover(q, k, v, counts, P, covers, backend):
    """Merge the ``backend`` partials of per-sample covers (padded with empty ranges); each
    partial is float32 on q's device."""
    partials = []
    for r in range(max(len(c) for c in covers)):
        ranges = [c[r] if r < len(c) else (t, t) for c, t in zip(covers, counts)]
        out, lse = ccam_partial_attention(q, keys_of_ranges(k, counts, P, ranges), keys_of_ranges(v, counts, P, ranges),
                                          counts, P, ranges, backend=backend)
        assert out.dtype == lse.dtype == torch.float32 and out.device == q.device
        partials.append((out, lse))
    return merge_partials(partials)


def check_cover(q, k, v, counts, P, covers, tol, backend):
    """Merged output within tol and dq, dk, dv within 2 tol of the float64 oracle."""
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = merged_cover(q, k, v, counts, P, covers, backend)
    assert torch.isfinite(lse).all()  # every query sees frame 0, so the merged LSE is finite
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = attention_oracle(q64, k64, v64, counts, P)
    assert rel_err(out, want) <= tol, covers
    dout = torch.randn(want.shape, device=q.device)
    got = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    for name, g, r in zip("qkv", got, ref):
        assert g.dtype == q.dtype and g.shape == r.shape, name
        assert rel_err(g, r) <= 2 * tol, (name, covers, rel_err(g, r))


def check_single_partial(backend, dtype, tol, device):
    """One partial against the dense formula: rows before the window see nothing (out 0, LSE
    -inf), an empty window, a whole video; float32 outputs."""
    N, H, Hkv, D, P, counts = 13, 4, 2, 16, 3, (9, 4, 20)
    ranges = [(3, 7), (0, 4), (12, 12)]  # a middle range, a whole video, an empty range
    q, k, v = kernel_inputs(N, H, Hkv, D, P, counts, dtype, shared=False, device=device)
    kr, vr = keys_of_ranges(k, counts, P, ranges), keys_of_ranges(v, counts, P, ranges)
    out, lse = ccam_partial_attention(q, kr, vr, counts, P, ranges, backend=backend)
    out, lse = out.cpu(), lse.cpu()
    want_out, want_lse = dense_partial(q.cpu(), k.cpu(), v.cpu(), counts, P, ranges)
    assert out.shape == (3, N, H, D) and lse.shape == (3, H, N)
    assert out.dtype == lse.dtype == torch.float32
    check_partial_matches(out, lse, want_out, want_lse, tol)


def check_lse_gradients(backend, dtype, tol, device, shape):
    """Gradients arriving on the output *and* the LSE (as the merges send them) against float64
    autograd through the reference backend, with rows that see nothing; returns the relative
    error of dq when the LSE's gradient is left out (the caller checks it is far off)."""
    N, H, Hkv, D, P, counts, ranges = shape
    q, k, v = kernel_inputs(N, H, Hkv, D, P, counts, dtype, shared=True, device=device)
    kr, vr = keys_of_ranges(k, counts, P, ranges), keys_of_ranges(v, counts, P, ranges)
    leaves = [x.detach().requires_grad_() for x in (q, kr, vr)]
    leaves64 = [x.detach().double().requires_grad_() for x in (q, kr, vr)]
    out, lse = ccam_partial_attention(*leaves, counts, P, ranges, backend=backend)
    want_out, want_lse = ccam_partial_attention(*leaves64, counts, P, ranges, backend="reference")
    seen = torch.isfinite(want_lse)
    assert not seen.all()
    dout, dlse = torch.randn(want_out.shape, device=q.device), torch.randn(want_lse.shape, device=q.device)
    (no_lse,) = torch.autograd.grad(out, leaves[0], dout, retain_graph=True)
    got = torch.autograd.grad((out, torch.where(seen, lse, 0.0)), leaves, (dout, dlse))
    want = torch.autograd.grad((want_out, torch.where(seen, want_lse, 0.0)), leaves64, (dout.double(), dlse.double()))
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all() and rel_err(g, w) <= 2 * tol, (name, rel_err(g, w))
    return rel_err(no_lse, want[0])


def check_every_window_empty(backend, dtype, device):
    """No keys at all (a frame-parallel rank without frames): out 0, LSE -inf, zero gradients."""
    q, k, v = kernel_inputs(9, 2, 1, 16, 4, (3, 5), dtype, shared=False, device=device)
    q, k, v = q.requires_grad_(), k[:0].requires_grad_(), v[:0].requires_grad_()
    out, lse = ccam_partial_attention(q, k, v, (3, 5), 4, [(3, 3), (0, 0)], backend=backend)
    assert (out == 0).all() and torch.isneginf(lse).all()
    dq, dk, dv = torch.autograd.grad((out * 2).sum(), (q, k, v))
    assert (dq == 0).all() and dk.shape == k.shape and dv.shape == v.shape


def check_stream(backend, dtype, total, seed, tol, device):
    """proj.stream() on a ``backend`` projector (head dim 16): the one-shot projector's output
    within tol, and as close to the float64 module as the one-shot is."""
    rng = random.Random(seed)
    ref = make_projector(backend="reference", dtype=torch.float64, seed=seed, hidden_size=64).eval()
    proj = make_projector(backend=backend, dtype=torch.float64, seed=seed, hidden_size=64).to(device, dtype).eval()
    x64 = features(total, 3, dtype=torch.float64, seed=seed + 1)
    x = x64.to(device, dtype)
    with torch.no_grad():
        want64 = ref(x64, [total])
        one_shot = proj(x, [total])
    got = stream_in_random_chunks(proj, x, rng, most=3)
    assert got.shape == one_shot.shape and got.dtype == dtype and got.device == x.device
    assert rel_err(got, one_shot) <= tol
    assert rel_err(got, want64) <= max(tol, 2 * rel_err(one_shot, want64))
