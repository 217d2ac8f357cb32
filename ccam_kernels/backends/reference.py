"""The "reference" backend: the specification, written as plainly as possible.

Per sample: build the dense (N, T*P) boolean mask from the mask rule and hand it to
``torch.nn.functional.scaled_dot_product_attention``. Slow on purpose; never tuned.

It runs as the custom op ``ccam_kernels::reference_attention`` like every backend (one op shape
for autocast, torch.compile and torch.export; attention_ops.py). Its backward differentiates
the same plain computation with autograd, recomputing the dropout masks from the forward's seed
(ccam_kernels/dropout.py: the mask is a function of the seed and the position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dropout import keep_mask, keep_scale
from ..mask import dense_mask, key_offsets
from .attention_ops import define_attention_ops, lse_dtype


def _dropped_attention(qb, kb, vb, mask, scale, dropout_p, seed, sample):
    """(N, H, D) attention of one sample with its dropout mask (dropout.keep_mask at every
    (head, row, key) of the sample), computed in the LSE's dtype (float64 for float64)."""
    num_query, num_heads = qb.shape[0], qb.shape[1]
    acc = lse_dtype(qb.dtype)
    group = num_heads // kb.shape[1]
    kh, vh = (x.to(acc).repeat_interleave(group, dim=1) for x in (kb, vb))
    s = torch.einsum("nhd,lhd->hnl", qb.to(acc), kh) * scale
    probs = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
    keep = keep_mask(seed, 0, sample, torch.arange(num_heads, device=qb.device)[:, None],
                     torch.arange(num_query, device=qb.device)[None], 0, kb.shape[0], num_heads, dropout_p)
    # 1 / (1 - p) as a tensor of the computation's dtype (a Python scalar in torch.where
    # would make a float32 tensor: 1e-8 relative error for float64 inputs).
    probs = probs * torch.where(keep, torch.tensor(keep_scale(dropout_p), dtype=acc, device=qb.device),
                                torch.zeros((), dtype=acc, device=qb.device))
    return torch.einsum("hnl,lhd->nhd", probs, vh).to(qb.dtype)


def _attend(q, k, v, frame_counts: tuple, P: int, scale: float, dropout_p: float, seed):
    """(B, N, H, D) output of the plain formula; differentiable by autograd."""
    offsets = key_offsets(frame_counts, P)
    num_query, num_heads = q.shape[-3], q.shape[-2]
    outs = []
    for b, frames in enumerate(frame_counts):
        qb = q if q.dim() == 3 else q[b]
        kb, vb = k[offsets[b]:offsets[b + 1]], v[offsets[b]:offsets[b + 1]]
        mask = dense_mask(num_query, frames, P, device=q.device)
        if dropout_p > 0:
            outs.append(_dropped_attention(qb, kb, vb, mask, scale, dropout_p, seed, b))
            continue
        out = F.scaled_dot_product_attention(  # SDPA's own layout: (batch=1, heads, tokens, D)
            qb.transpose(0, 1)[None], kb.transpose(0, 1)[None], vb.transpose(0, 1)[None],
            attn_mask=mask, scale=scale, enable_gqa=num_heads != k.shape[1],
        )
        outs.append(out[0].transpose(0, 1))
    return torch.stack(outs)


def _lse(q, k, frame_counts: tuple, P: int, scale: float) -> torch.Tensor:
    """(B, H, N): log-sum-exp of each row's visible scores, from the dense masked scores."""
    offsets = key_offsets(frame_counts, P)
    num_query, num_heads = q.shape[-3], q.shape[-2]
    group = num_heads // k.shape[1]
    acc = lse_dtype(q.dtype)
    lses = []
    for b, frames in enumerate(frame_counts):
        qb = (q if q.dim() == 3 else q[b]).to(acc)
        kb = k[offsets[b]:offsets[b + 1]].to(acc).repeat_interleave(group, dim=1)
        s = torch.einsum("nhd,lhd->hnl", qb, kb) * scale
        s = s.masked_fill(~dense_mask(num_query, frames, P, device=q.device), float("-inf"))
        lses.append(torch.logsumexp(s, dim=-1))
    return torch.stack(lses)


def _forward(q, k, v, frame_counts, P, scale, dropout_p, seed, keep_acc, variant):
    with torch.no_grad():
        return _attend(q, k, v, frame_counts, P, scale, dropout_p, seed), _lse(q, k, frame_counts, P, scale), None


def _autograd_inside_op():
    """Autograd, inside a custom op's implementation. The dispatcher runs an op's kernel with
    the autograd keys excluded (it is below autograd); the reference backward differentiates the
    plain formula, so it puts them back for its own recomputation, and turns grad mode on."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    for key in (torch._C.DispatchKey.AutogradFunctionality, torch._C.DispatchKey.AutogradOther):
        excluded = excluded.remove(key)
    guard = torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded)
    return guard


def _backward(dout, q, k, v, o, lse, frame_counts, P, scale, dropout_p, seed, variant):
    with _autograd_inside_op(), torch.enable_grad():
        inputs = [x.detach().requires_grad_() for x in (q, k, v)]
        out = _attend(*inputs, frame_counts, P, scale, dropout_p, seed)
        grads = torch.autograd.grad(out, inputs, dout)
    return tuple(g.contiguous() for g in grads)


# ccam_kernels::reference_attention -> (out, lse, acc) and its _backward -> (dq, dk, dv).
ccam_attention_reference = define_attention_ops("reference_attention", _forward, _backward)
