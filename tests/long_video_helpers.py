"""Small random projectors and features for the long-video tests."""

from __future__ import annotations

import random

import torch

from ccam_kernels import CCAMConfig, CCAMProjector

SMALL = dict(
    num_query=13, hidden_size=32, cross_hidden_size=12, num_heads=4, num_key_value_heads=2,
    intermediate_size=24, output_size=20, attention_dropout=0.0, dropout=0.0,
)


def make_projector(backend="torch", dtype=torch.float64, seed=0, **changes) -> CCAMProjector:
    """Every parameter random (norm weights around 1), so every one is checked."""
    gen = torch.Generator().manual_seed(seed)
    proj = CCAMProjector(CCAMConfig(**{**SMALL, **changes}), backend=backend)
    with torch.no_grad():
        for name, p in proj.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.3 * noise if name.endswith("norm.weight") else noise if name == "query" else 0.3 * noise)
    return proj.to(dtype)


def features(frames: int, tokens_per_frame: int, dtype=torch.float64, seed=1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(frames, tokens_per_frame, SMALL["cross_hidden_size"], generator=gen).to(dtype)


def stream_in_random_chunks(proj: CCAMProjector, x: torch.Tensor, rng: random.Random, most: int = 4) -> torch.Tensor:
    """proj.stream over the frames of x (one video), pushed in random chunks of 1..most frames."""
    total, start = x.shape[0], 0
    s = proj.stream(total)
    while start < total:
        t = rng.randint(1, min(most, total - start))
        s.push(x[start:start + t])
        start += t
    return s.finish()
