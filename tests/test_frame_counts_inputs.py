"""frame_counts / split_sizes inputs (issue 13 item 7): every integer tensor dtype and integer
NumPy arrays are accepted and read as Python ints; bool/float, non-1-D and meta inputs are
refused with a message naming the argument."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ccam_kernels import CCAMConfig, CCAMProjector, ccam_attention
from ccam_kernels.checks import normalize_frame_counts

COUNTS = [3, 1, 4]  # ragged, one 1-frame sample
N, P, H, HKV, D = 5, 2, 4, 2, 16

ACCEPTED = [
    ("list", lambda: list(COUNTS)),
    ("tuple-of-np.int64", lambda: tuple(np.int64(t) for t in COUNTS)),
    *[(f"tensor-{dt}", lambda dt=dt: torch.tensor(COUNTS, dtype=dt))
      for dt in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)],
    ("tensor-int32-strided", lambda: torch.tensor([3, 9, 1, 9, 4], dtype=torch.int32)[::2]),
    *[(f"numpy-{dt.__name__}", lambda dt=dt: np.array(COUNTS, dtype=dt)) for dt in (np.int64, np.int32, np.uint8)],
]

REFUSED = [
    ("numpy-0d", lambda: np.array(3), ValueError, r"must be 1-D.*shape \(\)"),
    ("numpy-2d", lambda: np.array([COUNTS]), ValueError, r"must be 1-D.*shape \(1, 3\)"),
    ("numpy-float", lambda: np.array(COUNTS, dtype=np.float64), TypeError, r"integer array.*float64"),
    ("numpy-bool", lambda: np.array([True, True]), TypeError, r"integer array.*bool"),
    ("tensor-0d", lambda: torch.tensor(8), ValueError, r"must be 1-D.*shape \(\)"),
    ("tensor-2d", lambda: torch.tensor([COUNTS]), ValueError, r"must be 1-D.*shape \(1, 3\)"),
    ("tensor-meta", lambda: torch.empty(3, dtype=torch.int64, device="meta"), ValueError, r"meta tensor"),
    ("tensor-meta-2d", lambda: torch.empty(1, 3, dtype=torch.int64, device="meta"), ValueError, r"must be 1-D"),
    ("tensor-bool", lambda: torch.tensor([True, True]), TypeError, r"integer tensor.*torch\.bool"),
    ("tensor-float", lambda: torch.tensor([3.0, 1.0, 4.0]), TypeError, r"integer tensor.*torch\.float32"),
    ("list-of-np.float", lambda: [np.float64(3), np.float64(5)], TypeError, r"element must be an int"),
    ("list-of-np.bool", lambda: [np.bool_(True)] * 8, TypeError, r"element must be an int"),
    ("int", lambda: 8, TypeError, r"sequence of ints"),
    ("tensor-negative-int8", lambda: torch.tensor([3, -1, 6], dtype=torch.int8), ValueError, r">= 1"),
]


def _attention_inputs():
    length = sum(COUNTS) * P
    return (torch.randn(N, H, D, dtype=torch.float64), torch.randn(length, HKV, D, dtype=torch.float64),
            torch.randn(length, HKV, D, dtype=torch.float64))


@pytest.mark.parametrize("make", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted_forms_become_python_ints(make):
    counts = normalize_frame_counts("frame_counts", make())
    assert counts == tuple(COUNTS) and all(type(t) is int for t in counts)


@pytest.mark.parametrize("make", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_ccam_attention_same_result_for_every_accepted_form(make):
    q, k, v = _attention_inputs()
    expected = ccam_attention(q, k, v, COUNTS, P, backend="reference")
    assert torch.equal(ccam_attention(q, k, v, make(), P, backend="reference"), expected)
    assert torch.equal(ccam_attention(q, k, v, make(), P, backend="torch"),
                       ccam_attention(q, k, v, COUNTS, P, backend="torch"))


@pytest.mark.parametrize("make,exc,pattern", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_ccam_attention_refuses_naming_frame_counts(make, exc, pattern):
    q, k, v = _attention_inputs()
    with pytest.raises(exc, match=rf"^frame_counts.*{pattern}"):
        ccam_attention(q, k, v, make(), P, backend="reference")


@pytest.fixture(scope="module")
def proj():
    cfg = CCAMConfig(num_query=N, hidden_size=16, cross_hidden_size=12, num_heads=H, num_key_value_heads=HKV,
                     intermediate_size=8, output_size=10)
    return CCAMProjector(cfg, backend="torch").eval()


def test_projector_split_sizes_accept_integer_tensors(proj):
    x = torch.randn(sum(COUNTS), P, 12)
    with torch.no_grad():
        expected = proj(x, COUNTS)
        for dt in (torch.int64, torch.int32, torch.int16, torch.uint8):
            assert torch.equal(proj(x, torch.tensor(COUNTS, dtype=dt)), expected)
        assert torch.equal(proj(x, np.array(COUNTS, dtype=np.int32)), expected)


@pytest.mark.parametrize("make,exc,pattern", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_projector_refuses_naming_split_sizes(proj, make, exc, pattern):
    with pytest.raises(exc, match=rf"^split_sizes.*{pattern}"):
        proj(torch.randn(8, P, 12), make())
