"""Triton kernels of the "triton" backend: block-causal cross-attention, forward and backward.

Layout (docs/reference.md §3.1): q (B, N, H, D) or (N, H, D) shared (batch stride 0: read in place for every
sample), k and v packed (L, Hkv, D), one launch for the whole ragged batch. Per-sample frame
counts, key offsets and frame windows are small int tensors the kernels read; nothing else
describes the mask.

Frame windows (partial attention, long_video/partial.py): k and v may hold only the keys of
frames [f0, f1) of each video. The kernels count keys from the window's first key, so a row's
limit becomes ``clamp(limit - f0*P, 0, (f1 - f0)*P)``: still non-decreasing in the row, so
every tile argument below holds unchanged, and a row whose limit is 0 (its frame is before
the window) sees nothing: output 0, LSE -inf. The whole-video op is the window [0, T).

The mask rule, in the kernels' terms (the same rule as ccam_kernels.mask, which the tests
check these kernels against): row i of a sample with T frames sees the keys
``[0, (floor(i*T/N) + 1) * P)`` of its sample. Rows are non-decreasing in what they see, so for a
tile of rows [m0, m1) the keys below the first row's limit are live for every row (no mask),
the keys from there to the last row's limit straddle frame boundaries (masked element-wise),
and nothing past the last row's limit is touched. From the key side, a key of frame f is seen by
the rows i >= ceil(f*N/T): the backward's key tiles walk only those rows.

Forward: online softmax in float32 in the log2 domain (exp2 of scores pre-scaled by
scale*log2(e)); saves the natural-log LSE per row, (B, H, N) float32, for the backward.
Backward: delta = rowsum(dO * O) precomputed; dK/dV by key tile (the GQA group's heads summed
in the program: no atomics); dQ by query tile, per sample, in float32, summed over the batch
on the host for a shared q (deterministic).

Dropout (DROPOUT, a compile-time switch: off, the kernels are the no-dropout ones): the P V
product and the backward's P and dP use P with the entries ccam_kernels.dropout drops zeroed
(triton_dropout.dropped, at row i, key j counted from the start of the video, stream
b * H + h), and the 1 / (1 - p) scale is applied once per row (forward: to the output; backward:
to dP). The LSE and the softmax statistics are those of P without dropout.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import tiling, triton_merge
from .triton_backend import interpreting
from .triton_dropout import dropped

# Globals read inside kernels must be constexpr.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs: IEEE (no TF32) unless the caller allows TF32; 16-bit inputs: tensor cores.
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _window_limit(rows, T, N, P, win0, n_keys):
    """Keys [0, limit) of the window that rows see: the mask rule's limit counted from the
    window's first key ``win0``, clamped to the window's ``n_keys`` keys."""
    return tl.minimum(tl.maximum(((rows * T) // N + 1) * P - win0, 0), n_keys)


@triton.jit
def _head_dim_mask(offs_d, D, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr):
    """The columns < D of a BLOCK_D-wide tile. With EVEN_D (D == BLOCK_D: head dims 16, 32, 64,
    128) a compile-time all-true mask: Triton cannot prove a runtime D's columns whole, so a
    load masked by ``offs_d < D`` is not vectorized and the sm_90 pipeliner leaves it a
    synchronous load (the forward's and dQ's K/V loads had no cp.async at any num_stages);
    masked by a constant it becomes asynchronous copies, pipelined over num_stages."""
    if EVEN_D:
        return offs_d < BLOCK_D
    else:
        return offs_d < D


@triton.jit
def _nonfinite(x):
    return (x != x) | (tl.abs(x) == float("inf"))


@triton.jit
def _seen_nonfinite(seen, x, IEEE: tl.constexpr):
    """The NaN rule (docs/reference.md §7, "NaN and inf") in a tile that straddles the rows' limits: x's rows
    (keys, or query rows in the dK/dV pass) include some that a row of ``seen`` (rows, x rows)
    does not see, whose weight 0 times a NaN or inf would still be NaN. The product runs on x
    with its NaN and inf zeroed, and this adds what each row does see of them: per (row,
    column), NaN, +inf, -inf, or their sum. One product of the 0/1 ``seen`` with x's
    non-finite entries coded as powers of two (NaN 1, +inf 2**7, -inf 2**14: exact in every
    input dtype, TF32 included) gives the three counts at once (each < 2**7: a tile has at most
    64 rows of x; the float32 sums stay exact integers): one accumulator, not three, so that
    this rarely taken branch does not push the hot loop into spilling registers on sm_90."""
    code = tl.where(x != x, 1.0, tl.where(x == float("inf"), 128.0, tl.where(x == -float("inf"), 16384.0, 0.0)))
    counts = _dot(seen.to(x.dtype), code.to(x.dtype), IEEE).to(tl.int32)
    nan = (counts & 127) > 0
    pos = ((counts >> 7) & 127) > 0
    neg = (counts >> 14) > 0
    return (tl.where(nan, float("nan"), 0.0) + tl.where(pos, float("inf"), 0.0)
            + tl.where(neg, -float("inf"), 0.0))


@triton.jit
def _query_tile(FRAMES, KEY_START, FIRST_FRAME, END_FRAME, N, H, G, P, BLOCK_M: tl.constexpr):
    """What a program of a (B*H, query tiles[, splits]) grid owns: its (sample, head, kv head),
    the sample's frame count and first key, its rows, each row's visible-key limit and the
    tile's lowest/highest limit (in keys of the sample's frame window). Query tiles go longest
    first: the last tile sees the most keys (up to twice the average), and blocks start in
    linear order, so the grid's first row of blocks takes the last query tile. B*H is on axis
    0, which has no 65535 limit."""
    pid_bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    T = tl.load(FRAMES + b).to(tl.int64)
    key0 = tl.load(KEY_START + b).to(tl.int64)
    f0 = tl.load(FIRST_FRAME + b).to(tl.int64)
    win0 = f0 * P
    n_keys = tl.load(END_FRAME + b).to(tl.int64) * P - win0
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    limit = _window_limit(offs_m.to(tl.int64), T, N, P, win0, n_keys)
    first = (pid_m * BLOCK_M).to(tl.int64)
    last = tl.minimum(first + BLOCK_M, N) - 1
    lo = _window_limit(first, T, N, P, win0, n_keys)
    hi = _window_limit(last, T, N, P, win0, n_keys)
    return pid_bh, b.to(tl.int64), h, h // G, T, key0, offs_m, limit, lo, hi


# (num_warps, num_stages) tried on a GPU, per kernel (the performance model compiles each for
# sm_90). dK/dV holds two (BLOCK_N, BLOCK_D) float32 accumulators, the (BLOCK_M, BLOCK_N) S, P,
# dP and dS tiles and, in the rows that straddle frames, the NaN rule's zeroed copies of q and
# dO: at 4 warps (128 threads) that is more than 255 registers a thread at every head dim
# (240-952 B of spills for sm_90, ptxas), so dK/dV tunes over 8 warps only.
GPU_CONFIGS = tuple((w, st) for w in (4, 8) for st in (2, 3))
KERNEL_CONFIGS = {"fwd": GPU_CONFIGS, "dq": GPU_CONFIGS, "dkdv": tuple(c for c in GPU_CONFIGS if c[0] == 8)}
ONE_CONFIG_ENV = "CCAM_TRITON_ONE_CONFIG"


def _configs(kernel: str):
    """The autotune space of ``kernel`` (fwd, dq, dkdv): warps and pipeline stages (block
    sizes are fixed per head dim, so the host-side tile plans stay valid). One config in the
    interpreter (nothing to time) and under CCAM_TRITON_ONE_CONFIG=1 (the GPU suite's
    compute-sanitizer case: no tuning runs; the kernel's first config)."""
    if interpreting():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    configs = [triton.Config({}, num_warps=w, num_stages=st) for w, st in KERNEL_CONFIGS[kernel]]
    return configs[:1] if os.environ.get(ONE_CONFIG_ENV, "") == "1" else configs


def _without_spills(kernel: str):
    """An early_config_prune that drops the configs whose sm_90 build spills registers
    (ccam_kernels/perf_model/resources.json: ptxas on each config's PTX, compiled on CPU).
    The table is Hopper's; other GPUs keep every config (their register file is the same
    size, so what spills there spills here too, but the table does not say)."""

    def prune(configs, named_args, **kwargs):
        from ..perf_model import resources

        table = resources.load().get("triton_sm_90", {})
        block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
        kept = [c for c in configs
                if not _spills(table.get(resources.triton_config_key(kernel, block_d, c.num_warps, c.num_stages)))]
        return kept or configs

    return prune


def _spills(res) -> bool:
    return bool(res and (res["spill_stores"] or res["spill_loads"]))


def tune_class(num_query: int, keys_per_video: int) -> int:
    """The autotune key's shape class: the query count and the most keys of one video, each
    rounded up to a power of two, so that a test's tiny shape and the v1.2 shape (N 1024,
    70k keys) tune apart while frame counts of the same class share one tuning. A multiple of
    16 (Triton specializes an int argument equal to 1 or divisible by 16: one compile)."""
    return 16 * (64 * max(num_query - 1, 0).bit_length() + max(keys_per_video - 1, 0).bit_length())


# Tuned once per head dim, precision mode, split mode, dropout mode (and argument dtypes) and
# shape class (tune_class): frame counts, batch and sizes are runtime values, so a new T in the
# same class never recompiles nor re-tunes. The choice is cached on disk with the compiled
# kernels (cache_results), so benchmarks/prewarm.py tunes once for every later process.
_TUNE_KEY = ["D", "IEEE", "TUNE_CLASS", "DROPOUT"]


@triton.autotune(configs=_configs("fwd"), key=_TUNE_KEY + ["SPLIT"], prune_configs_by={"early_config_prune": _without_spills("fwd")},
                 cache_results=True)
@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, FRAMES, KEY_START, FIRST_FRAME, END_FRAME, SEED,
    stride_qb, stride_qn, stride_qh,
    stride_kl, stride_kh, stride_vl, stride_vh,
    stride_ob, stride_on, stride_oh,
    N, H, G, P, D, qk_scale, num_splits, TUNE_CLASS, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    SPLIT: tl.constexpr, DROPOUT: tl.constexpr,
):
    """One (query tile, sample, head), or with SPLIT one share of its key tiles: then O and LSE
    are the split's partials (num_splits, B, N, H, D) and (num_splits, B, H, N), merged by
    log-sum-exp afterwards, so that a batch with few query tiles still fills the GPU (and a
    partial call gets float32 outputs)."""
    pid_bh, b, h, hk, T, key0, offs_m, limit, lo, hi = _query_tile(
        FRAMES, KEY_START, FIRST_FRAME, END_FRAME, N, H, G, P, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = _head_dim_mask(offs_d, D, BLOCK_D, EVEN_D)
    win0 = tl.load(FIRST_FRAME + b).to(tl.int64) * P  # dropout counts keys from the video's start

    q_ptrs = Q + b * stride_qb + offs_m[:, None].to(tl.int64) * stride_qn + h * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + key0 * stride_kl + hk * stride_kh
    v_base = V + key0 * stride_vl + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # This program's keys: all the tile sees, or its split's share of those key tiles.
    key_lo = hi - hi  # 0, as an int64 scalar
    key_hi = hi
    if SPLIT:
        split = tl.program_id(2)
        tiles = (hi + BLOCK_N - 1) // BLOCK_N
        per_split = (tiles + num_splits - 1) // num_splits
        key_lo = tl.minimum(split * per_split, tiles) * BLOCK_N
        key_hi = tl.minimum(key_lo + per_split * BLOCK_N, hi)
        O += split.to(tl.int64) * stride_ob * (tl.num_programs(0) // H)
        LSE += split.to(tl.int64) * tl.num_programs(0) * N
    # Key tiles every row of this tile sees whole: no mask.
    full_end = (lo // BLOCK_N) * BLOCK_N
    for start in range(key_lo, tl.minimum(full_end, key_hi), BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        kt = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None], mask=d_ok[:, None], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        p = dropped(p, SEED, pid_bh, offs_m.to(tl.int64), win0 + offs_n, drop_threshold, DROPOUT)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
        m_i = m_new
    # Key tiles that straddle a frame boundary of some row: masked from the rows' limits.
    for start in range(tl.maximum(full_end, key_lo), key_hi, BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = offs_n < hi
        kt = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale
        seen = offs_n[None, :] < limit[:, None]
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing live yet (in a split not starting at key 0, or a row before its
        # frame window): subtract 0 instead of -inf, so its p and alpha are 0, not NaN.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        p = dropped(p, SEED, pid_bh, offs_m.to(tl.int64), win0 + offs_n, drop_threshold, DROPOUT)
        bad = _nonfinite(v)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), tl.where(bad, tl.zeros_like(v), v), IEEE)
        if tl.max(bad.to(tl.int32)) > 0:  # rare: a NaN or inf value, kept from rows that do not see it
            acc += _seen_nonfinite(seen, v, IEEE)
        m_i = m_new

    # A whole video without splits: every valid row saw key 0 (frame 0), so l_i > 0. A split,
    # or a window after a row's frame, may have seen nothing live for a row: its partial is
    # then 0 with LSE -inf (weight 0 in the merge). A row with a NaN score has l_i = NaN:
    # output and LSE NaN.
    l_safe = tl.where(l_i == 0, 1.0, l_i)
    if DROPOUT:
        out = acc * (drop_scale / l_safe)[:, None]
    else:
        out = acc / l_safe[:, None]
    o_ptrs = O + b * stride_ob + offs_m[:, None].to(tl.int64) * stride_on + h * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(l_i == 0, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=row_ok)


@triton.autotune(configs=_configs("dq"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _without_spills("dq")},
                 cache_results=True)
@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, FRAMES, KEY_START, FIRST_FRAME, END_FRAME, SEED,
    stride_qb, stride_qn, stride_qh,
    stride_kl, stride_kh, stride_vl, stride_vh,
    stride_db, stride_dn, stride_dh,
    N, H, G, P, D, qk_scale, TUNE_CLASS, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dQ of one (sample, head, query tile), float32, into DQ (B, N, H, D) contiguous. A row
    that sees nothing of its window must come with a finite LSE (its p is then 0)."""
    pid_bh, b, h, hk, T, key0, offs_m, limit, lo, hi = _query_tile(
        FRAMES, KEY_START, FIRST_FRAME, END_FRAME, N, H, G, P, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    d_ok = _head_dim_mask(offs_d, D, BLOCK_D, EVEN_D)
    rd = row_ok[:, None] & d_ok[None, :]
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(Q + b * stride_qb + rows * stride_qn + h * stride_qh + offs_d[None, :], mask=rd, other=0.0)
    do = tl.load(DO + b * stride_db + rows * stride_dn + h * stride_dh + offs_d[None, :], mask=rd, other=0.0)
    lse2 = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0) * LOG2E
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=row_ok, other=0.0)
    k_base = K + key0 * stride_kl + hk * stride_kh
    v_base = V + key0 * stride_vl + hk * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    win0 = tl.load(FIRST_FRAME + b).to(tl.int64) * P

    full_end = (lo // BLOCK_N) * BLOCK_N
    for start in range(0, hi, BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        n_ok = offs_n < hi
        kt = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vl + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s = _dot(q, kt, IEEE) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        dp = _dot(do, vt, IEEE)
        if DROPOUT:  # dO reaches the kept probabilities only, scaled by 1 / (1 - p)
            dp = dropped(dp * drop_scale, SEED, pid_bh, offs_m.to(tl.int64), win0 + offs_n, drop_threshold, DROPOUT)
        ds = p * (dp - delta[:, None])
        if start >= full_end:  # a straddling tile: the mask, from the rows' limits
            seen = offs_n[None, :] < limit[:, None]
            ds = tl.where(seen, ds, 0.0)  # exactly 0, even where a hidden key's V or K is NaN
            bad = _nonfinite(kt)
            if tl.max(bad.to(tl.int32)) > 0:  # rare: a NaN or inf key, kept from rows that do not see it
                dq += _seen_nonfinite(seen, tl.trans(kt), IEEE)
                kt = tl.where(bad, tl.zeros_like(kt), kt)
        dq += _dot(ds.to(kt.dtype), tl.trans(kt), IEEE)
    # p was exp2(s*log2e*scale - lse*log2e): dS/dq carries the softmax scale once.
    dq = dq * (qk_scale * LN2)
    dq_base = DQ + b * N * H * D
    tl.store(dq_base + rows * (H * D) + h * D + offs_d[None, :], dq, mask=rd)


@triton.autotune(configs=_configs("dkdv"), key=_TUNE_KEY, prune_configs_by={"early_config_prune": _without_spills("dkdv")},
                 cache_results=True)
@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, FRAMES, KEY_START, FIRST_FRAME, END_FRAME, TILE_SAMPLE, TILE_START, SEED,
    stride_qb, stride_qn, stride_qh,
    stride_kl, stride_kh, stride_vl, stride_vh,
    stride_db, stride_dn, stride_dh,
    stride_dkl, stride_dkh, stride_dvl, stride_dvh,
    N, H, G, P, D, qk_scale, TUNE_CLASS, drop_threshold, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, IEEE: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    """dK, dV of one key tile of one sample and one kv head, summed over the heads of its group
    and over the rows that see it (rows >= ceil(f*N/T) for a key of frame f). Keys and tile
    starts count from the sample's frame window's first key (frame f0)."""
    pid_t = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.load(TILE_SAMPLE + pid_t).to(tl.int64)
    start = tl.load(TILE_START + pid_t).to(tl.int64)
    T = tl.load(FRAMES + b).to(tl.int64)
    key0 = tl.load(KEY_START + b).to(tl.int64)
    f0 = tl.load(FIRST_FRAME + b).to(tl.int64)
    n_keys = (tl.load(END_FRAME + b).to(tl.int64) - f0) * P
    offs_n = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n_keys
    d_ok = _head_dim_mask(offs_d, D, BLOCK_D, EVEN_D)
    nd = n_ok[:, None] & d_ok[None, :]
    keys = (key0 + offs_n)[:, None]
    k = tl.load(K + keys * stride_kl + hk * stride_kh + offs_d[None, :], mask=nd, other=0.0)
    v = tl.load(V + keys * stride_vl + hk * stride_vh + offs_d[None, :], mask=nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    f_first = f0 + start // P
    f_last = f0 + (tl.minimum(start + BLOCK_N, n_keys) - 1) // P
    first_row = (f_first * N + T - 1) // T  # the first row that sees any key of this tile
    full_row = (f_last * N + T - 1) // T  # from here on, rows see the whole tile
    m_begin = (first_row // BLOCK_M) * BLOCK_M
    m_full = ((full_row + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    any_bad = tl.full([], 0, tl.int32)  # a straddling row held a NaN or inf (see below)
    for g in range(0, G):
        h = hk * G + g
        bh = b * H + h
        for m0 in range(m_begin, N, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < N
            rd = row_ok[:, None] & d_ok[None, :]
            rows = offs_m[:, None].to(tl.int64)
            q = tl.load(Q + b * stride_qb + rows * stride_qn + h * stride_qh + offs_d[None, :], mask=rd, other=0.0)
            do = tl.load(DO + b * stride_db + rows * stride_dn + h * stride_dh + offs_d[None, :], mask=rd, other=0.0)
            lse2 = tl.load(LSE + bh * N + offs_m, mask=row_ok, other=0.0) * LOG2E
            delta = tl.load(DELTA + bh * N + offs_m, mask=row_ok, other=0.0)
            # Padded rows load q = dO = 0: their p is finite and they add nothing to dK, dV.
            s = _dot(q, tl.trans(k), IEEE) * qk_scale
            p = tl.exp2(s - lse2[:, None])
            dp = _dot(do, tl.trans(v), IEEE)
            if DROPOUT:  # V and dO meet the kept probabilities only, scaled by 1 / (1 - p)
                kept = dropped(tl.full(p.shape, drop_scale, tl.float32), SEED, bh, offs_m.to(tl.int64),
                               f0 * P + offs_n, drop_threshold, DROPOUT)  # 1 / (1 - p) or 0
                dp = dp * kept
            ds = p * (dp - delta[:, None])
            if m0 < m_full:  # rows that straddle: each row's limit (padded rows see nothing)
                limit = ((offs_m.to(tl.int64) * T) // N + 1 - f0) * P  # may be <= 0: masked
                seen = (offs_n[None, :] < limit[:, None]) & row_ok[:, None]
                # Exactly 0 where the row does not see the key: a NaN key or a NaN row's LSE
                # makes such an entry's p NaN, a NaN value its dp.
                p = tl.where(seen, p, 0.0)
                ds = tl.where(seen, ds, 0.0)
                # A NaN or inf row must reach only the keys it sees: zeroed for the products
                # here, its values added back after the loop to the keys that see it (rare; out
                # of the loop so that its two extra products do not make the loop spill).
                bad_q = _nonfinite(q)
                bad_do = _nonfinite(do)
                any_bad = tl.maximum(any_bad, tl.max((bad_q | bad_do).to(tl.int32)))
                q = tl.where(bad_q, tl.zeros_like(q), q)
                do = tl.where(bad_do, tl.zeros_like(do), do)
            if DROPOUT:
                p = p * kept
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
    if any_bad > 0:  # the non-finite values of the straddling rows, to the keys that see them
        for g in range(0, G):
            h = hk * G + g
            for m0 in range(m_begin, tl.minimum(m_full, N), BLOCK_M):
                offs_m = m0 + tl.arange(0, BLOCK_M)
                row_ok = offs_m < N
                rd = row_ok[:, None] & d_ok[None, :]
                rows = offs_m[:, None].to(tl.int64)
                q = tl.load(Q + b * stride_qb + rows * stride_qn + h * stride_qh + offs_d[None, :], mask=rd, other=0.0)
                do = tl.load(DO + b * stride_db + rows * stride_dn + h * stride_dh + offs_d[None, :], mask=rd,
                             other=0.0)
                limit = ((offs_m.to(tl.int64) * T) // N + 1 - f0) * P
                seen = (offs_n[None, :] < limit[:, None]) & row_ok[:, None]
                dk += _seen_nonfinite(tl.trans(seen), q, IEEE)
                dv += _seen_nonfinite(tl.trans(seen), do, IEEE)
    dk = dk * (qk_scale * LN2)
    tl.store(DK + keys * stride_dkl + hk * stride_dkh + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=nd)
    tl.store(DV + keys * stride_dvl + hk * stride_dvh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=nd)


# -- launchers -----------------------------------------------------------------------------


def block_sizes(head_dim: int, kernel: str = "fwd") -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) of ``kernel`` (fwd, dq, dkdv; BLOCK_M: query rows, BLOCK_N:
    keys). Small tiles under the interpreter (fast, and many tiles straddle frames, so the
    masked paths are exercised at test shapes)."""
    if interpreting():
        return 16, 16, max(16, triton.next_power_of_2(head_dim))
    return gpu_block_sizes(head_dim, kernel)


def gpu_block_sizes(head_dim: int, kernel: str = "fwd") -> tuple[int, int, int]:
    """block_sizes on a GPU (the performance model asks for these on CPU). Every kernel shares
    BLOCK_N (one key-tile plan); dK/dV at head dim 128 walks its rows 32 at a time: with 64, its
    (64, 32) score tiles and two (32, 128) float32 accumulators spill at 8 warps too (sm_90)."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_d >= 128:
        return (32 if kernel == "dkdv" else 64), 32, block_d
    return 64, 64, block_d


def _use_ieee(dtype: torch.dtype) -> bool:
    """float32 without TF32 unless torch allows TF32 for matmuls (its switch is ours)."""
    if dtype != torch.float32:
        return False
    try:
        return not torch.backends.cuda.matmul.allow_tf32
    except RuntimeError:  # newer torch refuses the old flag once fp32_precision is in use
        return torch.get_float32_matmul_precision() == "highest"


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _dropout_args(dropout, device) -> tuple:
    """(SEED pointer tensor, threshold, scale, DROPOUT) of the kernels; ``dropout`` is None or
    tiling.Dropout (seed tensor, p)."""
    if dropout is None:
        return torch.zeros(1, dtype=torch.int64, device=device), 0, 1.0, False
    return dropout.seed_on(device), dropout.threshold, dropout.scale, True


def _forward_launch(q, k, v, frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int, scale: float,
                    out=None, dropout=None, keep_acc: bool = True):
    """The forward over each sample's frame window (k, v: the windows' keys). With ``out``
    (B, N, H, D), one split and no ``keep_acc``, the kernel writes ``out`` and this returns
    (None, lse); otherwise the kernel writes float32 split partials and one merge kernel
    (triton_merge) writes ``out`` when given: (the float32 output if keep_acc or no out, lse)."""
    B, (N, H, D), Hkv = len(frame_counts), q.shape[-3:], k.shape[1]
    block_m, block_n, block_d = block_sizes(D, "fwd")
    p = tiling.window_plan(frame_counts, frame_ranges, tokens_per_frame, block_n, q.device)
    grid = (B * H, triton.cdiv(N, block_m))
    spans = tuple(f1 - f0 for f0, f1 in frame_ranges)
    splits = tiling.num_splits(grid[0] * grid[1], spans, tokens_per_frame, block_n, q.device)
    split = splits > 1 or out is None or keep_acc
    if split:  # float32 partials, merged below
        o_dst = torch.empty(splits, B, N, H, D, device=q.device, dtype=torch.float32)
        lse_dst = torch.empty(splits, B, H, N, device=q.device, dtype=torch.float32)
    else:
        o_dst, lse_dst = out, torch.empty(B, H, N, device=q.device, dtype=torch.float32)
    o_strides = (o_dst.stride(-4), o_dst.stride(-3), o_dst.stride(-2))
    seed, drop_threshold, drop_scale, drop = _dropout_args(dropout, q.device)
    _fwd_kernel[(*grid, splits)](
        q, k, v, o_dst, lse_dst, p.frames, p.key_start, p.first_frame, p.end_frame, seed,
        *tiling.q_strides(q), k.stride(0), k.stride(1), v.stride(0), v.stride(1), *o_strides,
        N, H, H // Hkv, tokens_per_frame, D, scale * LOG2E.value, splits,
        tune_class(N, max(spans, default=0) * tokens_per_frame), drop_threshold, drop_scale,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=D == block_d, IEEE=_use_ieee(q.dtype), SPLIT=split,
        DROPOUT=drop,
    )
    if not split:
        return None, lse_dst
    return triton_merge.merge_splits(o_dst, lse_dst, out, keep_acc)


def forward(q, k, v, frame_counts: tuple, tokens_per_frame: int, scale: float, keep_acc: bool = False,
            dropout=None):
    """(out (B, N, H, D) in q's dtype, lse (B, H, N) float32, acc): with ``keep_acc`` the kernel
    writes float32 partials even without a split, and ``acc`` is the float32 output (else None).
    ``dropout``: None or a tiling.Dropout."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return tiling.whole_video_forward(_forward_launch, q, k, v, frame_counts, tokens_per_frame, scale, keep_acc,
                                      dropout=dropout)


def partial_forward(q, k, v, frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int, scale: float,
                    dropout=None):
    """Partial attention (long_video/partial.py): every query of sample b over the keys of its
    frames [f0_b, f1_b) only, which is all k and v hold. -> (out (B, N, H, D) float32, lse
    (B, H, N) float32), out = 0 and lse = -inf for rows that see none of those frames."""
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    return _forward_launch(q, k, v, frame_counts, frame_ranges, tokens_per_frame, scale, dropout=dropout)


def _backward_launch(dout, q, k, v, lse, delta, frame_counts: tuple, frame_ranges: tuple, tokens_per_frame: int,
                     scale: float, dropout=None):
    """(dq, dk, dv) from the softmax's per-row (lse, delta), over each sample's frame window."""
    B, (N, H, D), Hkv = len(frame_counts), q.shape[-3:], k.shape[1]
    block_m, block_n, block_d = block_sizes(D, "dq")
    p = tiling.window_plan(frame_counts, frame_ranges, tokens_per_frame, block_n, q.device)
    dq_rows = torch.empty(B, N, H, D, device=q.device, dtype=torch.float32)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    seed, drop_threshold, drop_scale, drop = _dropout_args(dropout, q.device)
    common = dict(BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=D == block_d, IEEE=_use_ieee(q.dtype), DROPOUT=drop)
    keys = max((f1 - f0 for f0, f1 in frame_ranges), default=0) * tokens_per_frame
    sizes = (N, H, H // Hkv, tokens_per_frame, D, scale * LOG2E.value, tune_class(N, keys), drop_threshold, drop_scale)
    strides = (*tiling.q_strides(q), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               dout.stride(0), dout.stride(1), dout.stride(2))
    windows = (p.frames, p.key_start, p.first_frame, p.end_frame)
    _bwd_dq_kernel[(B * H, triton.cdiv(N, block_m))](
        q, k, v, dout, lse, delta, dq_rows, *windows, seed, *strides, *sizes, BLOCK_M=block_m, **common)
    if p.tile_sample.numel():  # no key tile when every window is empty (k, v have no rows)
        _bwd_dkdv_kernel[(p.tile_sample.numel(), Hkv)](
            q, k, v, dout, lse, delta, dk, dv, *windows, p.tile_sample, p.tile_start, seed, *strides,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), *sizes, BLOCK_M=block_sizes(D, "dkdv")[0],
            **common)
    dq = dq_rows.sum(0) if q.dim() == 3 else dq_rows
    return dq.to(q.dtype), dk, dv


def backward(dout, q, k, v, out, lse, frame_counts: tuple, tokens_per_frame: int, scale: float, dropout=None):
    """(dq, dk, dv) shaped like q, k, v and dense (an input may have any strides, even
    overlapping ones: its gradient never inherits them). dq of a shared q sums the samples'
    contributions. ``out`` is float32 for 16-bit inputs (the forward's accumulator)."""
    q, k, v, dout = (_last_dim_contiguous(x) for x in (q, k, v, dout))
    delta = tiling.softmax_delta(dout, out)
    return _backward_launch(dout, q, k, v, lse, delta, frame_counts, tiling.whole_videos(frame_counts),
                            tokens_per_frame, scale, dropout)


def partial_backward(dout, dlse, q, k, v, out, lse, frame_counts: tuple, frame_ranges: tuple,
                     tokens_per_frame: int, scale: float, dropout=None):
    """Gradients of ``partial_forward``'s (out, lse) -> (dq, dk, dv): the whole-video
    kernels with the LSE's gradient folded into delta (tiling.partial_softmax_rows)."""
    # The kernels' dots take one dtype: the upstream gradient in q's.
    dout = _last_dim_contiguous(dout.to(q.dtype))
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    lse, delta = tiling.partial_softmax_rows(dout, dlse, out, lse)
    return _backward_launch(dout, q, k, v, lse, delta, frame_counts, frame_ranges, tokens_per_frame, scale, dropout)
