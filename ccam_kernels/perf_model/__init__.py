"""A performance model of the kernel backends (cuda, triton) that runs on CPU: per kernel and
shape, the CTAs launched, the CTAs an SM holds (from the compiled kernels' registers and
shared memory for sm_90), a simulation of how the CTAs spread over an H100's 132 SMs, the
tensor-core FLOPs issued against the live ones, the bytes through L2 and from HBM, and a time
at a stated rate. ``python -m ccam_kernels.perf_model`` prints it; docs/gpu.md explains it.

Modules: launches.py (grids and per-CTA work, from the launchers' tile constants and the mask
rule), machine.py (occupancy and the scheduler simulation, the stated rates), resources.py
(the compiled kernels' registers and shared memory, resources.json).

It judges designs, it does not measure them: every number is a prediction until a GPU run
sits next to it (benchmarks/gpu_suite.sh puts them side by side).
"""

from __future__ import annotations

from .. import mask
from ..config import CCAMConfig
from . import launches, machine, merge, resources
from .launches import Shape

__all__ = ["Shape", "default_shapes", "predict"]

V12_FRAMES = (16, 32, 64, 96, 512)
RAGGED = (16, 96, 33, 64)


def default_shapes() -> list:
    """The issue-23 shapes: Video-CCAM v1.2 (bf16, N = 1024, H = 16, D = 64, P = 729) at
    T in {16, 32, 64, 96, 512} with B in {1, 4}, and the ragged batch [16, 96, 33, 64]."""
    cfg = CCAMConfig()
    base = dict(num_query=cfg.num_query, heads=cfg.num_heads, kv_heads=cfg.num_heads, head_dim=cfg.head_dim,
                tokens_per_frame=729, dtype="bf16")
    shapes = [Shape(frame_counts=(t,) * b, **base) for t in V12_FRAMES for b in (1, 4)]
    return shapes + [Shape(frame_counts=RAGGED, **base)]


def live_flops(s: Shape, pass_: str) -> float:
    """Tensor FLOPs of the live (query, key) pairs: 4 D per pair forward (QK^T, PV), 10 D
    backward (recompute QK^T; dP, dV, dQ, dK)."""
    pairs = mask.live_pairs(s.num_query, s.frame_counts, s.tokens_per_frame) * s.heads
    return (4 if pass_ == "fwd" else 10) * s.head_dim * pairs


def hbm_bytes(s: Shape, kernel: str, splits: int = 1) -> int:
    """Compulsory HBM traffic: every input read once, every output written once (a lower
    bound: K/V re-reads that miss L2 come on top)."""
    e, B, N, H, D = s.elem_bytes, len(s.frame_counts), s.num_query, s.heads, s.head_dim
    q = B * N * H * D * e
    kv = sum(s.frame_counts) * s.tokens_per_frame * s.kv_heads * D * e
    rows = B * H * N * 4
    if kernel == "fwd":
        out = splits * B * N * H * D * 4 if splits > 1 else q
        return q + 2 * kv + out + splits * rows
    if kernel == "dq":
        return 2 * q + 2 * kv + 2 * rows + splits * B * N * H * D * 4
    return 2 * q + 2 * kv + 2 * rows + 2 * kv  # dkdv: reads q, dO, k, v, lse, delta; writes dk, dv


def _resident_cuda(table: dict, s: Shape, launch) -> tuple:
    dtype = "bf16" if s.dtype == "bf16" else "fp16"
    if launch.backend == "cuda_sm90":
        name = resources.cuda_kernel_name("fwd_sm90_kernel", dtype, launches.sm90_width(s.head_dim))
    else:
        name = resources.cuda_kernel_name({"fwd": "fwd_kernel", "dq": "bwd_dq_kernel", "dkdv": "bwd_dkdv_kernel"}[launch.kernel],
                                          dtype, launches.padded_head_dim(s.head_dim))
    res = table["cuda_sm_90a"][name]
    return machine.resident_ctas(res["registers"], launch.threads, launch.smem_bytes), res, name


def _triton_options(table: dict, s: Shape, launch) -> list:
    """(config, resident CTAs, resources) of every sm_90 config of the kernel that does not spill."""
    from ..backends import triton_kernels

    block_d = triton_kernels.gpu_block_sizes(s.head_dim)[2]
    found = []
    for warps, stages in triton_kernels.KERNEL_CONFIGS[launch.kernel]:
        key = resources.triton_config_key(launch.kernel, block_d, warps, stages)
        res = table["triton_sm_90"].get(key)
        if res is None or res["spill_stores"] or res["spill_loads"]:
            continue
        found.append((f"w{warps}s{stages}", machine.resident_ctas(res["registers"], 32 * warps, res["shared"]), res))
    return found


def _merge_record(s: Shape, backend: str, splits: int, how: str) -> dict:
    """The split forward's merge (perf_model/merge.py): memory-bound, so no CTA schedule
    (balance None; ctas: the fused kernel's grid, 0 for PyTorch's chain of ops). The sm_90a
    forward's partials go through the cuda backend's merge."""
    cost = merge.merge_cost(splits, len(s.frame_counts), s.num_query, s.heads, s.head_dim, s.elem_bytes, how)
    ctas = 0
    if how == "fused":
        if backend.startswith("cuda"):
            from ..backends.cuda_backend import MERGE_ROWS as rows
        else:
            from ..backends.triton_merge import block_rows

            rows = block_rows(s.head_dim)
        ctas = len(s.frame_counts) * s.heads * -(-s.num_query // rows)
    return {
        "backend": backend, "kernel": "merge", "pass": "fwd", "frames": list(s.frame_counts),
        "batch": len(s.frame_counts), "num_query": s.num_query, "heads": s.heads, "kv_heads": s.kv_heads,
        "head_dim": s.head_dim, "tokens_per_frame": s.tokens_per_frame, "dtype": s.dtype, "splits": splits,
        "merge": how, "kernels": cost["kernels"], "ctas": ctas, "balance": None, "issued_tflop": 0.0,
        "hbm_bytes": cost["hbm_bytes"], "l2_bytes": cost["hbm_bytes"], "predicted_ms": cost["seconds"] * 1e3,
    }


BACKENDS = ("cuda", "cuda_sm90", "triton")
LAUNCHES = {"cuda": launches.cuda_launches, "cuda_sm90": launches.cuda_sm90_launches,
            "triton": launches.triton_launches}


def predict(s: Shape, backends=BACKENDS, sms: int = launches.SMS, rates=None, merges=None) -> list:
    """One record per backend and kernel (fwd, dq, dkdv), one for the forward's merge of its
    split partials ("merge", when it splits; ``merges`` {backend: "fused" | "pytorch"} overrides
    how, default merge.BACKEND_MERGE) and one per backward ("bwd", the two passes back to back)
    for shape s. "cuda_sm90" is the cuda backend's sm_90a forward (fwd_sm90.cuh; its backward is
    the mma.sync one, "cuda"'s dq and dkdv; its split partials take cuda's merge)."""
    merges = {**merge.BACKEND_MERGE, **(merges or {})}
    merges.setdefault("cuda_sm90", merges["cuda"])
    table = resources.load()
    rates = {**machine.RATE_TFLOPS, **(rates or {})}
    records = []
    for backend in backends:
        made = LAUNCHES[backend](s, sms)
        sm_rate = rates[backend] * 1e12 / sms
        bwd = []
        for kernel, launch in made.items():
            if backend in ("cuda", "cuda_sm90"):
                resident, res, name = _resident_cuda(table, s, launch)
                options = [(name, resident, res)]
            else:
                options = _triton_options(table, s, launch)
            best, sims = None, {}
            for config, resident, res in options:
                if resident not in sims:  # configs that fit as many CTAs per SM schedule alike
                    sims[resident] = machine.schedule(launch.flops, resident, sms, sm_rate)
                sim = sims[resident]
                if best is None or sim["makespan_s"] < best[3]["makespan_s"]:
                    best = (config, resident, res, sim)
            config, resident, res, sim = best
            pass_ = "fwd" if kernel == "fwd" else "bwd"
            hbm = hbm_bytes(s, kernel, launch.splits)
            seconds = max(sim["makespan_s"], hbm / machine.HBM_BYTES_PER_S)
            rec = {
                "backend": backend, "kernel": kernel, "pass": pass_, "frames": list(s.frame_counts),
                "batch": len(s.frame_counts), "num_query": s.num_query, "heads": s.heads, "kv_heads": s.kv_heads,
                "head_dim": s.head_dim, "tokens_per_frame": s.tokens_per_frame, "dtype": s.dtype,
                "grid": list(launch.grid), "ctas": launch.ctas, "splits": launch.splits, "config": config,
                "registers": res["registers"], "smem_bytes": launch.smem_bytes or res.get("shared", 0),
                "resident_per_sm": resident, "balance": round(sim["balance"], 4),
                "issued_tflop": sum(launch.flops) / 1e12, "hbm_bytes": hbm, "l2_bytes": sum(launch.l2_bytes),
                "rate_tflops": rates[backend], "predicted_ms": seconds * 1e3,
            }
            if kernel == "fwd":
                rec["live_tflop"] = live_flops(s, "fwd") / 1e12
            if backend == "cuda":
                rec["mma_per_cta"] = launch.mma
            if backend == "cuda_sm90":
                rec["wgmma_n8_per_cta"] = launch.mma
            records.append(rec)
            if kernel == "fwd" and launch.splits > 1:
                records.append(_merge_record(s, backend, launch.splits, merges[backend]))
            if kernel != "fwd":
                bwd.append((rec, sim))
        if not bwd:
            continue
        slots = [sms * rec["resident_per_sm"] for rec, _ in bwd]
        busy = sum(sim["busy_s"] for _, sim in bwd)
        capacity = sum(n * sim["makespan_s"] for n, (_, sim) in zip(slots, bwd))
        records.append({
            "backend": backend, "kernel": "bwd", "pass": "bwd", "frames": list(s.frame_counts),
            "batch": len(s.frame_counts), "num_query": s.num_query, "heads": s.heads, "kv_heads": s.kv_heads,
            "head_dim": s.head_dim, "tokens_per_frame": s.tokens_per_frame, "dtype": s.dtype,
            "ctas": sum(r["ctas"] for r, _ in bwd), "balance": round(busy / capacity if capacity else 1.0, 4),
            "issued_tflop": sum(r["issued_tflop"] for r, _ in bwd), "live_tflop": live_flops(s, "bwd") / 1e12,
            "hbm_bytes": sum(r["hbm_bytes"] for r, _ in bwd), "l2_bytes": sum(r["l2_bytes"] for r, _ in bwd),
            "rate_tflops": rates[backend], "predicted_ms": sum(r["predicted_ms"] for r, _ in bwd),
        })
    return records
