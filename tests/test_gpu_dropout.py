"""Attention dropout on CUDA tensors (issue 22): the triton and cuda kernels apply the mask of
ccam_kernels.dropout (output and gradients against autograd through the float64 formula with
the same mask), and the per-call seed behaves as PyTorch's fused dropout under CUDA graphs and
torch.compile(mode="reduce-overhead"): new masks on every call / replay, torch.manual_seed
reproduces them.

Marked ``gpu``: skipped where torch sees no CUDA device (conftest), collected everywhere.
"""

import pytest
import torch

from ccam_kernels import ccam_attention
from ccam_kernels.attention import resolve_backend
from ccam_kernels.backends.attention_ops import draw_seed
from ccam_kernels.checks import check_attention_args
from ccam_kernels.dropout import keep_mask
from conftest import rel_err
from oracle import oracle_visibility
from test_gpu_graphs import _capture, _require

pytestmark = pytest.mark.gpu

N, H, HKV, D, P = 70, 4, 2, 64, 9  # two query tiles of 64 rows, GQA
COUNTS = (3, 5, 1)
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(dtype, counts=COUNTS):
    L = sum(counts) * P
    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(N, H, D, device="cuda", dtype=dtype, generator=gen)
    k, v = (torch.randn(L, HKV, D, device="cuda", dtype=dtype, generator=gen) for _ in range(2))
    dout = torch.randn(len(counts), N, H, D, device="cuda", dtype=dtype, generator=gen)
    return q, k, v, dout


def _seeded(backend, q, k, v, counts, p, seed):
    problem = check_attention_args(q, k, v, list(counts), P, None, p)
    return resolve_backend(backend, q, problem).run(q, k, v, problem, seed=seed)


def _formula(q, k, v, counts, p, seed):
    """docs/reference.md 3.1.1 in float64 on the GPU: softmax probabilities times
    keep_mask / (1 - p), every (sample, head, row, key)."""
    q64, k64, v64 = (x.double() for x in (q, k, v))
    kv = torch.arange(H, device="cuda") // (H // HKV)
    outs, start = [], 0
    for b, t in enumerate(counts):
        kb, vb = k64[start:start + t * P][:, kv], v64[start:start + t * P][:, kv]
        start += t * P
        s = torch.einsum("nhd,lhd->hnl", q64, kb) / D**0.5
        probs = torch.softmax(s.masked_fill(~oracle_visibility(N, t, P).cuda(), float("-inf")), -1)
        keep = keep_mask(seed, 0, b, torch.arange(H, device="cuda")[:, None], torch.arange(N, device="cuda")[None],
                         0, t * P, H, p)
        outs.append(torch.einsum("hnl,lhd->nhd", probs * keep.double() / (1 - p), vb))
    return torch.stack(outs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_kernel_dropout_matches_formula_on_gpu(backend, dtype):
    _require(backend)
    q, k, v, dout = _inputs(dtype)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    seed = torch.tensor(2**40 + 7, device="cuda")
    out = _seeded(backend, q, k, v, COUNTS, 0.3, seed)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = _formula(q64, k64, v64, COUNTS, 0.3, seed)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), dout.double())
    assert rel_err(out, want) <= TOLERANCE[dtype], backend
    for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
        assert rel_err(g, w) <= 2 * TOLERANCE[dtype], (backend, name)
    plain = _seeded(backend, q, k, v, COUNTS, 0.0, None)
    assert rel_err(out, plain) > 0.05, "dropout must change the output"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_fresh_masks_per_call_and_manual_seed_reproduces_on_gpu(backend):
    _require(backend)
    q, k, v, _ = _inputs(torch.float16)
    torch.manual_seed(3)
    a, b = (ccam_attention(q, k, v, list(COUNTS), P, dropout_p=0.5, backend=backend) for _ in range(2))
    torch.manual_seed(3)
    assert torch.equal(a, ccam_attention(q, k, v, list(COUNTS), P, dropout_p=0.5, backend=backend))
    assert not torch.equal(a, b)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_seed_drawn_inside_a_cuda_graph_advances_per_replay(backend):
    """A step captured with its seed draw: each replay draws a new seed (the CUDA generator's
    Philox offset advances per replay, as for PyTorch's fused dropout in a graph), and the
    kernels read it: every replay equals an eager step with the seed that replay drew."""
    _require(backend)
    q, k, v, dout = _inputs(torch.float16)
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    def step():
        seed = draw_seed(q.device)
        out = _seeded(backend, q, k, v, COUNTS, 0.2, seed)
        return (seed, out, *torch.autograd.grad(out, (q, k, v), dout))

    graph, outputs = _capture(step)
    seeds = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        seed = outputs[0].clone()
        seeds.append(int(seed))
        out = _seeded(backend, q, k, v, COUNTS, 0.2, seed)
        want = (out, *torch.autograd.grad(out, (q, k, v), dout))
        for name, got, ref in zip(("out", "dq", "dk", "dv"), outputs[1:], want):
            assert torch.equal(got, ref), f"{backend} {name}: replay differs from eager with its seed"
    assert len(set(seeds)) == 3, seeds


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_reduce_overhead_compile_draws_new_masks(backend):
    """torch.compile(mode="reduce-overhead") with dropout: the seed draw is in the graph (its
    CUDA graph replays advance the generator), so calls differ, torch.manual_seed reproduces
    them, and nothing recompiles."""
    _require(backend)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    q, k, v, _ = _inputs(torch.float16)

    def f(q, k, v, counts):
        return ccam_attention(q, k, v, counts, P, dropout_p=0.5, backend=backend)

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    counts = torch.tensor(COUNTS)
    torch.manual_seed(9)
    first = [compiled(q, k, v, counts).clone() for _ in range(3)]
    torch.manual_seed(9)
    again = [compiled(q, k, v, counts).clone() for _ in range(3)]
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert all(torch.equal(x, y) for x, y in zip(first, again))
    assert counters["stats"]["unique_graphs"] == 1
