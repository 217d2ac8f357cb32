"""Partial attention over frame ranges (ccam_kernels.long_video.partial), against float64 oracles.

* merging the partials of a random cover of [0, T) gives the one-shot op (oracle.attention_oracle),
  output and every gradient, for both backends: ragged batches, T not dividing N, T > N, T = 1,
  chunks of one frame, GQA, shared and per-sample q;
* one partial alone (output and LSE, -inf for queries that see nothing) against a dense float64
  formula written here from the mask rule; the torch backend's gradients, arriving on both the
  output and the LSE, against autograd through the reference;
* large logits stay finite; empty ranges; bad arguments and unsupported backends are refused.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from ccam_kernels.long_video import ccam_partial_attention, merge_partials
from conftest import rel_err
from oracle import attention_oracle, oracle_visibility

BACKENDS = ["reference", "torch"]

# (N, H, Hkv, D, P, frame_counts): odd sizes, T not dividing N, T > N, T = 1, GQA.
CASES = [
    (13, 2, 1, 8, 3, (5, 1, 7)),
    (7, 3, 3, 16, 2, (11,)),  # T > N: some frames seen by no query
    (16, 4, 2, 8, 5, (16, 3)),
    (1, 2, 2, 8, 4, (3, 1)),  # one query
    (9, 2, 1, 8, 2, (40,)),  # T > N with blocks of 5 frames: straddling (masked) blocks
]


def random_cover(total: int, rng: random.Random) -> list[tuple[int, int]]:
    """Consecutive ranges covering [0, total): random cut points, some empty, one-frame chunks likely."""
    cuts = sorted(rng.randint(0, total) for _ in range(rng.randint(0, total + 1)))
    edges = [0, *cuts, total]
    return list(zip(edges[:-1], edges[1:]))


def make_inputs(N, H, Hkv, D, P, counts, dtype=torch.float64, shared=True, logit_scale=1.0):
    B = len(counts)
    q = torch.randn(*(() if shared else (B,)), N, H, D, dtype=dtype) * logit_scale
    k = torch.randn(sum(counts) * P, Hkv, D, dtype=dtype)
    v = torch.randn(sum(counts) * P, Hkv, D, dtype=dtype)
    return q, k, v


def keys_of_ranges(x, counts, P, ranges):
    """The rows of packed (L, ...) x that belong to frames [f0_b, f1_b) of each sample."""
    parts, start = [], 0
    for t, (f0, f1) in zip(counts, ranges):
        parts.append(x[start + f0 * P: start + f1 * P])
        start += t * P
    return torch.cat(parts)


def run_cover(q, k, v, counts, P, covers, backend):
    """Merge the partials of per-sample covers (padded with empty ranges to a common length)."""
    rounds = max(len(c) for c in covers)
    partials = []
    for r in range(rounds):
        ranges = [c[r] if r < len(c) else (t, t) for c, t in zip(covers, counts)]
        partials.append(ccam_partial_attention(
            q, keys_of_ranges(k, counts, P, ranges), keys_of_ranges(v, counts, P, ranges),
            counts, P, ranges, backend=backend,
        ))
    return merge_partials(partials)


def dense_partial(q, k, v, counts, P, ranges):
    """Float64 partial oracle from oracle_visibility: (out, lse) over the range columns only."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    N, H, D = q64.shape[-3:]
    G = H // k64.shape[1]
    outs, lses, start = [], [], 0
    for b, (t, (f0, f1)) in enumerate(zip(counts, ranges)):
        qb = q64 if q64.dim() == 3 else q64[b]
        kb = k64[start + f0 * P: start + f1 * P].repeat_interleave(G, 1)
        vb = v64[start + f0 * P: start + f1 * P].repeat_interleave(G, 1)
        start += t * P
        vis = oracle_visibility(N, t, P)[:, f0 * P: f1 * P]
        s = torch.einsum("nhd,lhd->hnl", qb, kb) / math.sqrt(D)
        s = s.masked_fill(~vis, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.nan_to_num(torch.exp(s - lse[..., None]), nan=0.0)
        outs.append(torch.einsum("hnl,lhd->nhd", p, vb))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-H{c[1]}-Hkv{c[2]}-D{c[3]}-P{c[4]}-T{c[5]}")
@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "batched_q"])
def test_merged_cover_equals_one_shot(backend, case, shared, seed):
    N, H, Hkv, D, P, counts = case
    rng = random.Random(seed)
    q, k, v = make_inputs(N, H, Hkv, D, P, counts, shared=shared)
    for x in (q, k, v):
        x.requires_grad_(True)
    covers = [random_cover(t, rng) for t in counts]
    out, lse = run_cover(q, k, v, counts, P, covers, backend)
    ref = attention_oracle(q, k, v, counts, P)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert rel_err(out, ref) <= 1e-12, covers
    assert torch.isfinite(lse).all()  # every query sees frame 0, so the merged LSE is finite
    dout = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for name, g, w in zip("qkv", got, want):
        assert rel_err(g, w) <= 1e-11, (name, covers)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_frame_chunks_large_logits(backend):
    """Chunks of one frame, logits in the thousands: still exact and finite."""
    N, H, Hkv, D, P, counts = 11, 2, 2, 8, 3, (6, 9)
    q, k, v = make_inputs(N, H, Hkv, D, P, counts, shared=False, logit_scale=300.0)
    q.requires_grad_(True)
    covers = [[(f, f + 1) for f in range(t)] for t in counts]
    out, lse = run_cover(q, k, v, counts, P, covers, backend)
    ref = attention_oracle(q, k, v, counts, P)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel_err(out, ref) <= 1e-12
    dout = torch.randn_like(ref)
    (g,) = torch.autograd.grad(out, q, dout)
    (w,) = torch.autograd.grad(ref, q, dout)
    assert torch.isfinite(g).all()
    # Rows this sharp are one-hot to float64 precision: dq = scale * sum_j p_j (dp_j - delta) k_j
    # cancels to almost nothing, so its relative error is unbounded for ANY two summation orders.
    # Bound the error by what the terms weigh before cancelling instead: |dp_j|, |delta| <=
    # |dO_i| max_j |v_j| and sum_j p_j = 1 give |term sum| <= 2 scale |dO_i| max|v| max|k| per row,
    # and float64 rounding of logits in the thousands costs ~1e-15 of that (measured).
    scale = D**-0.5
    gross = 2 * scale * dout.norm(dim=-1) * v.norm(dim=-1).max() * k.norm(dim=-1).max()
    err = (g - w).norm(dim=-1)
    assert (err <= 1e-10 * w.norm(dim=-1) + 1e-13 * gross).all(), (err / gross).max()


def check_partial_matches(out, lse, want_out, want_lse, tol):
    """A partial over the ranges [(3, 7), (0, 4), (12, 12)] against dense_partial: rows that see no
    key are exactly (0, -inf), the rest within tol (the three cases are all exercised)."""
    unseen = torch.isinf(want_lse)
    assert unseen[0].any() and unseen[2].all() and not unseen[1].any()  # the cases are exercised
    assert torch.equal(torch.isneginf(lse), unseen)
    assert (out.transpose(1, 2)[unseen] == 0).all()
    assert rel_err(out, want_out) <= tol
    assert rel_err(lse[~unseen], want_lse[~unseen]) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_single_partial_against_dense_formula(backend, dtype, tol, nan_poison):
    N, H, Hkv, D, P, counts = 13, 4, 2, 16, 3, (9, 4, 20)
    ranges = [(3, 7), (0, 4), (12, 12)]  # a middle range, a whole video, an empty range
    q, k, v = make_inputs(N, H, Hkv, D, P, counts, dtype=dtype, shared=False)
    kr, vr = keys_of_ranges(k, counts, P, ranges), keys_of_ranges(v, counts, P, ranges)
    out, lse = ccam_partial_attention(q, kr, vr, counts, P, ranges, backend=backend)
    want_out, want_lse = dense_partial(q, k, v, counts, P, ranges)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.shape == (3, N, H, D) and lse.shape == (3, H, N) and out.dtype == acc and lse.dtype == acc
    check_partial_matches(out, lse, want_out, want_lse, tol)


def test_torch_gradients_through_output_and_lse():
    """Gradients arriving on both outputs of one partial (the merge sends both), torch backend
    against float64 autograd through the reference backend."""
    N, H, Hkv, D, P, counts = 10, 4, 2, 8, 2, (7, 3)
    ranges = [(2, 6), (0, 3)]
    q, k, v = make_inputs(N, H, Hkv, D, P, counts, shared=True)
    kr, vr = keys_of_ranges(k, counts, P, ranges), keys_of_ranges(v, counts, P, ranges)
    results = {}
    for backend in BACKENDS:
        leaves = [x.clone().requires_grad_(True) for x in (q, kr, vr)]
        out, lse = ccam_partial_attention(*leaves, counts, P, ranges, backend=backend)
        results[backend] = (out, lse, leaves)
    out, lse, _ = results["reference"]
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    seen = torch.isfinite(lse)
    want = torch.autograd.grad((out, torch.where(seen, lse, 0.0)), results["reference"][2], (dout, dlse))
    out_t, lse_t, leaves_t = results["torch"]
    no_lse = torch.autograd.grad(out_t, leaves_t[0], dout, retain_graph=True)[0]
    got = torch.autograd.grad((out_t, torch.where(seen, lse_t, 0.0)), leaves_t, (dout, dlse))
    for name, g, w in zip("qkv", got, want):
        assert torch.isfinite(g).all() and rel_err(g, w) <= 1e-12, name
    # The LSE term matters: without it the gradient differs.
    assert rel_err(no_lse, got[0]) > 1e-3


def test_merge_of_nothing_seen_stays_finite():
    out = torch.zeros(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    lse = torch.full((1, 2, 3), float("-inf"), dtype=torch.float64, requires_grad=True)
    merged, merged_lse = merge_partials([(out, lse), (out, lse)])
    assert (merged == 0).all() and torch.isneginf(merged_lse).all()
    g_out, g_lse = torch.autograd.grad(merged.sum(), (out, lse))
    assert torch.isfinite(g_out).all() and torch.isfinite(g_lse).all()


def _pair(B=1, N=3, H=2, D=4, dtype=torch.float32):
    return torch.randn(B, N, H, D, dtype=dtype), torch.randn(B, H, N, dtype=dtype)


@pytest.mark.parametrize("partials,exc,match", [
    (5, TypeError, "merge_partials needs an iterable of \\(out, lse\\) pairs, got int"),
    (_pair(), TypeError, r"partials\[0\] must be an \(out, lse\) pair of tensors, got Tensor"),  # a pair, not a list
    ([_pair(), _pair()[:1]], TypeError, r"partials\[1\] must be an \(out, lse\) pair of tensors, got tuple of length 1"),
    ([(1.0, 2.0)], TypeError, r"partials\[0\] must be an \(out, lse\) pair of tensors, got tuple of length 2"),
    ([_pair(), torch.randn(2, 3)], TypeError, r"partials\[1\] must be an \(out, lse\) pair of tensors, got Tensor"),
    ([(_pair()[0], _pair()[1].transpose(1, 2))], ValueError, r"partials\[0\] must be out \(B, N, H, D\) and lse \(B, H, N\)"),
    ([(_pair()[0][0], _pair()[1][0])], ValueError, r"partials\[0\] must be out \(B, N, H, D\)"),
    ([_pair(), _pair(N=4)], ValueError, r"every partial must have the shapes of the first, got out \(1, 4, 2, 4\) at partials\[1\]"),
    ([_pair(), _pair(dtype=torch.float64)], ValueError, r"every partial must have the dtypes and device of the first"),
], ids=["int", "one-pair-unwrapped", "short-pair", "floats", "bare-tensor", "lse-transposed", "3-d", "shapes",
        "dtypes"])
def test_merge_partials_checks_its_input(partials, exc, match):
    with pytest.raises(exc, match=match):
        merge_partials(partials)


@pytest.mark.parametrize("backend,exc,match", [
    ("triton", RuntimeError, "cannot run partial attention here: .*float64"),  # runs float32/16-bit only
    ("cuda", RuntimeError, "cannot run partial attention here"),  # no GPU here (and 16-bit only)
    ("nope", ValueError, "backend must be one of"),
])
def test_backend_refusals(backend, exc, match):
    q, k, v = make_inputs(4, 2, 2, 8, 2, (3,))
    with pytest.raises(exc, match=match):
        ccam_partial_attention(q, k, v, (3,), 2, [(0, 3)], backend=backend)


@pytest.mark.parametrize("ranges,match", [
    ([(0, 4)], r"frame_ranges\[0\] must satisfy"),
    ([(2, 1)], r"frame_ranges\[0\] must satisfy"),
    ([(0, 3), (0, 1)], "one \\(first, end\\) pair per sample"),
    ([(0, 2)], "frame_ranges .* = 4 keys, but k and v have L=6"),
])
def test_bad_ranges(ranges, match):
    q, k, v = make_inputs(4, 2, 2, 8, 2, (3,))
    with pytest.raises(ValueError, match=match):
        ccam_partial_attention(q, k, v, (3,), 2, ranges)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_low_precision_cover(dtype, tol, seed):
    """16-bit inputs, torch backend: merged partials within the bound of docs/reference.md §7, or 3x plain PyTorch's
    own error in that precision on the same inputs where that is larger."""
    N, H, Hkv, D, P, counts = 21, 4, 2, 16, 5, (9, 2)
    rng = random.Random(seed)
    q, k, v = make_inputs(N, H, Hkv, D, P, counts, dtype=dtype, shared=False)
    out, lse = run_cover(q, k, v, counts, P, [random_cover(t, rng) for t in counts], "torch")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    ref = attention_oracle(q, k, v, counts, P)
    plain = attention_oracle(q, k, v, counts, P, compute_dtype=dtype)
    assert rel_err(out, ref) <= max(tol, 3 * rel_err(plain, ref))
