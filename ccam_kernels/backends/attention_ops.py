"""The custom-op wrapping shared by every backend (reference, torch, triton, cuda).

``define_attention_ops(name, forward, backward)`` registers ``ccam_kernels::<name>`` and
``ccam_kernels::<name>_backward`` with ``torch.library.custom_op``, their fake (meta)
implementations, autocast behaviour and the autograd formula that ties them together. Every
backend goes through the same op shape, so torch.compile and torch.export trace any of them
as one opaque node, without graph breaks:

    <name>(q, k, v, frame_counts, tokens_per_frame, scale, dropout_p=0.0, seed=None,
           keep_acc=False, variant="") -> (out, lse, acc)
    <name>_backward(dout, q, k, v, o, lse, frame_counts, tokens_per_frame, scale,
                    dropout_p=0.0, seed=None, variant="") -> (dq, dk, dv)

* ``frame_counts`` is an int64 CPU tensor ``(B,)``. A tensor, not a list of ints: the compiler
  then never specializes a graph on the frame counts (a list would be baked into the graph and
  every new list would recompile). Its values are checked inside the op, where they are known.
* ``lse`` ``(B, H, N)``: the natural-log log-sum-exp of each query row's scores, float32
  (float64 for float64 inputs).
* ``acc`` ``(B, N, H, D)`` float32 (float64 for float64 inputs): the output before rounding to a
  16-bit dtype, returned when ``keep_acc`` (else an empty float32 tensor); a backend that keeps
  no accumulator (the reference) returns its output, widened, and for float32/float64 inputs it
  is a copy of ``out``. The backward needs ``delta = rowsum(dO * O)``; from a
  16-bit O, ``dP - delta`` cancels catastrophically in rows whose softmax is nearly one-hot
  (errors near 100% in dq and dk), while from the float32 accumulator it is consistent with the
  dP that the backward computes. ``ccam_attention`` asks for it when a 16-bit forward records a
  graph; the backward op then receives it as ``o``.
* ``seed``: an int64 scalar tensor fixing the dropout masks (ccam_kernels/dropout.py: the mask
  is a function of the seed and the position, so the backward recomputes the forward's masks);
  drawn by ``ccam_attention`` on the inputs' device from torch's default generator for that
  device, a fresh one per call (which advances the generator, on CUDA its Philox offset, as
  PyTorch's fused dropout does). It stays a tensor down to the kernels (they read it from
  memory): no host sync, no value baked into a compiled graph. None when dropout_p = 0.
* ``variant``: a backend's implementation choice ("" = its best; the torch backend takes
  "flash" or "explicit" so tests can run each engine).

The real ops return what their fakes promise, whatever a backend hands back: dense contiguous
outputs (a backend's LSE may be a transposed view: with one K/V head it is), none sharing memory
with an input or with another output (a custom op may alias neither; a float32 backend's
accumulator is its output), the ``acc`` of ``keep_acc`` on every backend and dtype. Without that,
torch.compile asserts on the strides it was promised, or AOTAutograd refuses aliased outputs;
tests/test_opcheck.py runs ``torch.library.opcheck`` over every op.

Every op is tagged ``torch.Tag.cudagraph_unsafe``: its launches depend on the values of CPU
tensors (the frame counts, the dropout seed), read when it runs. A CUDA graph that contained it
would replay the launches of the frame counts and seed it was captured with, whatever the new
ones hold (same shapes, other values: wrong numbers, no error). With the tag,
``torch.compile(mode="reduce-overhead")`` captures the code around each call and runs the op
itself outside the graphs (inductor's graph partition), reading its inputs every call. A graph
captured by hand (``torch.cuda.graph``) is the user's: it holds the frame counts of its capture.

The op has no double backward: asking for one (``create_graph=True`` while q, k or v require
grad) raises a RuntimeError saying so, instead of silently returning untracked gradients.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

# Why every op carries it: module doc (a graph would replay the frame counts of its capture).
CUDAGRAPH_UNSAFE = (torch.Tag.cudagraph_unsafe,)

__all__ = ["CUDAGRAPH_UNSAFE", "define_attention_ops", "draw_seed", "on_tensor_device", "checked_counts",
           "autocast_inputs", "NO_DOUBLE_BACKWARD", "lse_dtype", "as_fakes_promise"]

NO_DOUBLE_BACKWARD = (
    "ccam_attention has no double backward (its backward is not differentiable): call "
    "torch.autograd.grad / .backward() without create_graph=True, or compute higher-order "
    "gradients with plain PyTorch attention"
)


def on_tensor_device(x: torch.Tensor):
    """Make x's CUDA device the current one (kernels launch on the current device)."""
    if x.device.type == "cuda":
        return torch.cuda.device(x.device)
    return contextlib.nullcontext()


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _contiguous_strides(shape) -> tuple:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def as_fakes_promise(outputs, inputs) -> tuple:
    """A custom op's real outputs as its fake implementation describes them: each dense with
    contiguous strides (exactly: torch.compile checks every stride, even of size-1 dims) and
    none sharing memory with an input or an earlier output (copied where one does)."""
    taken = {x.untyped_storage().data_ptr() for x in inputs if isinstance(x, torch.Tensor) and x.numel()}
    result = []
    for x in outputs:
        if x.numel():
            shared = x.untyped_storage().data_ptr() in taken
            if shared or x.storage_offset() or x.stride() != _contiguous_strides(x.shape):
                x = torch.empty(x.shape, dtype=x.dtype, device=x.device).copy_(x)
            taken.add(x.untyped_storage().data_ptr())
        result.append(x)
    return tuple(result)


def checked_counts(frame_counts: torch.Tensor, tokens_per_frame: int, length: int) -> tuple[int, ...]:
    """The frame counts as Python ints, checked against the keys (the op's own check: under
    torch.compile the values are only known here)."""
    counts = tuple(int(t) for t in frame_counts.tolist())
    if not counts or min(counts) < 1:
        raise ValueError(f"frame_counts must be >= 1 for every sample and not empty, got {list(counts)}")
    if sum(counts) * tokens_per_frame != length:
        raise ValueError(
            f"frame_counts {list(counts)} * tokens_per_frame {tokens_per_frame} = "
            f"{sum(counts) * tokens_per_frame} keys, but k and v have L={length}"
        )
    return counts


_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_LIBRARY = torch.library.Library("ccam_kernels", "FRAGMENT")  # holds the autocast kernels below


def autocast_inputs(device_type: str, *tensors: torch.Tensor) -> tuple:
    """Under autocast for ``device_type``: the float32/16-bit tensors cast to the autocast dtype
    (float64 is left alone), as autocast does for SDPA; otherwise the tensors unchanged."""
    if device_type not in _AUTOCAST_KEYS or not torch.is_autocast_enabled(device_type):
        return tensors  # (autocast exists for CPU and CUDA here; "meta" has none)
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(x.to(dtype) if x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x for x in tensors)


def _register_autocast(op, name: str) -> None:
    """Autocast kernels for the forward op: q, k, v cast to the autocast dtype, the op then run
    with autocast's dispatch key excluded (as PyTorch's own autocast wrappers do)."""
    for device_type, key in _AUTOCAST_KEYS.items():
        def cast_then_run(q, k, v, *args, _device_type=device_type, _key=key):
            q, k, v = autocast_inputs(_device_type, q, k, v)
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(q, k, v, *args)

        _LIBRARY.impl(name, cast_then_run, key)


def _seed(seed: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return seed if seed is None or seed.dim() == 0 else seed.reshape(())


def draw_seed(device: torch.device) -> torch.Tensor:
    """A dropout seed: a 0-dim int64 tensor on ``device``, from torch's default generator for
    that device, so torch.manual_seed reproduces the masks (no host sync on CUDA)."""
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def define_attention_ops(name: str, forward: Callable, backward: Callable,
                         device_context: Callable = on_tensor_device) -> Callable:
    """forward(q, k, v, frame_counts: tuple, P, scale, dropout_p, seed, keep_acc, variant)
        -> (out (B, N, H, D), lse (B, H, N), acc (B, N, H, D) float32 or None);
    backward(dout, q, k, v, o, lse, frame_counts: tuple, P, scale, dropout_p, seed, variant)
        (seed: a 0-dim int64 tensor, or None when dropout_p = 0)
        -> (dq, dk, dv), dense, shaped like q, k, v.
    Returns ``run(q, k, v, problem, *, seed=None, variant="") -> out``."""
    qualname = f"ccam_kernels::{name}"

    @torch.library.custom_op(qualname, mutates_args=(), tags=CUDAGRAPH_UNSAFE)
    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_counts: torch.Tensor,
                  tokens_per_frame: int, scale: float, dropout_p: float = 0.0,
                  seed: Optional[torch.Tensor] = None, keep_acc: bool = False,
                  variant: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = checked_counts(frame_counts, tokens_per_frame, k.shape[0])
        with device_context(q):
            out, lse, acc = forward(q, k, v, counts, tokens_per_frame, scale, dropout_p, _seed(seed),
                                    keep_acc, variant)
            if not keep_acc:
                acc = q.new_empty(0, dtype=torch.float32)
            else:  # (a backend without an accumulator: its output, widened; copied below if it is out)
                acc = (out if acc is None else acc).to(lse_dtype(q.dtype))
            return as_fakes_promise((out, lse, acc), (q, k, v, frame_counts, seed))

    @attention.register_fake
    def _(q, k, v, frame_counts, tokens_per_frame, scale, dropout_p=0.0, seed=None, keep_acc=False, variant=""):
        n, h, d = q.shape[-3:]
        b = frame_counts.shape[0]
        acc = q.new_empty(b, n, h, d, dtype=lse_dtype(q.dtype)) if keep_acc else q.new_empty(0, dtype=torch.float32)
        return q.new_empty(b, n, h, d), q.new_empty(b, h, n, dtype=lse_dtype(q.dtype)), acc

    @torch.library.custom_op(f"{qualname}_backward", mutates_args=(), tags=CUDAGRAPH_UNSAFE)
    def attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           o: torch.Tensor, lse: torch.Tensor, frame_counts: torch.Tensor,
                           tokens_per_frame: int, scale: float, dropout_p: float = 0.0,
                           seed: Optional[torch.Tensor] = None,
                           variant: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        counts = checked_counts(frame_counts, tokens_per_frame, k.shape[0])
        with device_context(q):
            grads = backward(dout, q, k, v, o, lse, counts, tokens_per_frame, scale, dropout_p, _seed(seed), variant)
            return as_fakes_promise(grads, (dout, q, k, v, o, lse, frame_counts, seed))

    @attention_backward.register_fake
    def _(dout, q, k, v, o, lse, frame_counts, tokens_per_frame, scale, dropout_p=0.0, seed=None, variant=""):
        # Gradients are dense, whatever the inputs' strides (an input may overlap itself).
        return tuple(x.new_empty(x.shape) for x in (q, k, v))

    def setup_context(ctx, inputs, output):
        q, k, v, frame_counts, tokens_per_frame, scale, dropout_p, seed, keep_acc, variant = inputs
        out, lse, acc = output
        ctx.save_for_backward(q, k, v, acc if keep_acc else out, lse, frame_counts, seed)
        ctx.args = (tokens_per_frame, scale, dropout_p)
        ctx.variant = variant
        ctx.mark_non_differentiable(lse, acc)

    def autograd_backward(ctx, dout, dlse, dacc):
        q, k, v, o, lse, frame_counts, seed = ctx.saved_tensors
        if torch.is_grad_enabled() and any(t.requires_grad for t in (dout, q, k, v)):
            raise RuntimeError(NO_DOUBLE_BACKWARD)
        tokens_per_frame, scale, dropout_p = ctx.args
        dq, dk, dv = attention_backward(dout.contiguous(), q, k, v, o, lse, frame_counts, tokens_per_frame,
                                        scale, dropout_p, seed, ctx.variant)
        return dq, dk, dv, None, None, None, None, None, None, None

    attention.register_autograd(autograd_backward, setup_context=setup_context)
    _register_autocast(attention, name)

    def run(q, k, v, problem, *, seed: Optional[torch.Tensor] = None, variant: str = "") -> torch.Tensor:
        """The backend's entry point, for checked arguments (checks.check_attention_args)."""
        if seed is None and problem.dropout_p > 0:
            seed = draw_seed(q.device)
        # A 16-bit forward that records a graph keeps its float32 output for the backward.
        keep_acc = (q.dtype in (torch.float16, torch.bfloat16) and torch.is_grad_enabled()
                    and any(x.requires_grad for x in (q, k, v)))
        out, _, _ = attention(q, k, v, problem.counts, problem.tokens_per_frame, float(problem.scale),
                              float(problem.dropout_p), seed, keep_acc, variant)
        return out

    run.op, run.backward_op = attention, attention_backward
    run.forward_impl, run.backward_impl = forward, backward  # what the ops run (for tests)
    return run
