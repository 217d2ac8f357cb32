"""The attention-dropout mask, defined once (the Python side of it; the kernels' copies are
``triton_kernels._dropout_keep`` and csrc/ccam/dropout.cuh, tested bit for bit against this one).

Whether probability P[b, h, i, j] is kept is a function of position, never of a tile plan,
a frame split or a stream's chunking:

    u0, u1, u2, u3 = Philox4x32-10(key = (seed mod 2**32, seed >> 32),
                                   counter = (j >> 3, i, b * H + h, offset))   (all mod 2**32)
    r = 16-bit half (j & 1) of word u[(j >> 1) & 3]      (one Philox call serves 8 keys)
    keep  iff  r >= threshold(p) = ceil(p * 65536)       (i.e. uniform r / 65536 >= p)

b: sample, h: query head (of H), i: query row, j: key counted from the start of sample b's
video (so a frame window, a stream chunk or a rank holding frames [f0, f1) uses j = f0*P + its
own key index). Kept probabilities are scaled by 1 / (1 - p) in the computation's precision
(float64 stays float64). Philox4x32-10 is the Random123 generator (Salmon et al., SC'11), the
one ``tl.philox`` computes. The keep probability is 1 - ceil(p * 65536) / 65536, within 2**-16
of 1 - p. Masked (invisible) keys have probability 0 whatever the mask says.

This module computes the mask for any broadcastable (heads, rows, keys) block with int64
tensor arithmetic: a (rows, keys) block of a tile is generated on the fly, never N x L.
"""

from __future__ import annotations

import math
from typing import Union

import torch

__all__ = ["philox4x32_10", "threshold", "keep_mask", "keep_mask_at", "keep_scale", "MAX_SEED"]

MASK32 = 0xFFFFFFFF
M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32 round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments
MAX_SEED = 2**63 - 1  # seeds are non-negative int64 values

IntLike = Union[int, torch.Tensor]


def philox4x32_10(c0: IntLike, c1: IntLike, c2: IntLike, c3: IntLike, k0: IntLike, k1: IntLike):
    """Philox4x32-10 of counter (c0, c1, c2, c3) under key (k0, k1): int64 tensors (or ints)
    holding uint32 values, broadcast together -> four int64 tensors of uint32 values."""
    c0, c1, c2, c3 = (torch.as_tensor(x, dtype=torch.int64) for x in (c0, c1, c2, c3))
    for _ in range(10):
        # The 64-bit products of two uint32 values wrap in int64 but keep all 64 bits (two's
        # complement): >> 32 gives the high word up to sign bits, which the masks after the
        # xors clear. Low words and c1, c3 are masked only where they reach a multiplier.
        p0, p1 = c0 * M0, c2 * M1
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0) & MASK32, p1, ((p0 >> 32) ^ c3 ^ k1) & MASK32, p0
        k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
    return c0, c1 & MASK32, c2, c3 & MASK32


def threshold(p: float) -> int:
    """The 16-bit threshold of dropout probability p: a draw r in [0, 65536) is kept iff
    r >= threshold(p). Computed once, in float64, by every backend's host code."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return math.ceil(p * 65536.0)


def keep_scale(p: float) -> float:
    """What a kept probability is multiplied by."""
    return 1.0 / (1.0 - p)


def _seed_words(seed: IntLike) -> tuple[IntLike, IntLike]:
    """The Philox key words of a seed: Python ints for an int or a CPU tensor (cheaper key
    schedule), int64 0-dim tensors for a seed on an accelerator (no host sync)."""
    if isinstance(seed, torch.Tensor) and seed.device.type != "cpu":
        s = seed.to(torch.int64)
        return s & MASK32, (s >> 32) & MASK32
    s = int(seed)
    return s & MASK32, (s >> 32) & MASK32


def _on(x: IntLike, device) -> IntLike:
    return x.to(device) if isinstance(x, torch.Tensor) else x


def _keep_block(seed: IntLike, offset: int, stream: torch.Tensor, rows: torch.Tensor, key_start: int,
                key_end: int, thresh: int, device) -> torch.Tensor:
    """Keep mask (broadcast(stream, rows), key_end - key_start) of keys [key_start, key_end):
    one Philox call per 8 consecutive keys (j >> 3), its eight 16-bit halves compared."""
    k0, k1 = _seed_words(seed)
    g0, g1 = key_start >> 3, ((key_end - 1) >> 3) + 1
    groups = torch.arange(g0, g1, dtype=torch.int64, device=device) & MASK32
    words = philox4x32_10(groups, rows[..., None] & MASK32, stream[..., None], int(offset) & MASK32,
                          _on(k0, device), _on(k1, device))
    # key 8 * g + 2 * w + half: word w = (j >> 1) & 3, 16-bit half j & 1 (low half first)
    halves = [x for w in words for x in ((w & 0xFFFF) >= thresh, (w >> 16) >= thresh)]
    keep = torch.stack(halves, dim=-1).flatten(-2)
    return keep[..., key_start - 8 * g0:key_end - 8 * g0]


def keep_mask(seed: IntLike, offset: int, sample: IntLike, heads: IntLike, rows: IntLike, key_start: int,
              key_end: int, num_heads: int, p: float) -> torch.Tensor:
    """Boolean keep mask of dropout probability ``p`` for keys [key_start, key_end) (counted
    from the start of the sample's video) of sample ``sample`` (an int) with ``num_heads``
    query heads: shape broadcast(heads, rows) + (key_end - key_start,), for int64 tensors
    ``heads`` and ``rows`` (e.g. (H, 1) and (1, R)). ``seed`` may be an int64 tensor (0-dim,
    on any device: no host sync). See the module doc for the definition."""
    rows = torch.as_tensor(rows, dtype=torch.int64)
    device = rows.device
    stream = (int(sample) * num_heads + torch.as_tensor(heads, dtype=torch.int64, device=device)) & MASK32
    if key_end <= key_start:
        return torch.ones(torch.broadcast_shapes(stream.shape, rows.shape) + (0,), dtype=torch.bool, device=device)
    return _keep_block(seed, offset, stream, rows, key_start, key_end, threshold(p), device)


def keep_mask_at(seed: IntLike, offset: int, sample: int, head: IntLike, row: IntLike, key: IntLike,
                 num_heads: int, p: float) -> torch.Tensor:
    """The keep mask at arbitrary broadcast (head, row, key) positions, element by element:
    the definition spelled out (one Philox call per element; for tests and spot checks)."""
    k0, k1 = _seed_words(seed)
    key = torch.as_tensor(key, dtype=torch.int64)
    row = torch.as_tensor(row, dtype=torch.int64)
    stream = (int(sample) * num_heads + torch.as_tensor(head, dtype=torch.int64)) & MASK32
    words = philox4x32_10((key >> 3) & MASK32, row & MASK32, stream, int(offset) & MASK32, k0, k1)
    lane = (key >> 1) & 3
    word = torch.where(lane == 0, words[0], torch.where(lane == 1, words[1], torch.where(lane == 2, words[2], words[3])))
    return ((word >> ((key & 1) * 16)) & 0xFFFF) >= threshold(p)
