"""The machine side of the model: resident CTAs per SM from a kernel's registers and shared
memory, and a simulation of the CTA scheduler: greedy list scheduling in launch order.

Hopper SM limits (CUDA C Programming Guide, compute capability 9.0): 65,536 32-bit registers,
allocated per warp in units of 256 (8 per thread); 228 KB of shared memory per SM, at most
227 KB per block, 1 KB reserved per resident block; at most 64 warps and 32 blocks.

The scheduler model: every SM holds ``resident`` CTA slots; the CTAs start in launch order,
each on the slot that frees first (what the hardware's block scheduler does, up to its
tie-breaking). The resident CTAs of an SM share its tensor-core rate evenly, so a CTA that
issues F FLOPs runs for ``overhead + F * resident / sm_rate``. Balance = busy slot-time /
(slots x makespan): 1 when every SM is busy until the last CTA ends.
"""

from __future__ import annotations

import heapq

REGISTERS_PER_SM = 65536
SMEM_PER_SM = 228 * 1024
SMEM_RESERVED_PER_BLOCK = 1024
MAX_WARPS_PER_SM = 64
MAX_BLOCKS_PER_SM = 32

# Stated rates (estimates for an H100 SXM; no GPU has measured them for these kernels):
# issued tensor-core FLOPs per second the whole GPU sustains in each backend's hot loop, and
# HBM bandwidth. mma.sync tops out near 2/3 of the 989 TF/s dense bf16 wgmma peak; the cuda
# kernels' hot loop is issue-bound besides (docs/gpu.md: non-MMA instructions per HMMA), so
# 400; Triton's wgmma kernels 500. The cuda backend's sm_90a forward (wgmma fed by TMA, one
# CTA of two consumer warpgroups per SM, intra-warpgroup overlap of softmax and GEMMs, no
# ping-pong yet): 500, FlashAttention-3's reported 497 TF/s at head dim 64 for the same
# instruction mix (dense, so issued = live there). A CTA's fixed cost (launch, first loads,
# epilogue): 1 us.
RATE_TFLOPS = {"cuda": 400.0, "cuda_sm90": 500.0, "triton": 500.0}
HBM_BYTES_PER_S = 3.35e12
CTA_OVERHEAD_S = 1e-6


def resident_ctas(registers: int, threads: int, smem_bytes: int) -> int:
    """CTAs one SM holds at once, by registers, shared memory, warps and blocks."""
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) // 8) * 8 * 32
    by_regs = (REGISTERS_PER_SM // regs_per_warp) // warps
    by_smem = SMEM_PER_SM // (smem_bytes + SMEM_RESERVED_PER_BLOCK)
    return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, MAX_BLOCKS_PER_SM))


def schedule(work_flops: list, resident: int, sms: int, sm_rate_flops: float,
             overhead_s: float = CTA_OVERHEAD_S) -> dict:
    """List-schedule CTAs (their issued FLOPs, in launch order) over sms x resident slots.
    -> {"makespan_s", "busy_s", "balance"}."""
    slots = [0.0] * (sms * resident)
    heapq.heapify(slots)
    per_flop = resident / sm_rate_flops
    busy = 0.0
    end = 0.0
    for flops in work_flops:
        start = heapq.heappop(slots)
        duration = overhead_s + flops * per_flop
        busy += duration
        finish = start + duration
        end = max(end, finish)
        heapq.heappush(slots, finish)
    balance = busy / (len(slots) * end) if end > 0 else 1.0
    return {"makespan_s": end, "busy_s": busy, "balance": balance}
