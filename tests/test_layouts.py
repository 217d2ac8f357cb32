"""Inputs in unusual memory layouts give the same result as contiguous ones."""

import pytest
import torch

from ccam_kernels import ccam_attention
from ccam_kernels.backends.torch_prefix import ccam_attention_torch
from ccam_kernels.checks import check_attention_args



def _strided(shape, perm):
    """A tensor of `shape` whose memory order is `perm` (so its last dim is strided)."""
    inv = [perm.index(i) for i in range(len(shape))]
    return torch.randn([shape[p] for p in perm], dtype=torch.float64).permute(inv)


@pytest.mark.parametrize("engine", ["flash", "explicit"])
def test_strided_head_dim_matches_contiguous(engine):
    N, H, Hkv, D, P, counts = 37, 4, 2, 16, 7, [5, 3]
    L = sum(counts) * P
    q = _strided((N, H, D), (0, 2, 1))
    k = _strided((L, Hkv, D), (2, 0, 1))
    v = _strided((L, Hkv, D), (1, 2, 0))
    assert q.stride(-1) != 1 and k.stride(-1) != 1 and v.stride(-1) != 1
    want = ccam_attention(q.contiguous(), k.contiguous(), v.contiguous(), counts, P, backend="reference")
    problem = check_attention_args(q, k, v, counts, P)
    got = ccam_attention_torch(q, k, v, problem, engine=engine)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
