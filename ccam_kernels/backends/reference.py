"""The "reference" backend: the specification, written as plainly as possible.

Per sample and frame f: the rows of frame f (from the mask rule) attend to the keys of frames
0..f, softmax(q k^T * scale) v in plain tensor ops. Slow on purpose; never tuned.

It runs as the custom op ``ccam_kernels::reference_attention`` like every backend (one op shape
for autocast, torch.compile and torch.export; attention_ops.py). Its backward differentiates
the same plain computation with autograd, recomputing the dropout masks from the forward's seed
(ccam_kernels/dropout.py: the mask is a function of the seed and the position).
"""

from __future__ import annotations

import torch

from ..dropout import keep_mask, keep_scale
from ..mask import dense_mask, first_query_of_frame, key_offsets
from .attention_ops import define_attention_ops, lse_dtype


def _attend(q, k, v, frame_counts: tuple, P: int, scale: float, dropout_p: float, seed):
    """(B, N, H, D) output of the plain formula; differentiable by autograd. The rows of frame f
    attend to the keys of frames 0..f, sliced: a key a row does not see takes no part in its
    arithmetic, so a NaN or inf reaches exactly what the formula makes it reach
    (docs/reference.md §7, "NaN and inf"; a mask would multiply a hidden NaN value by probability 0).
    With dropout, each kept probability is scaled by 1 / (1 - p) and the rest are 0, by
    dropout.keep_mask at every (head, row, key) of the sample; computed in the LSE's dtype
    (float64 for float64 inputs)."""
    offsets = key_offsets(frame_counts, P)
    num_query, num_heads = q.shape[-3], q.shape[-2]
    group = num_heads // k.shape[1]
    acc = lse_dtype(q.dtype)
    heads = torch.arange(num_heads, device=q.device)[:, None]
    # 1 / (1 - p) as a tensor of the computation's dtype (a Python scalar in torch.where would
    # make a float32 tensor: 1e-8 relative error for float64 inputs).
    kept, dropped = (torch.tensor(x, dtype=acc, device=q.device) for x in (keep_scale(dropout_p) if dropout_p > 0
                                                                             else 1.0, 0.0))
    outs = []
    for b, frames in enumerate(frame_counts):
        qb = (q if q.dim() == 3 else q[b]).to(acc)
        kb = k[offsets[b]:offsets[b + 1]].to(acc).repeat_interleave(group, dim=1)  # (L_b, H, D)
        vb = v[offsets[b]:offsets[b + 1]].to(acc).repeat_interleave(group, dim=1)
        first = first_query_of_frame(num_query, frames)
        rows = []
        for f in range(frames):
            r0, r1 = first[f], first[f + 1]
            if r0 == r1:
                continue  # no query has frame f
            seen = slice(0, (f + 1) * P)
            s = torch.einsum("nhd,lhd->hnl", qb[r0:r1], kb[seen]) * scale
            p = torch.softmax(s, dim=-1)
            if dropout_p > 0:
                keep = keep_mask(seed, 0, b, heads, torch.arange(r0, r1, device=q.device)[None], 0, (f + 1) * P,
                                 num_heads, dropout_p)
                p = p * torch.where(keep, kept, dropped)
            rows.append(torch.einsum("hnl,lhd->nhd", p, vb[seen]))
        outs.append(torch.cat(rows))
    return torch.stack(outs).to(q.dtype)


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
