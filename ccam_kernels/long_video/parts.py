"""The projector's computation around the attention (docs/reference.md §4.2), for the long-video paths.

The streaming and frame-parallel projectors split only the attention; everything around it is
the same as ``CCAMProjector.forward``, written here from the module's own submodules (so no
state of the module is copied; tests compare both paths with ``proj(...)``).
"""

from __future__ import annotations

import torch

from .partial import refuses_partial, resolve_partial_backend


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


def query_heads(proj) -> torch.Tensor:
    """(N, H, D): q_proj(query_norm(query))."""
    cfg = proj.config
    return proj.attn.q_proj(proj.query_norm(proj.query)).view(cfg.num_query, cfg.num_heads, cfg.head_dim)


def keys_values(proj, x: torch.Tensor, weights=None):
    """(M, Cv) features -> k, v (M, Hkv, D). ``weights`` optionally replaces the parameters
    (feature_norm.weight, feature_norm.bias, k_proj.weight, k_proj.bias, v_proj.weight,
    v_proj.bias), e.g. by views whose gradient is summed over a process group."""
    cfg = proj.config
    if weights is None:
        weights = (proj.feature_norm.weight, proj.feature_norm.bias, proj.attn.k_proj.weight,
                   proj.attn.k_proj.bias, proj.attn.v_proj.weight, proj.attn.v_proj.bias)
    nw, nb, kw, kb, vw, vb = weights
    z = torch.nn.functional.layer_norm(x, (cfg.cross_hidden_size,), nw, nb, proj.feature_norm.eps)
    shape = (-1, cfg.num_key_value_heads, cfg.head_dim)
    return torch.nn.functional.linear(z, kw, kb).view(shape), torch.nn.functional.linear(z, vw, vb).view(shape)


def head(proj, attn: torch.Tensor) -> torch.Tensor:
    """(B, N, H, D) attention output -> (B, N, O): o_proj, residual, MLP, out_proj."""
    cfg = proj.config
    batch = attn.shape[0]
    h = proj.query + proj.dropout(proj.attn.o_proj(attn.reshape(batch, cfg.num_query, cfg.hidden_size)))
    h = h + proj.dropout(proj.mlp(proj.mlp_norm(h)))
    return proj.out_proj(proj.out_norm(h))
