"""The mask rule (docs/reference.md §2) and the planning helpers of ccam_kernels.mask."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import ccam_kernels
from ccam_kernels.mask import (
    dense_mask,
    first_query_of_frame,
    frame_of_query,
    key_offsets,
    live_pairs,
    mask_block,
    visible_prefix_length,
)

from oracle import oracle_frame_of_query, oracle_visibility

# (N, T): T = 1, T = N, T dividing N, T not dividing N, T > N, N = 1, released sizes.
SIZES = [
    (1, 1), (1, 7), (7, 1), (37, 1), (37, 5), (37, 37), (37, 36), (37, 38), (16, 40), (16, 16),
    (64, 16), (64, 24), (100, 7), (1024, 16), (1024, 96), (1024, 512), (1024, 1000), (1024, 1025),
    (5, 1000), (3, 2),
]


def _id(nt):
    return f"N{nt[0]}-T{nt[1]}"


@pytest.mark.parametrize("nt", SIZES, ids=_id)
def test_frame_of_query_formula_and_properties(nt):
    N, T = nt
    fq = frame_of_query(N, T)
    assert fq.shape == (N,)
    assert fq.dtype == torch.int64
    assert fq[0].item() == 0
    assert bool((fq[1:] >= fq[:-1]).all()), "frame_of_query must be non-decreasing"
    assert int(fq.max()) <= T - 1 and int(fq.min()) >= 0
    assert fq.tolist() == [(i * T) // N for i in range(N)]
    assert torch.equal(fq, oracle_frame_of_query(N, T))
    # Query N-1 sees every frame whenever T <= N (docs/reference.md §2: "query N-1 sees every frame").
    if T <= N:
        assert fq[-1].item() == T - 1


def test_frame_of_query_is_exported_and_consistent():
    assert ccam_kernels.frame_of_query is frame_of_query
    assert torch.equal(ccam_kernels.frame_of_query(37, 5), frame_of_query(37, 5))


@pytest.mark.parametrize("nt", SIZES, ids=_id)
def test_frame_of_query_is_nearest_neighbour_resize_of_tril(nt):
    """Row i of the (N, T) resized matrix is row floor(i * T / N) of the T x T lower triangle,
    and that is the frame-level mask: frame f visible to query i iff f <= frame_of_query(i)."""
    N, T = nt
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    rows = torch.tensor([(i * T) // N for i in range(N)])
    resized = tril[rows]  # (N, T): explicit nearest-neighbour row resize
    fq = frame_of_query(N, T)
    frame_mask = torch.arange(T)[None, :] <= fq[:, None]
    assert torch.equal(resized, frame_mask)
    # With P tokens per frame every frame column is repeated P times: the dense key mask.
    P = 3
    assert torch.equal(resized.repeat_interleave(P, dim=1), dense_mask(N, T, P))


@pytest.mark.parametrize("nt", [(8, 2), (16, 4), (64, 16), (16, 64), (128, 32), (4, 4), (1024, 16)], ids=_id)
def test_frame_of_query_matches_torch_nearest_interpolate(nt):
    """torch's 'nearest' resize uses floor(i * T / N) with a float scale; for powers of two the
    scale is exact, so it must agree with the rule (docs/reference.md §2: 'nearest-neighbour resizing')."""
    N, T = nt
    tril = torch.ones(T, T).tril()
    resized = F.interpolate(tril[None, None], size=(N, T), mode="nearest")[0, 0].bool()
    assert torch.equal(resized, torch.arange(T)[None, :] <= frame_of_query(N, T)[:, None])


@pytest.mark.parametrize("nt", SIZES, ids=_id)
@pytest.mark.parametrize("P", [1, 7])
def test_visible_prefix_length(nt, P):
    N, T = nt
    vis = visible_prefix_length(N, T, P)
    assert vis.shape == (N,) and vis.dtype == torch.int64
    assert torch.equal(vis, (oracle_frame_of_query(N, T) + 1) * P)
    assert int(vis.min()) >= P, "no query may see an empty prefix"
    if T * P * N <= 200_000:
        assert torch.equal(vis, dense_mask(N, T, P).sum(dim=1))


@pytest.mark.parametrize("nt", SIZES, ids=_id)
def test_first_query_of_frame(nt):
    N, T = nt
    first = first_query_of_frame(N, T)
    assert isinstance(first, list) and len(first) == T + 1
    assert all(isinstance(x, int) for x in first)
    fq = oracle_frame_of_query(N, T).tolist()
    for f in range(T + 1):
        seeing = [i for i in range(N) if fq[i] >= f]
        # Queries [first[f], N) are exactly those whose frame is >= f.
        assert seeing == list(range(first[f], N)), f"frame {f}"
    assert first[0] == 0
    assert first[T] == N


@pytest.mark.parametrize(
    "frame_counts,P", [([1], 1), ([5, 3, 9], 7), ([16], 729), ((2, 2, 2, 2), 3), (torch.tensor([4, 1, 6]), 2)]
)
def test_key_offsets(frame_counts, P):
    offsets = key_offsets(frame_counts, P)
    counts = [int(t) for t in frame_counts]
    assert len(offsets) == len(counts) + 1
    assert all(isinstance(x, int) for x in offsets)
    assert offsets[0] == 0
    for b, t in enumerate(counts):
        assert offsets[b + 1] - offsets[b] == t * P
    assert offsets[-1] == sum(counts) * P


@pytest.mark.parametrize("nt", [(37, 5), (16, 40), (37, 1), (64, 32), (1, 3), (10, 10)], ids=_id)
@pytest.mark.parametrize("P", [1, 7])
def test_dense_mask_matches_oracle(nt, P):
    N, T = nt
    m = dense_mask(N, T, P)
    assert m.dtype == torch.bool and m.shape == (N, T * P)
    assert torch.equal(m, oracle_visibility(N, T, P))
    # Every row is a non-empty prefix.
    lengths = m.sum(dim=1)
    assert int(lengths.min()) >= 1
    for i in range(N):
        assert bool(m[i, : lengths[i]].all()) and not bool(m[i, lengths[i]:].any())


@pytest.mark.parametrize("nt", [(37, 5), (16, 40), (37, 1), (64, 32), (7, 7)], ids=_id)
@pytest.mark.parametrize("P", [1, 7])
def test_mask_block_is_a_slice_of_dense_mask(nt, P):
    N, T = nt
    L = T * P
    dense = dense_mask(N, T, P)
    rng = random.Random(N * 1000 + T * 10 + P)
    ranges = [((0, N), (0, L)), ((0, 1), (0, 1)), ((N - 1, N), (L - 1, L)), ((0, N), (L, L))]
    for _ in range(30):
        q0 = rng.randrange(N)
        q1 = rng.randrange(q0, N + 1)
        k0 = rng.randrange(L)
        k1 = rng.randrange(k0, L + 1)
        ranges.append(((q0, q1), (k0, k1)))
    for qr, kr in ranges:
        block = mask_block(N, T, P, qr, kr)
        assert block.dtype == torch.bool
        assert block.shape == (qr[1] - qr[0], kr[1] - kr[0])
        assert torch.equal(block, dense[qr[0] : qr[1], kr[0] : kr[1]]), (qr, kr)


@pytest.mark.parametrize("N", [1, 16, 37, 64])
@pytest.mark.parametrize("frame_counts,P", [([1], 1), ([5, 3, 9], 7), ([40, 2], 3), ([16, 16], 4)])
def test_live_pairs_equals_dense_mask_sum(N, frame_counts, P):
    expected = sum(int(dense_mask(N, t, P).sum()) for t in frame_counts)
    assert live_pairs(N, frame_counts, P) == expected
    assert live_pairs(N, frame_counts, P) == sum(int(oracle_visibility(N, t, P).sum()) for t in frame_counts)


def test_about_half_the_pairs_are_masked_at_16_frames():
    """docs/reference.md §2: about half of the (query, key) pairs are masked at T >= 16."""
    for T in (16, 32, 96):
        live = live_pairs(1024, [T], 729)
        total = 1024 * T * 729
        assert 0.45 <= 1 - live / total <= 0.5


BAD_INTS = [
    (0, ValueError),
    (-3, ValueError),
    (1.0, TypeError),
    (2.5, TypeError),
    ("4", TypeError),
    (None, TypeError),
    (True, TypeError),
]


def test_frame_of_query_is_exact_for_every_int64_frame_count():
    """floor(i * T / N) exactly, also where i * T overflows int64 (T up to 2**63 - 1)."""
    assert frame_of_query(4, 2**62).tolist() == [0, 2**60, 2**61, 3 * 2**60]
    rng = random.Random(torch.initial_seed())
    for _ in range(300):
        N = rng.randint(1, 64)
        T = rng.choice([rng.randint(1, 2**63 - 1), 2**63 - 1 - rng.randint(0, 64), rng.randint(2**40, 2**50)])
        assert frame_of_query(N, T).tolist() == oracle_frame_of_query(N, T).tolist(), (N, T)


def test_frame_of_query_refuses_what_int64_cannot_hold_exactly():
    with pytest.raises(ValueError, match=r"num_frames must be <= 2\*\*63 - 1 so that frame_of_query is exact"):
        frame_of_query(4, 2**63)
    # (N - 1)**2, the largest i * (T mod N), must fit: refused before anything is allocated
    with pytest.raises(ValueError, match=r"num_query must be <= 3037000500 so that frame_of_query is exact"):
        frame_of_query(3037000501, 7)


@pytest.mark.parametrize("value,exc", BAD_INTS, ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_frame_of_query_rejects_bad_arguments(value, exc):
    with pytest.raises(exc, match="num_query"):
        frame_of_query(value, 4)
    with pytest.raises(exc, match="num_frames"):
        frame_of_query(4, value)


@pytest.mark.parametrize("value,exc", BAD_INTS, ids=lambda x: repr(x) if not isinstance(x, type) else x.__name__)
def test_helpers_reject_bad_arguments(value, exc):
    with pytest.raises(exc, match="tokens_per_frame"):
        visible_prefix_length(4, 2, value)
    with pytest.raises(exc, match="num_query"):
        visible_prefix_length(value, 2, 3)
    with pytest.raises(exc, match="num_frames"):
        first_query_of_frame(4, value)
    with pytest.raises(exc, match="num_query"):
        dense_mask(value, 2, 3)


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda p: dense_mask(4, 2, p), id="dense_mask"),
        pytest.param(lambda p: mask_block(4, 2, p, (0, 4), (0, 2)), id="mask_block"),
        pytest.param(lambda p: key_offsets([2, 3], p), id="key_offsets"),
        pytest.param(lambda p: live_pairs(4, [2, 3], p), id="live_pairs"),
    ],
)
def test_mask_helpers_reject_bad_tokens_per_frame(call):
    """The module that defines the rule must not silently build a mask for P < 1 or P = 2.5
    (e.g. an empty (N, 0) mask, in which every query sees an empty prefix)."""
    with pytest.raises(ValueError, match="tokens_per_frame"):
        call(0)
    with pytest.raises(TypeError, match="tokens_per_frame"):
        call(2.5)
