"""Frame-parallel projector (proj(..., group=...)) with gloo on CPU, 2 and 3 processes spawned
here: output and every gradient equal to one process running the whole batch (float64,
<= 1e-10), uneven shards including a rank with no frame of some video and a rank with no frame
at all; hidden dropout draws the same masks on every rank; attention dropout in training gives
the one-process output and gradients under the same manual seed (rank 0's); a bad argument on
one rank raises on every rank (no hang)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from conftest import rel_err
from long_video_helpers import features, make_projector, spawn_gloo

P = 3


def local_slice(x, shards, rank):
    """Rank ``rank``'s frames of each video from packed full features x; shards[r][b] = frames."""
    counts = [sum(col) for col in zip(*shards)]
    parts, start = [], 0
    for b, total in enumerate(counts):
        first = start + sum(s[b] for s in shards[:rank])
        parts.append(x[first:first + shards[rank][b]])
        start += total
    return torch.cat(parts)


def _train_both(rank, shards, seed, **changes):
    """(ref, proj, x, local, y_ref, y): one process and this rank, both backpropagated; the
    generator is seeded alike for the one-process run and on rank 0 (the others on purpose not)."""
    group = dist.group.WORLD
    counts = [sum(col) for col in zip(*shards)]
    ref = make_projector(seed=seed, **changes).train()
    proj = make_projector(seed=seed, **changes).train()
    x = features(sum(counts), P, seed=seed + 1).requires_grad_(True)
    torch.manual_seed(seed + 7)
    y_ref = ref(x, counts)
    g = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 2))
    (y_ref * g).sum().backward()

    local = local_slice(x.detach(), shards, rank).clone().requires_grad_(True)
    torch.manual_seed(seed + 7 if rank == 0 else seed + 50 + rank)
    y = proj(local, shards[rank], group=group)
    (y * g).sum().backward()
    return ref, proj, x, local, y_ref, y


def _check_rank(rank, shards, seed):
    group = dist.group.WORLD
    counts = [sum(col) for col in zip(*shards)]
    ref, proj, x, local, y_ref, y = _train_both(rank, shards, seed)
    _check_equal(rank, shards, ref, proj, x, local, y_ref, y)

    # Attention dropout in training (the released config's 0.1; here 0.3): rank 0's seed and
    # a mask of the key's position in the video make it the one-process computation.
    dropped = _train_both(rank, shards, seed, attention_dropout=0.3)
    _check_equal(rank, shards, *dropped)
    assert rel_err(dropped[-1], y) > 1e-3, "attention dropout must change the output"
    _check_more(rank, shards, seed, group, counts, ref, proj, x, local)


def _check_equal(rank, shards, ref, proj, x, local, y_ref, y):
    assert rel_err(y, y_ref) <= 1e-10, rel_err(y, y_ref)
    ref_params = dict(ref.named_parameters())
    for name, p in proj.named_parameters():
        if name == "attn.k_proj.bias":
            # A bias shared by all keys shifts a row's scores by a constant: its true gradient is 0,
            # so both sides must be rounding noise next to the key weights' gradient.
            scale = ref_params["attn.k_proj.weight"].grad.norm()
            assert p.grad.norm() <= 1e-10 * scale and ref_params[name].grad.norm() <= 1e-10 * scale
            continue
        err = rel_err(p.grad, ref_params[name].grad)
        assert err <= 1e-10, (rank, name, err)
    want = local_slice(x.grad, shards, rank)
    assert local.grad.shape == want.shape
    if want.numel():
        assert rel_err(local.grad, want) <= 1e-10, (rank, rel_err(local.grad, want))


def _check_more(rank, shards, seed, group, counts, ref, proj, x, local):
    with torch.no_grad():  # inference: no gradient machinery, same output
        assert rel_err(proj.eval()(local, shards[rank], group=group), ref.eval()(x, counts)) <= 1e-10

    # Hidden dropout in training: every rank must draw the same masks.
    drop = make_projector(seed=seed, dropout=0.5).train()
    torch.manual_seed(seed + 100 + rank)  # different RNG states per rank on purpose
    with torch.no_grad():
        y_drop = drop(local, shards[rank], group=group)
        everyone = [torch.empty_like(y_drop) for _ in shards]
        dist.all_gather(everyone, y_drop, group=group)
        assert all(torch.equal(other, everyone[0]) for other in everyone)
        assert not torch.equal(y_drop, drop.eval()(local, shards[rank], group=group))

    # One rank's bad argument is every rank's error.
    bad = local.detach().float() if rank == len(shards) - 1 else local.detach()
    with pytest.raises(ValueError, match=f"rank {len(shards) - 1}: features dtype must match"):
        proj(bad, shards[rank], group=group)
    # A meta tensor as one rank's split sizes: the same error, naming that rank, on every rank
    # (reading its values would raise NotImplementedError there alone and leave the others hanging).
    splits = torch.tensor(shards[rank], device="meta") if rank == 0 else shards[rank]
    with pytest.raises(ValueError, match=r"^rank 0: split_sizes must hold values, got a meta tensor"):
        proj(local.detach(), splits, group=group)


# shards[r][b]: frames of video b on rank r (rank order = frame order).
SHARDS = {
    2: [[2, 0, 7], [3, 1, 0]],  # videos of 5, 1, 7 frames; each rank misses a video
    3: [[1, 1, 3], [0, 0, 0], [4, 0, 14]],  # rank 1 has no frame at all; T = 17 > N = 13
}


@pytest.mark.parametrize("world", [2, 3])
def test_frame_parallel_equals_one_process(world, tmp_path, seed):
    spawn_gloo(_check_rank, world, tmp_path, SHARDS[world], seed % 2**31)


def test_needs_an_initialized_group():
    proj = make_projector()
    x = features(2, P)
    with pytest.raises(RuntimeError, match="initialized process group"):
        proj(x, [2], group=object())
