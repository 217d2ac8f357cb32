"""FLOP counts shared by every backend's row: live work only (masked pairs excluded)."""

from __future__ import annotations

from ..config import CCAMConfig
from ..mask import live_pairs

# The backward of attention recomputes the scores and runs four more matmuls: 2.5x the
# forward's two matmuls, the convention of FlashAttention's benchmarks.
BWD_OVER_FWD_ATTENTION = 2.5
# A Linear's backward is two GEMMs (input and weight gradients): 2x its forward.
BWD_OVER_FWD_GEMM = 2.0


def attention_flops(num_query, num_heads, head_dim, frame_counts, tokens_per_frame, pass_: str) -> float:
    """4 * H * D per live (query, key) pair for the forward (QK^T and PV)."""
    fwd = 4.0 * num_heads * head_dim * live_pairs(num_query, frame_counts, tokens_per_frame)
    return fwd * _factor(pass_, BWD_OVER_FWD_ATTENTION)


def dense_attention_flops(num_query, num_heads, head_dim, frame_counts, tokens_per_frame, pass_: str) -> float:
    """4 * H * D per (query, key) pair of each sample, masked or not: the work of a backend
    that computes the dense masked scores (the reference, SDPA with a mask). Only the
    time-left estimate uses it; no row reports it."""
    fwd = 4.0 * num_heads * head_dim * num_query * sum(frame_counts) * tokens_per_frame
    return fwd * _factor(pass_, BWD_OVER_FWD_ATTENTION)


def projector_flops(cfg: CCAMConfig, frame_counts, tokens_per_frame, pass_: str) -> float:
    """Every GEMM of the projector (query side included) plus the live attention FLOPs."""
    attn = attention_flops(cfg.num_query, cfg.num_heads, cfg.head_dim, frame_counts, tokens_per_frame, "fwd")
    return projector_gemm_flops(cfg, frame_counts, tokens_per_frame, pass_) + attn * _factor(pass_, BWD_OVER_FWD_ATTENTION)


def projector_gemm_flops(cfg: CCAMConfig, frame_counts, tokens_per_frame, pass_: str) -> float:
    """Every GEMM of the projector (query side included), its attention excluded."""
    B, N, C = len(frame_counts), cfg.num_query, cfg.hidden_size
    tokens = sum(frame_counts) * tokens_per_frame
    kv_width = cfg.num_key_value_heads * cfg.head_dim
    gemm = 2.0 * (
        N * C * C  # q_proj
        + tokens * cfg.cross_hidden_size * 2 * kv_width  # k_proj, v_proj
        + B * N * C * C  # o_proj
        + 3 * B * N * C * cfg.intermediate_size  # gate, up, down
        + B * N * C * cfg.output_size  # out_proj
    )
    return gemm * _factor(pass_, BWD_OVER_FWD_GEMM)


def _factor(pass_: str, bwd_over_fwd: float) -> float:
    return {"fwd": 1.0, "bwd": bwd_over_fwd, "fwd+bwd": 1.0 + bwd_over_fwd}[pass_]
