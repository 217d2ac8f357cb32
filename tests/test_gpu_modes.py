"""The PyTorch-mode checks of tests/test_modes.py on CUDA for the kernel backends: autocast in
float16 and bfloat16, and 16-bit gradients as accurate as plain PyTorch on near-one-hot rows.

Marked ``gpu``: skipped where torch sees no CUDA device (conftest), collected everywhere."""

import math

import pytest
import torch

from ccam_kernels import available_backends, ccam_attention
from conftest import rel_err
from oracle import attention_oracle
from test_modes import _grads, _near_one_hot_case, _plain_low_precision

pytestmark = pytest.mark.gpu


def _kernel_backends():
    return [b for b in ("triton", "cuda") if b in available_backends()]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_on_cuda_kernel_backends(dtype):
    backends = _kernel_backends()
    assert backends, "no kernel backend usable on this GPU"
    L = (2 + 3) * 5
    q = torch.randn(19, 4, 64, device="cuda")
    k = torch.randn(L, 2, 64, device="cuda")
    v = torch.randn(L, 2, 64, device="cuda")
    for backend in backends:
        want = ccam_attention(q.to(dtype), k.to(dtype), v.to(dtype), (2, 3), 5, backend=backend)
        with torch.autocast("cuda", dtype=dtype):
            got = ccam_attention(q, k.to(dtype), v, (2, 3), 5, backend=backend)
        assert got.dtype == dtype and torch.equal(got, want), backend


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("seed_case", [1, 2, 3])
def test_16_bit_gradients_as_accurate_as_plain_pytorch_on_cuda(dtype, seed_case):
    backends = _kernel_backends()
    assert backends, "no kernel backend usable on this GPU"
    for q, k, v, dout, counts, P in _near_one_hot_case(dtype, "cuda", seed_case):
        scale = 1 / math.sqrt(q.shape[-1])
        want = _grads(lambda a, b, c: attention_oracle(a, b, c, counts, P, scale), q, k, v, dout.double())
        plain = _grads(lambda a, b, c: _plain_low_precision(a, b, c, counts, P, scale), q, k, v, dout)
        for backend in backends:
            got = _grads(lambda a, b, c: ccam_attention(a, b, c, counts, P, backend=backend), q, k, v, dout)
            for name, g, p, w in zip(("dq", "dk", "dv"), got, plain, want):
                bound = 3 * rel_err(p, w) + 2e-4
                assert rel_err(g, w) <= bound, f"{backend} {name}: {rel_err(g, w):.3g} > {bound:.3g}"
