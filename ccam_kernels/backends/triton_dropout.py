"""The attention-dropout mask in Triton: ``dropout_keep``, the copy of ccam_kernels.dropout.keep_mask
that the Triton kernels call inside their P computation (tests/test_dropout.py checks the two
agree bit for bit). Philox4x32-10 is Triton's own ``tl.philox`` (the Random123 generator)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, offset, stream, rows, keys, threshold):
    """(len(rows), len(keys)) boolean keep mask: ``seed`` int64 scalar, ``offset`` and
    ``stream`` (= sample * H + head) scalars, ``rows`` query rows and ``keys`` keys counted
    from the start of the sample's video (int64 blocks), ``threshold`` = ceil(p * 65536)."""
    zero = (rows[:, None] * 0 + keys[None, :] * 0).to(tl.uint32)
    c0 = zero + (keys[None, :] >> 3).to(tl.uint32)
    c1 = zero + rows[:, None].to(tl.uint32)
    c2 = zero + tl.to_tensor(stream).to(tl.uint32)
    c3 = zero + tl.to_tensor(offset).to(tl.uint32)
    u0, u1, u2, u3 = tl.philox(seed, c0, c1, c2, c3)
    lane = (keys[None, :] >> 1) & 3
    word = tl.where(lane == 0, u0, tl.where(lane == 1, u1, tl.where(lane == 2, u2, u3)))
    r = (word >> ((keys[None, :] & 1) * 16).to(tl.uint32)) & 0xFFFF
    return r >= threshold.to(tl.uint32)


@triton.jit
def dropped(p, SEED, stream, rows, keys, threshold, DROPOUT: tl.constexpr):
    """p with the dropped (row, key) entries zeroed (the 1 / (1 - p) scale is applied by the
    caller, once per row); p itself when DROPOUT is off (compiled out: the no-dropout kernels
    are unchanged). SEED: pointer to the int64 seed; offset 0 (docs/reference.md)."""
    if DROPOUT:
        return tl.where(dropout_keep(tl.load(SEED), 0, stream, rows, keys, threshold), p, 0.0)
    else:
        return p


@triton.jit
def _keep_block_kernel(OUT, SEED, offset, stream, row0, key0, threshold, M: tl.constexpr, N: tl.constexpr):
    rows = row0 + tl.arange(0, M).to(tl.int64)
    keys = key0 + tl.arange(0, N).to(tl.int64)
    seed = tl.load(SEED)
    keep = dropout_keep(seed, offset, stream, rows, keys, threshold)
    tl.store(OUT + tl.arange(0, M)[:, None] * N + tl.arange(0, N)[None, :], keep.to(tl.int8))


def keep_block(seed_tensor, offset: int, stream: int, row0: int, key0: int, threshold: int, m: int, n: int):
    """The (m, n) keep mask of rows row0.. and keys key0.. as int8, from the Triton helper (for tests)."""
    import torch

    out = torch.empty(m, n, dtype=torch.int8, device=seed_tensor.device)
    _keep_block_kernel[(1,)](out, seed_tensor, offset, stream, row0, key0, threshold, M=m, N=n)
    return out
