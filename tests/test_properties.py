"""Property tests over random small shapes (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

# hypothesis is a test extra; a bare GPU machine may lack it: the module then shows as skipped
# with this reason (and the GPU suite can still collect tests/).
pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[test]')")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ccam_kernels import ccam_attention, frame_of_query
from ccam_kernels.backends.torch_prefix import ccam_attention_torch
from ccam_kernels.checks import check_attention_args
from ccam_kernels.mask import first_query_of_frame

from conftest import rel_err
from oracle import attention_oracle, oracle_frame_of_query

SETTINGS = settings(max_examples=25, deadline=None)


@dataclass
class Problem:
    N: int
    P: int
    T: list
    H: int
    Hkv: int
    D: int
    shared: bool
    seed: int

    def inputs(self, dtype=torch.float64):
        gen = torch.Generator().manual_seed(self.seed)
        B, L = len(self.T), sum(self.T) * self.P
        q_shape = (self.N, self.H, self.D) if self.shared else (B, self.N, self.H, self.D)
        q = torch.randn(q_shape, generator=gen, dtype=dtype)
        k = torch.randn(L, self.Hkv, self.D, generator=gen, dtype=dtype)
        v = torch.randn(L, self.Hkv, self.D, generator=gen, dtype=dtype)
        return q, k, v


@st.composite
def problems(draw):
    H = draw(st.sampled_from([1, 2, 4]))
    Hkv = draw(st.sampled_from([d for d in (1, 2, 4) if H % d == 0]))
    B = draw(st.integers(1, 3))
    return Problem(
        N=draw(st.integers(1, 40)),
        P=draw(st.integers(1, 9)),
        T=draw(st.lists(st.integers(1, 12), min_size=B, max_size=B)),
        H=H,
        Hkv=Hkv,
        D=draw(st.sampled_from([8, 16])),
        shared=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def run(impl, q, k, v, frame_counts, P):
    if impl in ("reference", "torch"):
        return ccam_attention(q, k, v, frame_counts, P, backend=impl)
    problem = check_attention_args(q, k, v, frame_counts, P)
    return ccam_attention_torch(q, k, v, problem, variant=impl)


@SETTINGS
@given(problems(), st.sampled_from(["torch", "explicit"]))
def test_torch_backend_float64_equals_oracle(pb, impl):
    q, k, v = pb.inputs()
    out = run(impl, q, k, v, pb.T, pb.P)
    assert out.shape == (len(pb.T), pb.N, pb.H, pb.D) and out.dtype == torch.float64
    assert rel_err(out, attention_oracle(q, k, v, pb.T, pb.P)) <= 1e-10


@SETTINGS
@given(problems(), st.sampled_from(["torch", "explicit", "reference"]), st.data())
def test_rows_depend_only_on_visible_keys_of_their_sample(pb, impl, data):
    """Perturb every key/value of the other samples and of sample b's frames after f: the
    rows of sample b whose frame is <= f do not change at all; a row that sees frame f+1 does."""
    q, k, v = pb.inputs()
    b = data.draw(st.integers(0, len(pb.T) - 1), label="sample")
    frames = pb.T[b]
    f = data.draw(st.integers(0, frames - 1), label="last kept frame")
    start = sum(pb.T[:b]) * pb.P
    keep = torch.zeros(k.shape[0], dtype=torch.bool)
    keep[start : start + (f + 1) * pb.P] = True

    gen = torch.Generator().manual_seed(pb.seed + 1)
    k2 = torch.where(keep[:, None, None], k, 3 * torch.randn(k.shape, generator=gen, dtype=k.dtype))
    v2 = torch.where(keep[:, None, None], v, 3 * torch.randn(v.shape, generator=gen, dtype=v.dtype))

    out = run(impl, q, k, v, pb.T, pb.P)
    out2 = run(impl, q, k2, v2, pb.T, pb.P)
    rows = oracle_frame_of_query(pb.N, frames) <= f
    assert torch.equal(out[b, rows], out2[b, rows])
    if not bool(rows.all()):
        assert not torch.equal(out[b, ~rows], out2[b, ~rows])


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 3000), st.integers(1, 3000))
def test_frame_of_query_properties(N, T):
    fq = frame_of_query(N, T)
    assert fq.dtype == torch.int64 and fq.shape == (N,)
    assert torch.equal(fq, oracle_frame_of_query(N, T))
    assert fq[0] == 0
    steps = fq[1:] - fq[:-1]
    assert bool((steps >= 0).all())
    if T <= N:
        # Every frame belongs to floor(N/T) or ceil(N/T) queries; the last query sees everything.
        counts = torch.bincount(fq, minlength=T)
        assert counts.shape == (T,)
        assert int(counts.min()) >= N // T and int(counts.max()) <= -(-N // T)
        assert fq[-1] == T - 1
    else:
        # More frames than queries: one query per frame at most, spaced floor or ceil of T/N.
        assert bool((steps >= T // N).all()) and bool((steps <= -(-T // N)).all())
    first = first_query_of_frame(N, T)
    assert first[T] == N
    for f in torch.randint(0, T + 1, (8,)).tolist() + [0, T]:
        assert first[f] == int((fq < f).sum())
