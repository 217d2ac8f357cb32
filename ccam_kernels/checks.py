"""Argument checks for every public entry point (docs/reference.md §8), in one place.

Every backend receives arguments that passed :func:`check_attention_args`, so a backend never
re-validates. Messages name the argument, what was expected and what was given.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ALL_DTYPES = (torch.float64,) + KERNEL_DTYPES


@dataclass(frozen=True)
class AttentionProblem:
    """Validated, normalized description of one ``ccam_attention`` call."""

    frame_counts: Optional[tuple]  # T_b per sample (ints, or SymInts while tracing); None
    # while torch.compile traces a call whose frame counts came as a tensor (values unknown)
    counts: torch.Tensor  # the same as an int64 CPU tensor (B,): what the ops take
    tokens_per_frame: int  # P
    num_query: int  # N
    num_heads: int  # H
    num_kv_heads: int  # Hkv
    head_dim: int  # D
    shared_query: bool  # q is (N, H, D) and serves every sample
    scale: float
    dropout_p: float

    @property
    def batch(self) -> int:
        return self.counts.shape[0]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _require_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def as_int(name: str, value) -> int:
    """``value`` as a Python int: ints and integer scalars (NumPy's too), never bools or floats.
    An int (or a SymInt: an int that torch.compile traces symbolically) passes through
    unchanged: operator.index on it would specialize the compiled graph on its value."""
    if isinstance(value, (int, torch.SymInt)) and not isinstance(value, bool):
        return value
    if isinstance(value, (bool, torch.Tensor)):  # a tensor would mean a silent device sync
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_int(name: str, value, minimum: int = 1) -> int:
    value = as_int(name, value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def is_real_number(value) -> bool:
    """A Python or NumPy int or float (np.float32 as well as np.float64, which alone subclasses
    float), never a bool: what a float argument takes."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_probability(name: str, value) -> float:
    if not is_real_number(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (0.0 <= float(value) < 1.0):
        raise ValueError(f"{name} must be in [0, 1), got {value}")
    return float(value)


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale as a float: 1/sqrt(D) for None, else a finite non-zero number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not is_real_number(scale):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale == 0:
        raise ValueError(f"scale must be finite and non-zero, got {scale}")
    return float(scale)


def integer_tensor_values(name: str, values: torch.Tensor) -> list:
    """The values of a 1-D integer tensor (any integer dtype, any device but meta) as Python
    ints; TypeError/ValueError naming ``name`` for a bool or floating dtype, another shape, or a
    meta tensor (it holds no values to read)."""
    dtype = values.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor (int64, int32, int16, int8 or uint8), got dtype {dtype}")
    if values.dim() != 1:
        raise ValueError(f"{name} must be 1-D (B,), got a tensor of shape {tuple(values.shape)}")
    if values.is_meta:
        raise ValueError(f"{name} must hold values, got a meta tensor (meta tensors have no data)")
    return [int(t) for t in values.tolist()]


def normalize_frame_counts(name: str, frame_counts) -> tuple[int, ...]:
    """frame_counts -> tuple of Python ints, each >= 1, not empty.

    Accepted: a list/tuple/range of ints (NumPy integer scalars too), a 1-D NumPy integer
    array, or a 1-D integer tensor of any integer dtype (int64, int32, int16, int8, uint8, ...)
    on any device except meta (the values are read to the host). Refused with ``name`` in
    the message: bool and floating-point arrays or tensors, arrays and tensors that are not
    1-D (0-d included), meta tensors (they hold no values), and any other type.
    """
    if isinstance(frame_counts, torch.Tensor):
        counts = tuple(integer_tensor_values(name, frame_counts))
    elif isinstance(frame_counts, np.ndarray):
        if frame_counts.dtype.kind not in "iu":  # b: bool, f: float, ...
            raise TypeError(f"{name} must be an integer array, got a NumPy array of dtype {frame_counts.dtype}")
        if frame_counts.ndim != 1:
            raise ValueError(f"{name} must be 1-D (B,), got a NumPy array of shape {frame_counts.shape}")
        counts = tuple(int(t) for t in frame_counts.tolist())
    elif isinstance(frame_counts, (list, tuple, range)):
        counts = tuple(as_int(f"{name} element", t) for t in frame_counts)
    else:
        raise TypeError(
            f"{name} must be a sequence of ints, a 1-D integer array or an integer tensor, "
            f"got {type(frame_counts).__name__}"
        )
    if len(counts) == 0:
        raise ValueError(f"{name} must not be empty (one frame count per sample)")
    bad = [t for t in counts if t < 1]
    if bad:
        raise ValueError(f"{name} must be >= 1 for every sample, got {list(counts)}")
    return counts


def frame_counts_arg(name: str, frame_counts):
    """Frame counts as a tuple of ints (see normalize_frame_counts); or, while torch.compile or
    torch.export traces a call that got them as a tensor, that tensor as int64 on the CPU: its
    values are data then, unknown here, and the op checks them when it runs
    (attention_ops.checked_counts). Shape and dtype are checked in both cases."""
    if isinstance(frame_counts, torch.Tensor) and torch.compiler.is_compiling():
        if frame_counts.dtype.is_floating_point or frame_counts.dtype.is_complex or frame_counts.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor (int64), got dtype {frame_counts.dtype}")
        if frame_counts.dim() != 1:
            raise ValueError(f"{name} must be 1-D (B,), got shape {tuple(frame_counts.shape)}")
        return frame_counts.to(device="cpu", dtype=torch.int64)
    return normalize_frame_counts(name, frame_counts)


def check_attention_args(q, k, v, frame_counts, tokens_per_frame, scale=None, dropout_p=0.0) -> AttentionProblem:
    """Validate a ``ccam_attention`` call; raise ValueError/TypeError naming the argument."""
    q = _require_tensor("q", q)
    k = _require_tensor("k", k)
    v = _require_tensor("v", v)
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, N, H, D) or (N, H, D), got shape {tuple(q.shape)}")
    if k.dim() != 3:
        raise ValueError(f"k must be (L, Hkv, D), got shape {tuple(k.shape)}")
    if v.dim() != 3:
        raise ValueError(f"v must be (L, Hkv, D), got shape {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in ALL_DTYPES:
            raise ValueError(
                f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    num_query, num_heads, head_dim = q.shape[-3:]
    length, num_kv_heads, kv_head_dim = k.shape
    if head_dim != kv_head_dim:
        raise ValueError(f"head dim mismatch: q has D={head_dim}, k and v have D={kv_head_dim}")
    if min(num_query, num_heads, head_dim) < 1 or num_kv_heads < 1:
        raise ValueError(f"q and k must have non-empty dims, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(
            f"the number of query heads H={num_heads} must be a multiple of the key/value heads Hkv={num_kv_heads}"
        )
    tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame)
    counts = frame_counts_arg("frame_counts", frame_counts)
    if isinstance(counts, torch.Tensor):
        counts, counts_tensor = None, counts
    else:
        expected = sum(counts) * tokens_per_frame
        if expected != length:
            raise ValueError(
                f"frame_counts {list(counts)} * tokens_per_frame {tokens_per_frame} = {expected} keys, "
                f"but k and v have L={length}"
            )
        counts_tensor = torch.tensor(counts, dtype=torch.int64)
    batch = counts_tensor.shape[0]
    if q.dim() == 4 and q.shape[0] != batch:
        raise ValueError(
            f"q has batch size {q.shape[0]} but frame_counts has {batch} samples"
        )
    scale = check_scale(scale, head_dim)
    dropout_p = check_probability("dropout_p", dropout_p)
    return AttentionProblem(
        frame_counts=counts,
        counts=counts_tensor,
        tokens_per_frame=tokens_per_frame,
        num_query=num_query,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        shared_query=q.dim() == 3,
        scale=float(scale),
        dropout_p=dropout_p,
    )
