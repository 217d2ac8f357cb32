"""The "auto" order per device (backends/device_order.py), with faked GPU capabilities."""

import dataclasses
import types

import pytest
import torch

from ccam_kernels import attention
from ccam_kernels.attention import BACKENDS, resolve_backend
from ccam_kernels.backends import device_order
from ccam_kernels.checks import check_attention_args


@pytest.mark.parametrize("capability, first", [
    ((8, 0), "cuda"), ((8, 6), "cuda"), ((8, 7), "cuda"), ((8, 9), "cuda"),
    ((9, 0), "triton"),
    ((10, 0), "triton"), ((12, 0), "triton"),  # newer than every row: Hopper's
    ((7, 5), "cuda"),  # below every row: the sm_80 row (the cuda backend refuses sm_75 itself)
])
def test_order_per_capability(capability, first):
    order = device_order.order_for_capability(capability)
    assert order[0] == first
    assert sorted(order) == ["cuda", "torch", "triton"] and order[-1] == "torch"


def test_cpu_order_unchanged():
    assert device_order.auto_order(torch.device("cpu")) == ("cuda", "triton", "torch")
    if not torch.cuda.is_available():
        assert device_order.auto_order() == device_order.CPU_ORDER


def _usable_everywhere(monkeypatch, capability):
    """A faked GPU of ``capability`` on which both kernel backends count as usable."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for name in ("cuda", "triton"):
        monkeypatch.setitem(attention.BACKENDS, name, dataclasses.replace(BACKENDS[name], why_unusable=lambda: None))


@pytest.mark.parametrize("capability, picked", [((9, 0), "triton"), ((8, 0), "cuda"), ((8, 9), "cuda")])
def test_auto_follows_the_table(monkeypatch, capability, picked):
    _usable_everywhere(monkeypatch, capability)
    q = torch.randn(8, 2, 16, dtype=torch.float16)
    k = torch.randn(6, 2, 16, dtype=torch.float16)
    problem = check_attention_args(q, k, k, (2,), 3, None, 0.0)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda", 0), dtype=torch.float16)
    assert resolve_backend("auto", on_gpu, problem).name == picked
    assert attention.available_backends() == [*device_order.order_for_capability(capability), "reference"]
    # CPU tensors on the same machine still go to torch.
    assert resolve_backend("auto", q, problem).name == "torch"
