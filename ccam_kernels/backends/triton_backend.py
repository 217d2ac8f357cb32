"""The "triton" backend: the Triton kernels as PyTorch custom ops.

``ccam_kernels::triton_attention`` (forward: out and the per-row log-sum-exp) and
``ccam_kernels::triton_attention_backward`` are registered with ``torch.library.custom_op``,
with fake (meta) implementations and an autograd formula, so torch.compile traces through
them without a graph break. Frame counts travel as a list of ints: the ops' inputs describe
the whole mask. CUDA graphs: capture after one eager call with the same head dim, dtype and
frame counts (it builds the small per-batch plan tensors and runs Triton's autotuning, neither
of which may happen during a capture); torch.compile's reduce-overhead mode warms up so.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Optional

import torch

from ..checks import AttentionProblem

_TRITON = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unusable() -> Optional[str]:
    if not _TRITON:
        return "triton is not installed (pip install triton; Linux x86_64 wheels)"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA device (the Triton kernels run on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1)"
    return None


def devices() -> tuple:
    """Devices of the tensors it takes: CUDA, and CPU under Triton's interpreter (tests)."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def refuses_inputs(q: torch.Tensor, problem: AttentionProblem) -> Optional[str]:
    d = problem.head_dim
    if d % 8 or not 16 <= d <= 128:
        return f"it supports head dims that are multiples of 8 from 16 to 128, got {d}"
    return None


def refuses_dtype_on(device_type: str, dtype: torch.dtype) -> Optional[str]:
    if device_type == "cpu" and dtype == torch.bfloat16:
        # Seen with triton 3.9: the interpreter's tl.dot on bfloat16 returns garbage.
        return "Triton's CPU interpreter computes bfloat16 dots wrong; run bfloat16 on a GPU"
    return None


def _kernels():
    from . import triton_kernels  # imported on first use: importing triton costs ~1 s

    return triton_kernels


def _on_device(x: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


@torch.library.custom_op("ccam_kernels::triton_attention", mutates_args=())
def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_counts: list[int],
                     tokens_per_frame: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, H, D) in q's dtype, lse (B, H, N) float32 (natural log)."""
    with _on_device(q):
        return _kernels().forward(q, k, v, tuple(frame_counts), tokens_per_frame, scale)


@triton_attention.register_fake
def _(q, k, v, frame_counts, tokens_per_frame, scale):
    n, h, d = q.shape[-3:]
    b = len(frame_counts)
    return q.new_empty(b, n, h, d), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("ccam_kernels::triton_attention_backward", mutates_args=())
def triton_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              out: torch.Tensor, lse: torch.Tensor, frame_counts: list[int],
                              tokens_per_frame: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped like q, k, v."""
    with _on_device(q):
        return _kernels().backward(dout, q, k, v, out, lse, tuple(frame_counts), tokens_per_frame, scale)


@triton_attention_backward.register_fake
def _(dout, q, k, v, out, lse, frame_counts, tokens_per_frame, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, frame_counts, tokens_per_frame, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (list(frame_counts), tokens_per_frame, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = triton_attention_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
    return dq, dk, dv, None, None, None


triton_attention.register_autograd(_backward, setup_context=_setup_context)


def ccam_attention_triton(q, k, v, problem: AttentionProblem) -> torch.Tensor:
    out, _ = triton_attention(q, k, v, list(problem.frame_counts), problem.tokens_per_frame, float(problem.scale))
    return out
