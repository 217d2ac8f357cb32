"""Independent float64 oracles of docs/reference.md §2 / §3 / §4, written from that page alone.

Nothing here imports ccam_kernels: the mask rule, the attention and the projector are
re-derived from the contract so the package is checked against a second, plain formulation.
Every function upcasts its inputs with ``.to(torch.float64)``, which is differentiable, so
float64 autograd through the oracle gives the reference gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def oracle_frame_of_query(num_query: int, num_frames: int) -> torch.Tensor:
    """floor(i * T / N) for i = 0 .. N-1, in exact Python integer arithmetic."""
    return torch.tensor([(i * num_frames) // num_query for i in range(num_query)], dtype=torch.int64)


def oracle_visibility(num_query: int, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
    """(N, T * P) bool: query i may attend key j iff j // P <= floor(i * T / N)."""
    query_frame = oracle_frame_of_query(num_query, num_frames)
    key_frame = torch.arange(num_frames * tokens_per_frame, dtype=torch.int64) // tokens_per_frame
    return key_frame[None, :] <= query_frame[:, None]


def _counts(frame_counts) -> list[int]:
    if isinstance(frame_counts, torch.Tensor):
        return [int(t) for t in frame_counts.tolist()]
    return [int(t) for t in frame_counts]


def attention_oracle(q, k, v, frame_counts, tokens_per_frame, scale=None, *, compute_dtype=torch.float64):
    """docs/reference.md §3.1 in float64.

    q: (N, H, D) shared by every sample, or (B, N, H, D); k, v: (L, Hkv, D) packed sample by
    sample, frame by frame. Head h reads kv head h // (H // Hkv). Returns (B, N, H, D) float64.
    ``compute_dtype=torch.float32`` evaluates the same formula in float32: the error of that
    plain evaluation measures how ill-conditioned an input is (e.g. logits in the thousands).
    """
    counts = _counts(frame_counts)
    P = int(tokens_per_frame)
    q64, k64, v64 = q.to(compute_dtype), k.to(compute_dtype), v.to(compute_dtype)
    shared = q64.dim() == 3
    N, H, D = q64.shape[-3:]
    Hkv = k64.shape[1]
    assert H % Hkv == 0
    kv_head = torch.arange(H) // (H // Hkv)
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    assert k64.shape[0] == sum(counts) * P
    outs = []
    start = 0
    for b, frames in enumerate(counts):
        length = frames * P
        kb = k64[start : start + length][:, kv_head]  # (L_b, H, D)
        vb = v64[start : start + length][:, kv_head]
        start += length
        qb = q64 if shared else q64[b]
        scores = torch.einsum("nhd,lhd->hnl", qb, kb) * scale  # (H, N, L_b)
        visible = oracle_visibility(N, frames, P)  # (N, L_b)
        scores = scores.masked_fill(~visible, float("-inf"))
        # The row max only stabilizes exp(); the softmax does not depend on it.
        row_max = scores.amax(dim=-1, keepdim=True).detach()
        e = torch.exp(scores - row_max)
        probs = e / e.sum(dim=-1, keepdim=True)
        outs.append(torch.einsum("hnl,lhd->nhd", probs, vb))
    return torch.stack(outs)


def _cfg(cfg, name):
    return cfg[name] if isinstance(cfg, dict) else getattr(cfg, name)


def projector_oracle(state: dict, cfg, features: torch.Tensor, split_sizes=None) -> torch.Tensor:
    """docs/reference.md §4.2 in float64, written functionally from a state dict (keys as in §4.2).

    ``state`` values are cast with ``.to(torch.float64)`` (differentiable). ``cfg`` is a
    CCAMConfig-like object or dict with the field names of docs/reference.md §4.1; only swiglu/silu gating.
    Dropout is the identity (evaluation).
    """
    assert _cfg(cfg, "hidden_act") in ("swiglu", "silu")
    sd = {name: t.to(torch.float64) for name, t in state.items()}
    N, C = _cfg(cfg, "num_query"), _cfg(cfg, "hidden_size")
    H, Hkv = _cfg(cfg, "num_heads"), _cfg(cfg, "num_key_value_heads")
    Cv, eps = _cfg(cfg, "cross_hidden_size"), _cfg(cfg, "layer_norm_eps")
    D = C // H

    def ln(x, name, width):
        return F.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"], eps)

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))

    x = features.to(torch.float64)
    if x.dim() == 4:
        assert split_sizes is None
        B, T = x.shape[:2]
        split_sizes = [T] * B
        x = x.reshape(B * T, *x.shape[2:])
    counts = _counts(split_sizes)
    B = len(counts)
    frames, P = x.shape[:2]
    assert frames == sum(counts)

    query = sd["query"]
    q_heads = lin(ln(query, "query_norm", C), "attn.q_proj").reshape(N, H, D)
    z = ln(x.reshape(frames * P, Cv), "feature_norm", Cv)
    keys = lin(z, "attn.k_proj").reshape(-1, Hkv, D)
    values = lin(z, "attn.v_proj").reshape(-1, Hkv, D)
    a = attention_oracle(q_heads, keys, values, counts, P)  # (B, N, H, D)
    h = query + lin(a.reshape(B, N, C), "attn.o_proj")
    u = ln(h, "mlp_norm", C)
    h = h + lin(F.silu(lin(u, "mlp.gate_proj")) * lin(u, "mlp.up_proj"), "mlp.down_proj")
    return lin(ln(h, "out_norm", C), "out_proj")


def attention_rows_oracle(q, k, v, frame_counts, tokens_per_frame, scale=None):
    """docs/reference.md §3.1 in float64, row by row from the keys each row sees and nothing
    else: the rows of frame f attend to the keys of frames 0..f of their sample, sliced (no
    mask, so no product with a key a row cannot see). The NaN rule's oracle: a NaN or inf
    anywhere reaches exactly the outputs and gradients the formula makes it reach.
    Same arguments and result as :func:`attention_oracle`; differentiable."""
    counts = _counts(frame_counts)
    P = int(tokens_per_frame)
    q64, k64, v64 = q.to(torch.float64), k.to(torch.float64), v.to(torch.float64)
    N, H, D = q64.shape[-3:]
    kv_head = torch.arange(H) // (H // k64.shape[1])
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    outs, start = [], 0
    for b, frames in enumerate(counts):
        qb = q64 if q64.dim() == 3 else q64[b]
        query_frame = oracle_frame_of_query(N, frames)
        rows = []
        for f in range(frames):
            sel = (query_frame == f).nonzero().flatten()
            if sel.numel() == 0:
                continue
            kf = k64[start:start + (f + 1) * P][:, kv_head]  # (keys seen, H, D)
            vf = v64[start:start + (f + 1) * P][:, kv_head]
            probs = torch.softmax(torch.einsum("nhd,lhd->hnl", qb[sel], kf) * scale, dim=-1)
            rows.append(torch.einsum("hnl,lhd->nhd", probs, vf))
        outs.append(torch.cat(rows))
        start += frames * P
    return torch.stack(outs)
