"""GPU-scale checks: every usable backend on CUDA against the float64 oracle.

Marked ``gpu``: skipped where torch sees no CUDA device (conftest), collected everywhere.
"""

import pytest
import torch

from ccam_kernels import CCAMConfig, CCAMProjector, available_backends, ccam_attention
from ccam_kernels.attention import BACKENDS
from conftest import rel_err
from oracle import attention_oracle

pytestmark = pytest.mark.gpu

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _gpu_backends(dtype=None):
    """Our backends usable here (for CUDA tensors of this dtype, when given)."""
    return [b for b in ("torch", "triton", "cuda")
            if b in available_backends() and BACKENDS[b].refuses_placement("cuda", dtype) is None]


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
    # The oracle runs on the GPU too, in float64: the same formula, seconds instead of minutes.
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = attention_oracle(q64, k64, v64, counts, P)
    want.backward(dout.double())
    want = want.detach()
    for backend in _gpu_backends(dtype):
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
        for backend in _gpu_backends(torch.bfloat16):
            proj.backend = backend
            got = proj(features.to(torch.bfloat16), [16, 9])
            assert rel_err(got, want) <= 2e-2, backend


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_projector_bf16_training_step_on_gpu_matches_float64_module(backend):
    """The v1.2 projector in training (dropout 0 so the step is deterministic), bf16, ragged:
    the output and the gradients of the features and of every parameter against the float64
    module. On triton this covers the fused LayerNorm + K/V projection's backward at real size."""
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not usable here")
    cfg = CCAMConfig(attention_dropout=0.0, dropout=0.0)
    torch.manual_seed(0)
    ref = CCAMProjector(cfg, backend="reference").cuda().double().train()
    ours = CCAMProjector(cfg, backend=backend).cuda().to(torch.bfloat16).train()
    ours.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in ref.state_dict().items()})
    features = torch.randn(16 + 9, 729, cfg.cross_hidden_size, device="cuda").to(torch.bfloat16)
    x_ref = features.double().requires_grad_()
    x_ours = features.clone().requires_grad_()
    want = ref(x_ref, [16, 9])
    got = ours(x_ours, [16, 9])
    assert rel_err(got, want) <= 2e-2
    dy = torch.randn_like(want)
    want.backward(dy)
    got.backward(dy.to(torch.bfloat16))
    assert rel_err(x_ours.grad, x_ref.grad) <= 4e-2
    params_ref = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        if name == "attn.k_proj.bias":
            # Exactly zero in exact arithmetic (a key bias shifts a whole softmax row), so
            # only rounding is left: bound it against a gradient of the same scale.
            scale = params_ref["attn.v_proj.bias"].grad.norm()
            assert p.grad.double().norm() <= 4e-2 * scale, name
        else:
            assert rel_err(p.grad, params_ref[name].grad) <= 4e-2, name


# -- the benchmark machinery on CUDA (events, L2 flush, peak memory, every anchor) ----------


def test_cuda_timer_measures_gpu_time_and_peak_memory():
    from ccam_kernels.bench.timing import Timer

    timer = Timer(torch.device("cuda"))
    held = {}

    def run(i):
        torch.cuda._sleep(50_000_000)  # tens of ms of GPU time, nearly none on the host
        held["x"] = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")

    ms, peak = timer.call(lambda i: held.clear(), run, 0)
    assert ms > 1.0  # the events saw the kernel, not just the launch
    assert 63.9 <= peak <= 80  # the 64 MiB allocation, above what existed before the call


def test_bench_case_on_cuda_every_contestant():
    from ccam_kernels.bench import contestants as C
    from ccam_kernels.bench.runner import BenchCase, Settings, run_case
    from ccam_kernels.bench.timing import Timer, measure_ceilings

    device = torch.device("cuda")
    ceilings = measure_ceilings(device, [torch.bfloat16])
    assert ceilings["matmul_tflops"] > 10 and ceilings["copy_gbps"] > 100
    cfg = CCAMConfig(num_query=256, hidden_size=256, num_heads=4, num_key_value_heads=4, intermediate_size=512,
                     output_size=128)
    for bench in ("attention", "projector"):
        names = C.default_contestants(bench, device)
        assert "flex" in names and "reference" in names
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            case = BenchCase(bench, pass_, (3, 8), torch.bfloat16, cfg, tokens_per_frame=33)
            rows = run_case(case, names, Timer(device), Settings(warmup=1, repeats=3, rounds=2), ceilings,
                            lambda *a, **k: None)
            for row in rows:
                # An anchor may refuse a case (unsupported); nothing may fail.
                assert row["status"] in ("ok", "unsupported"), row
                if row["kind"] != "anchor" or row["backend"] == "flex":
                    assert row["status"] == "ok", row
                if row["status"] == "ok":
                    assert row["max_rel_err"] < 2e-2, row
                    assert row["median_ms"] > 0 and row["peak_mem_mb"] is not None and row["repeats"] == 6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_v12_shape_on_gpu(dtype):
    """The cuda backend at the v1.2 attention shape at 16 frames (N=1024, H=16, D=64, P=729)
    and a ragged pair, forward and gradients (moved from test_cuda.py, which runs on the CPU
    emulator where there is no GPU: this size is for the device)."""
    from kernel_cases import check_against_oracle, make_inputs

    if "cuda" not in available_backends():
        pytest.skip("the cuda backend is not built here")
    for counts in [(16,), (5, 12)]:
        q, k, v, dout = make_inputs(1024, 16, 16, 64, counts, 729, True, dtype, "cuda")
        check_against_oracle("cuda", q, k, v, dout, counts, 729, dtype, TOLERANCE[dtype])
