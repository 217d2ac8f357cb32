"""Shared test machinery.

* ``gpu``-marked tests are skipped where CUDA is not available. The check runs inside the
  collection hook, never at import, so the suite collects on any machine.
* Every test gets fresh random inputs: an autouse fixture seeds torch with a random seed and
  prints it (shown by pytest on failure). Set ``CCAM_TEST_SEED`` to replay a failing seed.
* ``rel_err(a, b)`` = ||a - b|| / ||b||, computed in float64.
* ``nan_poison``: ``torch.empty`` / ``torch.empty_like`` return NaN-filled floating tensors,
  so an output element a backend forgets to write fails loudly.
* Without a CUDA device, Triton runs in its CPU interpreter (TRITON_INTERPRET=1) for the
  whole session, so the "triton" backend is tested everywhere: the variable must be set before
  triton is first imported (triton's own library functions are jitted at import).
* Under pytest-xdist (the README's command runs `-n auto --dist loadfile`) each worker uses one
  torch thread: the workers already fill the cores, and oversubscribed intra-op threads slow
  every worker down.
"""

from __future__ import annotations

import os
import random
import sys

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Where the Triton kernels' tests run: compiled on a GPU, else in the interpreter, which
# computes bfloat16 dots wrong (so bfloat16 is tested on GPUs only).
CUDA = torch.cuda.is_available()
TRITON_DEVICE = "cuda" if CUDA else "cpu"
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TRITON_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def pytest_collection_modifyitems(config, items):
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh random seed per test, printed so a failure can be replayed with CCAM_TEST_SEED."""
    env = os.environ.get("CCAM_TEST_SEED")
    value = int(env) if env else random.SystemRandom().randrange(2**31)
    print(f"[{request.node.nodeid}] torch.manual_seed({value})  (replay: CCAM_TEST_SEED={value})")
    torch.manual_seed(value)
    return value


@pytest.fixture
def generator(seed):
    """A torch.Generator seeded from this test's seed (independent of the global stream)."""
    gen = torch.Generator()
    gen.manual_seed(seed + 1)
    return gen


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (inf when b == 0 and a != b, 0 when both are 0)."""
    a64 = a.detach().to(device="cpu", dtype=torch.float64)
    b64 = b.detach().to(device="cpu", dtype=torch.float64)
    assert a64.shape == b64.shape, f"shape mismatch: {tuple(a64.shape)} vs {tuple(b64.shape)}"
    num = torch.linalg.vector_norm(a64 - b64).item()
    den = torch.linalg.vector_norm(b64).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


@pytest.fixture
def nan_poison(monkeypatch):
    """Make uninitialized floating-point allocations NaN for the duration of the test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _poison(t):
        if t.is_floating_point():
            with torch.no_grad():
                t.fill_(float("nan"))
        return t

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture
def triton_here():
    """For the Triton kernels' test files (``pytest.mark.usefixtures("triton_here")``): on CPU
    the kernels run in the interpreter, which this conftest switches on for the session."""
    from ccam_kernels.backends import triton_backend

    if not CUDA and not triton_backend.interpreting():
        pytest.fail("no CUDA and TRITON_INTERPRET is not set: run the tests through conftest (pytest tests/)")
    assert triton_backend.why_unusable() is None


def require_cuda_backend(monkeypatch) -> None:
    """The cuda ops on this machine: without a GPU the CPU emulation build (which must build:
    a failure, never a skip); on a GPU the built extension, else a skip with the reason (a
    failure where CCAM_REQUIRE_CUDA_BACKEND=1, as in the GPU suite)."""
    from ccam_kernels.attention import BACKENDS
    from ccam_kernels.backends import cuda_backend

    if not CUDA:
        monkeypatch.setenv(cuda_backend.EMULATE_ENV, "1")
        why = BACKENDS["cuda"].why_unusable()
        if why:
            pytest.fail(f"the cuda backend's CPU emulation is unusable: {why}")
        return
    why = BACKENDS["cuda"].why_unusable()
    if why:
        if os.environ.get("CCAM_REQUIRE_CUDA_BACKEND") == "1":
            pytest.fail(f"the cuda backend is required here but unusable: {why}")
        pytest.skip(f"cuda backend unusable: {why}")


@pytest.fixture
def cuda_here(monkeypatch):
    """For tests of the cuda backend: see :func:`require_cuda_backend`."""
    require_cuda_backend(monkeypatch)
