"""Small random projectors and features for the long-video tests."""

from __future__ import annotations

import datetime
import random

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

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


def spawn_gloo(fn, world: int, tmp_path, *args) -> None:
    """Run ``fn(rank, *args)`` on ``world`` gloo processes spawned here (one torch thread each,
    a file store under tmp_path); an exception or crash on any rank fails the caller. ``fn``
    must be a module-level function (spawned children import it by name)."""
    mp.spawn(_gloo_rank, args=(world, str(tmp_path / "store"), fn, args), nprocs=world, join=True)


def _gloo_rank(rank, world, init_file, fn, args):
    torch.set_num_threads(1)
    # A finite timeout: a rank left waiting for a peer that failed errors out instead of hanging.
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        fn(rank, *args)
        # No rank tears its connections down while a peer may still be reading from them: an
        # early exit made a peer's gloo thread abort ("terminate called without an active
        # exception", SIGABRT) about once in ten runs.
        dist.barrier()
    finally:
        dist.destroy_process_group()
