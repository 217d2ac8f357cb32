"""GPU-scale checks: every usable backend on CUDA against the float64 oracle.

Marked ``gpu``: skipped where torch sees no CUDA device (conftest), collected everywhere.
"""

import pytest
import torch

from ccam_kernels import CCAMConfig, CCAMProjector, available_backends, ccam_attention
from conftest import rel_err
from oracle import attention_oracle

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _gpu_backends():
    return [b for b in ("torch", "triton", "cuda") if b in available_backends()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("counts", [(16,), (16, 96, 33, 64)], ids=lambda c: f"T{list(c)}")
def test_attention_v12_shapes_on_gpu(dtype, counts):
    torch.backends.cuda.matmul.allow_tf32 = False
    N, H, D, P = 1024, 16, 64, 729
    L = sum(counts) * P
    q = torch.randn(N, H, D, device="cuda", dtype=dtype, requires_grad=True)
    k = torch.randn(L, H, D, device="cuda", dtype=dtype, requires_grad=True)
    v = torch.randn(L, H, D, device="cuda", dtype=dtype, requires_grad=True)
    dout = torch.randn(len(counts), N, H, D, device="cuda", dtype=dtype)
    want = attention_oracle(q.detach().cpu(), k.detach().cpu(), v.detach().cpu(), counts, P)
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    attention_oracle(q64, k64, v64, counts, P).backward(dout.cpu().double())
    for backend in _gpu_backends():
        for x in (q, k, v):
            x.grad = None
        out = ccam_attention(q, k, v, counts, P, backend=backend)
        assert out.dtype == dtype and out.device.type == "cuda"
        assert rel_err(out, want) <= TOLERANCE[dtype], backend
        out.backward(dout)
        for got, ref in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
            assert rel_err(got, ref) <= 2 * TOLERANCE[dtype], backend


def test_projector_bf16_on_gpu_matches_float64_module():
    cfg = CCAMConfig(attention_dropout=0.0, dropout=0.0)
    proj = CCAMProjector(cfg).cuda().eval()
    features = torch.randn(16 + 9, 729, cfg.cross_hidden_size, device="cuda")
    with torch.no_grad():
        want = proj.double()(features.double(), [16, 9])
        proj = proj.to(torch.bfloat16)
        for backend in _gpu_backends():
            proj.backend = backend
            got = proj(features.to(torch.bfloat16), [16, 9])
            assert rel_err(got, want) <= 2e-2, backend
