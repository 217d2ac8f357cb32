"""The Triton backend's one-kernel merge of split-KV partials (triton_merge.merge_splits)
against the PyTorch merge (tiling.merge_splits) and the merge formula in float64, on fresh
random partials with rows no split saw, splits that saw nothing of a row, a NaN LSE (the row
stays NaN, docs/reference.md §7) and a NaN in a partial output. On CPU it runs in Triton's
interpreter; the end-to-end split forward is tests/test_triton.py's test_triton_split_kv_forward."""

import pytest
import torch

from ccam_kernels.backends import tiling
from conftest import TRITON_DEVICE as DEVICE
from merge_cases import MERGE_CASES, check_merge_with_acc, partials, same_nonfinite as _same_nonfinite

pytest.importorskip("triton", reason="triton is not installed")
pytestmark = [pytest.mark.triton, pytest.mark.usefixtures("triton_here")]


@pytest.mark.parametrize("S,B,N,H,D", MERGE_CASES)
def test_fused_merge_equals_the_pytorch_merge_and_float64(S, B, N, H, D):
    from ccam_kernels.backends import triton_merge

    check_merge_with_acc(triton_merge.merge_splits, S, B, N, H, D, torch.Generator().manual_seed(S * 100 + D),
                         torch.float16, DEVICE)


def test_fused_merge_without_acc_writes_only_the_output():
    from ccam_kernels.backends import triton_merge

    gen = torch.Generator().manual_seed(7)
    o, lse = partials(3, 2, 21, 2, 32, gen, DEVICE)
    out = torch.empty(2, 2, 21, 32, dtype=torch.float16, device=DEVICE).transpose(1, 2)  # strided rows and heads
    acc, got_lse = triton_merge.merge_splits(o, lse, out, keep_acc=False)
    want, want_lse = tiling.merge_splits(o, lse)
    assert acc is None
    _same_nonfinite(out, want)
    ok = torch.isfinite(want)
    assert torch.allclose(out.cpu()[ok].float(), want.cpu()[ok], rtol=1e-3, atol=1e-3)
    _same_nonfinite(got_lse, want_lse)


def test_split_forward_through_the_fused_merge_keeps_the_nan_rule(monkeypatch):
    """Three key splits, so some of a row's split partials hold the poisoned key and others
    not: the merged output (written by the merge kernel, no float32 copy kept) follows the
    row-by-row float64 formula. (Gradients through splits: tests/test_triton.py.)"""
    from test_nan_rule import TOLERANCE, _oracle, _poison, _same_nonfinite

    from ccam_kernels import ccam_attention
    from kernel_cases import make_inputs

    monkeypatch.setattr(tiling, "FORCE_SPLITS", 3)
    poison = "k-nan"
    N, H, Hkv, D, counts, P, shared = 7, 2, 1, 16, (6, 2), 7, False  # 42 keys: 3 interpreter key tiles, 1 a split
    q, k, v, dout = make_inputs(N, H, Hkv, D, counts, P, shared, torch.float32, DEVICE)
    _poison(dict(q=q, k=k, v=v, dout=dout), poison)
    with torch.no_grad():
        out = ccam_attention(q, k, v, counts, P, backend="triton")
    _same_nonfinite(f"split triton {poison}", out, _oracle(q, k, v, dout, counts, P)[0], poison.endswith("nan"),
                    TOLERANCE[torch.float32])
