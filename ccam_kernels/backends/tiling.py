"""Host-side launch planning shared by the kernel backends (triton, cuda).

The kernels read the mask rule from small per-sample tensors (frame counts, key offsets and,
for partial attention, the frame window [f0, f1) whose keys k/v hold) and, for the dK/dV pass,
from a list of key tiles (sample, first key); this module builds them, picks the split-KV
factor, and does the small float32 steps around the kernels: the softmax backward's per-row
constant, and the merge of split-KV partials in PyTorch ops (the reference of the backends'
one-kernel merges, triton_merge.py and csrc/ccam/merge.cuh).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from ..dropout import threshold as dropout_threshold

FORCE_SPLITS = None  # tests (and tuning) set an exact number of key splits
MAX_SPLITS = 8


class WindowPlan(NamedTuple):
    """int tensors the kernels read: per sample b, its frame count T_b, the offset of its first
    given key in the packed k/v, its frame window [f0_b, f1_b); and per key tile of the given
    keys, its sample and its first key counted from the window's first key."""

    frames: torch.Tensor
    key_start: torch.Tensor
    first_frame: torch.Tensor
    end_frame: torch.Tensor
    tile_sample: torch.Tensor
    tile_start: torch.Tensor


def whole_videos(frame_counts: tuple) -> tuple:
    """The frame windows of the whole-video op: [0, T_b) for every sample."""
    return tuple((0, t) for t in frame_counts)


class Dropout(NamedTuple):
    """A kernel launch's attention dropout (ccam_kernels/dropout.py): its seed, an int64
    0-dim tensor the kernels read from memory, and the probability p."""

    seed: torch.Tensor
    p: float

    @property
    def threshold(self) -> int:
        return dropout_threshold(self.p)

    @property
    def scale(self) -> float:
        return 1.0 / (1.0 - self.p)

    def seed_on(self, device) -> torch.Tensor:
        return self.seed.to(device=device, dtype=torch.int64).reshape(1)


def dropout_of(dropout_p: float, seed) -> Optional[Dropout]:
    """The Dropout of an op call, or None when dropout_p is 0 (the no-dropout kernels)."""
    if dropout_p <= 0:
        return None
    return Dropout(seed, float(dropout_p))


def whole_video_forward(launch, q, k, v, frame_counts: tuple, tokens_per_frame: int, scale: float, keep_acc: bool,
                        dropout: Optional[Dropout] = None):
    """A kernel backend's whole-video forward: its window launch over [0, T_b) of every sample.
    ``launch(q, k, v, frame_counts, frame_ranges, tokens_per_frame, scale, out, dropout=,
    keep_acc=)`` writes ``out`` (q's dtype; the kernel itself without a split and without
    keep_acc, else the merge of its float32 partials) and returns (the float32 output if
    keep_acc else None, lse). -> (out in q's dtype, lse, acc if keep_acc)."""
    B, (N, H, D) = len(frame_counts), q.shape[-3:]
    out = torch.empty(B, N, H, D, device=q.device, dtype=q.dtype)
    acc, lse = launch(q, k, v, frame_counts, whole_videos(frame_counts), tokens_per_frame, scale, out,
                      dropout=dropout, keep_acc=keep_acc)
    return out, lse, acc if keep_acc else None


# Plans read by a captured CUDA graph: it reads their memory at every replay, so they must
# outlive their eviction from window_plan's cache (freed memory would be reused by others).
_CAPTURED_PLANS: list = []


def window_plan(frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int, block_n: int,
                device: torch.device, dtype=torch.int64) -> WindowPlan:
    """The plan of a call whose k/v hold, sample by sample, only the keys of frames
    [f0_b, f1_b) of each video (partial attention; the whole-video op is the windows [0, T_b)).
    The mask rule still needs T_b; the kernels count keys from the window's first key.
    Cached; under CUDA-graph capture it must be cached already (an eager call with the same
    frame counts first: building it copies host data to the device, which a capture forbids)."""
    p = _window_plan(frame_counts, frame_ranges, tokens_per_frame, block_n, device, dtype)
    if torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing():
        _CAPTURED_PLANS.append(p)
    return p


@functools.lru_cache(maxsize=256)
def _window_plan(frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int, block_n: int,
                 device: torch.device, dtype=torch.int64) -> WindowPlan:
    offsets, tile_sample, tile_start = [], [], []
    total = 0
    for b, (f0, f1) in enumerate(frame_ranges):
        offsets.append(total)
        n_keys = (f1 - f0) * tokens_per_frame
        for start in range(0, n_keys, block_n):
            tile_sample.append(b)
            tile_start.append(start)
        total += n_keys
    as_tensor = functools.partial(torch.tensor, dtype=dtype, device=device)
    return WindowPlan(as_tensor(list(frame_counts)), as_tensor(offsets), as_tensor([f0 for f0, _ in frame_ranges]),
                      as_tensor([f1 for _, f1 in frame_ranges]), as_tensor(tile_sample), as_tensor(tile_start))


@functools.lru_cache(maxsize=256)
def plan(frame_counts: tuple, tokens_per_frame: int, block_n: int, device: torch.device, dtype=torch.int64):
    """Per-sample frame counts and key offsets, and the (sample, start) of every key tile of
    ``block_n`` keys, as ``dtype`` tensors on ``device``: the whole-video plan."""
    p = window_plan(frame_counts, whole_videos(frame_counts), tokens_per_frame, block_n, device, dtype)
    return p.frames, p.key_start, p.tile_sample, p.tile_start


def num_splits(programs: int, frame_counts: tuple, tokens_per_frame: int, block_n: int, device) -> int:
    """Key splits per query tile: enough programs for two waves over the SMs, no more than
    MAX_SPLITS, and at least two key tiles per split. ``frame_counts``: the frames whose keys
    each sample's programs may read (a partial call's window sizes)."""
    if FORCE_SPLITS is not None:
        return FORCE_SPLITS
    if device.type != "cuda":
        return 1
    return splits_for_sms(programs, frame_counts, tokens_per_frame, block_n,
                          torch.cuda.get_device_properties(device).multi_processor_count)


def splits_for_sms(programs: int, frame_counts: tuple, tokens_per_frame: int, block_n: int, sms: int) -> int:
    """num_splits on a GPU with ``sms`` SMs (the performance model asks for an H100's 132)."""
    if programs >= 2 * sms:
        return 1
    key_tiles = max(frame_counts) * tokens_per_frame // block_n
    return max(1, min(MAX_SPLITS, -(-2 * sms // programs), key_tiles // 2))


def merge_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor, out: Optional[torch.Tensor] = None,
                 keep_acc: bool = True) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Merge split-KV partials by their log-sum-exp: (acc (B, N, H, D) float32, lse (B, H, N)).
    o_parts: (S, B, N, H, D) float32, lse_parts: (S, B, H, N) float32, -inf where a split saw
    nothing live for a row (its weight is then 0). One split is returned as it is. With ``out``
    the merged output is also written there (its dtype); ``keep_acc`` False then returns no
    acc. In PyTorch ops (about eight kernels): the reference the backends' one-kernel merges
    (triton_merge.merge_splits, cuda_backend.merge_splits) are tested against."""
    if o_parts.shape[0] == 1:
        acc, lse = o_parts[0], lse_parts[0]
    else:
        lse = torch.logsumexp(lse_parts, dim=0)
        # A row no split saw (a partial's query before its frame window) keeps lse = -inf and
        # output 0: shift by 0 there, so its weights are exp(-inf) = 0 rather than NaN.
        shift = torch.where(torch.isneginf(lse), 0.0, lse)
        weight = torch.exp(lse_parts - shift).transpose(-1, -2).unsqueeze(-1)  # (S, B, N, H, 1)
        acc = (weight * o_parts).sum(0)
    if out is not None:
        out.copy_(acc)
    return (acc if keep_acc or out is None else None), lse


def softmax_delta(dout: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """delta = rowsum(dO * O) as (B, H, N) float32: the softmax backward's per-row constant.
    ``out`` should be the forward's float32 accumulator for 16-bit inputs (attention_ops.py)."""
    return (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()


def partial_softmax_rows(dout: torch.Tensor, dlse: torch.Tensor, out: torch.Tensor,
                         lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse, delta) for the backward kernels of a partial call (float32 out and LSE, whose
    gradients are dout and dlse). With p the window's softmax, d lse / d s = p, so the LSE's
    gradient folds into the softmax backward's per-row constant: ds = p * (dp - (delta - dlse)),
    and the whole-video kernels compute the rest. Rows that see nothing of the window have
    p = 0: their LSE is passed as 0 (not -inf, which would make exp(s - lse) NaN) and their
    delta as 0 (whatever dlse holds there). A NaN LSE (a row with a NaN score) stays NaN: that
    row's gradients are NaN (docs/reference.md §7, "NaN and inf"). ``dout`` in the kernels' input dtype, so
    that delta matches the dp the kernels compute (as in the whole-video backward)."""
    seen = ~torch.isneginf(lse)
    delta = torch.where(seen, softmax_delta(dout, out) - dlse.float(), 0.0).contiguous()
    return torch.where(seen, lse, 0.0).contiguous(), delta


def q_strides(q: torch.Tensor):
    """(batch, row, head) strides; batch stride 0 for a shared (N, H, D) q."""
    if q.dim() == 3:
        return 0, q.stride(0), q.stride(1)
    return q.stride(0), q.stride(1), q.stride(2)


def refuses_head_dim(q: torch.Tensor, problem) -> Optional[str]:
    """The kernel backends' head-dim limit (the minimum of docs/reference.md §3.1): multiples of 8 from 16 to 128."""
    return refuses_head_dim_of(problem.head_dim)


def refuses_head_dim_of(d: int) -> Optional[str]:
    """``refuses_head_dim`` for a head dim alone (a projector's, before any call)."""
    if d % 8 or not 16 <= d <= 128:
        return f"it supports head dims that are multiples of 8 from 16 to 128, got {d}"
    return None
