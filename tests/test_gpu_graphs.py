"""CUDA graphs with the kernel backends (issue 21, item 9): a training step captured by hand
with torch.cuda.graph and replayed on new inputs, and torch.compile(mode="reduce-overhead"),
over three frame-count lists, two of them with the same shapes (only the values differ: a graph
that replayed the frame counts of its capture would give wrong numbers, and these tests see it).

Marked ``gpu``: skipped where torch sees no CUDA device (conftest), collected everywhere. Until
a GPU runs them, what docs/modes.md says about CUDA graphs is untested on hardware.
"""

import os

import pytest
import torch
from torch._dynamo.utils import counters

from ccam_kernels import CCAMConfig, CCAMProjector, ccam_attention
from ccam_kernels.attention import BACKENDS
from conftest import rel_err

pytestmark = pytest.mark.gpu

# Frame-count lists: the first two have the same batch and key count (the same shapes).
LISTS = ([2, 3], [4, 1], [1, 1, 3])
N, H, HKV, D, P = 70, 4, 2, 64, 9  # two query tiles of 64 rows, GQA
DTYPES = [torch.float16, torch.bfloat16]


def _require(backend):
    """triton must run on a GPU; cuda needs its built extension (required in the GPU suite)."""
    why = BACKENDS[backend].why_unusable()
    if why is None:
        return
    if backend == "cuda" and os.environ.get("CCAM_REQUIRE_CUDA_BACKEND") != "1":
        pytest.skip(f"cuda backend unusable: {why}")
    pytest.fail(f"backend {backend!r} unusable on this GPU: {why}")


def _inputs(counts, dtype):
    L = sum(counts) * P
    q = torch.randn(N, H, D, device="cuda", dtype=dtype)
    k = torch.randn(L, HKV, D, device="cuda", dtype=dtype)
    v = torch.randn(L, HKV, D, device="cuda", dtype=dtype)
    dout = torch.randn(len(counts), N, H, D, device="cuda", dtype=dtype)
    return q, k, v, dout


def _step(q, k, v, dout, counts, backend):
    """A training step's attention: output and the gradients of q, k and v."""
    out = ccam_attention(q, k, v, counts, P, backend=backend)
    return (out, *torch.autograd.grad(out, (q, k, v), dout))


def _capture(fn):
    """Warm fn up on a side stream (Triton's autotuning and the plan tensors happen there, as
    the docs ask: neither may happen during a capture), then capture it: (graph, its outputs)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_captured_training_step_replays_new_inputs(backend, dtype):
    """One graph per frame-count list; replays interleaved, each on new values copied into the
    captured inputs, equal bit for bit to an eager step on those values (the kernels are
    deterministic; the eager step against the float64 formula: test_gpu.py, test_triton.py)."""
    _require(backend)
    graphs = []
    for counts in LISTS:
        static = [x.requires_grad_(i < 3) for i, x in enumerate(_inputs(counts, dtype))]
        graph, outputs = _capture(lambda s=static, c=counts: _step(*s, c, backend))
        graphs.append((counts, static, graph, outputs))
    for _ in range(2):
        for counts, static, graph, outputs in graphs:
            fresh = _inputs(counts, dtype)
            with torch.no_grad():
                for x, y in zip(static, fresh):
                    x.copy_(y)
            graph.replay()
            torch.cuda.synchronize()
            want = _step(*(x.requires_grad_(i < 3) for i, x in enumerate(fresh)), counts, backend)
            for name, got, ref in zip(("out", "dq", "dk", "dv"), outputs, want):
                assert torch.equal(got, ref), f"{backend} {counts} {name}: replay differs from eager"


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_reduce_overhead_compile_follows_new_frame_counts(backend):
    """torch.compile(mode="reduce-overhead") around the op, frame counts as a tensor (the same
    compiled graph for the first two lists): every call, forward and gradients, matches eager.
    The ops are tagged cudagraph_unsafe, so the graphs hold the code around them and the op
    runs outside, reading its frame counts each call; no graph is skipped."""
    _require(backend)
    torch._dynamo.reset()
    counters.clear()

    def f(q, k, v, counts):
        return ccam_attention(q * 0.5, k, v, counts, P, backend=backend).mul(3.0)

    compiled = torch.compile(f, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        for counts in LISTS:
            q, k, v, dout = (x.requires_grad_(i < 3) for i, x in enumerate(_inputs(counts, torch.float16)))
            got = compiled(q, k, v, torch.tensor(counts))
            got_grads = torch.autograd.grad(got, (q, k, v), dout)
            want = f(q, k, v, torch.tensor(counts))
            want_grads = torch.autograd.grad(want, (q, k, v), dout)
            assert rel_err(got, want) <= 1e-3, (backend, counts)
            for name, g, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
                assert rel_err(g, w) <= 1e-3, (backend, counts, name)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_reduce_overhead_projector_follows_new_split_sizes(backend):
    """The GQA projector in float16, eval, compiled with mode="reduce-overhead": three split-size
    lists (as tensors), each called three times, equal to the eager module within float16 noise."""
    _require(backend)
    torch._dynamo.reset()
    cfg = CCAMConfig(num_query=N, hidden_size=H * D, cross_hidden_size=96, num_heads=H, num_key_value_heads=HKV,
                     intermediate_size=192, output_size=80)
    proj = CCAMProjector(cfg, backend=backend).cuda().half().eval()
    compiled = torch.compile(proj, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            for sizes in LISTS:
                x = torch.randn(sum(sizes), P, 96, device="cuda", dtype=torch.float16)
                got = compiled(x, torch.tensor(sizes)).clone()  # (a graph's output is reused by its next replay)
                assert rel_err(got, proj(x, sizes)) <= 2e-3, (backend, sizes)
