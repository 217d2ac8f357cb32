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


def check_merge_with_acc(merge, S, B, N, H, D, gen, dtype, device):
    """A fused ``merge(o, lse, out, keep_acc=True) -> (acc, lse)`` on fresh partials: the
    float32 output and LSE equal the PyTorch merge (tiling.merge_splits) and the float64
    formula, the NaN and -inf rows stay so, and ``out`` (poisoned with NaN first) is acc cast
    once to ``dtype``."""
    from ccam_kernels.backends import tiling

    o, lse = partials(S, B, N, H, D, gen, device)
    want, want_lse = tiling.merge_splits(o, lse)
    out = torch.full((B, N, H, D), float("nan"), dtype=dtype, device=device)
    acc, got_lse = merge(o, lse, out, keep_acc=True)
    ref, ref_lse = merge64(o, lse)
    for got, torch_merge, f64 in ((acc, want, ref), (got_lse, want_lse, ref_lse)):
        same_nonfinite(got, torch_merge)
        same_nonfinite(got, f64)
        ok = torch.isfinite(f64)
        assert torch.allclose(got.cpu()[ok], torch_merge.cpu()[ok], rtol=1e-6, atol=1e-6)
        assert torch.allclose(got.cpu()[ok].double(), f64[ok], rtol=1e-5, atol=1e-6)
    assert torch.isnan(acc[0, 2, -1]).all() and torch.isnan(got_lse[0, -1, 2])  # the NaN LSE's row
    assert torch.equal(acc[-1, 1, 0].cpu(), torch.zeros(D)) and torch.isneginf(got_lse[-1, 0, 1])
    same_nonfinite(out, acc)
    assert torch.equal(out.cpu().float().nan_to_num(), acc.cpu().to(dtype).float().nan_to_num())  # cast once
