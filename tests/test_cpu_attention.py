"""The torch backend's native CPU forward (csrc/cpu/attention_forward.cpp via
ccam_kernels/backends/cpu_attention.py): float32 output and LSE against a float64 evaluation,
the shapes that exercise its frame groups, pieces and row suffixes, thread-count independence,
and that "auto" runs it. Gradients of the forward it feeds are in test_ccam_attention.py (the
"torch" rows run it for float32), NaN and inf in test_nan_rule.py."""

from __future__ import annotations

import math

import pytest
import torch

from ccam_kernels import ccam_attention
from ccam_kernels.backends import cpu_attention
from ccam_kernels.backends.torch_prefix import ccam_attention_torch
from ccam_kernels.checks import check_attention_args

from conftest import rel_err
from oracle import oracle_visibility

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="no native CPU build here (no C++ compiler): the torch engines run instead")


def oracle_out_lse(q, k, v, counts, P, scale):
    """(out (B, N, H, D), lse (B, H, N)) in float64, written from docs/reference.md §3.1."""
    q64, k64, v64 = q.double(), k.double(), v.double()
    N, H, D = q64.shape[-3:]
    kv_head = torch.arange(H) // (H // k64.shape[1])
    outs, lses, start = [], [], 0
    for b, t in enumerate(counts):
        kb, vb = (x[start:start + t * P][:, kv_head] for x in (k64, v64))
        start += t * P
        qb = q64 if q64.dim() == 3 else q64[b]
        s = torch.einsum("nhd,lhd->hnl", qb, kb) * scale
        s = s.masked_fill(~oracle_visibility(N, t, P), float("-inf"))
        lse = torch.logsumexp(s, -1)
        outs.append(torch.einsum("hnl,lhd->nhd", torch.exp(s - lse[..., None]), vb))
        lses.append(lse)
    return torch.stack(outs), torch.stack(lses)


# (N, P, frame counts, H, Hkv, D): the native forward's structure, each case a different part
CASES = [
    (37, 7, (5, 3, 9), 4, 2, 16),   # frame groups with straddling rows, GQA, ragged
    (130, 33, (1,), 2, 2, 64),      # T = 1, more rows than one row block (128)
    (300, 90, (16, 5), 2, 1, 32),   # groups of 11 frames, several row blocks, MQA
    (16, 3, (40, 3), 1, 1, 16),     # T > N: frames no query sees, frames sharing a row suffix
    (20, 1100, (2,), 1, 1, 8),      # a frame longer than a chunk: cut into equal pieces
    (1, 5, (4, 1), 2, 2, 24),       # N = 1
    (29, 21, (3,), 2, 2, 20),       # D not a multiple of 8 (the transposes' tail)
]


@pytest.mark.parametrize("blas", [False, True], ids=["own_kernels", "blas"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared_q", "batched_q"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_native_forward_matches_float64(case, shared, blas):
    """Both product paths: the library's AVX2 kernels (where compiled: -march=native here) and
    torch's BLAS (the path of CPUs without AVX2)."""
    N, P, counts, H, Hkv, D = case
    B = len(counts)
    q = torch.randn((N, H, D) if shared else (B, N, H, D))
    k, v = torch.randn(sum(counts) * P, Hkv, D), torch.randn(sum(counts) * P, Hkv, D)
    scale = 0.7 / math.sqrt(D)
    out, lse = cpu_attention.forward(q, k, v, counts, P, scale, blas=blas)
    ref, ref_lse = oracle_out_lse(q, k, v, counts, P, scale)
    assert out.shape == (B, N, H, D) and lse.shape == (B, H, N)
    assert rel_err(out, ref) <= 1e-5
    assert (lse.double() - ref_lse).abs().max() <= 1e-5 * ref_lse.abs().max()


@pytest.mark.parametrize("blas", [False, True], ids=["own_kernels", "blas"])
def test_result_does_not_depend_on_thread_count(blas):
    """Each (sample, head) runs whole on one thread: 1 and 2 threads give the same bits."""
    counts, P, N, H = (7, 2, 5), 40, 150, 4
    q, k, v = torch.randn(N, H, 32), torch.randn(sum(counts) * P, H, 32), torch.randn(sum(counts) * P, H, 32)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(cpu_attention.forward(q, k, v, counts, P, 0.125, blas=blas))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_auto_runs_the_native_forward_for_float32(monkeypatch):
    calls = []
    real = cpu_attention.forward
    monkeypatch.setattr(cpu_attention, "forward", lambda *a: calls.append(a[0].dtype) or real(*a))
    q, k, v = torch.randn(9, 2, 16), torch.randn(12, 2, 16), torch.randn(12, 2, 16)
    ccam_attention(q, k, v, [4], 3, backend="torch")
    ccam_attention(q.double(), k.double(), v.double(), [4], 3, backend="torch")
    assert calls == [torch.float32]  # float64 stays on the exact torch engines


def test_native_variant_refuses_what_it_cannot_run():
    q, k, v = torch.randn(9, 2, 16).double(), torch.randn(12, 2, 16).double(), torch.randn(12, 2, 16).double()
    problem = check_attention_args(q, k, v, [4], 3)
    with pytest.raises(RuntimeError, match="engine 'native' cannot run"):
        ccam_attention_torch(q, k, v, problem, variant="native")
