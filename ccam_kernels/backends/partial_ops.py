"""The custom-op wrapping of a kernel backend's partial attention (long_video/partial.py).

``define_partial_ops(name, forward, backward)`` registers, with fake implementations and an
autograd formula (so torch.compile traces them and ``opcheck`` tests them):

    ccam_kernels::<name>(q, k, v, frame_counts, frame_ranges, tokens_per_frame, scale,
                         dropout_p=0.0, seed=None) -> (out, lse)
    ccam_kernels::<name>_backward(dout, dlse, q, k, v, out, lse, frame_counts, frame_ranges,
                                  tokens_per_frame, scale, dropout_p=0.0, seed=None) -> (dq, dk, dv)

* k, v hold only the keys of frames [f0_b, f1_b) of each video, packed sample by sample;
  ``frame_counts`` (B,) and ``frame_ranges`` (B, 2) are int64 CPU tensors (not lists: the
  compiler then never specializes a graph on them), checked inside the op.
* ``out`` (B, N, H, D) and ``lse`` (B, H, N) are float32 (the kernels' accumulators) and both
  differentiable: the long-video merges send gradients to both. Rows that see none of their
  window's frames get out = 0 and lse = -inf.
* ``dropout_p``, ``seed`` (an int64 0-dim tensor): attention dropout with ccam_kernels.dropout's
  mask, keys counted from the start of the video, so the partials of any split of the frames
  merge into the whole video's dropped attention; the LSE is that of the undropped scores.

The triton backend registers its kernels here; the cuda backend plugs in the same way, with a
``forward(q, k, v, counts, ranges, P, scale, dropout)`` and a ``backward(dout, dlse, q, k, v, out,
lse, counts, ranges, P, scale, dropout)`` of its own (dropout: a tiling.Dropout or None).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from . import tiling
from .attention_ops import CUDAGRAPH_UNSAFE, as_fakes_promise, on_tensor_device

__all__ = ["define_partial_ops", "checked_windows"]


def checked_windows(frame_counts: torch.Tensor, frame_ranges: torch.Tensor, tokens_per_frame: int,
                    length: int) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]]:
    """(counts, ranges) as Python ints, checked against each other and the keys: the op's own
    check (under torch.compile the values are only known here)."""
    counts = tuple(int(t) for t in frame_counts.tolist())
    ranges = tuple((int(f0), int(f1)) for f0, f1 in frame_ranges.reshape(-1, 2).tolist())
    if not counts or min(counts) < 1 or len(ranges) != len(counts):
        raise ValueError(f"frame_counts must be >= 1 for every sample and not empty, with one (first, end) "
                         f"pair each in frame_ranges; got {list(counts)} and {list(ranges)}")
    for b, ((f0, f1), total) in enumerate(zip(ranges, counts)):
        if not 0 <= f0 <= f1 <= total:
            raise ValueError(f"frame_ranges[{b}] must satisfy 0 <= first <= end <= frame_counts[{b}] = {total}, "
                             f"got ({f0}, {f1})")
    keys = sum(f1 - f0 for f0, f1 in ranges) * tokens_per_frame
    if keys != length:
        raise ValueError(f"frame_ranges {list(ranges)} * tokens_per_frame {tokens_per_frame} = {keys} keys, "
                         f"but k and v have L={length}")
    return counts, ranges


def define_partial_ops(name: str, forward: Callable, backward: Callable,
                       device_context: Callable = on_tensor_device) -> Callable:
    """Register the two ops (module doc). Returns ``run(q, k, v, problem) -> (out, lse)`` for a
    checked ``long_video.partial.PartialProblem``."""
    qualname = f"ccam_kernels::{name}"

    @torch.library.custom_op(qualname, mutates_args=(), tags=CUDAGRAPH_UNSAFE)  # (attention_ops.py)
    def partial(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_counts: torch.Tensor,
                frame_ranges: torch.Tensor, tokens_per_frame: int, scale: float, dropout_p: float = 0.0,
                seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        counts, ranges = checked_windows(frame_counts, frame_ranges, tokens_per_frame, k.shape[0])
        with device_context(q):
            return as_fakes_promise(forward(q, k, v, counts, ranges, tokens_per_frame, scale,
                                            tiling.dropout_of(dropout_p, seed)),
                                    (q, k, v, frame_counts, frame_ranges))

    @partial.register_fake
    def _(q, k, v, frame_counts, frame_ranges, tokens_per_frame, scale, dropout_p=0.0, seed=None):
        n, h, d = q.shape[-3:]
        b = frame_counts.shape[0]
        return q.new_empty(b, n, h, d, dtype=torch.float32), q.new_empty(b, h, n, dtype=torch.float32)

    @torch.library.custom_op(f"{qualname}_backward", mutates_args=(), tags=CUDAGRAPH_UNSAFE)
    def partial_backward(dout: torch.Tensor, dlse: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                         v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, frame_counts: torch.Tensor,
                         frame_ranges: torch.Tensor, tokens_per_frame: int, scale: float, dropout_p: float = 0.0,
                         seed: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts, ranges = checked_windows(frame_counts, frame_ranges, tokens_per_frame, k.shape[0])
        with device_context(q):
            return as_fakes_promise(backward(dout, dlse, q, k, v, out, lse, counts, ranges, tokens_per_frame, scale,
                                             tiling.dropout_of(dropout_p, seed)),
                                    (dout, dlse, q, k, v, out, lse, frame_counts, frame_ranges))

    @partial_backward.register_fake
    def _(dout, dlse, q, k, v, out, lse, frame_counts, frame_ranges, tokens_per_frame, scale, dropout_p=0.0,
          seed=None):
        return tuple(x.new_empty(x.shape) for x in (q, k, v))

    def setup_context(ctx, inputs, output):
        q, k, v, frame_counts, frame_ranges, tokens_per_frame, scale, dropout_p, seed = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, out, lse, frame_counts, frame_ranges, seed)
        ctx.args = (tokens_per_frame, scale, dropout_p)

    def autograd_backward(ctx, dout, dlse):
        q, k, v, out, lse, frame_counts, frame_ranges, seed = ctx.saved_tensors
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (dout, dlse, q, k, v)):
            raise RuntimeError(f"{qualname} has no double backward (its backward is not differentiable): "
                               "call torch.autograd.grad / .backward() without create_graph=True")
        # An output that received no gradient arrives as None (or zeros): it contributes nothing.
        dout = torch.zeros_like(out) if dout is None else dout
        dlse = torch.zeros_like(lse) if dlse is None else dlse
        dq, dk, dv = partial_backward(dout.contiguous(), dlse.contiguous(), q, k, v, out, lse, frame_counts,
                                      frame_ranges, *ctx.args, seed)
        return dq, dk, dv, None, None, None, None, None, None

    partial.register_autograd(autograd_backward, setup_context=setup_context)

    def run(q, k, v, problem, dropout_p: float = 0.0, seed: Optional[torch.Tensor] = None):
        counts = torch.tensor(problem.frame_counts, dtype=torch.int64)
        ranges = torch.tensor(problem.frame_ranges, dtype=torch.int64).reshape(-1, 2)
        if dropout_p <= 0:
            seed = None
        return partial(q, k, v, counts, ranges, problem.tokens_per_frame, float(problem.scale), float(dropout_p), seed)

    run.op, run.backward_op = partial, partial_backward
    return run
