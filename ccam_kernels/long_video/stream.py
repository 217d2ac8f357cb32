"""Streaming projector: one video pushed chunk by chunk, memory independent of its length.

    s = proj.stream(total_frames)
    s.push(chunk)            # (t, P, Cv): the next t >= 1 frames
    y = s.finish()           # (1, N, O) == proj(all_frames, [total_frames])

The state between pushes is the running partial attention of every query over the frames
pushed so far, merged by log-sum-exp (``partial.merge_partials``): an (N, H, D) accumulator
and an (H, N) LSE in float32 (float64 for a float64 module), plus the (N, H, D) query heads,
computed once. The mask rule needs the video's total frame count, hence ``total_frames``.

Every push and ``finish()`` first checks that the parameters the pushes read are bit for bit
what they were at the start (``snapshot.py``: version counters miss writes through ``p.data``),
so the result is the output of the weights at ``finish()`` or an error naming the change.

In training mode (``proj.train()``) the stream records the autograd graph (``finish()``'s output
backpropagates into the module and every chunk) and applies attention dropout: one seed, drawn
from torch's default generator when the stream starts (where the one-shot forward draws its
own), and a mask that is a function of the key's position in the whole video, so the stream
gives the one-shot output and gradients under the same torch.manual_seed. Memory then grows
with the video (the graph keeps every chunk's keys), as any training does.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from ..backends.attention_ops import draw_seed
from ..checks import check_int
from .partial import RunningPartial, accumulate_dtype, ccam_partial_attention, merge_partials, partial_backend_of
from .snapshot import ParameterSnapshot

if TYPE_CHECKING:  # the projector imports this module where it is used
    from ..projector import CCAMProjector

USABLE = "the stream is unchanged and still usable"


def _state_mode(training: bool):
    """Plain tensors even inside torch.inference_mode: the state is updated in place, which an
    inference tensor refuses outside inference mode, so a stream started inside it could not be
    pushed to outside it (and the reverse works as it is). In eval mode no autograd; in training
    mode autograd as the caller has it (the graph reaches the module and every chunk)."""
    grad = training and torch.is_grad_enabled()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.set_grad_enabled(grad))
    return stack


class ProjectorStream:
    """Streaming of one video through a :class:`CCAMProjector` (see module doc): inference in
    eval mode, training (autograd, attention dropout) in training mode.

    Errors say whether the stream is still usable: a bad chunk (wrong rank, width, dtype,
    device, tokens per frame, or more frames than remain) is a ValueError/TypeError and
    changes nothing; ``finish()`` before every frame arrived is a RuntimeError and changes
    nothing; switching the module between train and eval mode mid-stream is a RuntimeError;
    after ``finish()``, or once a parameter the pushes read changed (values, dtype, device:
    checked at every push and at ``finish()``), the stream is closed.
    """

    def __init__(self, proj: "CCAMProjector", total_frames: int) -> None:
        self._proj = proj
        self.total_frames = check_int("total_frames", total_frames)
        self._training = proj.training
        self._backend = partial_backend_of(proj)
        cfg = proj.config
        param = proj.query
        self._dtype, self._device = param.dtype, param.device
        acc = accumulate_dtype(param.dtype)
        self._dropout_p = cfg.attention_dropout if self._training else 0.0
        # Drawn first, where the one-shot forward draws its seed (ccam_attention).
        self._seed = draw_seed(param.device) if self._dropout_p > 0 else None
        with _state_mode(self._training):
            self._q = proj.query_states()
            self._snapshot = ParameterSnapshot(proj)
            if self._backend == "torch" and not self._training:  # merged in place, block by block
                self._running = RunningPartial(self._q, cfg.num_key_value_heads)
            else:  # the plain path: one partial per chunk, merged with the state
                self._running = None
                self._out = torch.zeros(1, cfg.num_query, cfg.num_heads, cfg.head_dim, dtype=acc, device=param.device)
                self._lse = torch.full((1, cfg.num_heads, cfg.num_query), float("-inf"), dtype=acc,
                                       device=param.device)
        self.frames_done = 0
        self._tokens_per_frame = None  # fixed by the first chunk
        self._closed = False

    # -- checks ------------------------------------------------------------------------------

    def _check_mode(self):
        if self._proj.training != self._training:
            now, then = ("training", "eval") if self._proj.training else ("eval", "training")
            raise RuntimeError(f"the projector is in {now} mode but this stream started in {then} mode; "
                               f"switch it back (or start a new stream); {USABLE}")

    def _check_open(self, what: str):
        if self._closed:
            raise RuntimeError(f"{what}: this stream is closed (finished, or its parameters changed); "
                               "start a new one with proj.stream(total_frames)")
        change = self._snapshot.change(self._proj)
        if change is not None:
            self._closed = True
            self._out = self._lse = self._q = self._running = self._snapshot = None
            raise RuntimeError(f"{what}: the projector's parameters changed since proj.stream() started "
                               f"({change}), so the frames pushed so far used other weights; this stream "
                               "is closed, start a new one")
        self._check_mode()

    def _check_chunk(self, chunk):
        cfg = self._proj.config
        if not isinstance(chunk, torch.Tensor):
            raise TypeError(f"chunk must be a torch.Tensor (t, P, Cv), got {type(chunk).__name__}; {USABLE}")
        if chunk.dim() != 3:
            raise ValueError(f"chunk must be (t, P, Cv), got shape {tuple(chunk.shape)}; {USABLE}")
        t, p, width = chunk.shape
        if width != cfg.cross_hidden_size:
            raise ValueError(f"chunk width must equal cross_hidden_size={cfg.cross_hidden_size}, "
                             f"got {width}; {USABLE}")
        if t < 1 or p < 1:
            raise ValueError(f"chunk must hold t >= 1 frames of P >= 1 tokens, got shape {tuple(chunk.shape)}; {USABLE}")
        if self._tokens_per_frame is not None and p != self._tokens_per_frame:
            raise ValueError(f"chunk must have the P={self._tokens_per_frame} tokens per frame of the "
                             f"earlier chunks, got {p}; {USABLE}")
        if chunk.dtype != self._dtype:
            raise ValueError(f"chunk dtype must match the module's ({self._dtype}), got {chunk.dtype}; {USABLE}")
        if chunk.device != self._device:
            raise ValueError(f"chunk device must match the module's ({self._device}), got {chunk.device}; {USABLE}")
        left = self.total_frames - self.frames_done
        if t > left:
            raise ValueError(f"chunk has {t} frames but only {left} of total_frames={self.total_frames} "
                             f"remain; {USABLE}")

    # -- API ---------------------------------------------------------------------------------

    def push(self, chunk: torch.Tensor) -> None:
        """Add the next t frames, (t, P, Cv) in the module's dtype and device."""
        self._check_open("push()")
        self._check_chunk(chunk)
        t, p, width = chunk.shape
        first = self.frames_done
        with _state_mode(self._training):
            k, v = self._proj._keys_values(chunk.reshape(t * p, width))
            if self._running is not None:
                self._running.add(k, v, self.total_frames, p, (first, first + t))
            else:
                part = ccam_partial_attention(self._q, k, v, (self.total_frames,), p, [(first, first + t)],
                                              dropout_p=self._dropout_p, seed=self._seed, backend=self._backend)
                self._out, self._lse = merge_partials([(self._out, self._lse), part])
        self._tokens_per_frame = p
        self.frames_done = first + t

    def finish(self) -> torch.Tensor:
        """(1, N, O): the projector's output for the whole video. Closes the stream."""
        self._check_open("finish()")
        if self.frames_done != self.total_frames:
            raise RuntimeError(f"finish() after {self.frames_done} of total_frames={self.total_frames} frames: "
                               f"push the remaining {self.total_frames - self.frames_done} first; {USABLE}")
        out = self._running.result()[0] if self._running is not None else self._out
        with _state_mode(self._training):
            y = self._proj._head(out.to(self._dtype))
        self._closed = True
        self._out = self._lse = self._q = self._running = self._snapshot = None
        return y

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.frames_done}/{self.total_frames} frames"
        return f"ProjectorStream({state})"
