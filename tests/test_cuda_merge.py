"""The cuda backend's one-kernel merge of split-KV partials (csrc/ccam/merge.cuh, the op
ccam_kernels::cuda_merge, through cuda_backend.merge_splits) against the PyTorch merge
(tiling.merge_splits) and the merge formula in float64, on fresh random partials with rows no
split saw, splits that saw nothing of a row, a NaN LSE (the row stays NaN, docs/reference.md
§7) and a NaN in a partial output. Without a GPU it runs on the CPU emulator (bounds, one
writer per output element); the end-to-end split forward is tests/test_cuda.py's
test_cuda_split_kv_forward."""

import pytest
import torch

from ccam_kernels.backends import cuda_backend, tiling
from merge_cases import MERGE_CASES, check_merge_with_acc, partials, same_nonfinite

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def cuda_backend_here(cuda_here):
    """The cuda ops: on the emulator without a GPU."""


@pytest.mark.parametrize("S,B,N,H,D", MERGE_CASES)
def test_merge_kernel_equals_the_pytorch_merge_and_float64(S, B, N, H, D):
    dtype = torch.bfloat16 if S % 2 else torch.float16
    check_merge_with_acc(cuda_backend.merge_splits, S, B, N, H, D, torch.Generator().manual_seed(S * 100 + D + 1),
                         dtype, DEVICE)


def test_merge_kernel_without_acc_and_without_out():
    """Inference: out only (no float32 copy); a partial call: the float32 output only."""
    gen = torch.Generator().manual_seed(11)
    o, lse = partials(3, 2, 21, 2, 32, gen, DEVICE)
    want, want_lse = tiling.merge_splits(o, lse)
    out = torch.empty(2, 21, 2, 32, dtype=torch.float16, device=DEVICE)
    acc, got_lse = cuda_backend.merge_splits(o, lse, out, keep_acc=False)
    assert acc is None
    same_nonfinite(out, want)
    same_nonfinite(got_lse, want_lse)
    assert torch.allclose(out.cpu().float().nan_to_num(), want.cpu().nan_to_num(), rtol=1e-3, atol=1e-3)
    acc, got_lse = cuda_backend.merge_splits(o, lse)
    same_nonfinite(acc, want)
    ok = torch.isfinite(want)
    assert torch.allclose(acc.cpu()[ok], want.cpu()[ok], rtol=1e-6, atol=1e-6)
