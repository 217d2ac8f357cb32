"""torch.library.opcheck over every custom op of the library (issue 21, item 6): the forward
and backward op of each backend (attention_ops.define_attention_ops: reference, torch, triton,
cuda), the partial-attention ops (partial_ops.define_partial_ops: triton, cuda) and the cuda
extension's three launch ops (ccam_kernels::layernorm_kv: test_triton_projection*.py).

opcheck runs each op for real and on fake tensors and compares them (shapes, dtypes, strides:
what torch.compile trusts), checks that no output aliases an input or another output and that
the autograd formula is registered; on one case per op (test_aot_dispatch_dynamic, ~1 s) it
also runs it under AOTAutograd with dynamic shapes, gradients included. Before issue 21 these
checks failed on: the torch backend's LSE with one K/V head (strides), the reference backend's
acc in 16-bit, the torch backend's acc in float32 (the output itself, aliased).

Grid: every head layout (Hkv = 1, Hkv = H, GQA), every dtype the backend takes, keep_acc off
and on, shared and batched q, one and two videos, covered without the full product (``_grid``
cycles the smaller axes along dtype x keep_acc, so each value of each axis occurs). The triton
ops run in Triton's CPU interpreter without a GPU (float32 and float16: the interpreter computes
bfloat16 dots wrong), the cuda ops on the emulation build (CCAM_CUDA_EMULATE=1); on a GPU both
run on the device, bfloat16 included. Shapes are tiny: opcheck runs each op several times.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ccam_kernels.backends import cuda_backend, tiling, triton_backend
from ccam_kernels.backends.reference import ccam_attention_reference
from ccam_kernels.backends.torch_prefix import ccam_attention_torch
from conftest import CUDA, TRITON_DEVICE, TRITON_DTYPES, require_cuda_backend
from test_long_video_partial import keys_of_ranges

FAST = ("test_schema", "test_autograd_registration", "test_faketensor")
ALL = FAST + ("test_aot_dispatch_dynamic",)  # the slow one (~1 s a case): one case per op
LAYOUTS = {"Hkv1": (4, 1), "HkvH": (2, 2), "GQA": (4, 2)}  # id -> (H, Hkv)
VIDEOS = [(2, 1), (3,)]  # frame counts: two videos of 2 and 1 frames; one video (B = 1), T = 3
N, D, P = 5, 16, 2
CUDA_DEVICE = "cuda" if CUDA else "cpu"
CUDA_DTYPES = [torch.float16, torch.bfloat16]
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _utils(dtype, keep_acc):
    """All checks on the case that a compiled 16-bit training step runs (float16, keep_acc),
    the fast ones elsewhere (they are what found the stride, acc and aliasing mismatches)."""
    return ALL if keep_acc and dtype == torch.float16 else FAST


def _grid(dtypes, variants=("",)):
    """Cases (dtype, layout, keep_acc, shared q, frame counts, variant): dtype x keep_acc in full,
    the other axes cycled along it, so that every value of every axis occurs at least once."""
    cases = []
    for i, (dtype, keep_acc) in enumerate(itertools.product(dtypes, (False, True))):
        layout = list(LAYOUTS)[i % len(LAYOUTS)]
        shared, counts, variant = (i // 2) % 2 == 1, VIDEOS[(i // 3) % 2], variants[i % len(variants)]
        name = (f"{str(dtype)[6:]}-{layout}-{'acc' if keep_acc else 'noacc'}-"
                f"{'shared' if shared else 'batched'}-B{len(counts)}")
        cases.append(pytest.param(dtype, LAYOUTS[layout], keep_acc, shared, counts, variant,
                                  id=name + (f"-{variant}" if variant else "")))
    return cases


def _inputs(dtype, layout, shared, counts, device):
    (H, Hkv), B, L = layout, len(counts), sum(counts) * P
    q = torch.randn(*(() if shared else (B,)), N, H, D)
    k, v = torch.randn(L, Hkv, D), torch.randn(L, Hkv, D)
    return [x.to(device, dtype) for x in (q, k, v)]


def _cuda_here(monkeypatch):
    require_cuda_backend(monkeypatch)


def check_attention_ops(run, dtype, layout, keep_acc, shared, counts, variant, device, *, dropout_p=0.0,
                        utils=ALL):
    """opcheck of a backend's forward op (inputs that require grad: its autograd formula too)
    and of its backward op, fed the forward's own outputs."""
    q, k, v = _inputs(dtype, layout, shared, counts, device)
    frame_counts = torch.tensor(counts)
    seed = torch.tensor(1234) if dropout_p else None
    args = (frame_counts, P, 0.25, dropout_p, seed, keep_acc, variant)
    torch.library.opcheck(run.op, (*(x.requires_grad_() for x in (q, k, v)), *args), test_utils=utils)
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse, acc = run.op(q, k, v, *args)
    assert out.shape == (len(counts), N, *layout[:1], D) and acc.numel() == (out.numel() if keep_acc else 0)
    dout = torch.randn_like(out)
    o = acc if keep_acc else out
    torch.library.opcheck(run.backward_op, (dout, q, k, v, o, lse, frame_counts, P, 0.25, dropout_p, seed, variant),
                          test_utils=utils)


@pytest.mark.parametrize("dtype,layout,keep_acc,shared,counts,variant", _grid(ALL_DTYPES))
def test_reference_ops(dtype, layout, keep_acc, shared, counts, variant):
    dropout_p = 0.3 if shared else 0.0  # with dropout: its seed is an op input
    check_attention_ops(ccam_attention_reference, dtype, layout, keep_acc, shared, counts, variant, "cpu",
                        dropout_p=dropout_p, utils=_utils(dtype, keep_acc))


@pytest.mark.parametrize("dtype,layout,keep_acc,shared,counts,variant",
                         _grid(ALL_DTYPES, variants=("", "explicit", "flash")))
def test_torch_ops(dtype, layout, keep_acc, shared, counts, variant):
    dropout_p = 0.3 if shared and variant != "flash" else 0.0  # (the fused CPU kernel has no dropout)
    check_attention_ops(ccam_attention_torch, dtype, layout, keep_acc, shared, counts, variant, "cpu",
                        dropout_p=dropout_p, utils=_utils(dtype, keep_acc))


@pytest.mark.parametrize("dtype,layout,keep_acc,shared,counts,variant", _grid(TRITON_DTYPES))
def test_triton_ops(dtype, layout, keep_acc, shared, counts, variant):
    pytest.importorskip("triton", reason="triton is not installed")
    check_attention_ops(triton_backend.ccam_attention_triton, dtype, layout, keep_acc, shared, counts, variant,
                        TRITON_DEVICE, utils=_utils(dtype, keep_acc))


@pytest.mark.parametrize("dtype,layout,keep_acc,shared,counts,variant", _grid(CUDA_DTYPES))
def test_cuda_ops(dtype, layout, keep_acc, shared, counts, variant, monkeypatch):
    _cuda_here(monkeypatch)
    check_attention_ops(cuda_backend.ccam_attention_cuda, dtype, layout, keep_acc, shared, counts, variant,
                        CUDA_DEVICE, utils=_utils(dtype, keep_acc))


# Partial attention: frames [f0_b, f1_b) of each video; a window with no key at all included.
WINDOWS = {(2, 1): [(1, 2), (0, 1)], (3,): [(0, 2)]}
EMPTY_WINDOWS = {(2, 1): [(1, 2), (1, 1)], (3,): [(3, 3)]}


def check_partial_ops(run, dtype, layout, shared, counts, windows, device, utils):
    """opcheck of a partial op (gradients of out and LSE) and of its backward op."""
    q, k, v = _inputs(dtype, layout, shared, counts, device)
    k, v = (keys_of_ranges(x, counts, P, windows) for x in (k, v))
    args = (torch.tensor(counts), torch.tensor(windows).reshape(-1, 2), P, 0.25)
    torch.library.opcheck(run.op, (*(x.requires_grad_() for x in (q, k, v)), *args), test_utils=utils)
    q, k, v = (x.detach() for x in (q, k, v))
    out, lse = run.op(q, k, v, *args)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    torch.library.opcheck(run.backward_op, (dout, dlse, q, k, v, out, lse, *args), test_utils=utils)


def _partial_grid(dtypes):
    """(dtype, layout, shared, counts, windows): dtype x {some keys, a window with none} in full."""
    cases = []
    for i, (dtype, empty) in enumerate(itertools.product(dtypes, (False, True))):
        layout = list(LAYOUTS)[i % len(LAYOUTS)]
        shared, counts = (i // 2) % 2 == 1, VIDEOS[(i // 3) % 2]
        windows = (EMPTY_WINDOWS if empty else WINDOWS)[counts]
        cases.append(pytest.param(dtype, LAYOUTS[layout], shared, counts, windows, i,
                                  id=f"{str(dtype)[6:]}-{layout}-{'shared' if shared else 'batched'}-{windows}"))
    return cases


@pytest.mark.parametrize("dtype,layout,shared,counts,windows,i", _partial_grid(TRITON_DTYPES))
def test_triton_partial_ops(dtype, layout, shared, counts, windows, i):
    pytest.importorskip("triton", reason="triton is not installed")
    check_partial_ops(triton_backend.ccam_partial_attention_triton, dtype, layout, shared, counts, windows,
                      TRITON_DEVICE, ALL if i == 0 else FAST)


@pytest.mark.parametrize("dtype,layout,shared,counts,windows,i", _partial_grid(CUDA_DTYPES))
def test_cuda_partial_ops(dtype, layout, shared, counts, windows, i, monkeypatch):
    _cuda_here(monkeypatch)
    check_partial_ops(cuda_backend.ccam_partial_attention_cuda, dtype, layout, shared, counts, windows,
                      CUDA_DEVICE, ALL if i == 0 else FAST)


def test_cuda_launch_ops(monkeypatch):
    """The extension's four launch ops (csrc/ccam_dispatch.h: they write into given outputs,
    declared mutated in their schemas; their fakes return nothing), at one GQA case."""
    _cuda_here(monkeypatch)
    counts, windows = (2, 1), ((0, 2), (0, 1))
    q, k, v = _inputs(torch.float16, LAYOUTS["GQA"], False, counts, CUDA_DEVICE)
    B, H = len(counts), q.shape[-2]
    p = tiling.window_plan(counts, windows, P, cuda_backend.BWD_KEY_TILE, q.device)
    plan = (p.frames, p.key_start, p.first_frame, p.end_frame)
    out = torch.empty(1, B, N, H, D, device=q.device)
    lse = torch.empty(1, B, H, N, device=q.device)
    ops = torch.ops.ccam_kernels
    torch.library.opcheck(ops.cuda_fwd, (q, k, v, *plan, P, 0.25, 1, out, lse), test_utils=ALL)
    dout, delta = torch.randn_like(q), torch.randn(B, H, N, device=q.device)
    lse = lse[0].clone()
    torch.library.opcheck(ops.cuda_bwd_dq, (dout, q, k, v, lse, delta, *plan, P, 0.25,
                                            torch.empty(B, N, H, D, device=q.device)), test_utils=ALL)
    torch.library.opcheck(ops.cuda_bwd_dkdv, (dout, q, k, v, lse, delta, *plan, p.tile_sample, p.tile_start, P, 0.25,
                                              torch.empty_like(k), torch.empty_like(v)), test_utils=ALL)
    parts, lse_parts = torch.randn(3, B, N, H, D, device=q.device), torch.randn(3, B, H, N, device=q.device)
    torch.library.opcheck(ops.cuda_merge, (parts, lse_parts, torch.empty(B, N, H, D, device=q.device, dtype=q.dtype),
                                           torch.empty(B, N, H, D, device=q.device), torch.empty(B, H, N, device=q.device)),
                          test_utils=ALL)
