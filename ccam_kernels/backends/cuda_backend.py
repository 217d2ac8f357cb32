"""The "cuda" backend: the hand-written CUDA kernels of csrc/ as PyTorch custom ops.

The extension (``ccam_kernels._C``, built by setup.py with CCAM_BUILD_CUDA=1, or JIT-built at
first use with CCAM_CUDA_JIT=1) registers three low-level ops that only check and launch:
``ccam_kernels::cuda_fwd``, ``::cuda_bwd_dq`` and ``::cuda_bwd_dkdv``, writing into outputs
allocated here. This module owns the rest: the tile plan and split-KV factor (tiling.py, shared
with the Triton backend), the merge of split partials, the softmax-backward delta, and the
custom ops ``ccam_kernels::cuda_attention`` / ``::cuda_attention_backward`` (attention_ops.py:
fake implementations and autograd, so torch.compile traces through them), and
``ccam_kernels::cuda_partial_attention`` / ``_backward``: the same kernels over a frame window
of each video (partial_ops.py; long_video/partial.py dispatches to them). The whole-video op
is the window [0, T) of each sample.

Kernels: mma.sync tensor cores with cp.async pipelines, float16 and bfloat16 (float32 is
refused: it runs on "triton" or "torch"), head dims that are multiples of 8 from 16 to 128
(run in kernels built for 32, 64, 96 or 128 columns, zero-padded), sm_80 and newer.

With CCAM_CUDA_EMULATE=1 the same ops run on CPU tensors instead, on the CPU emulation build of
the same kernel sources (csrc/emu, JIT-built with g++ at first use): every thread, barrier,
warp collective and cp.async of the kernels is executed and checked. A correctness tool: slow,
never picked by "auto", never timed by ccam-bench. It cannot share a process with the GPU
build (both register the same op names): set it where the GPU build is not loaded.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from typing import Optional

import torch

from . import tiling
from .. import cuda_archs
from .attention_ops import define_attention_ops
from .partial_ops import define_partial_ops

# Tile sizes of the kernels, as in csrc/ccam/params.h and fwd.cuh (a test checks they agree):
# the host's plans and split counts depend on them.
FWD_BLOCK_M = 64
FWD_BLOCK_N = 64  # ccam::kFwdBlockN
BWD_KEY_TILE = 64  # ccam::kBwdKeyTile
MERGE_ROWS = 16  # ccam::kMergeRows (merge.cuh): rows of one (sample, head) per merge CTA
DTYPES = (torch.float16, torch.bfloat16)


EMULATE_ENV = "CCAM_CUDA_EMULATE"


def emulating() -> bool:
    """CCAM_CUDA_EMULATE=1: the ops run on CPU tensors, on the CPU emulation build of the same
    kernel sources (csrc/emu; a correctness tool: slow, never picked by "auto", never timed)."""
    return os.environ.get(EMULATE_ENV, "") == "1"


def devices() -> tuple:
    return ("cpu",) if emulating() else ("cuda",)


@functools.cache
def _register_fakes() -> None:
    for op in ("cuda_fwd", "cuda_bwd_dq", "cuda_bwd_dkdv", "cuda_merge"):  # they write their outputs in place
        torch.library.register_fake(f"ccam_kernels::{op}")(lambda *args, **kwargs: None)


_EMULATOR_STATE: dict = {}  # "error": the build's outcome, once (a plain dict: torch.compile traces through it)


def _emulator_error() -> Optional[str]:
    """Build and load the emulation build once; None when its ops are registered, else why not."""
    if "error" not in _EMULATOR_STATE:
        try:
            from .. import cuda_build

            cuda_build.load_emulator()
            _register_fakes()
            _EMULATOR_STATE["error"] = None
        except Exception as exc:  # noqa: BLE001 - reported as the reason, with its message
            _EMULATOR_STATE["error"] = f"its CPU emulation build ({EMULATE_ENV}=1) failed: {exc}"
    return _EMULATOR_STATE["error"]


@functools.cache
def _load_error() -> Optional[str]:
    """Load the extension once; None when its ops are registered, else why not."""
    try:
        importlib.import_module("ccam_kernels._C")
        built = None
    except ImportError as exc:
        built = f"the CUDA extension is not built ({exc})"
    if built and os.environ.get("CCAM_CUDA_JIT", "") == "1":
        try:
            from .. import cuda_build

            cuda_build.load()
            built = None
        except Exception as exc:  # noqa: BLE001 - reported as the reason, with its message
            return f"its JIT build (CCAM_CUDA_JIT=1) failed: {exc}"
    if built:
        return (built + "; build it with CCAM_BUILD_CUDA=1 pip install --no-build-isolation -e . "
                "(needs nvcc and a CUDA build of torch), or set CCAM_CUDA_JIT=1 to compile it at first use")
    _register_fakes()
    return None


def why_unusable() -> Optional[str]:
    if emulating():
        return _emulator_error()
    if not torch.cuda.is_available():
        return "no CUDA device (the CUDA kernels run on NVIDIA GPUs, sm_80 and newer, or on CPU tensors under CCAM_CUDA_EMULATE=1)"
    error = _load_error()
    if error:
        return error
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return f"its mma.sync kernels need an sm_80 or newer GPU, got sm_{major}{minor}"
    # A GPU the build has neither machine code nor PTX for would fail at the first launch.
    return cuda_archs.why_not_built_for((major, minor))


def refuses_dtype_on(device_type: str, dtype: torch.dtype) -> Optional[str]:
    if dtype not in DTYPES:
        return f"its kernels run on 16-bit tensor cores (float16, bfloat16), got {dtype}; float32 runs on 'triton' or 'torch'"
    return None


def _rows_aligned(x: torch.Tensor) -> torch.Tensor:
    """The kernels load rows with 16-byte cp.async: unit stride in the head dim, other strides
    multiples of 8 elements, a 16-byte aligned start. Anything else is copied once, here."""
    strides_ok = x.stride(-1) == 1 and all(s % 8 == 0 for s, n in zip(x.stride()[:-1], x.shape[:-1]) if n > 1)
    if strides_ok and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _dropout_args(dropout, device) -> tuple:
    """The ops' (dropout_seed, dropout_threshold, dropout_scale) of a tiling.Dropout or None."""
    if dropout is None:
        return None, 0, 1.0
    return dropout.seed_on(device).contiguous(), dropout.threshold, dropout.scale


def _forward_launch(q, k, v, frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int, scale: float,
                    out=None, dropout=None, keep_acc: bool = True):
    """The forward over each sample's frame window [f0, f1) (k, v: the windows' keys; the
    whole-video op is the windows [0, T)). With ``out`` (B, N, H, D), one split and no
    ``keep_acc`` the kernel writes ``out`` and this returns (None, lse); otherwise the kernel
    writes float32 split partials (out_partial mode), merged into ``out`` when given: (the
    float32 output if keep_acc or no out, lse)."""
    B, (N, H, D) = len(frame_counts), q.shape[-3:]
    p = tiling.window_plan(frame_counts, frame_ranges, tokens_per_frame, FWD_BLOCK_N, q.device)
    programs = B * H * math.ceil(N / FWD_BLOCK_M)
    spans = tuple(f1 - f0 for f0, f1 in frame_ranges)
    splits = tiling.num_splits(programs, spans, tokens_per_frame, FWD_BLOCK_N, q.device)
    plan = (p.frames, p.key_start, p.first_frame, p.end_frame)
    drop = _dropout_args(dropout, q.device)
    if splits > 1 or out is None or keep_acc:
        parts = torch.empty(splits, B, N, H, D, device=q.device, dtype=torch.float32)
        lse_parts = torch.empty(splits, B, H, N, device=q.device, dtype=torch.float32)
        torch.ops.ccam_kernels.cuda_fwd(q, k, v, *plan, tokens_per_frame, scale, splits, parts, lse_parts, *drop)
        return merge_splits(parts, lse_parts, out, keep_acc)
    lse = torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    torch.ops.ccam_kernels.cuda_fwd(q, k, v, *plan, tokens_per_frame, scale, 1, out, lse, *drop)
    return None, lse


def merge_splits(o_parts, lse_parts, out=None, keep_acc: bool = True):
    """tiling.merge_splits in one kernel (csrc/ccam/merge.cuh, the op ccam_kernels::cuda_merge):
    each partial read once, ``out`` (q's dtype) written when given, the float32 output only when
    kept. -> (acc (B, N, H, D) float32 or None, lse (B, H, N)). One split needs no merge."""
    S, B, N, H, D = o_parts.shape
    if S == 1:
        return tiling.merge_splits(o_parts, lse_parts, out, keep_acc)
    keep = keep_acc or out is None
    acc = o_parts.new_empty((B, N, H, D) if keep else (0,))
    lse = lse_parts.new_empty(B, H, N)
    dst = out if out is not None else o_parts.new_empty(0, dtype=torch.float16)
    torch.ops.ccam_kernels.cuda_merge(o_parts, lse_parts, dst, acc, lse)
    return (acc if keep else None), lse


def forward(q, k, v, frame_counts: tuple, tokens_per_frame: int, scale: float, dropout_p: float = 0.0,
            seed: int = 0, keep_acc: bool = False, variant: str = ""):
    """(out (B, N, H, D) in q's dtype, lse (B, H, N) float32, acc): with ``keep_acc`` the kernel
    writes float32 partials even without a split and ``acc`` is the float32 output (else None).
    With dropout_p > 0 the kernels apply ccam_kernels.dropout's mask of ``seed``."""
    q, k, v = (_rows_aligned(x) for x in (q, k, v))
    return tiling.whole_video_forward(_forward_launch, q, k, v, frame_counts, tokens_per_frame, scale, keep_acc,
                                      dropout=tiling.dropout_of(dropout_p, seed))


def partial_forward(q, k, v, frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int, scale: float,
                    dropout=None):
    """Partial attention (long_video/partial.py): every query of sample b over the keys of its
    frames [f0_b, f1_b) only, which is all k and v hold. -> (out (B, N, H, D) float32, lse
    (B, H, N) float32), out = 0 and lse = -inf for rows that see none of those frames."""
    q, k, v = (_rows_aligned(x) for x in (q, k, v))
    return _forward_launch(q, k, v, frame_counts, frame_ranges, tokens_per_frame, scale, dropout=dropout)


def _backward_launch(dout, q, k, v, lse, delta, frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int,
                     scale: float, dropout=None):
    """(dq, dk, dv) from the softmax's per-row (lse, delta), over each sample's frame window."""
    B, (N, H, D) = len(frame_counts), q.shape[-3:]
    p = tiling.window_plan(frame_counts, frame_ranges, tokens_per_frame, BWD_KEY_TILE, q.device)
    plan = (p.frames, p.key_start, p.first_frame, p.end_frame)
    # The dQ pass splits each query tile's keys as the forward does when one pass of query
    # tiles would not fill the SMs twice (one video: 256 tiles, the last walking every key):
    # float32 partials per split, summed here in split order (deterministic).
    spans = tuple(f1 - f0 for f0, f1 in frame_ranges)
    splits = tiling.num_splits(B * H * math.ceil(N / FWD_BLOCK_M), spans, tokens_per_frame, FWD_BLOCK_N, q.device)
    dq_rows = torch.empty(*((splits,) if splits > 1 else ()), B, N, H, D, device=q.device, dtype=torch.float32)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    ops = torch.ops.ccam_kernels
    drop = _dropout_args(dropout, q.device)
    ops.cuda_bwd_dq(dout, q, k, v, lse, delta, *plan, tokens_per_frame, scale, dq_rows, *drop)
    # (with every window empty there is no key tile: the op returns without a launch)
    ops.cuda_bwd_dkdv(dout, q, k, v, lse, delta, *plan, p.tile_sample, p.tile_start, tokens_per_frame, scale, dk, dv,
                      *drop)
    if splits > 1:
        dq_rows = dq_rows.sum(0)
    dq = dq_rows.sum(0) if q.dim() == 3 else dq_rows
    return dq.to(q.dtype), dk, dv


def backward(dout, q, k, v, out, lse, frame_counts: tuple, tokens_per_frame: int, scale: float,
             dropout_p: float = 0.0, seed: int = 0, variant: str = ""):
    """(dq, dk, dv) shaped like q, k, v, dense. dq of a shared q sums the samples'
    contributions. ``out`` is the forward's float32 accumulator when it kept one."""
    q, k, v, dout = (_rows_aligned(x) for x in (q, k, v, dout))
    delta = tiling.softmax_delta(dout, out)
    return _backward_launch(dout, q, k, v, lse, delta, frame_counts, tiling.whole_videos(frame_counts),
                            tokens_per_frame, scale, tiling.dropout_of(dropout_p, seed))


def partial_backward(dout, dlse, q, k, v, out, lse, frame_counts: tuple, frame_ranges: tuple,
                     tokens_per_frame: int, scale: float, dropout=None):
    """Gradients of ``partial_forward``'s (out, lse) -> (dq, dk, dv): the whole-video
    kernels with the LSE's gradient folded into delta (tiling.partial_softmax_rows)."""
    dout = _rows_aligned(dout.to(q.dtype))  # the kernels' dots are 16-bit: dout in q's dtype
    q, k, v = (_rows_aligned(x) for x in (q, k, v))
    lse, delta = tiling.partial_softmax_rows(dout, dlse, out, lse)
    return _backward_launch(dout, q, k, v, lse, delta, frame_counts, frame_ranges, tokens_per_frame, scale, dropout)


# ccam_kernels::cuda_attention -> (out, lse, acc) and ccam_kernels::cuda_attention_backward -> (dq, dk, dv).
ccam_attention_cuda = define_attention_ops("cuda_attention", forward, backward)
cuda_attention = ccam_attention_cuda.op

# ccam_kernels::cuda_partial_attention -> (out (B, N, H, D) float32, lse (B, H, N) float32) over
# frames [f0_b, f1_b) of each video, and its backward (gradients of both outputs).
ccam_partial_attention_cuda = define_partial_ops("cuda_partial_attention", partial_forward, partial_backward)
cuda_partial_attention = ccam_partial_attention_cuda.op
