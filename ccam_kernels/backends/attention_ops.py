"""The custom-op wrapping shared by the kernel backends (triton, cuda).

``define_attention_ops(name, forward, backward)`` registers ``ccam_kernels::<name>`` (forward:
out and the per-row log-sum-exp) and ``ccam_kernels::<name>_backward`` with
``torch.library.custom_op``, their fake (meta) implementations and the autograd formula that
ties them together, so torch.compile traces through either backend without a graph break.
Frame counts travel as a list of ints: the ops' inputs describe the whole mask.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from ..checks import AttentionProblem


def on_tensor_device(x: torch.Tensor):
    """Make x's CUDA device the current one (kernels launch on the current device)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def define_attention_ops(name: str, forward: Callable, backward: Callable, device_context: Callable = on_tensor_device):
    """forward(q, k, v, frame_counts: tuple, P, scale) -> (out (B, N, H, D), lse (B, H, N) float32);
    backward(dout, q, k, v, out, lse, frame_counts: tuple, P, scale) -> (dq, dk, dv).
    device_context(q): a context manager around each call (default: q's CUDA device is current).
    Returns ``run(q, k, v, problem) -> out``, the backend's entry point."""

    @torch.library.custom_op(f"ccam_kernels::{name}", mutates_args=())
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_counts: list[int],
                  tokens_per_frame: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        with device_context(q):
            return forward(q, k, v, tuple(frame_counts), tokens_per_frame, scale)

    @attention.register_fake
    def _(q, k, v, frame_counts, tokens_per_frame, scale):
        n, h, d = q.shape[-3:]
        b = len(frame_counts)
        return q.new_empty(b, n, h, d), q.new_empty(b, h, n, dtype=torch.float32)

    @torch.library.custom_op(f"ccam_kernels::{name}_backward", mutates_args=())
    def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           out: torch.Tensor, lse: torch.Tensor, frame_counts: list[int],
                           tokens_per_frame: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with device_context(q):
            return backward(dout, q, k, v, out, lse, tuple(frame_counts), tokens_per_frame, scale)

    @attention_backward.register_fake
    def _(dout, q, k, v, out, lse, frame_counts, tokens_per_frame, scale):
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def setup_context(ctx, inputs, output):
        q, k, v, frame_counts, tokens_per_frame, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (list(frame_counts), tokens_per_frame, scale)
        ctx.mark_non_differentiable(lse)

    def autograd_backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, out, lse, *ctx.args)
        return dq, dk, dv, None, None, None

    attention.register_autograd(autograd_backward, setup_context=setup_context)

    def run(q, k, v, problem: AttentionProblem) -> torch.Tensor:
        out, _ = attention(q, k, v, list(problem.frame_counts), problem.tokens_per_frame, float(problem.scale))
        return out

    run.op, run.backward_op = attention, attention_backward
    return run
