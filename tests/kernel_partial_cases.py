"""Shared checks of a kernel backend's partial attention ("triton", "cuda") against float64
oracles: random covers of [0, T) whose merged partials must give the one-shot op, output and
the gradients of q, k and v (tests/test_triton_partial.py, tests/test_cuda_partial.py)."""

from __future__ import annotations

import random

import torch

from ccam_kernels.long_video import ccam_partial_attention, merge_partials
from conftest import rel_err
from oracle import attention_oracle
from test_long_video_partial import keys_of_ranges


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
