"""Partial CCAM attention: every query of a video against the keys of a frame range only.

Under the CCAM rule (``ccam_kernels.mask``) a query's softmax runs over a prefix of frames,
so the attention over disjoint frame ranges combines exactly by log-sum-exp: with ``o_r`` the
output normalized over range ``r`` alone and ``lse_r`` the log-sum-exp of its scores,

    lse = log(sum_r exp(lse_r)),   out = sum_r exp(lse_r - lse) * o_r.

A range a query cannot see (it starts after the query's frame) contributes ``lse_r = -inf``
and ``o_r = 0``, i.e. weight 0. This is the split-KV merge of the kernels, exposed so that
a video can be processed frame chunk by frame chunk (``stream.py``) or across processes
(``distributed.py``).

Backends: "reference" (each frame's rows against the range's keys they see, plain autograd), "torch" (blocks of
frames as the torch backend plans them, no N x L mask, its own backward that takes the
gradient of the output *and* of the LSE), "triton" and "cuda" (the whole-video kernels over a
frame window: backends/partial_ops.py, their partial_forward/backward, registered in
KERNEL_PARTIALS through ``kernel_partial``). "auto" means "torch".
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from ..attention import BACKENDS as ATTENTION_BACKENDS
from ..checks import ALL_DTYPES, as_int, check_int, check_probability, check_scale, normalize_frame_counts
from ..dropout import keep_mask, keep_scale
from ..mask import first_query_of_frame, frame_of_query
from ..backends import cuda_backend, tiling, triton_backend
from ..backends.attention_ops import draw_seed
from ..backends.torch_prefix import BlockDropout, _fold, _unfold, choose_engine
from ..api_types import FrameCounts, FrameRanges, Partials

__all__ = ["ccam_partial_attention", "merge_partials", "PARTIAL_BACKENDS", "refuses_partial"]

# Keys per block and the cap on frames per block (<= T / 8, so rows straddling a frame
# boundary inside a block stay a small fraction): the torch backend's own choices.
SEGMENT_KEYS = 2048
MIN_SEGMENTS = 8


@dataclass(frozen=True)
class PartialProblem:
    """A validated ``ccam_partial_attention`` call."""

    frame_counts: tuple[int, ...]  # T_b: frames of each whole video
    frame_ranges: tuple[tuple[int, int], ...]  # [f0_b, f1_b): the frames whose keys are given
    tokens_per_frame: int
    num_query: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    shared_query: bool
    scale: float

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def key_offsets(self) -> list[int]:
        """Start of each sample's range keys in the packed k/v, plus the total at the end."""
        offsets = [0]
        for f0, f1 in self.frame_ranges:
            offsets.append(offsets[-1] + (f1 - f0) * self.tokens_per_frame)
        return offsets


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype of partials and their LSE."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_ranges(frame_ranges, counts) -> tuple[tuple[int, int], ...]:
    if isinstance(frame_ranges, torch.Tensor):
        frame_ranges = frame_ranges.tolist()
    if not isinstance(frame_ranges, (list, tuple)):
        raise TypeError(f"frame_ranges must be a sequence of (first, end) int pairs, got {type(frame_ranges).__name__}")
    if len(frame_ranges) != len(counts):
        raise ValueError(
            f"frame_ranges must hold one (first, end) pair per sample ({len(counts)}), got {len(frame_ranges)}"
        )
    ranges = []
    for b, (pair, total) in enumerate(zip(frame_ranges, counts)):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"frame_ranges[{b}] must be a (first, end) pair, got {pair!r}")
        f0, f1 = as_int(f"frame_ranges[{b}][0]", pair[0]), as_int(f"frame_ranges[{b}][1]", pair[1])
        if not 0 <= f0 <= f1 <= total:
            raise ValueError(
                f"frame_ranges[{b}] must satisfy 0 <= first <= end <= frame_counts[{b}] = {total}, got ({f0}, {f1})"
            )
        ranges.append((f0, f1))
    return tuple(ranges)


def check_partial_args(q, k, v, frame_counts, tokens_per_frame, frame_ranges, scale) -> PartialProblem:
    """The checks of a partial call (docs/reference.md §8.7); k and v hold only the keys of the ranges."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in ALL_DTYPES:
            raise ValueError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be (B, N, H, D) or (N, H, D), got shape {tuple(q.shape)}")
    if k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"k and v must both be (L, Hkv, D), got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q {q.device}, k {k.device}, v {v.device}")
    num_query, num_heads, head_dim = q.shape[-3:]
    length, num_kv_heads, kv_head_dim = k.shape
    if head_dim != kv_head_dim:
        raise ValueError(f"head dim mismatch: q has D={head_dim}, k and v have D={kv_head_dim}")
    if min(num_query, num_heads, head_dim, num_kv_heads) < 1:
        raise ValueError(f"q and k must have non-empty dims, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    if num_heads % num_kv_heads:
        raise ValueError(f"the number of query heads H={num_heads} must be a multiple of Hkv={num_kv_heads}")
    tokens_per_frame = check_int("tokens_per_frame", tokens_per_frame)
    counts = normalize_frame_counts("frame_counts", frame_counts)
    if q.dim() == 4 and q.shape[0] != len(counts):
        raise ValueError(f"q has batch size {q.shape[0]} but frame_counts has {len(counts)} samples")
    ranges = _check_ranges(frame_ranges, counts)
    expected = sum(f1 - f0 for f0, f1 in ranges) * int(tokens_per_frame)
    if expected != length:
        raise ValueError(
            f"frame_ranges {list(ranges)} * tokens_per_frame {tokens_per_frame} = {expected} keys, "
            f"but k and v have L={length}"
        )
    return PartialProblem(counts, ranges, int(tokens_per_frame), num_query, num_heads, num_kv_heads,
                          head_dim, q.dim() == 3, check_scale(scale, head_dim))


# ---------------------------------------------------------------------------------------------
# reference: the specification of a partial, as plainly as possible.


def partial_reference(q, k, v, problem: PartialProblem, dropout_p: float = 0.0, seed=None):
    """Per sample and frame f, the rows of frame f against the range's keys of frames [f0, f],
    sliced (never masked: a key a row does not see takes no part in its arithmetic, so a NaN or
    inf reaches exactly what the formula makes it reach, docs/reference.md §7, "NaN and inf").
    Rows whose frame is before the range see nothing: (out 0, LSE -inf). With dropout, the
    mask at the range's keys, counted from the video's start (dropout.keep_mask)."""
    N, H, D, P, G = problem.num_query, problem.num_heads, problem.head_dim, problem.tokens_per_frame, problem.group_size
    acc = accumulate_dtype(q.dtype)
    offsets = problem.key_offsets()
    outs, lses = [], []
    for b, (total, (f0, f1)) in enumerate(zip(problem.frame_counts, problem.frame_ranges)):
        qb = (q if problem.shared_query else q[b]).to(acc)
        kb = k[offsets[b]:offsets[b + 1]].to(acc).repeat_interleave(G, dim=1)  # (Lr, H, D)
        vb = v[offsets[b]:offsets[b + 1]].to(acc).repeat_interleave(G, dim=1)
        first = first_query_of_frame(N, total)
        out_rows, lse_rows = [], []
        for f in range(total):
            r0, r1 = first[f], first[f + 1]
            seen = (min(f + 1, f1) - f0) * P  # the range's keys that the rows of frame f see
            if r0 == r1:
                continue
            if seen <= 0:
                out_rows.append(torch.zeros(r1 - r0, H, D, dtype=acc, device=q.device))
                lse_rows.append(torch.full((H, r1 - r0), float("-inf"), dtype=acc, device=q.device))
                continue
            s = torch.einsum("nhd,lhd->hnl", qb[r0:r1], kb[:seen]) * problem.scale
            p = torch.softmax(s, dim=-1)
            if dropout_p > 0:  # the mask at the range's keys, counted from the video's start
                keep = keep_mask(seed, 0, b, torch.arange(H, device=q.device)[:, None],
                                 torch.arange(r0, r1, device=q.device)[None], f0 * P, f0 * P + seen, H, dropout_p)
                p = p * torch.where(keep, torch.tensor(keep_scale(dropout_p), dtype=acc, device=q.device),
                                    torch.zeros((), dtype=acc, device=q.device))
            out_rows.append(torch.einsum("hnl,lhd->nhd", p, vb[:seen]))
            lse_rows.append(torch.logsumexp(s, dim=-1))
        outs.append(torch.cat(out_rows))
        lses.append(torch.cat(lse_rows, dim=1))
    return torch.stack(outs), torch.stack(lses)


# ---------------------------------------------------------------------------------------------
# torch: blocks of frames, never an N x L mask.


@dataclass(frozen=True)
class Block:
    """Queries ``[q0, q1)`` against the range's keys ``[k0, k1)`` (offsets inside the range)."""

    q0: int
    q1: int
    k0: int
    k1: int


def plan_partial_blocks(num_query: int, num_frames: int, tokens_per_frame: int, f0: int, f1: int,
                        cap_by_frames: bool = True):
    """Blocks covering exactly the visible pairs of queries x frames [f0, f1) of a video with
    ``num_frames`` frames, each pair once. Queries are ordered by frame, so segment [fa, fb) is
    seen whole by rows ``[first[fb-1], N)`` (one block), and the rows of each frame f in
    [fa, fb-1) see its frames [fa, f] (one block per such frame: no mask, so a key a block's row
    does not see never enters its arithmetic, docs/reference.md §7, "NaN and inf").

    Host work and memory are O(N + blocks), never O(num_frames): a stream of an hour-long
    video plans each chunk from the chunk's own frames (and nothing is cached per chunk).

    ``cap_by_frames=False`` drops the T / 8 cap on a block's frames, so block sizes (and peak
    memory) depend on the range and P only, not on T: what a stream wants. Measured on CPU
    (bench long config, 32-frame chunks): the same stream time at 96 and 512 frames either way."""
    N, T, P = num_query, num_frames, tokens_per_frame
    frames_per_segment = max(1, math.ceil(SEGMENT_KEYS / P))
    if cap_by_frames:
        frames_per_segment = max(1, min(frames_per_segment, T // MIN_SEGMENTS))
    starts = list(range(f0, f1, frames_per_segment))
    ends = [min(f1, fa + frames_per_segment) for fa in starts]
    # first query whose frame is >= f, for f in [f0, f1] only (mask.frame_of_query is the rule).
    first = torch.searchsorted(frame_of_query(N, T), torch.arange(f0, f1 + 1), side="left").tolist()
    blocks = []
    for fa, fb in zip(starts, ends):
        if first[fb - 1 - f0] < N:
            blocks.append(Block(first[fb - 1 - f0], N, (fa - f0) * P, (fb - f0) * P))
        for f in range(fa, fb - 1):  # the rows of frame f see the segment's frames [fa, f]
            if first[f - f0] < first[f + 1 - f0]:
                blocks.append(Block(first[f - f0], first[f + 1 - f0], (fa - f0) * P, (f + 1 - f0) * P))
    return tuple(blocks)


def _walk(problem: PartialProblem, b: int, device, cap_by_frames: bool = True, dropout=None):
    """(folded rows, packed key slice, BlockDropout or None) of every block of sample b;
    ``dropout``: None or (p, seed tensor)."""
    N, P, G = problem.num_query, problem.tokens_per_frame, problem.group_size
    total, (f0, f1) = problem.frame_counts[b], problem.frame_ranges[b]
    base = problem.key_offsets()[b]
    for blk in plan_partial_blocks(N, total, P, f0, f1, cap_by_frames):
        drop = None
        if dropout is not None:  # keys counted from the video's start: the same masks as one call
            drop = BlockDropout(dropout[0], dropout[1], b, blk.q0, blk.q1, f0 * P + blk.k0, f0 * P + blk.k1,
                                problem.num_heads, G)
        yield slice(blk.q0 * G, blk.q1 * G), slice(base + blk.k0, base + blk.k1), drop


def _lse_unfold(lse_f: torch.Tensor, num_query: int) -> torch.Tensor:
    """(Hkv, N*G) folded rows -> (H, N)."""
    hkv, rows = lse_f.shape
    g = rows // num_query
    return lse_f.view(hkv, num_query, g).permute(0, 2, 1).reshape(hkv * g, num_query)


def _lse_fold(lse: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(H, N) -> (Hkv, N*G) folded rows."""
    h, n = lse.shape
    g = h // num_kv_heads
    return lse.view(num_kv_heads, g, n).permute(0, 2, 1).reshape(num_kv_heads, n * g)


def _merge_blocks_into(qf, k, v, problem: PartialProblem, b: int, engine, o_acc, lse, cap_by_frames=True,
                       dropout=None):
    """Merge sample b's blocks into its running folded state, in place: o_acc (Hkv, N*G, D),
    lse (Hkv, N*G), both in the accumulation dtype; (0, -inf) is the empty state."""
    acc = o_acc.dtype
    for rows, keys, drop in _walk(problem, b, qf.device, cap_by_frames, dropout):
        o_blk, lse_blk = engine.forward(qf[:, rows], k[keys].transpose(0, 1), v[keys].transpose(0, 1), problem.scale,
                                        drop)
        lse_blk = lse_blk.to(acc)
        # w = exp(lse_blk) / (exp(lse_old) + exp(lse_blk)); exactly 1 when lse_old = -inf.
        w = torch.sigmoid(lse_blk - lse[:, rows])
        o_acc[:, rows].lerp_(o_blk.to(acc), w[..., None])
        lse[:, rows] = torch.logaddexp(lse[:, rows], lse_blk)


def _partial_forward(q, k, v, problem: PartialProblem, engine, dropout=None):
    B, N, H, D = len(problem.frame_counts), problem.num_query, problem.num_heads, problem.head_dim
    Hkv = problem.num_kv_heads
    acc = accumulate_dtype(q.dtype)
    out = torch.empty(B, N, H, D, dtype=acc, device=q.device)
    lse_out = torch.empty(B, H, N, dtype=acc, device=q.device)
    for b in range(B):
        qf = _fold(q if problem.shared_query else q[b], Hkv)
        o_acc = torch.zeros(Hkv, qf.shape[1], D, dtype=acc, device=q.device)
        lse = torch.full((Hkv, qf.shape[1]), float("-inf"), dtype=acc, device=q.device)
        _merge_blocks_into(qf, k, v, problem, b, engine, o_acc, lse, dropout=dropout)
        out[b] = _unfold(o_acc, N)
        lse_out[b] = _lse_unfold(lse, N)
    return out, lse_out


class RunningPartial:
    """The running (out, LSE) of one video's queries over the frame ranges added so far,
    merged in place block by block (torch backend, no autograd): what a stream keeps.

    q: (N, H, D). ``add(k, v, total_frames, tokens_per_frame, (f0, f1))`` takes the keys of
    frames [f0, f1); ``result()`` -> (out (1, N, H, D), lse (1, H, N)) in the accumulation dtype.
    """

    def __init__(self, q: torch.Tensor, num_kv_heads: int):
        self.q = q if q.stride(-1) == 1 else q.contiguous()
        self.num_kv_heads = num_kv_heads
        self.qf = _fold(self.q, num_kv_heads)
        acc = accumulate_dtype(q.dtype)
        self.out = torch.zeros(num_kv_heads, self.qf.shape[1], q.shape[-1], dtype=acc, device=q.device)
        self.lse = torch.full(self.out.shape[:2], float("-inf"), dtype=acc, device=q.device)

    def add(self, k, v, total_frames: int, tokens_per_frame: int, frame_range) -> None:
        problem = check_partial_args(self.q, k, v, (total_frames,), tokens_per_frame, [frame_range], None)
        k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (k, v))
        with torch.no_grad():
            engine = choose_engine(self.q.device, 0.0, inputs=(self.q, k, v))
            _merge_blocks_into(self.qf, k, v, problem, 0, engine, self.out, self.lse, cap_by_frames=False)

    def result(self):
        n = self.q.shape[0]
        return _unfold(self.out, n)[None], _lse_unfold(self.lse, n)[None]


def _partial_backward(dout, dlse, q, k, v, out, lse_all, problem: PartialProblem, dropout=None):
    """Gradients of (out, lse) -> (dq, dk, dv). Per block, with p = exp(s - lse) the block's
    slice of the range's softmax:  dv = p^T dO,  ds = p * (dO v^T - delta + dLSE) with
    delta = rowsum(dO * O) over the range's output (d lse / d s = p adds the dLSE term)."""
    N, Hkv, D = problem.num_query, problem.num_kv_heads, problem.head_dim
    cd = accumulate_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=cd, device=q.device)
    dk = torch.zeros(k.shape, dtype=cd, device=q.device)
    dv = torch.zeros(v.shape, dtype=cd, device=q.device)
    for b in range(len(problem.frame_counts)):
        qf = _fold(q if problem.shared_query else q[b], Hkv).to(cd)
        dof = _fold(dout[b].to(cd), Hkv)
        lsef = _lse_fold(lse_all[b], Hkv)
        # Rows that see nothing of the range belong to no block; their (inf) LSE is never read.
        shift = (dof * _fold(out[b].to(cd), Hkv)).sum(-1) - _lse_fold(dlse[b].to(cd), Hkv)
        dqf = torch.zeros(Hkv, qf.shape[1], D, dtype=cd, device=q.device)
        for rows, keys, drop in _walk(problem, b, q.device, dropout=dropout):
            kb, vb = k[keys].transpose(0, 1).to(cd), v[keys].transpose(0, 1).to(cd)
            s = torch.matmul(qf[:, rows], kb.transpose(-1, -2)).mul_(problem.scale)
            p = torch.exp(s.sub_(lsef[:, rows, None]))
            dp = torch.matmul(dof[:, rows], vb.transpose(-1, -2))
            if drop is not None:  # V and dO meet the kept probabilities only, scaled by 1 / (1 - p)
                kept = p.clone()
                drop.apply_(kept, dp)  # one mask for P * keep and dP * keep (native on CPU)
                dv[keys] += torch.matmul(kept.transpose(-1, -2), dof[:, rows]).transpose(0, 1)
            else:
                dv[keys] += torch.matmul(p.transpose(-1, -2), dof[:, rows]).transpose(0, 1)
            ds = p.mul_(dp.sub_(shift[:, rows, None]))
            dqf[:, rows] += torch.matmul(ds, kb).mul_(problem.scale)
            dk[keys] += torch.matmul(ds.transpose(-1, -2), qf[:, rows]).mul_(problem.scale).transpose(0, 1)
        if problem.shared_query:
            dq += _unfold(dqf, N)  # a shared query's gradient sums over the samples
        else:
            dq[b] = _unfold(dqf, N)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _PartialTorch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, problem, engine, dropout):
        out, lse = _partial_forward(q, k, v, problem, engine, dropout)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.problem, ctx.dropout = problem, dropout
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _partial_backward(dout, dlse, q, k, v, out, lse, ctx.problem, ctx.dropout)
        return dq, dk, dv, None, None, None


def partial_torch(q, k, v, problem: PartialProblem, dropout_p: float = 0.0, seed=None):
    engine = choose_engine(q.device, dropout_p, inputs=(q, k, v))
    # PyTorch's fused CPU attention misreads strided head dims: unit stride for every engine.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    return _PartialTorch.apply(q, k, v, problem, engine, (dropout_p, seed) if dropout_p > 0 else None)


# ---------------------------------------------------------------------------------------------
# kernel backends: their partial custom op (backends/partial_ops.py), float32 out and LSE.


def refuses_partial(backend: str, device_type: str, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why partial backend ``backend`` cannot take tensors like these, or None: a kernel
    backend's own placement rules (device, dtype, an interpreter's gaps, as for ccam_attention)
    and head-dim limit; "reference" and "torch" take any."""
    if backend not in KERNEL_PARTIALS:
        return None
    return ATTENTION_BACKENDS[backend].refuses_placement(device_type, dtype) or tiling.refuses_head_dim_of(head_dim)


def kernel_partial(name: str, run: Callable) -> Callable:
    """The partial backend of kernel backend ``name``: ``refuses_partial``'s checks, then its
    partial op ``run(q, k, v, problem) -> (out, lse)`` (float32 both, also for 16-bit inputs)."""

    def partial_kernel(q, k, v, problem: PartialProblem, dropout_p: float = 0.0, seed=None):
        why = refuses_partial(name, q.device.type, q.dtype, problem.head_dim)
        if why:
            raise RuntimeError(f"backend {name!r} cannot run partial attention here: {why}")
        return run(q, k, v, problem, dropout_p, seed)

    return partial_kernel


KERNEL_PARTIALS = {
    "triton": triton_backend.ccam_partial_attention_triton,
    "cuda": cuda_backend.ccam_partial_attention_cuda,
}
PARTIAL_BACKENDS = {
    "reference": partial_reference,
    "torch": partial_torch,
    **{name: kernel_partial(name, run) for name, run in KERNEL_PARTIALS.items()},
}


def resolve_partial_backend(backend) -> str:
    """"auto" -> "torch"; every backend of ccam_attention has a partial path."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "auto":
        return "torch"
    if backend in PARTIAL_BACKENDS:
        return backend
    raise ValueError(f"backend must be one of {['auto', *PARTIAL_BACKENDS]}, got {backend!r}")


def partial_backend_of(proj) -> str:
    """The partial-attention backend for a projector's ``backend``: "auto" -> "torch"; a named
    backend without partial attention, or that cannot take the module's device, dtype or head
    dim, is refused (RuntimeError) up front rather than silently replaced."""
    if callable(proj.backend):
        raise RuntimeError(
            "long-video paths need partial attention, which a callable backend does not provide; "
            "construct the projector with backend='auto', 'torch', 'reference', 'triton' or 'cuda'"
        )
    name = resolve_partial_backend(proj.backend)
    param = proj.query
    why = refuses_partial(name, param.device.type, param.dtype, proj.config.head_dim)
    if why:
        raise RuntimeError(f"backend {name!r} cannot run partial attention for this projector: {why}")
    return name


def ccam_partial_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frame_counts: FrameCounts,
                           tokens_per_frame: int, frame_ranges: FrameRanges, *, scale: float | None = None,
                           dropout_p: float = 0.0, seed: Optional[Union[int, torch.Tensor]] = None,
                           backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """CCAM attention of every query of each video over the keys of its frames [f0_b, f1_b) only.

    Args:
        q: (B, N, H, D), or (N, H, D) shared by every sample.
        k, v: (L, Hkv, D), L = sum(f1_b - f0_b) * tokens_per_frame: the keys of the frames in
            the ranges only, packed sample by sample, frame by frame.
        frame_counts: B ints >= 1: frames T_b of each whole video (they fix the mask rule).
        tokens_per_frame: P.
        frame_ranges: B pairs (f0_b, f1_b), 0 <= f0_b <= f1_b <= T_b (an empty range is allowed).
        scale: softmax scale, default 1 / sqrt(D).
        dropout_p: attention dropout (ccam_kernels.dropout's mask, keys counted from the start
            of the video: partials of any split of the frames with one seed merge into the
            whole video's dropped attention; the LSE is that of the undropped scores).
        seed: the dropout seed, an int or an int64 0-dim tensor; drawn from torch's default
            generator for q's device when None. Pass the same one for every range of a video.
        backend: "auto" (= "torch"), "torch", "reference", "triton" (CUDA tensors, or CPU
            under TRITON_INTERPRET=1; float32, float16, bfloat16; head dims 16..128, multiples of 8)
            or "cuda" (CUDA tensors, or CPU under CCAM_CUDA_EMULATE=1; float16, bfloat16; the
            same head dims).

    Returns:
        (out, lse): out (B, N, H, D), the attention normalized over the range's visible keys,
        and lse (B, H, N), the log-sum-exp of those scores, both float32 (float64 for float64
        inputs; the triton and cuda backends refuse float64). A query that sees no frame of its range
        has lse = -inf and out = 0. Differentiable in q, k and v through both outputs.
    """
    problem = check_partial_args(q, k, v, frame_counts, tokens_per_frame, frame_ranges, scale)
    dropout_p = check_probability("dropout_p", dropout_p)
    run = PARTIAL_BACKENDS[resolve_partial_backend(backend)]
    if dropout_p == 0:
        return run(q, k, v, problem)
    seed = draw_seed(q.device) if seed is None else torch.as_tensor(seed, dtype=torch.int64, device=q.device)
    return run(q, k, v, problem, dropout_p, seed.reshape(()))


def _check_partials(partials) -> list:
    """The (out, lse) pairs as a list, each out (B, N, H, D) and lse (B, H, N) of the first
    pair's shapes, dtypes and device; TypeError/ValueError naming the first bad pair."""
    if isinstance(partials, torch.Tensor) or not isinstance(partials, Iterable):
        raise TypeError(f"merge_partials needs an iterable of (out, lse) pairs, got {type(partials).__name__}")
    partials = list(partials)
    if not partials:
        raise ValueError("merge_partials needs at least one (out, lse) pair, got none")
    for i, pair in enumerate(partials):
        # A tensor is refused even when its first dim is 2: it would unpack as a "pair".
        if (not isinstance(pair, (tuple, list)) or len(pair) != 2
                or not all(isinstance(x, torch.Tensor) for x in pair)):
            got = f"{type(pair).__name__} of length {len(pair)}" if isinstance(pair, (tuple, list)) else type(pair).__name__
            raise TypeError(f"merge_partials: partials[{i}] must be an (out, lse) pair of tensors, got {got}")
        out, lse = pair
        if out.dim() != 4 or lse.shape != (out.shape[0], out.shape[2], out.shape[1]):
            raise ValueError(f"merge_partials: partials[{i}] must be out (B, N, H, D) and lse (B, H, N), "
                             f"got out {tuple(out.shape)} and lse {tuple(lse.shape)}")
        first_out, first_lse = partials[0]
        if out.shape != first_out.shape:
            raise ValueError(f"merge_partials: every partial must have the shapes of the first, got out "
                             f"{tuple(out.shape)} at partials[{i}] and {tuple(first_out.shape)} at partials[0]")
        for x, first in ((out, first_out), (lse, first_lse)):
            if x.dtype != first.dtype or x.device != first.device:
                raise ValueError(f"merge_partials: every partial must have the dtypes and device of the first, "
                                 f"got {x.dtype} on {x.device} at partials[{i}] and {first.dtype} on "
                                 f"{first.device} at partials[0]")
    return partials


def merge_partials(partials: Partials) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge partials of disjoint frame ranges: a sequence of (out (B, N, H, D), lse (B, H, N))
    -> (out, lse) of the union of the ranges. Differentiable; -inf LSEs weigh 0, and a query
    that sees nothing in any of them keeps (0, -inf)."""
    partials = _check_partials(partials)
    outs = torch.stack([o for o, _ in partials])  # (R, B, N, H, D)
    lses = torch.stack([lse for _, lse in partials])  # (R, B, H, N)
    # Shift by the max (a constant: the result does not depend on it, so no gradient flows).
    top = lses.detach().amax(0)
    top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=top.dtype, device=top.device))
    weights = torch.exp(lses - top)  # -inf -> 0
    norm = weights.sum(0)  # (B, H, N)
    seen = norm != 0  # a NaN norm (a NaN LSE: a row with a NaN score) keeps out and LSE NaN
    safe_norm = torch.where(seen, norm, torch.ones((), dtype=norm.dtype, device=norm.device))
    lse = torch.where(seen, top + torch.log(safe_norm), float("-inf"))
    w = (weights / safe_norm).transpose(-1, -2).unsqueeze(-1)  # (R, B, N, H, 1)
    return (w * outs).sum(0), lse
