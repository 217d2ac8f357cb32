"""LayerNorm + K/V projection fused in one Triton kernel (the projector's largest GEMM).

    kv = LayerNorm(x) @ [W_k | W_v]^T + [b_k | b_v]        x: (M, Cv), M = frames * P

W_k and W_v (and their biases, or none) are read through their own pointers: nothing is
concatenated per call and nothing is cached between calls, so an optimizer step, a loaded
state_dict or a replaced parameter is always what the next call reads.

Each program owns BLOCK_M tokens and BLOCK_N output columns of one half (K or V). It first
computes its rows' mean and rstd in float32 (one pass over the rows; the programs of column
block 0 also save them for the backward), then runs the GEMM's K loop normalizing each x chunk
in registers: the normalized features never touch memory. The result (M, 2*Hkv*D) holds K in
its first half and V in its second: ``kv[:, :C].view(M, Hkv, D)`` is already the (L, Hkv, D)
layout the attention kernels read (rows of stride 2C, unit stride inside a row; no copy).

Program order (GROUP_M): the programs are numbered so that GROUP_M consecutive row blocks run
all their column blocks before the next group starts. The column-block programs that read the
same feature rows then run at about the same time and share them through L2; with the row
axis fastest they would run a whole grid sweep apart, and at 96 frames (161 MB of bf16
features, more than an H200's 60 MB L2) every column block would read the features from HBM
again (benchmarks/NOTES.md counts the bytes).

dtypes: x, gamma and beta may be any floating dtype (the normalization runs in float32); the
GEMM runs in the weights' dtype and the output is in it. Without autocast the projector passes
one dtype for all; under autocast (registered below) the weights are cast to the autocast
dtype, as torch.autocast does for the unfused LayerNorm + Linear.

Backward (PyTorch, cuBLAS): the weight gradients are large GEMMs that cuBLAS runs at peak,
and x_hat is recomputed from the saved mean/rstd (one elementwise pass), so fusing more would
save little; the input gradient is the LayerNorm backward of dk @ W_k + dv @ W_v.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import triton
import triton.language as tl

from .triton_kernels import interpreting


@triton.jit
def _ln_kv_kernel(
    X, GAMMA, BETA, WK, WV, BK, BV, OUT, MEAN, RSTD,
    M, K, C, eps,
    stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile: rows [pid_m*BLOCK_M, +BLOCK_M) x columns [col0, +BLOCK_N) of the K half (W_k, b_k)
    or of the V half (W_v, b_v). C = Hkv*D columns per half; OUT has 2C columns."""
    # Program id -> (row block, column block), GROUP_M row blocks at a time, column block
    # slowest inside a group: the programs of one group read the same GROUP_M*BLOCK_M rows.
    blocks_per_half = tl.cdiv(C, BLOCK_N)
    col_blocks = 2 * blocks_per_half
    row_blocks = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    per_group = GROUP_M * col_blocks
    group_first_row_block = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(row_blocks - group_first_row_block, GROUP_M)  # the last group may be short
    within = pid % per_group
    pid_m = group_first_row_block + within % group_rows
    pid_n = within // group_rows

    # Which half this column block belongs to: both halves have blocks_per_half blocks, so a
    # block never straddles W_k and W_v even when C is not a multiple of BLOCK_N.
    is_v = pid_n >= blocks_per_half
    offs_c = (pid_n - is_v.to(tl.int32) * blocks_per_half) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C
    w_off = offs_c[None, :].to(tl.int64) * stride_wn
    w_cols = tl.where(is_v, WV + w_off, WK + w_off)  # (1, BLOCK_N) pointers, one row of W each

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    rows = X + offs_m[:, None].to(tl.int64) * stride_xm

    # Row statistics in float32 (two accumulators: sum and sum of squares of x - shift, with
    # the row's first element as the shift, which keeps the variance well conditioned).
    shift = tl.load(rows, mask=m_ok[:, None], other=0.0).to(tl.float32)
    s1 = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(rows + offs_k[None, :], mask=m_ok[:, None] & (offs_k < K)[None, :], other=0.0).to(tl.float32)
        d = tl.where((offs_k < K)[None, :], x - shift, 0.0)
        s1 += tl.sum(d, 1)
        s2 += tl.sum(d * d, 1)
    mean_d = s1 / K
    var = tl.maximum(s2 / K - mean_d * mean_d, 0.0)
    mean = mean_d + tl.sum(shift, 1)  # shift is (BLOCK_M, 1)
    rstd = 1.0 / tl.sqrt(var + eps)
    if pid_n == 0:
        tl.store(MEAN + offs_m, mean, mask=m_ok)
        tl.store(RSTD + offs_m, rstd, mask=m_ok)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(GAMMA + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        b = tl.load(BETA + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        xn = (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        w = tl.load(w_cols + offs_k[:, None], mask=k_ok[:, None] & c_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if WK.dtype.element_ty == tl.float32:
            acc += tl.dot(xn, w, input_precision="ieee")
        else:
            acc += tl.dot(xn.to(WK.dtype.element_ty), w)
    if HAS_BIAS:
        bias = tl.load(tl.where(is_v, BV + offs_c, BK + offs_c), mask=c_ok, other=0.0).to(tl.float32)
        acc += bias[None, :]
    out_cols = offs_c + is_v.to(tl.int32) * C
    out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + out_cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])


def _blocks():
    if interpreting():
        return 16, 32, 32
    return 128, 128, 64


# Row blocks per program group. 8 groups 8*128 = 1024 rows (2.4 MB of bf16 features at
# Cv = 1152) with all 16 column blocks of the v1.2 config: 128 programs, about one wave of an
# H200, whose rows stay in L2 while every column block reads them.
GROUP_M = 8


def _check_weights(x, w_k, w_v, b_k, b_v):
    if w_k.shape != w_v.shape or w_k.dim() != 2 or w_k.shape[1] != x.shape[1]:
        raise ValueError(
            f"w_k and w_v must both be (C, {x.shape[1]}) for x of shape {tuple(x.shape)}, "
            f"got w_k {tuple(w_k.shape)} and w_v {tuple(w_v.shape)}"
        )
    if w_k.dtype != w_v.dtype:
        raise ValueError(f"w_k and w_v must share one dtype, got w_k {w_k.dtype} and w_v {w_v.dtype}")
    if (b_k is None) != (b_v is None):
        raise ValueError(f"b_k and b_v must both be tensors or both None, got b_k {type(b_k).__name__} "
                         f"and b_v {type(b_v).__name__}")
    if b_k is not None and (b_k.shape != (w_k.shape[0],) or b_v.shape != (w_k.shape[0],)):
        raise ValueError(f"b_k and b_v must be ({w_k.shape[0]},), got {tuple(b_k.shape)} and {tuple(b_v.shape)}")


def ln_kv_forward(x, gamma, beta, w_k, w_v, b_k, b_v, eps, group_m: int = GROUP_M):
    """(out (M, 2C) in the weights' dtype, mean (M,) float32, rstd (M,) float32)."""
    _check_weights(x, w_k, w_v, b_k, b_v)
    if not isinstance(group_m, int) or group_m < 1:
        raise ValueError(f"group_m must be an int >= 1, got {group_m!r}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_k, w_v = w_k.contiguous(), w_v.contiguous()  # no-ops for nn.Linear weights
    M, K = x.shape
    C = w_k.shape[0]
    out = torch.empty(M, 2 * C, device=x.device, dtype=w_k.dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    has_bias = b_k is not None
    bm, bn, bk = _blocks()
    grid = (triton.cdiv(M, bm) * 2 * triton.cdiv(C, bn),)
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _ln_kv_kernel[grid](
            x, gamma, beta, w_k, w_v,
            b_k if has_bias else w_k, b_v if has_bias else w_v,  # not read without HAS_BIAS
            out, mean, rstd,
            M, K, C, eps, x.stride(0), w_k.stride(0), out.stride(0),
            HAS_BIAS=has_bias, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
            num_warps=8 if not interpreting() else 4, num_stages=3,
        )
    return out, mean, rstd


@torch.library.custom_op("ccam_kernels::layernorm_kv", mutates_args=())
def layernorm_kv_op(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, w_k: torch.Tensor,
                    w_v: torch.Tensor, b_k: Optional[torch.Tensor], b_v: Optional[torch.Tensor],
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv (M, 2C), mean (M,), rstd (M,)): the fused kernel as a custom op (torch.compile
    traces it without a graph break)."""
    return ln_kv_forward(x, gamma, beta, w_k, w_v, b_k, b_v, eps)


@layernorm_kv_op.register_fake
def _(x, gamma, beta, w_k, w_v, b_k, b_v, eps):
    m = x.shape[0]
    stats = x.new_empty(m, dtype=torch.float32)
    return x.new_empty(m, 2 * w_k.shape[0], dtype=w_k.dtype), stats, stats.clone()


def _setup_context(ctx, inputs, output):
    x, gamma, beta, w_k, w_v, b_k, _b_v, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, gamma, beta, w_k, w_v, mean, rstd)
    ctx.has_bias = b_k is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dout, _dmean, _drstd):
    x, gamma, beta, w_k, w_v, mean, rstd = ctx.saved_tensors
    C, wdt = w_k.shape[0], w_k.dtype
    dk, dv = dout[:, :C].to(wdt), dout[:, C:].to(wdt)  # strided views: cuBLAS takes them as they are
    # x_hat recomputed from the saved float32 statistics; the GEMMs go to cuBLAS.
    x_hat = (x.float() - mean[:, None]) * rstd[:, None]
    xa = (x_hat * gamma.float() + beta.float()).to(wdt)  # what the kernel's GEMM read
    d_wk, d_wv = dk.t() @ xa, dv.t() @ xa
    d_bk = d_bv = None
    if ctx.has_bias:
        d_bk, d_bv = dk.float().sum(0).to(wdt), dv.float().sum(0).to(wdt)
    d_xa = torch.addmm(dk @ w_k, dv, w_v).float()
    d_gamma = (d_xa * x_hat).sum(0).to(gamma.dtype)
    d_beta = d_xa.sum(0).to(beta.dtype)
    g = d_xa * gamma.float()
    dx = rstd[:, None] * (g - g.mean(1, keepdim=True) - x_hat * (g * x_hat).mean(1, keepdim=True))
    return dx.to(x.dtype), d_gamma, d_beta, d_wk, d_wv, d_bk, d_bv, None


layernorm_kv_op.register_autograd(_backward, setup_context=_setup_context)


# Autocast: the weights and biases are cast to the autocast dtype of the device (the dtype
# torch.autocast is running, not a fixed one, so torch.library.register_autocast does not
# fit), and the output is in it, as for the unfused LayerNorm + Linear pair. x, gamma and beta
# keep their dtype: the kernel normalizes in float32 whatever they are, and casting x would
# be an extra pass over the largest tensor.
def _register_autocast(device_type: str) -> None:
    key_name = "Autocast" + torch._C._dispatch_key_for_device(device_type)  # AutocastCUDA, AutocastCPU
    key = getattr(torch._C.DispatchKey, key_name)

    def autocast_kernel(x, gamma, beta, w_k, w_v, b_k, b_v, eps):
        dtype = torch.get_autocast_dtype(device_type)

        def cast(t):
            return t if t is None or not t.is_floating_point() else t.to(dtype)

        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(key)):
            return layernorm_kv_op(x, gamma, beta, cast(w_k), cast(w_v), cast(b_k), cast(b_v), eps)

    _AUTOCAST_LIB.impl("layernorm_kv", autocast_kernel, key_name)


_AUTOCAST_LIB = torch.library.Library("ccam_kernels", "FRAGMENT")
for _device_type in ("cuda", "cpu"):  # cpu: Triton's interpreter (tests)
    _register_autocast(_device_type)


def layernorm_kv(x, gamma, beta, w_k, w_v, b_k, b_v, eps: float):
    """(M, Cv) features -> (M, 2C) = [LayerNorm(x) @ w_k^T + b_k | LayerNorm(x) @ w_v^T + b_v],
    fused: the normalized features are never written to memory. b_k and b_v may be None."""
    return layernorm_kv_op(x, gamma, beta, w_k, w_v, b_k, b_v, float(eps))[0]
