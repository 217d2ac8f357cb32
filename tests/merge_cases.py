"""Random split-KV partials for the merge kernels' tests (tests/test_triton_merge.py,
tests/test_cuda_merge.py): rows no split saw, splits that saw nothing of a row, a NaN LSE with
its partial row NaN (a NaN score), a NaN value; and the merge formula in float64."""

import torch

# (S, B, N, H, D): odd N, one split (nothing to merge), many splits, head dims 16 to 64.
MERGE_CASES = [(3, 2, 37, 3, 24), (2, 1, 19, 2, 64), (5, 2, 8, 1, 16), (1, 2, 9, 2, 16)]


def partials(S, B, N, H, D, gen, device):
    o = torch.randn(S, B, N, H, D, generator=gen)
    lse = torch.randn(S, B, H, N, generator=gen) * 4
    if S > 1:
        lse[1, 0, :, ::3] = float("-inf")  # split 1 saw nothing of these rows
        o[1, 0, ::3] = 0.0
    lse[:, -1, 0, 1] = float("-inf")  # a row no split saw: lse -inf, output 0
    o[:, -1, 1, 0] = 0.0
    lse[0, 0, -1, 2] = float("nan")  # a NaN score in one split (its partial row NaN too): the row is NaN
    o[0, 0, 2, -1] = float("nan")
    o[S - 1, -1, 4, -1, 3] = float("nan")  # a NaN value: that column of the row
    return o.to(device), lse.to(device)


def merge64(o, lse):
    """The merge formula in float64: out = sum_s exp(lse_s - lse) o_s, lse = log sum_s exp(lse_s)."""
    o, lse = o.double().cpu(), lse.double().cpu()
    m = torch.logsumexp(lse, 0)
    w = torch.exp(lse - torch.where(torch.isneginf(m), 0.0, m)).transpose(-1, -2).unsqueeze(-1)
    return (w * o).sum(0), m


def same_nonfinite(a, b):
    a, b = a.cpu(), b.cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isneginf(a), torch.isneginf(b))
