"""Host-side launch planning shared by the kernel backends (triton, cuda).

The kernels read the mask rule from two small per-sample tensors (frame counts and key
offsets) and, for the dK/dV pass, from a list of key tiles (sample, first key); this module
builds them, picks the split-KV factor, and does the two small float32 steps around the
kernels: the softmax backward's per-row constant and the merge of split-KV partials.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

FORCE_SPLITS = None  # tests (and tuning) set an exact number of key splits
MAX_SPLITS = 8


@functools.lru_cache(maxsize=256)
def plan(frame_counts: tuple, tokens_per_frame: int, block_n: int, device: torch.device, dtype=torch.int64):
    """Per-sample frame counts and key offsets, and the (sample, start) of every key tile of
    ``block_n`` keys, as ``dtype`` tensors on ``device``."""
    offsets, tile_sample, tile_start = [], [], []
    total = 0
    for b, t in enumerate(frame_counts):
        offsets.append(total)
        n_keys = t * tokens_per_frame
        for start in range(0, n_keys, block_n):
            tile_sample.append(b)
            tile_start.append(start)
        total += n_keys
    as_tensor = functools.partial(torch.tensor, dtype=dtype, device=device)
    return as_tensor(list(frame_counts)), as_tensor(offsets), as_tensor(tile_sample), as_tensor(tile_start)


def num_splits(programs: int, frame_counts: tuple, tokens_per_frame: int, block_n: int, device) -> int:
    """Key splits per query tile: enough programs for two waves over the SMs, no more than
    MAX_SPLITS, and at least two key tiles per split."""
    if FORCE_SPLITS is not None:
        return FORCE_SPLITS
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= 2 * sms:
        return 1
    key_tiles = max(frame_counts) * tokens_per_frame // block_n
    return max(1, min(MAX_SPLITS, -(-2 * sms // programs), key_tiles // 2))


def merge_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge split-KV partials by their log-sum-exp: (out (B, N, H, D) float32, lse (B, H, N)).
    o_parts: (S, B, N, H, D) float32, lse_parts: (S, B, H, N) float32, -inf where a split saw
    nothing live for a row (its weight is then 0). One split is returned as it is."""
    if o_parts.shape[0] == 1:
        return o_parts[0], lse_parts[0]
    lse = torch.logsumexp(lse_parts, dim=0)
    weight = torch.exp(lse_parts - lse).transpose(-1, -2).unsqueeze(-1)  # (S, B, N, H, 1)
    return (weight * o_parts).sum(0), lse


def softmax_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) as (B, H, N) float32: the softmax backward's per-row constant.
    ``out`` should be the forward's float32 accumulator for 16-bit inputs (attention_ops.py)."""
    return (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


def q_strides(q: torch.Tensor):
    """(batch, row, head) strides; batch stride 0 for a shared (N, H, D) q."""
    if q.dim() == 3:
        return 0, q.stride(0), q.stride(1)
    return q.stride(0), q.stride(1), q.stride(2)


def refuses_head_dim(q: torch.Tensor, problem) -> Optional[str]:
    """The kernel backends' head-dim limit (the minimum of docs/reference.md §3.1): multiples of 8 from 16 to 128."""
    d = problem.head_dim
    if d % 8 or not 16 <= d <= 128:
        return f"it supports head dims that are multiples of 8 from 16 to 128, got {d}"
    return None
