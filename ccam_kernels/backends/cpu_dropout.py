"""``ccam_kernels::cpu_dropout_apply_``: attention dropout applied in place to blocks of CPU
probabilities, the torch backend's dropout on CPU (BlockDropout.apply_).

    cpu_dropout_apply_(blocks: list of (A, R, K) float32 | float64 | bfloat16 tensors of one
                       shape and dtype, seed (0-dim int64), offset, sample, num_heads, head0,
                       row0, key0, p, group=1) -> None

blocks[.][a, r, k] is at head ``head0 + a * group + r % group``, query row ``row0 + r // group``,
key ``key0 + k`` (counted from the start of sample ``sample``'s video) of a sample with
``num_heads`` query heads: the torch backend's folded rows. It is multiplied by 1 / (1 - p) where
ccam_kernels.dropout.keep_mask keeps that position and by 0 where it drops it (a NaN stays NaN),
in float32 (float64 for float64), rounded once to the block's dtype. Every block gets the same
mask (the backward applies it to P and to dP: one set of draws).

It runs the native CPU library (csrc/cpu/dropout.cpp: 8 Philox counters at a time) when
cpu_native has one, else the same arithmetic with ccam_kernels.dropout's int64 torch Philox:
the same bits either way (tests/test_cpu_native.py).

BlockDropout calls the Python function ``cpu_dropout_apply_`` directly: it runs inside the
attention op already, where the dispatcher's per-call cost (tens of microseconds, on every
block of the forward and backward) would be a visible part of dropout's cost.
"""

from __future__ import annotations

import ctypes

import torch

from .. import cpu_native
from ..dropout import MASK32, keep_mask, keep_scale, threshold

__all__ = ["cpu_dropout_apply_", "native_entry", "MAX_BLOCKS"]

MAX_BLOCKS = 4  # csrc/cpu/dropout.cpp's kMaxBlocks
_C_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
_I64, _U32 = ctypes.c_int64, ctypes.c_uint32
# csrc/cpu/dropout.cpp's entry points: the block pointers, then CCAM_CPU_DROPOUT_ARGS
_ARGTYPES = [ctypes.POINTER(ctypes.c_void_p), _I64, _I64, _I64, _I64, _I64, _I64, ctypes.c_uint64, _U32, _U32, _I64,
             _I64, _I64, _I64, _I64, _I64, ctypes.c_double]


def native_entry(dtype: torch.dtype):
    """The C entry point for blocks of ``dtype``, or None (no native build: the torch path)."""
    return cpu_native.function(f"ccam_cpu_dropout_apply_{_C_SUFFIX[dtype]}", _ARGTYPES, ctypes.c_int)


def _torch_apply_(blocks, seed, offset, sample, num_heads, head0, row0, key0, p, group):
    """The same arithmetic in torch ops (ccam_kernels.dropout's int64 Philox)."""
    A, R, K = blocks[0].shape
    r = torch.arange(R)
    heads = head0 + torch.arange(A)[:, None] * group + r % group  # (A, R)
    keep = keep_mask(seed, offset, sample, heads, row0 + r // group, key0, key0 + K, num_heads, p)
    acc = torch.float64 if blocks[0].dtype == torch.float64 else torch.float32
    factor = torch.where(keep, torch.tensor(keep_scale(p), dtype=acc), torch.zeros((), dtype=acc))
    for x in blocks:
        if x.dtype == acc:
            x.mul_(factor)
        else:  # one rounding, of the float32 product
            x.copy_(x.to(acc).mul_(factor))


def _check(blocks) -> None:
    first = blocks[0] if blocks else None
    if (first is None or first.dim() != 3 or first.dtype not in _C_SUFFIX or first.device.type != "cpu"
            or any(x.shape != first.shape or x.dtype != first.dtype or x.device != first.device for x in blocks)):
        raise ValueError("cpu_dropout_apply_ takes 3-d CPU blocks of one shape and dtype (float32, float64 or "
                         f"bfloat16), got {[(tuple(x.shape), x.dtype, str(x.device)) for x in blocks]}")


def cpu_dropout_apply_(blocks: list[torch.Tensor], seed: torch.Tensor, offset: int, sample: int, num_heads: int,
                       head0: int, row0: int, key0: int, p: float, group: int = 1) -> None:
    _check(blocks)
    thresh = threshold(p)
    if thresh == 0 or blocks[0].numel() == 0:
        return
    entry = native_entry(blocks[0].dtype)
    if entry is None:
        _torch_apply_(blocks, seed, offset, sample, num_heads, head0, row0, key0, p, group)
        return
    for start in range(0, len(blocks), MAX_BLOCKS):
        _native_apply_(entry, blocks[start:start + MAX_BLOCKS], seed, offset, sample, num_heads, head0, row0, key0,
                       p, group, thresh)


def _native_apply_(entry, blocks, seed, offset, sample, num_heads, head0, row0, key0, p, group, thresh):
    # The C side walks keys with unit stride and rows / heads by one pair of strides for all the
    # blocks: blocks with another layout go through contiguous copies.
    shared = all(x.stride(-1) == 1 and x.stride() == blocks[0].stride() for x in blocks)
    work = blocks if shared else [x.contiguous() for x in blocks]
    A, R, K = work[0].shape
    pointers = (ctypes.c_void_p * len(work))(*(x.data_ptr() for x in work))
    status = entry(pointers, len(work), A, R, K, work[0].stride(0), work[0].stride(1), int(seed) & (2**64 - 1),
                   int(offset) & MASK32, thresh, sample, num_heads, head0, row0, key0, group, keep_scale(p))
    assert status == 0, f"ccam_cpu_dropout_apply_: status {status}"
    for w, x in zip(work, blocks):
        if w is not x:
            x.copy_(w)


# The registered op runs the same function (for callers outside the attention op, tests,
# torch.compile: a mutating op with no outputs needs no fake implementation).
torch.library.custom_op("ccam_kernels::cpu_dropout_apply_", mutates_args=("blocks",), device_types="cpu")(
    cpu_dropout_apply_)
