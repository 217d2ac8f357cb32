"""Cases and checks shared by the kernel backends' tests (test_triton.py, test_cuda.py): the
same shapes, the same float64 oracle, forward and every gradient."""

import pytest
import torch

from ccam_kernels import ccam_attention
from conftest import rel_err
from oracle import attention_oracle, oracle_visibility

# (N, H, Hkv, D, frame counts, P, shared q)
CASES = [
    pytest.param(37, 4, 2, 16, (5, 3, 9), 7, True, id="ragged-gqa-shared"),
    pytest.param(37, 4, 2, 16, (5, 3, 9), 7, False, id="ragged-gqa-batched"),
    pytest.param(20, 2, 2, 24, (3,), 5, True, id="T-not-dividing-N-D24"),
    pytest.param(16, 2, 1, 40, (23, 2), 3, True, id="T-greater-than-N-D40"),
    pytest.param(33, 3, 3, 64, (1, 1), 4, False, id="T1"),
    pytest.param(64, 2, 2, 32, (6, 11), 13, True, id="several-tiles"),
]


def make_inputs(N, H, Hkv, D, counts, P, shared, dtype, device, scale_q=1.0):
    """Fresh random q (shared (N, H, D) or batched), packed k/v, and an upstream gradient."""
    L, B = sum(counts) * P, len(counts)
    q = torch.randn(*(() if shared else (B,)), N, H, D) * scale_q
    k, v = torch.randn(L, Hkv, D), torch.randn(L, Hkv, D)
    dout = torch.randn(B, N, H, D)
    return [x.to(device, dtype) for x in (q, k, v, dout)]


def check_against_oracle(backend, q, k, v, dout, counts, P, dtype, tol, scale=None):
    """Output within tol and dq/dk/dv within 2*tol of the float64 oracle (relative norms)."""
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = ccam_attention(q, k, v, counts, P, scale=scale, backend=backend)
    assert out.dtype == dtype and out.shape == (len(counts), *q.shape[-3:])
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = attention_oracle(q64, k64, v64, counts, P, scale=scale)
    want.backward(dout.double())
    assert rel_err(out, want) <= tol
    for name, got, ref in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.shape == ref.shape and got.dtype == dtype, name
        assert rel_err(got, ref) <= 2 * tol, name


def check_deterministic(backend, q, k, v, dout, counts, P):
    """Two backward passes on the same inputs give bitwise-equal gradients."""
    grads = []
    for _ in range(2):
        x = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        ccam_attention(*x, counts, P, backend=backend).backward(dout)
        grads.append([t.grad for t in x])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def check_lse(lse, q, k, counts, P, scale, tol):
    """A forward op's saved LSE (B, H, N), for a shared q and one kv head, is the natural-log
    log-sum-exp of each row's visible scaled scores (visibility from the oracle's rule)."""
    N = q.shape[0]
    offs = 0
    for b, t in enumerate(counts):
        s = torch.einsum("nhd,ld->hnl", q.double(), k[offs:offs + t * P, 0].double()) * scale
        visible = oracle_visibility(N, t, P).to(s.device)
        s = s.masked_fill(~visible[None], float("-inf"))
        assert (lse[b].double() - torch.logsumexp(s, -1)).abs().max() < tol
        offs += t * P


# -- attention dropout (docs/reference.md §3.1.1) ------------------------------------------

# (N, H, Hkv, D, frame counts, P, shared q): ragged GQA batched, T > N shared. Small: the
# Triton interpreter evaluates Philox op by op.
DROPOUT_CASES = [
    pytest.param(21, 4, 2, 16, (5, 2), 5, False, id="ragged-gqa-batched"),
    pytest.param(16, 2, 1, 40, (19, 1), 2, True, id="T-greater-than-N-D40"),
]
DROPOUT_SPLIT_CASE = (21, 2, 1, 16, (5, 2, 7), 5, False)


def run_seeded(backend, q, k, v, counts, P, p, seed, scale=None):
    """``backend``'s op with an explicit dropout seed (ccam_attention draws one per call)."""
    from ccam_kernels.attention import resolve_backend
    from ccam_kernels.checks import check_attention_args

    problem = check_attention_args(q, k, v, list(counts), P, scale, p)
    return resolve_backend(backend, q, problem).run(q, k, v, problem,
                                                    seed=torch.tensor(seed, dtype=torch.int64, device=q.device))


def check_dropout_against_reference(backend, q, k, v, dout, counts, P, dtype, tol, p=0.3):
    """Output and dq/dk/dv with dropout on, against autograd through the float64 reference
    backend with the same seed (the same mask, a function of position); p = 0 is bitwise the
    no-dropout call."""
    seed = int(torch.randint(0, 2**62, ()))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = run_seeded(backend, q, k, v, counts, P, p, seed)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    want = run_seeded("reference", q64, k64, v64, counts, P, p, seed)
    refs = torch.autograd.grad(want, (q64, k64, v64), dout.cpu().double())
    assert rel_err(out.cpu(), want) <= tol
    for name, g, r in zip(("dq", "dk", "dv"), grads, refs):
        assert g.dtype == dtype and rel_err(g.cpu(), r) <= 2 * tol, name
    plain = ccam_attention(q, k, v, list(counts), P, backend=backend)
    assert rel_err(out, plain) > 0.05, "dropout must change the output"
    with torch.no_grad():
        assert torch.equal(run_seeded(backend, q, k, v, counts, P, 0.0, seed), plain)


def check_dropout_partials_merge(backend, q, k, v, counts, P, dtype, tol, p=0.3):
    """Partials of a frame split with one seed merge into the one-call dropped attention."""
    from ccam_kernels.long_video.partial import ccam_partial_attention, merge_partials

    seed = int(torch.randint(0, 2**62, ()))
    full = run_seeded(backend, q, k, v, counts, P, p, seed)
    cuts = [t // 2 for t in counts]
    starts = [0]
    for t in counts:
        starts.append(starts[-1] + t * P)
    parts = []
    for ranges in ([(0, c) for c in cuts], [(c, t) for c, t in zip(cuts, counts)]):
        idx = torch.cat([torch.arange(starts[b] + f0 * P, starts[b] + f1 * P) for b, (f0, f1) in enumerate(ranges)])
        idx = idx.to(k.device)
        parts.append(ccam_partial_attention(q, k[idx], v[idx], counts, P, ranges, dropout_p=p, seed=seed,
                                            backend=backend))
    merged, _ = merge_partials(parts)
    assert rel_err(merged, full.float()) <= tol


def check_dropout_with_splits_and_partials(backend, q, k, v, dout, dtype, tolerance, monkeypatch):
    """Split-KV programs and frame windows draw the same mask as one program (keys counted from
    the video's start): forced splits against the reference, then partials merged."""
    from ccam_kernels.backends import tiling

    counts, P = DROPOUT_SPLIT_CASE[4:6]
    monkeypatch.setattr(tiling, "FORCE_SPLITS", 3)
    check_dropout_against_reference(backend, q, k, v, dout, counts, P, dtype, tolerance)
    monkeypatch.setattr(tiling, "FORCE_SPLITS", None)
    check_dropout_partials_merge(backend, q, k, v, counts, P, dtype, tolerance)
