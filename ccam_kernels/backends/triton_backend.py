"""The "triton" backend: the Triton kernels as PyTorch custom ops.

``ccam_kernels::triton_attention`` (forward: out and the per-row log-sum-exp) and
``ccam_kernels::triton_attention_backward`` are custom ops (attention_ops.py: fake
implementations and an autograd formula, so torch.compile traces through them).
``ccam_kernels::triton_partial_attention`` and its ``_backward`` are the same kernels over a
frame window of each video (partial_ops.py; long_video/partial.py dispatches to them). CUDA graphs
(docs/modes.md; untested on a GPU): capture by hand after one eager call with the same head dim,
dtype and frame counts (it builds the small per-batch plan tensors and runs Triton's autotuning,
neither of which may happen during a capture); the graph holds those frame counts. The ops are
tagged cudagraph_unsafe, so torch.compile's reduce-overhead mode captures the code around them.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from . import tiling
from .attention_ops import define_attention_ops
from .partial_ops import define_partial_ops

# The "triton" extra: a CPU install goes without it (about 290 MB that no CPU path needs), and
# this module never imports triton itself, so the package imports and runs without it.
INSTALL_HINT = 'pip install "ccam_kernels[triton]" (Linux x86_64; a CUDA build of torch brings it)'


def triton_installed() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or half-removed install counts as absent
        return False


_TRITON = triton_installed()


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unusable() -> Optional[str]:
    if not _TRITON:
        return f"triton is not installed: {INSTALL_HINT}"
    if not interpreting() and not torch.cuda.is_available():
        return "no CUDA device (the Triton kernels run on CUDA GPUs, or on CPU tensors under TRITON_INTERPRET=1)"
    return None


def devices() -> tuple:
    """Devices of the tensors it takes: CUDA, and CPU under Triton's interpreter (tests)."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def refuses_dtype_on(device_type: str, dtype: torch.dtype) -> Optional[str]:
    if device_type == "cpu" and dtype == torch.bfloat16:
        # Seen with triton 3.9: the interpreter's tl.dot on bfloat16 returns garbage.
        return "Triton's CPU interpreter computes bfloat16 dots wrong; run bfloat16 on a GPU"
    return None


def _kernels():
    from . import triton_kernels  # imported on first use: importing triton costs ~1 s

    return triton_kernels


def _forward(q, k, v, frame_counts: tuple, tokens_per_frame: int, scale: float, dropout_p: float, seed: int,
             keep_acc: bool, variant: str):
    return _kernels().forward(q, k, v, frame_counts, tokens_per_frame, scale, keep_acc,
                              tiling.dropout_of(dropout_p, seed))


def _backward(dout, q, k, v, out, lse, frame_counts: tuple, tokens_per_frame: int, scale: float, dropout_p: float,
              seed: int, variant: str):
    return _kernels().backward(dout, q, k, v, out, lse, frame_counts, tokens_per_frame, scale,
                               tiling.dropout_of(dropout_p, seed))


# ccam_kernels::triton_attention -> (out (B, N, H, D), lse (B, H, N) float32, acc) and
# ccam_kernels::triton_attention_backward -> (dq, dk, dv), with fakes and autograd.
ccam_attention_triton = define_attention_ops("triton_attention", _forward, _backward)
triton_attention = ccam_attention_triton.op


def _partial_forward(q, k, v, frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int, scale: float,
                     dropout=None):
    return _kernels().partial_forward(q, k, v, frame_counts, frame_ranges, tokens_per_frame, scale, dropout)


def _partial_backward(dout, dlse, q, k, v, out, lse, frame_counts: tuple, frame_ranges: tuple,
                      tokens_per_frame: int, scale: float, dropout=None):
    return _kernels().partial_backward(dout, dlse, q, k, v, out, lse, frame_counts, frame_ranges,
                                       tokens_per_frame, scale, dropout)


# ccam_kernels::triton_partial_attention -> (out (B, N, H, D) float32, lse (B, H, N) float32)
# over frames [f0_b, f1_b) of each video, and its backward (gradients of both outputs).
ccam_partial_attention_triton = define_partial_ops("triton_partial_attention", _partial_forward, _partial_backward)
triton_partial_attention = ccam_partial_attention_triton.op
