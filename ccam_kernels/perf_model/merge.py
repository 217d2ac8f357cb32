"""The split-KV forward's merge, in the model: the HBM bytes and kernel launches of merging S
float32 partials into the output (q's dtype) and the LSE, for the two ways the backends do it.

- "fused" (both backends: backends/triton_merge.py, csrc/ccam/merge.cuh): one kernel reads
  each partial output and LSE once and writes out, lse (and the float32 copy for training).
- "pytorch" (both backends before, tiling.merge_splits): the ops as written there, each a kernel
  that re-reads its inputs from memory: logsumexp over the splits (counted as one kernel; torch
  runs several), the -inf shift (isneginf, where), the weights (subtract, exp), the weighted
  partials (a product the size of all partials), their sum, and the cast into out.

Memory-bound: time = bytes / HBM bandwidth + a stated cost per kernel launch (the small
kernels are latency-bound; PyTorch also dispatches each op from the host). No GPU has timed
either: predicted, like the rest of the model.
"""

from __future__ import annotations

from . import machine

KERNEL_LAUNCH_S = 3e-6  # stated: one small kernel's launch and tail (a PyTorch op's dispatch included)


def merge_cost(splits: int, batch: int, num_query: int, heads: int, head_dim: int, elem_bytes: int,
               how: str, keep_acc: bool = False) -> dict:
    """{"kernels", "hbm_bytes", "seconds"} of merging ``splits`` partials (B, N, H, D) float32
    with their (B, H, N) LSEs into out (``elem_bytes`` per element) and lse; ``keep_acc`` adds
    the float32 output (training, a partial call)."""
    o = batch * num_query * heads * head_dim * 4  # one float32 (B, N, H, D)
    r = batch * heads * num_query * 4  # one (B, H, N) float32
    out = o // 4 * elem_bytes
    S = splits
    if how == "fused":
        steps = [S * o + S * r + out + r + (o if keep_acc else 0)]
    elif how == "pytorch":
        steps = [
            S * r + r,  # lse = logsumexp(lse_parts, 0)
            r + r // 4,  # isneginf(lse)
            r + r // 4 + r,  # shift = where(...)
            S * r + r + S * r,  # lse_parts - shift
            2 * S * r,  # exp(...)
            S * o + S * r + S * o,  # weight * o_parts
            S * o + o,  # .sum(0): the float32 output
            o + out,  # out.copy_(acc)
        ]
    else:
        raise ValueError(f"how is 'fused' or 'pytorch', got {how!r}")
    hbm = sum(steps)
    return {"kernels": len(steps), "hbm_bytes": hbm,
            "seconds": len(steps) * KERNEL_LAUNCH_S + hbm / machine.HBM_BYTES_PER_S}


BACKEND_MERGE = {"cuda": "fused", "triton": "fused"}
