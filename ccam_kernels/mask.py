"""The CCAM mask rule, defined once.

Query ``i`` of a sample with ``T`` frames belongs to frame ``floor(i * T / N)`` and may attend
to key ``j`` of the same sample iff ``j // P <= frame_of_query(i, T)``: every query sees a
prefix of its sample's keys. Every other module asks this one; none re-derives the rule.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .api_types import DeviceLike
from .checks import check_int

__all__ = [
    "frame_of_query",
    "visible_prefix_length",
    "first_query_of_frame",
    "key_offsets",
    "mask_block",
    "dense_mask",
    "live_pairs",
]


INT64_MAX = 2**63 - 1
# The largest N for which (N - 1)**2, the largest i * (T mod N), fits in int64. Its output alone
# would be 24 GB.
MAX_EXACT_QUERIES = math.isqrt(INT64_MAX) + 1


def frame_of_query(num_query: int, num_frames: int, *, device: Optional[DeviceLike] = None) -> torch.Tensor:
    """Frame of each query: ``floor(i * num_frames / num_query)`` for ``i = 0 .. num_query-1``.

    Returns an int64 tensor of shape ``(num_query,)``, non-decreasing, starting at 0, exact
    for every ``num_frames`` up to 2**63 - 1 and ``num_query`` up to MAX_EXACT_QUERIES
    (larger ones are refused).
    For ``num_frames > num_query`` the last query's frame can be below ``num_frames - 1``:
    the keys of the frames after it are then seen by no query.
    """
    num_query = check_int("num_query", num_query)
    num_frames = check_int("num_frames", num_frames)
    if isinstance(num_frames, int) and num_frames > INT64_MAX:
        raise ValueError(f"num_frames must be <= 2**63 - 1 so that frame_of_query is exact in int64 arithmetic, "
                         f"got {num_frames}")
    if isinstance(num_query, int) and num_query > MAX_EXACT_QUERIES:
        raise ValueError(f"num_query must be <= {MAX_EXACT_QUERIES} so that frame_of_query is exact in int64 "
                         f"arithmetic, got {num_query}")
    i = torch.arange(num_query, dtype=torch.int64, device=device)
    # Exact int64 arithmetic for every T < 2**63: i * T itself overflows once T > 2**63 / N, so
    # split T = q * N + r: floor(i * T / N) = i * q + floor(i * r / N), where i * q <= T and
    # i * r < N**2 both fit (MAX_EXACT_QUERIES).
    q, r = num_frames // num_query, num_frames % num_query
    return i * q + torch.div(i * r, num_query, rounding_mode="floor")


def visible_prefix_length(num_query: int, num_frames: int, tokens_per_frame: int, *, device=None) -> torch.Tensor:
    """Number of keys each query sees, ``(frame_of_query + 1) * P``, int64 ``(num_query,)``."""
    tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame)
    return (frame_of_query(num_query, num_frames, device=device) + 1) * tokens_per_frame


def first_query_of_frame(num_query: int, num_frames: int) -> list[int]:
    """``out[f]`` = index of the first query whose frame is ``>= f``, for ``f = 0 .. num_frames``.

    Queries ``[out[f], num_query)`` are exactly those that see frame ``f``; ``out[f] == num_query``
    when no query does. A list of ``num_frames + 1`` Python ints (host-side planning data).
    """
    fq = frame_of_query(num_query, num_frames)
    frames = torch.arange(num_frames + 1, dtype=torch.int64)
    return torch.searchsorted(fq, frames, side="left").tolist()


def key_offsets(frame_counts, tokens_per_frame: int) -> list[int]:
    """Start of each sample's keys in the packed ``(L, Hkv, D)`` tensors, plus ``L`` at the end.

    ``frame_counts`` is a sequence of ints; returns ``B + 1`` Python ints.
    """
    tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame)
    offsets = [0]
    for t in frame_counts:
        offsets.append(offsets[-1] + int(t) * tokens_per_frame)
    return offsets


def mask_block(
    num_query: int,
    num_frames: int,
    tokens_per_frame: int,
    query_range: tuple[int, int],
    key_range: tuple[int, int],
    *,
    device=None,
) -> torch.Tensor:
    """Boolean visibility of queries ``[q0, q1)`` against keys ``[k0, k1)`` of one sample.

    ``True`` means "may attend". Shape ``(q1 - q0, k1 - k0)``. Fast paths call this only for
    the small blocks that straddle a frame boundary; the reference calls it for everything.
    """
    tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame)
    q0, q1 = query_range
    k0, k1 = key_range
    query_frame = frame_of_query(num_query, num_frames, device=device)[q0:q1]
    key_frame = torch.div(torch.arange(k0, k1, dtype=torch.int64, device=device), tokens_per_frame, rounding_mode="floor")
    return key_frame[None, :] <= query_frame[:, None]


def dense_mask(num_query: int, num_frames: int, tokens_per_frame: int, *, device=None) -> torch.Tensor:
    """The whole ``(N, T * P)`` boolean mask of one sample. For the reference path only."""
    return mask_block(
        num_query, num_frames, tokens_per_frame, (0, num_query), (0, num_frames * tokens_per_frame), device=device
    )


def live_pairs(num_query: int, frame_counts, tokens_per_frame: int) -> int:
    """Number of unmasked (query, key) pairs over a batch, per head. Used for FLOP counts."""
    total = 0
    for t in frame_counts:
        total += int(visible_prefix_length(num_query, int(t), tokens_per_frame).sum())
    return total
