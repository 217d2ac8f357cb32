"""``ccam_attention``: argument checks, then dispatch to a backend.

Backends register here with a function and a reason they cannot run (None when usable).
"auto" takes the first usable one that supports the inputs, in the order of
backends/device_order.py for the inputs' device (on GPUs, per compute capability).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .api_types import FrameCounts
from .checks import ALL_DTYPES, KERNEL_DTYPES, AttentionProblem, check_attention_args
from .backends.attention_ops import autocast_inputs
from .backends.reference import ccam_attention_reference
from .backends.torch_prefix import ccam_attention_torch
from .backends import cuda_backend, device_order, tiling, triton_backend

__all__ = ["ccam_attention", "available_backends", "BACKENDS"]


@dataclass(frozen=True)
class Backend:
    name: str
    run: Optional[Callable]  # (q, k, v, problem, *, seed=None, variant="") -> (B, N, H, D); attention_ops.py
    why_unusable: Callable[[], Optional[str]]  # None when usable on this machine
    dtypes: tuple = KERNEL_DTYPES
    devices_fn: Callable[[], tuple] = lambda: ("cpu", "cuda")  # noqa: E731 - device types it takes
    dropout: bool = False
    auto_devices: tuple = ("cpu", "cuda")  # device types on which "auto" may pick it
    refuses_inputs: Callable = lambda q, problem: None  # noqa: E731 - backend-specific limits
    refuses_dtype_on: Callable = lambda device_type, dtype: None  # noqa: E731 - e.g. an interpreter's gaps

    @property
    def devices(self) -> tuple:
        return self.devices_fn()

    def refuses_placement(self, device_type: str, dtype: Optional[torch.dtype] = None, *,
                          auto: bool = False) -> Optional[str]:
        """Why this backend cannot take tensors of this device type (and dtype, unless None),
        or None. With ``auto``, also where "auto" would not pick it. The projector and the
        benchmarks ask this too, so every caller applies the same rules."""
        why = self.why_unusable()
        if why:
            return why
        if device_type not in self.devices:
            return f"it runs on {', '.join(self.devices)} tensors, got a {device_type} tensor"
        if auto and device_type not in self.auto_devices:
            return f"auto uses it for {', '.join(self.auto_devices)} tensors only"
        if dtype is None:
            return None
        if dtype not in self.dtypes:
            return f"it supports dtypes {[str(d) for d in self.dtypes]}, got {dtype}"
        return self.refuses_dtype_on(device_type, dtype)

    def refuses(self, q: torch.Tensor, problem: AttentionProblem, *, auto: bool = False) -> Optional[str]:
        """Why this backend cannot take these inputs, or None."""
        why = self.refuses_placement(q.device.type, q.dtype, auto=auto)
        if why:
            return why
        if problem.dropout_p > 0 and not self.dropout:
            return "it does not implement attention dropout"
        return self.refuses_inputs(q, problem)


BACKENDS = {
    "reference": Backend("reference", ccam_attention_reference, lambda: None, ALL_DTYPES, dropout=True),
    "torch": Backend("torch", ccam_attention_torch, lambda: None, ALL_DTYPES, dropout=True),
    "triton": Backend("triton", triton_backend.ccam_attention_triton, triton_backend.why_unusable,
                      devices_fn=triton_backend.devices, auto_devices=("cuda",), dropout=True,
                      refuses_inputs=tiling.refuses_head_dim,
                      refuses_dtype_on=triton_backend.refuses_dtype_on),
    "cuda": Backend("cuda", cuda_backend.ccam_attention_cuda, cuda_backend.why_unusable,
                    devices_fn=cuda_backend.devices, auto_devices=("cuda",), dropout=True,
                    refuses_inputs=tiling.refuses_head_dim,
                    refuses_dtype_on=cuda_backend.refuses_dtype_on),
}


def available_backends() -> list[str]:
    """Backends usable on this machine, in "auto" preference order (for the current CUDA device
    when there is one), then "reference".
    ("triton" counts as usable on CPU under TRITON_INTERPRET=1, and "cuda" under
    CCAM_CUDA_EMULATE=1, for tests; "auto" never picks either for CPU tensors.)"""
    usable = [name for name in device_order.auto_order() if BACKENDS[name].why_unusable() is None]
    return usable + ["reference"]


def resolve_backend(backend: str, q: torch.Tensor, problem: AttentionProblem) -> Backend:
    """The Backend that will run these inputs; raises as docs/reference.md §8.3 says when there is none."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        reasons = []
        for name in device_order.auto_order(q.device):
            why = BACKENDS[name].refuses(q, problem, auto=True)
            if why is None:
                return BACKENDS[name]
            reasons.append(f"{name}: {why}")
        raise RuntimeError(
            "no backend can run these inputs: " + "; ".join(reasons)
            + f". Usable backends: {available_backends()}"
        )
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
    chosen = BACKENDS[backend]
    why = chosen.refuses(q, problem)
    if why is not None:
        raise RuntimeError(
            f"backend {backend!r} cannot run here: {why}. Usable backends: {available_backends()}"
        )
    return chosen


def ccam_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_counts: FrameCounts,
                   tokens_per_frame: int, *, scale: Optional[float] = None, dropout_p: float = 0.0,
                   backend: str = "auto") -> torch.Tensor:
    """Block-causal cross-attention of N queries over the frames of each video.

    Query ``i`` of sample ``b`` attends to the keys of frames ``0 .. floor(i * T_b / N)`` of that
    sample (see :func:`ccam_kernels.frame_of_query`).

    Args:
        q: (B, N, H, D), or (N, H, D) shared by every sample (read in place, never copied per sample).
        k, v: (L, Hkv, D) with L = sum(frame_counts) * tokens_per_frame: all samples' keys packed
            sample by sample, frame by frame, no padding. H must be a multiple of Hkv (GQA).
        frame_counts: B ints >= 1, or an integer tensor (B,): frames T_b of each sample. Pass a
            tensor to torch.compile'd code so that new frame counts never recompile.
        tokens_per_frame: P, keys per frame.
        scale: softmax scale, default 1 / sqrt(D).
        dropout_p: dropout on the attention probabilities (0 in inference); every backend
            applies the same mask, a function of (seed, sample, head, row, key) drawn from
            torch's default generator for the inputs' device (docs/reference.md, dropout).
        backend: "auto", "reference", "torch", "triton" or "cuda".

    Raises:
        TypeError, ValueError: a bad argument, named in the message, before any kernel runs.
        RuntimeError: a known backend that cannot run these inputs here, with the reason.
        (Every message: docs/reference.md §8.1 to §8.3.)

    Returns:
        (B, N, H, D) in q's dtype and on q's device; differentiable in q, k and v (once: there
        is no double backward). Under torch.autocast, q, k and v are cast to the autocast
        dtype and the output is in it.
    """
    if all(isinstance(x, torch.Tensor) for x in (q, k, v)):
        # Under torch.autocast q, k and v run in the autocast dtype and so does the output,
        # as autocast does for SDPA (float64 is left alone). The ops' autocast kernels do the
        # same for direct calls.
        q, k, v = autocast_inputs(q.device.type, q, k, v)
    problem = check_attention_args(q, k, v, frame_counts, tokens_per_frame, scale, dropout_p)
    chosen = resolve_backend(backend, q, problem)
    return chosen.run(q, k, v, problem)
