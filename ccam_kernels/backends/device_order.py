"""The order in which "auto" tries the backends, per device.

On NVIDIA GPUs the order depends on the compute capability: our CUDA kernels use mma.sync
(sm_80 tensor-core instructions) everywhere, while on Hopper (sm_90) Triton emits wgmma for
the same dots. Each row below is an assumption until a committed GPU run (benchmarks/results/,
whose SUITE.md names the fastest backend of each row) says otherwise; change a row only with
such a run, and cite it here.

"auto" still skips a backend that refuses the inputs (dtype, head dim, dropout), so every
order ends in "torch", which takes everything.
"""

from __future__ import annotations

from typing import Optional

import torch

# CPU tensors: the kernel backends refuse them under "auto" (Triton's CPU interpreter is a
# test tool), so this is "torch" in effect.
CPU_ORDER = ("cuda", "triton", "torch")

# Compute capability -> order on that GPU.
#   sm_80 (A100), sm_86 (RTX 30, A10/A40), sm_89 (L4, L40, RTX 40): mma.sync is what both
#       backends use there; cuda first, as before this table existed (no GPU run yet).
#   sm_90 (H100, H200): triton first, for wgmma, until a committed H200 run shows the cuda
#       kernels faster.
ORDER_BY_CAPABILITY = {
    (8, 0): ("cuda", "triton", "torch"),
    (8, 6): ("cuda", "triton", "torch"),
    (8, 9): ("cuda", "triton", "torch"),
    (9, 0): ("triton", "cuda", "torch"),
}


def order_for_capability(capability: tuple[int, int]) -> tuple[str, ...]:
    """The row of the nearest listed capability at or below this one (so sm_87 takes sm_86's,
    and sm_100 or sm_120 Hopper's: newer GPUs keep the newest measured choice). Below every
    row (sm_75 and older, where the cuda kernels cannot run) the sm_80 row."""
    at_or_below = [c for c in ORDER_BY_CAPABILITY if c <= tuple(capability)]
    return ORDER_BY_CAPABILITY[max(at_or_below) if at_or_below else min(ORDER_BY_CAPABILITY)]


def auto_order(device: Optional[torch.device] = None) -> tuple[str, ...]:
    """The "auto" order for tensors on ``device``; None means this machine's default device
    (the current CUDA device when there is one, else the CPU)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if device.type != "cuda":
        return CPU_ORDER
    return order_for_capability(torch.cuda.get_device_capability(device))
