"""The split-KV forward's merge as one Triton kernel: it reads each split's float32 partial
output and LSE once and writes the merged output in the inputs' dtype, the merged LSE and, for
training (or a partial call), the float32 output, where tiling.merge_splits runs a chain of
small PyTorch kernels (log-sum-exp, shift, exp, product, sum, cast) that re-read the partials.

The same arithmetic as tiling.merge_splits (which the tests hold it to, and float64): per row,
m = max over splits of lse_s; lse = m + log(sum_s exp(lse_s - m)) (shifted by 0 where every
split is -inf: a row no split saw keeps lse -inf and output 0); out = sum_s exp(lse_s - lse)
o_s, summed in split order. The NaN rule (docs/reference.md §7): a NaN in any split's LSE makes
the row's LSE NaN and so every weight and the output NaN, as torch.logsumexp does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_backend import interpreting


@triton.jit
def _merge_kernel(
    O_PARTS, LSE_PARTS, OUT, ACC, LSE,
    stride_ps, stride_pb, stride_pn, stride_ph,
    stride_ob, stride_on, stride_oh,
    S, H, N, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, WRITE_OUT: tl.constexpr, WRITE_ACC: tl.constexpr,
):
    """Rows [r0, r0 + BLOCK_R) of one (sample, head). LSE_PARTS (S, B, H, N) and LSE (B, H, N)
    contiguous; ACC (B, N, H, D) contiguous; O_PARTS and OUT by their strides (head dim
    contiguous)."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    rd = row_ok[:, None] & (cols < D)[None, :]
    lse_rows = LSE_PARTS + pid_bh * N + rows
    lse_split = tl.num_programs(0).to(tl.int64) * N  # one split's (B, H, N)

    # The LSE: a max over the splits, then the sum of exponentials (the LSE rows are 1/D of the
    # partials' bytes: read three times, from cache, to keep torch.logsumexp's arithmetic).
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    nan = rows < 0
    for s in range(0, S):
        x = tl.load(lse_rows + s * lse_split, mask=row_ok, other=float("-inf"))
        m = tl.maximum(m, x)
        nan = nan | (x != x)
    shift = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([BLOCK_R], tl.float32)
    for s in range(0, S):
        total += tl.exp(tl.load(lse_rows + s * lse_split, mask=row_ok, other=float("-inf")) - shift)
    # total is 0 where every split is -inf: lse -inf (log of 1 then replaced: no log(0) taken).
    lse = tl.where(total == 0, float("-inf"), shift + tl.log(tl.where(total == 0, 1.0, total)))
    lse = tl.where(nan, float("nan"), lse)

    # The output: each split's partial read once, weighted by exp(lse_s - lse).
    w_shift = tl.where(lse == float("-inf"), 0.0, lse)
    parts = O_PARTS + b * stride_pb + rows[:, None].to(tl.int64) * stride_pn + h * stride_ph + cols[None, :]
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for s in range(0, S):
        w = tl.exp(tl.load(lse_rows + s * lse_split, mask=row_ok, other=float("-inf")) - w_shift)
        acc += w[:, None] * tl.load(parts + s * stride_ps, mask=rd, other=0.0)

    tl.store(LSE + pid_bh * N + rows, lse, mask=row_ok)
    offs = b * stride_ob + rows[:, None].to(tl.int64) * stride_on + h * stride_oh + cols[None, :]
    if WRITE_OUT:
        tl.store(OUT + offs, acc.to(OUT.dtype.element_ty), mask=rd)
    if WRITE_ACC:
        acc_offs = ((b * N + rows[:, None].to(tl.int64)) * H + h) * D + cols[None, :]  # contiguous (B, N, H, D)
        tl.store(ACC + acc_offs, acc, mask=rd)


NUM_WARPS = 8


def block_rows(head_dim: int) -> int:
    """Rows per program on a GPU: 4096 float32 of each partial per program and split, over 8
    warps (16 a thread: 128 registers for sm_90; 8192 over 4 warps spilled, its 64-bit element
    pointers included; perf_model/resources.json has the merge kernel's compiles)."""
    return max(16, 4096 // max(16, triton.next_power_of_2(head_dim)))


def merge_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor, out=None, keep_acc: bool = True):
    """tiling.merge_splits in one kernel: -> (acc (B, N, H, D) float32 or None, lse (B, H, N)),
    writing ``out`` (B, N, H, D, any dtype and strides with a contiguous head dim) when given.
    ``keep_acc`` False returns no float32 output (then ``out`` must be given)."""
    S, B, N, H, D = o_parts.shape
    if S == 1:  # nothing to merge: the one split's partial is the output
        if out is not None:
            out.copy_(o_parts[0])
        return (o_parts[0] if keep_acc or out is None else None), lse_parts[0]
    assert o_parts.stride(-1) == 1 and lse_parts.is_contiguous()
    lse = torch.empty(B, H, N, device=o_parts.device, dtype=torch.float32)
    write_acc = keep_acc or out is None
    acc = torch.empty(B, N, H, D, device=o_parts.device, dtype=torch.float32) if write_acc else None
    dst = out if out is not None else acc
    assert dst.stride(-1) == 1
    block_d = max(16, triton.next_power_of_2(D))
    block_r = 16 if interpreting() else block_rows(D)
    _merge_kernel[(B * H, triton.cdiv(N, block_r))](
        o_parts, lse_parts, dst, acc if write_acc else dst, lse,
        o_parts.stride(0), o_parts.stride(1), o_parts.stride(2), o_parts.stride(3),
        dst.stride(0), dst.stride(1), dst.stride(2),
        S, H, N, D,
        BLOCK_R=block_r, BLOCK_D=block_d, WRITE_OUT=out is not None, WRITE_ACC=write_acc,
        num_warps=NUM_WARPS,
    )
    return acc, lse
