"""The "reference" backend: the specification, written as plainly as possible.

Per sample: build the dense (N, T*P) boolean mask from the mask rule and hand it to
``torch.nn.functional.scaled_dot_product_attention``. Slow on purpose; never tuned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import AttentionProblem
from ..mask import dense_mask, key_offsets


def ccam_attention_reference(q, k, v, problem: AttentionProblem) -> torch.Tensor:
    """(B, N, H, D) or (N, H, D) queries, packed (L, Hkv, D) keys/values -> (B, N, H, D)."""
    P = problem.tokens_per_frame
    offsets = key_offsets(problem.frame_counts, P)
    outs = []
    for b, frames in enumerate(problem.frame_counts):
        qb = q if problem.shared_query else q[b]
        kb = k[offsets[b] : offsets[b + 1]]
        vb = v[offsets[b] : offsets[b + 1]]
        mask = dense_mask(problem.num_query, frames, P, device=q.device)
        out = F.scaled_dot_product_attention(  # SDPA's own layout: (batch=1, heads, tokens, D)
            qb.transpose(0, 1)[None],
            kb.transpose(0, 1)[None],
            vb.transpose(0, 1)[None],
            attn_mask=mask,
            dropout_p=problem.dropout_p,
            scale=problem.scale,
            enable_gqa=problem.num_heads != problem.num_kv_heads,
        )
        outs.append(out[0].transpose(0, 1))
    return torch.stack(outs)
