"""The "torch" backend: prefix-aware CCAM attention in plain PyTorch ops.

No mask is ever built and no masked pair is computed. The keys of each sample are cut into
segments of a few frames. Segment ``[fa, fb)`` is seen by the query suffix
``[first_query_of_frame[fa], N)`` (queries are ordered by frame), and within that suffix:

* rows whose frame is ``>= fb - 1`` see the whole segment: one block;
* the few rows whose frame ``f`` lies in ``[fa, fb - 1)`` straddle it: one block per such frame,
  its rows against the frames ``[fa, f]``. So every block is plain attention over keys all its
  rows see, and a NaN or inf in a key no row of a block sees never enters its arithmetic (a mask
  would multiply it by probability 0: docs/reference.md §7, "NaN and inf").

Each block returns a partial output normalized over its own keys and the log-sum-exp (LSE) of
its scores; partials are merged by their LSE, as split-KV flash attention does. The backward
recomputes each block from the final output and LSE (no probabilities are stored), so memory
stays O(N + L) per head: with the final LSE, ``exp(s - lse)`` of a block *is* its slice of the
global softmax, and ``rowsum(dO * O)`` is the global one, so per-block gradients add up exactly.

Two engines compute a block. "flash" calls PyTorch's fused CPU attention kernel (the ATen op
that backs ``scaled_dot_product_attention`` on CPU and returns the LSE); "explicit" is plain
matmul + exp in float32 (float64 for float64 inputs) and runs on every device, with dropout.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ..dropout import keep_mask, keep_scale
from ..mask import first_query_of_frame, key_offsets
from . import cpu_attention
from .attention_ops import define_attention_ops
from .cpu_dropout import cpu_dropout_apply_

# Keys per segment. Large enough that each fused call streams a long K/V block (fewer
# merges), small enough that the straddling rows stay a small fraction of the work.
# Measured on a 2-core CPU at N=1024, H=16, D=64, P=729, T=96: 1 to 4 frames (729 to 2916
# keys) are within noise of each other; 16 frames is 30% slower.
SEGMENT_KEYS = 2048
# A segment never spans more than 1/8 of the frames, so straddling rows stay <= ~1/8 of rows.
MIN_SEGMENTS = 8


@dataclass(frozen=True)
class Block:
    """Queries ``[query_start, query_end)`` against keys ``[key_start, key_end)`` of one sample."""

    query_start: int
    query_end: int
    key_start: int
    key_end: int


@functools.lru_cache(maxsize=1024)
def plan_blocks(num_query: int, num_frames: int, tokens_per_frame: int) -> tuple[Block, ...]:
    """The blocks that cover exactly the visible (query, key) pairs of one sample, each pair
    once. Cached: depends only on (N, T, P)."""
    N, T, P = num_query, num_frames, tokens_per_frame
    frames_per_segment = max(1, min(math.ceil(SEGMENT_KEYS / P), T // MIN_SEGMENTS))
    first = first_query_of_frame(N, T)
    blocks = []
    for fa in range(0, T, frames_per_segment):
        fb = min(T, fa + frames_per_segment)
        if first[fb - 1] < N:
            blocks.append(Block(first[fb - 1], N, fa * P, fb * P))
        for f in range(fa, fb - 1):  # the rows of frame f see the segment's frames [fa, f]
            if first[f] < first[f + 1]:
                blocks.append(Block(first[f], first[f + 1], fa * P, (f + 1) * P))
    return tuple(blocks)


# ---------------------------------------------------------------------------------------------
# Layout. Query-side tensors are "folded" to (Hkv, N * G, D), row r = i * G + g holding query i
# of head kv * G + g, so that every query head of one K/V head is a row of one matrix: GQA
# without copying K/V, and a row range [i0, i1) of queries is the row slice [i0 * G, i1 * G).
# For G = 1 folding is a view; otherwise one copy of the (small) query-side tensor per call.


def _fold(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    n, h, d = x.shape
    g = h // num_kv_heads
    return x.view(n, num_kv_heads, g, d).permute(1, 0, 2, 3).reshape(num_kv_heads, n * g, d)


def _unfold(x: torch.Tensor, num_query: int) -> torch.Tensor:
    hkv, rows, d = x.shape
    g = rows // num_query
    return x.view(hkv, num_query, g, d).permute(1, 0, 2, 3).reshape(num_query, hkv * g, d)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Engines. Shapes: qf, dof, of (Hkv, R, D); kf, vf (Hkv, Lk, D); lse (Hkv, R); every row sees
# every key. forward -> (o (Hkv, R, D), lse (Hkv, R)); backward -> (dq, dk, dv).


class _FlashCPUEngine:
    """PyTorch's fused CPU flash-attention kernel (the op behind SDPA on CPU), which also
    returns the LSE. Private ATen op: used only when present; no dropout; finite inputs only
    (it returns 0 for a row whose scores are all NaN, where the formula gives NaN)."""

    name = "flash"

    @staticmethod
    def usable(device: torch.device, dropout_p: float) -> bool:
        return (
            device.type == "cpu"
            and dropout_p == 0.0
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")
        )

    @classmethod
    def forward(cls, qf, kf, vf, scale, dropout):
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(qf[None], kf[None], vf[None], scale=scale)
        return o[0], lse[0]

    @classmethod
    def backward(cls, dof, qf, kf, vf, of, lse, scale, dropout):
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            # The fused kernel takes O in the inputs' dtype (it computes delta from it itself).
            dof[None], qf[None], kf[None], vf[None], of.to(qf.dtype)[None], lse[None], 0.0, False, scale=scale,
        )
        return dq[0], dk[0], dv[0]


@dataclass(frozen=True)
class BlockDropout:
    """The dropout of one block: ``keep_scale`` evaluates ccam_kernels.dropout.keep_mask at
    the block's (head, row, key) positions, so the backward recomputes exactly the forward's
    masks without storing them, and every block plan (and frame window) gives the same ones.
    Rows are folded: row r of kv head kv is query query_start + r // G of head kv * G + r % G;
    keys count from the start of the sample's video."""

    p: float
    seed: torch.Tensor
    sample: int
    query_start: int
    query_end: int
    key_start: int
    key_end: int
    num_heads: int
    group: int

    def keep_scale(self, dtype: torch.dtype, device) -> torch.Tensor:
        """(Hkv, R, K): 1 / (1 - p) where kept, 0 where dropped, in ``dtype`` (the engine's
        accumulation dtype: float64 stays float64)."""
        G = self.group
        r = torch.arange((self.query_end - self.query_start) * G, device=device)
        heads = torch.arange(0, self.num_heads, G, device=device)[:, None] + r % G  # (Hkv, R)
        keep = keep_mask(self.seed, 0, self.sample, heads, self.query_start + r // G, self.key_start,
                         self.key_end, self.num_heads, self.p)
        return torch.where(keep, torch.tensor(keep_scale(self.p), dtype=dtype, device=device),
                           torch.zeros((), dtype=dtype, device=device))

    def rows(self, start: int, end: int) -> "BlockDropout":
        """The dropout of the block's folded rows [start, end) (multiples of the group size)."""
        G = self.group
        return dataclasses.replace(self, query_start=self.query_start + start // G,
                                   query_end=self.query_start + end // G)

    def apply_(self, *blocks: torch.Tensor) -> None:
        """Multiply each (Hkv, R, K) block in place by :meth:`keep_scale` (one mask for all).
        On CPU that is cpu_dropout_apply_ (backends/cpu_dropout.py: the native CPU build's
        Philox, 8 counters at a time, where there is one; the int64 torch Philox alone cost
        2-3x the attention's time)."""
        if blocks[0].device.type == "cpu":
            cpu_dropout_apply_(list(blocks), self.seed, 0, self.sample, self.num_heads, 0, self.query_start,
                               self.key_start, self.p, self.group)
            return
        scale = self.keep_scale(blocks[0].dtype, blocks[0].device)
        for x in blocks:
            x.mul_(scale)


# The explicit engine computes a block in row chunks whose score tile holds at most this many
# elements (4 MB in float32), so that its elementwise passes (exp, the dropout mask, the
# backward's products) run in cache rather than at memory speed: a whole block at the v1.2
# shape is (16 heads, 1024 rows, 1458 keys), 95 MB a pass.
EXPLICIT_TILE_ELEMENTS = 1 << 20


def _row_chunks(rows: int, heads: int, keys: int, group: int) -> list[tuple[int, int]]:
    """[start, end) chunks of a block's folded rows, each a whole number of queries (G rows)."""
    step = max(group, EXPLICIT_TILE_ELEMENTS // max(heads * keys, 1) // group * group)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)]


class _ExplicitEngine:
    """Scores as matmuls in float32 (float64 for float64 inputs), softmax by hand, with
    dropout (a BlockDropout) applied to the probabilities; in row chunks (_row_chunks)."""

    name = "explicit"

    @staticmethod
    def usable(device: torch.device, dropout_p: float) -> bool:
        return True

    @staticmethod
    def _scores(qf, kf, scale):
        """Scores of already up-cast qf, kf."""
        return torch.matmul(qf, kf.transpose(-1, -2)).mul_(scale)

    @classmethod
    def forward(cls, qf, kf, vf, scale, dropout):
        cd = _accumulate_dtype(qf.dtype)
        qf, kf, vf = qf.to(cd), kf.to(cd), vf.to(cd)
        (hkv, R, D), K = qf.shape, kf.shape[1]
        o = torch.empty(hkv, R, vf.shape[-1], dtype=cd, device=qf.device)
        lse = torch.empty(hkv, R, dtype=cd, device=qf.device)
        for r0, r1 in _row_chunks(R, hkv, K, dropout.group if dropout is not None else 1):
            s = cls._scores(qf[:, r0:r1], kf, scale)
            # One exp pass: e = exp(s - rowmax), normalized in the output (D columns, not K).
            # A row with a +inf score (or a NaN) gets NaN in e, its sum, its output and its LSE
            # (not +inf), so that the backward's probabilities of every key of the row are NaN,
            # as the autograd of softmax gives (and as the kernels' online softmax gives).
            m = s.amax(-1, keepdim=True)
            e = s.sub_(m).exp_()
            total = e.sum(-1, keepdim=True)
            if dropout is not None:
                dropout.rows(r0, r1).apply_(e)  # the mask commutes with the row's normalization
            o[:, r0:r1] = torch.matmul(e, vf).div_(total)
            lse_c = m.add_(total.log()).squeeze(-1)
            lse[:, r0:r1] = lse_c.masked_fill_(lse_c == float("inf"), float("nan"))
        return o, lse

    @classmethod
    def backward(cls, dof, qf, kf, vf, of, lse, scale, dropout):
        cd = _accumulate_dtype(qf.dtype)
        dof, qf, kf, vf, of, lse = (x.to(cd) for x in (dof, qf, kf, vf, of, lse))
        (hkv, R, D), K = qf.shape, kf.shape[1]
        delta = (dof * of).sum(-1, keepdim=True)  # rowsum(dO * O), the global one
        dq = torch.empty_like(qf)
        dk = torch.zeros(hkv, K, D, dtype=cd, device=qf.device)
        dv = torch.zeros(hkv, K, vf.shape[-1], dtype=cd, device=qf.device)
        for r0, r1 in _row_chunks(R, hkv, K, dropout.group if dropout is not None else 1):
            rows = slice(r0, r1)
            p = torch.exp(cls._scores(qf[:, rows], kf, scale).sub_(lse[:, rows, None]))
            dp = torch.matmul(dof[:, rows], vf.transpose(-1, -2))
            if dropout is not None:
                kept = p.clone()
                # P * keep for dV; dP * keep: the gradient through the mask (one set of draws)
                dropout.rows(r0, r1).apply_(kept, dp)
                dv.baddbmm_(kept.transpose(-1, -2), dof[:, rows])
            else:
                dv.baddbmm_(p.transpose(-1, -2), dof[:, rows])
            ds = p.mul_(dp.sub_(delta[:, rows]))
            dq[:, rows] = torch.matmul(ds, kf).mul_(scale)
            dk.baddbmm_(ds.transpose(-1, -2), qf[:, rows])
        return dq, dk.mul_(scale), dv


ENGINES = {e.name: e for e in (_FlashCPUEngine, _ExplicitEngine)}


def choose_engine(device: torch.device, dropout_p: float, inputs: tuple = ()):
    """The best usable engine for tensors on ``device``; the explicit one when ``inputs`` hold a
    NaN or inf (see :func:`_for_inputs`)."""
    for engine in (_FlashCPUEngine, _ExplicitEngine):
        if engine.usable(device, dropout_p):
            return _for_inputs(engine, inputs)
    raise AssertionError("the explicit engine is always usable")


def _for_inputs(engine, inputs: tuple):
    """The fused CPU kernel returns 0 for a row whose scores are all NaN, where the NaN rule
    wants NaN: inputs holding a NaN or inf go to the explicit engine. The fused kernel runs on
    CPU only, so the check costs no device sync."""
    if engine is _FlashCPUEngine and not all(bool(torch.isfinite(x).all()) for x in inputs):
        return _ExplicitEngine
    return engine


# ---------------------------------------------------------------------------------------------


def _walk_blocks(problem: _Shape, frames: int, key_offset: int, sample: int, seed: int, device):
    """Per block of one sample: (folded row slice, packed key slice, dropout or None)."""
    G = problem.group_size
    for blk in plan_blocks(problem.num_query, frames, problem.tokens_per_frame):
        rows = slice(blk.query_start * G, blk.query_end * G)
        keys = slice(key_offset + blk.key_start, key_offset + blk.key_end)
        dropout = None
        if problem.dropout_p > 0:
            dropout = BlockDropout(problem.dropout_p, seed, sample, blk.query_start, blk.query_end, blk.key_start,
                                   blk.key_end, problem.num_heads, G)
        yield rows, keys, dropout


@dataclass(frozen=True)
class _Shape:
    """What the block walk needs to know of a call (the op's arguments, without tensors)."""

    frame_counts: tuple
    tokens_per_frame: int
    num_query: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    dropout_p: float

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


def _shape(q, k, frame_counts, P, scale, dropout_p) -> _Shape:
    n, h, d = q.shape[-3:]
    return _Shape(tuple(frame_counts), P, n, h, k.shape[1], d, scale, dropout_p)


def _lse_heads(lse_folded: torch.Tensor, num_query: int) -> torch.Tensor:
    """(B, Hkv, N * G) folded rows -> (B, H, N), head hk * G + g: the op's LSE layout."""
    b, hkv, rows = lse_folded.shape
    g = rows // num_query
    return lse_folded.view(b, hkv, num_query, g).transpose(2, 3).reshape(b, hkv * g, num_query)


def _lse_folded(lse: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """(B, H, N) -> (B, Hkv, N * G), the inverse of :func:`_lse_heads`."""
    b, h, n = lse.shape
    g = h // num_kv_heads
    return lse.view(b, num_kv_heads, g, n).transpose(2, 3).reshape(b, num_kv_heads, n * g)


def _forward(q, k, v, problem: _Shape, engine, seed):
    """(out (B, N, H, D) in q's dtype, lse (B, H, N), acc (B, N, H, D) in the accumulation dtype)."""
    B, N, H, D = len(problem.frame_counts), problem.num_query, problem.num_heads, problem.head_dim
    Hkv, G = problem.num_kv_heads, problem.group_size
    acc = _accumulate_dtype(q.dtype)
    out_acc = torch.empty(B, N, H, D, dtype=acc, device=q.device)
    lse_all = torch.empty(B, Hkv, N * G, dtype=acc, device=q.device)
    qf_shared = _fold(q, Hkv) if q.dim() == 3 else None
    offsets = key_offsets(problem.frame_counts, problem.tokens_per_frame)
    for b, frames in enumerate(problem.frame_counts):
        qf = qf_shared if qf_shared is not None else _fold(q[b], Hkv)
        o_acc = torch.zeros(Hkv, N * G, D, dtype=acc, device=q.device)
        lse = lse_all[b].fill_(float("-inf"))
        for rows, keys, dropout in _walk_blocks(problem, frames, offsets[b], b, seed, q.device):
            o_blk, lse_blk = engine.forward(
                qf[:, rows], k[keys].transpose(0, 1), v[keys].transpose(0, 1), problem.scale, dropout
            )
            # Merge by LSE: new = old * (1 - w) + blk * w, w = exp(lse_blk) / (exp(lse_old) + exp(lse_blk)).
            # With lse_old = -inf (first block of a row) w = 1 exactly.
            lse_blk = lse_blk.to(acc)
            w = torch.sigmoid(lse_blk - lse[:, rows])
            o_acc[:, rows].lerp_(o_blk.to(acc), w[..., None])
            lse[:, rows] = torch.logaddexp(lse[:, rows], lse_blk)
        out_acc[b] = _unfold(o_acc, N)
    return out_acc.to(q.dtype), _lse_heads(lse_all, N), out_acc


def _backward(dout, q, k, v, o, lse_heads, problem: _Shape, engine, seed):
    """o: the forward's output, in float32 when the inputs are 16-bit (the accumulator: delta =
    rowsum(dO * O) must come from it, see attention_ops.py). Gradients dense, in q's dtype."""
    N, Hkv, G, P = problem.num_query, problem.num_kv_heads, problem.group_size, problem.tokens_per_frame
    acc = _accumulate_dtype(q.dtype)
    lse_all = _lse_folded(lse_heads, Hkv)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    qf_shared = _fold(q, Hkv) if q.dim() == 3 else None
    offsets = key_offsets(problem.frame_counts, P)
    for b, frames in enumerate(problem.frame_counts):
        qf = qf_shared if qf_shared is not None else _fold(q[b], Hkv)
        dof, of = _fold(dout[b], Hkv), _fold(o[b], Hkv)
        dqf = torch.zeros(Hkv, N * G, problem.head_dim, dtype=acc, device=q.device)
        for rows, keys, dropout in _walk_blocks(problem, frames, offsets[b], b, seed, q.device):
            dq_blk, dk_blk, dv_blk = engine.backward(
                dof[:, rows], qf[:, rows], k[keys].transpose(0, 1), v[keys].transpose(0, 1),
                of[:, rows], lse_all[b][:, rows], problem.scale, dropout,
            )
            dqf[:, rows] += dq_blk
            dk[keys] += dk_blk.transpose(0, 1)
            dv[keys] += dv_blk.transpose(0, 1)
        if q.dim() == 3:
            dq += _unfold(dqf, N)  # the shared query's gradient sums over the samples
        else:
            dq[b] = _unfold(dqf, N)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _engine(variant: str, device: torch.device, dropout_p: float, dtype: torch.dtype, *, needs_acc: bool,
            inputs: tuple):
    """The engine of a call: the one named by ``variant``, else the best usable one. 16-bit
    inputs whose float32 output feeds a backward (``needs_acc``) use the explicit engine: the
    fused CPU kernel rounds each block's partial output to 16 bits, and the backward's delta
    needs the unrounded one. So do ``inputs`` with a NaN or inf, even under variant "flash"
    (:func:`_for_inputs`)."""
    return _for_inputs(_choose(variant, device, dropout_p, dtype, needs_acc), inputs)


# The variant that runs the native CPU forward (cpu_attention.py); its backward is the best engine's.
NATIVE = "native"


def _choose(variant: str, device: torch.device, dropout_p: float, dtype: torch.dtype, needs_acc: bool):
    if variant == NATIVE:
        variant = ""
    if variant:
        if variant not in ENGINES:
            raise ValueError(f"torch backend variant must be one of {['', *ENGINES, NATIVE]}, got {variant!r}")
        eng = ENGINES[variant]
        if not eng.usable(device, dropout_p):
            raise RuntimeError(f"torch backend engine {variant!r} cannot run on {device} with dropout_p={dropout_p}")
        return eng
    if needs_acc and dtype in (torch.float16, torch.bfloat16):
        return _ExplicitEngine
    return choose_engine(device, dropout_p)


def _native_forward(q, k, v, frame_counts, P, scale, dropout_p, variant):
    """(out, lse) from the native CPU forward where it runs (float32 on CPU, no dropout, a native
    build): "auto" ("") takes it there, being the fastest (docs/torch.md); variant "native"
    insists. Else None. It needs no finiteness check: its products hold only keys all their
    rows see, and rows with a non-finite max take its scalar path (the NaN rule, reference §7)."""
    if variant not in ("", NATIVE):
        return None
    runs = q.device.type == "cpu" and q.dtype == torch.float32 and dropout_p == 0.0
    result = cpu_attention.forward(q, k, v, frame_counts, P, scale) if runs else None
    if result is None and variant == NATIVE:
        why = "no native CPU build" if runs else "it runs float32 CPU tensors without dropout only"
        raise RuntimeError(f"torch backend engine 'native' cannot run on {q.device} with dtype {q.dtype} and "
                           f"dropout_p={dropout_p}: {why}")
    return result


def _op_forward(q, k, v, frame_counts, P, scale, dropout_p, seed, keep_acc, variant):
    native = _native_forward(q, k, v, frame_counts, P, scale, dropout_p, variant)
    if native is not None:
        return native[0], native[1], None  # (float32: no separate accumulator)
    # PyTorch's fused CPU kernel reads wrong values when the head dim is strided (seen with
    # torch 2.13): give every engine rows with unit stride, copying only tensors that lack it.
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    eng = _engine(variant, q.device, dropout_p, q.dtype, needs_acc=keep_acc, inputs=(q, k, v))
    # The engines choose their own precisions (float32 accumulation for 16-bit inputs): an
    # autocast region around the call (a backward run inside one, too) must not recast their
    # matmuls, whose results meet float32 buffers in place.
    with torch.autocast(q.device.type, enabled=False):
        out, lse, out_acc = _forward(q, k, v, _shape(q, k, frame_counts, P, scale, dropout_p), eng, seed)
    return out, lse, (out_acc.float() if keep_acc and out_acc.dtype != torch.float64 else None)


def _op_backward(dout, q, k, v, o, lse, frame_counts, P, scale, dropout_p, seed, variant):
    q, k, v, dout = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v, dout))
    eng = _engine(variant, q.device, dropout_p, q.dtype, needs_acc=True, inputs=(q, k, v, dout))
    with torch.autocast(q.device.type, enabled=False):  # as in _op_forward
        return _backward(dout, q, k, v, o, lse, _shape(q, k, frame_counts, P, scale, dropout_p), eng, seed)


# ccam_kernels::torch_attention -> (out, lse, acc) and ccam_kernels::torch_attention_backward
# -> (dq, dk, dv): custom ops (attention_ops.py), so the compiler sees one node per call.
ccam_attention_torch = define_attention_ops("torch_attention", _op_forward, _op_backward)
torch_attention = ccam_attention_torch.op
