"""LayerNorm + K/V projection fused in one Triton kernel (the projector's largest GEMM).

    kv = LayerNorm(x) @ [W_k | W_v]^T + [b_k | b_v]        x: (M, Cv), M = frames * P

Each program owns BLOCK_M tokens and BLOCK_N output columns. It first computes its rows'
mean and rstd in float32 (one pass over the rows; the program of column block 0 also saves
them for the backward), then runs the GEMM's K loop normalizing each x chunk in registers:
the normalized features never touch memory. The result (M, 2*Hkv*D) holds K in its first half
and V in its second: ``kv[:, :C].view(M, Hkv, D)`` is already the (L, Hkv, D) layout the
attention kernels read (rows of stride 2C, unit stride inside a row; no copy).

Backward (PyTorch, cuBLAS): the weight gradients are two large GEMMs that cuBLAS runs at
peak, and x_hat is recomputed from the saved mean/rstd (one elementwise pass), so fusing more
would save little; the input gradient is the LayerNorm backward of dkv @ W.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .triton_kernels import interpreting


@triton.jit
def _ln_kv_kernel(
    X, GAMMA, BETA, W, BIAS, OUT, MEAN, RSTD,
    M, K, NOUT, eps,
    stride_xm, stride_wn, stride_om,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < NOUT
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
    w_rows = W + offs_n[None, :].to(tl.int64) * stride_wn
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(rows + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
        g = tl.load(GAMMA + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        b = tl.load(BETA + offs_k, mask=k_ok, other=0.0).to(tl.float32)
        xn = (x - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
        w = tl.load(w_rows + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)  # (BLOCK_K, BLOCK_N)
        if W.dtype.element_ty == tl.float32:
            acc += tl.dot(xn, w, input_precision="ieee")
        else:
            acc += tl.dot(xn.to(W.dtype.element_ty), w)
    bias = tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    acc += bias[None, :]
    out_ptrs = OUT + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _blocks():
    if interpreting():
        return 16, 32, 32
    return 128, 128, 64


def ln_kv_forward(x, gamma, beta, weight, bias, eps):
    """(out (M, NOUT) in x's dtype, mean (M,) float32, rstd (M,) float32)."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    weight = weight.contiguous()
    M, K = x.shape
    nout = weight.shape[0]
    out = torch.empty(M, nout, device=x.device, dtype=x.dtype)
    mean = torch.empty(M, device=x.device, dtype=torch.float32)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    bm, bn, bk = _blocks()
    grid = (triton.cdiv(M, bm), triton.cdiv(nout, bn))
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        _ln_kv_kernel[grid](
            x, gamma, beta, weight, bias, out, mean, rstd,
            M, K, nout, eps, x.stride(0), weight.stride(0), out.stride(0),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if not interpreting() else 4, num_stages=3,
        )
    return out, mean, rstd


@torch.library.custom_op("ccam_kernels::layernorm_kv", mutates_args=())
def layernorm_kv_op(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kv (M, NOUT), mean (M,), rstd (M,)): the fused kernel as a custom op (torch.compile
    traces it without a graph break)."""
    return ln_kv_forward(x, gamma, beta, weight, bias, eps)


@layernorm_kv_op.register_fake
def _(x, gamma, beta, weight, bias, eps):
    m = x.shape[0]
    stats = x.new_empty(m, dtype=torch.float32)
    return x.new_empty(m, weight.shape[0]), stats, stats.clone()


def _setup_context(ctx, inputs, output):
    x, gamma, beta, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, gamma, beta, weight, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dout, _dmean, _drstd):
    x, gamma, beta, weight, mean, rstd = ctx.saved_tensors
    # x_hat recomputed from the saved float32 statistics; the GEMMs go to cuBLAS.
    x_hat = (x.float() - mean[:, None]) * rstd[:, None]
    xa = (x_hat * gamma.float() + beta.float()).to(weight.dtype)  # what the kernel's GEMM read
    d_weight = dout.t().to(weight.dtype) @ xa
    d_bias = dout.float().sum(0).to(weight.dtype)
    d_xa = (dout.to(weight.dtype) @ weight).float()
    d_gamma = (d_xa * x_hat).sum(0).to(gamma.dtype)
    d_beta = d_xa.sum(0).to(beta.dtype)
    g = d_xa * gamma.float()
    dx = rstd[:, None] * (g - g.mean(1, keepdim=True) - x_hat * (g * x_hat).mean(1, keepdim=True))
    return dx.to(x.dtype), d_gamma, d_beta, d_weight, d_bias, None


layernorm_kv_op.register_autograd(_backward, setup_context=_setup_context)


def layernorm_kv(x, gamma, beta, weight, bias, eps: float):
    """(M, Cv) features -> (M, NOUT) = LayerNorm(x) @ weight^T + bias, fused: the normalized
    features are never written to memory."""
    return layernorm_kv_op(x, gamma, beta, weight, bias, float(eps))[0]
