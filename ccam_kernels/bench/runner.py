"""Timing of benchmark cases: every backend on the same inputs, errors against the reference."""

from __future__ import annotations

import statistics
import sys
import time
import zlib
from dataclasses import dataclass, field

import torch

from ..attention import ccam_attention
from ..config import CCAMConfig
from ..projector import CCAMProjector
from .flops import attention_flops, projector_flops

PASSES = ("fwd", "fwd+bwd")
BENCHES = ("attention", "projector")


@dataclass(frozen=True)
class BenchCase:
    bench: str  # "attention" | "projector"
    pass_: str  # "fwd" | "fwd+bwd"
    frame_counts: tuple  # frames of each sample
    dtype: torch.dtype
    config: CCAMConfig = field(default_factory=CCAMConfig)
    tokens_per_frame: int = 729

    @property
    def label(self) -> str:
        t = self.frame_counts
        frames = f"T={t[0]}" if len(set(t)) == 1 else f"T={list(t)}"
        return f"{self.bench} {self.pass_} {frames} B={len(t)} {str(self.dtype).replace('torch.', '')}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall time of ``fn`` over ``repeats`` calls after ``warmup`` untimed calls.
    On CUDA each call is timed with CUDA events and peak memory is measured above the
    memory already allocated before the timed calls (the inputs)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    peak_mb = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "peak_mem_mb": peak_mb}


def measure_ceilings(device: torch.device) -> dict:
    """The machine's own limits, measured now: GEMM rate (bf16 on GPU, float32 on CPU) and
    copy bandwidth (bytes read + written)."""
    if device.type == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 2**30
    else:
        n, dtype, copy_bytes = 2048, torch.float32, 2**28
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    # A ceiling is the best the machine did: the fastest call, not the median.
    gemm = time_fn(lambda: torch.mm(a, b), device, warmup=2, repeats=10)
    src = torch.randn(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return {
        "matmul_tflops": 2 * n**3 / (gemm["min_ms"] * 1e-3) / 1e12,
        "matmul_dtype": str(dtype).replace("torch.", ""),
        "copy_gbps": 2 * copy_bytes / (copy["min_ms"] * 1e-3) / 1e9,
    }


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


class _AttentionInputs:
    def __init__(self, case: BenchCase, device):
        cfg, P = case.config, case.tokens_per_frame
        L = sum(case.frame_counts) * P
        H, Hkv, D = cfg.num_heads, cfg.num_key_value_heads, cfg.head_dim
        grad = case.pass_ != "fwd"
        make = lambda *shape: torch.randn(*shape, device=device, dtype=case.dtype).requires_grad_(grad)  # noqa: E731
        self.q, self.k, self.v = make(cfg.num_query, H, D), make(L, Hkv, D), make(L, Hkv, D)
        self.dout = torch.randn(len(case.frame_counts), cfg.num_query, H, D, device=device, dtype=case.dtype)
        self.case = case

    def step(self, backend: str):
        """One call of the benchmarked pass; returns the tensors compared with the reference."""
        case = self.case
        if case.pass_ == "fwd":
            with torch.no_grad():
                return [ccam_attention(self.q, self.k, self.v, case.frame_counts, case.tokens_per_frame, backend=backend)]
        for x in (self.q, self.k, self.v):
            x.grad = None
        out = ccam_attention(self.q, self.k, self.v, case.frame_counts, case.tokens_per_frame, backend=backend)
        out.backward(self.dout)
        return [out.detach(), self.q.grad, self.k.grad, self.v.grad]


class _ProjectorInputs:
    def __init__(self, case: BenchCase, device):
        cfg = case.config
        self.module = CCAMProjector(cfg).to(device=device, dtype=case.dtype).eval()
        grad = case.pass_ != "fwd"
        F = sum(case.frame_counts)
        self.features = torch.randn(
            F, case.tokens_per_frame, cfg.cross_hidden_size, device=device, dtype=case.dtype
        ).requires_grad_(grad)
        self.dout = torch.randn(len(case.frame_counts), cfg.num_query, cfg.output_size, device=device, dtype=case.dtype)
        self.case = case

    def step(self, backend: str):
        self.module.backend = backend
        if self.case.pass_ == "fwd":
            with torch.no_grad():
                return [self.module(self.features, self.case.frame_counts)]
        self.module.zero_grad(set_to_none=True)
        self.features.grad = None
        out = self.module(self.features, self.case.frame_counts)
        out.backward(self.dout)
        return [out.detach(), self.features.grad, self.module.query.grad]


def run_case(case: BenchCase, backends, device, warmup, repeats, ceilings, log) -> list[dict]:
    """Rows of one case, one per backend (reference first: it anchors the error column)."""
    torch.manual_seed(zlib.crc32(case.label.encode()))  # fresh random data, the same in every run
    inputs = (_AttentionInputs if case.bench == "attention" else _ProjectorInputs)(case, device)
    ref = [t.detach().clone() for t in inputs.step("reference")]
    if case.bench == "attention":
        cfg = case.config
        flops = attention_flops(cfg.num_query, cfg.num_heads, cfg.head_dim, case.frame_counts,
                                case.tokens_per_frame, case.pass_)
    else:
        flops = projector_flops(case.config, case.frame_counts, case.tokens_per_frame, case.pass_)
    rows = []
    for backend in backends:
        log(f"  {backend:<10}", end="")
        row = {
            "bench": case.bench, "pass": case.pass_, "backend": backend,
            "frames": case.frame_counts[0] if len(set(case.frame_counts)) == 1 else list(case.frame_counts),
            "frame_counts": list(case.frame_counts), "batch": len(case.frame_counts),
            "dtype": str(case.dtype).replace("torch.", ""), "gflop": flops / 1e9,
        }
        try:
            got = inputs.step(backend)
            row["max_rel_err"] = max(_rel_err(g, r) for g, r in zip(got, ref))
            del got
            timing = time_fn(lambda: inputs.step(backend), device, warmup, repeats)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row.update(status="oom", median_ms=None, tflops=None, pct_of_ceiling=None, peak_mem_mb=None)
            log(" out of memory")
            rows.append(row)
            continue
        tflops = flops / (timing["median_ms"] * 1e-3) / 1e12
        row.update(status="ok", **timing, repeats=repeats, tflops=tflops,
                   pct_of_ceiling=100.0 * tflops / ceilings["matmul_tflops"])
        log(f" {timing['median_ms']:10.2f} ms  {tflops:7.3f} TFLOP/s  err {row['max_rel_err']:.1e}")
        rows.append(row)
    by_backend = {r["backend"]: r for r in rows}
    ref_ms = by_backend.get("reference", {}).get("median_ms")
    for row in rows:
        row["speedup_vs_reference"] = ref_ms / row["median_ms"] if ref_ms and row.get("median_ms") else None
    return rows


def run_suite(cases, backends, device, *, warmup=1, repeats=3, log=None) -> dict:
    """Measure the ceilings, then every case; returns {"ceilings": ..., "rows": [...]}."""
    if log is None:
        def log(msg="", end="\n"):
            print(msg, end=end, file=sys.stderr, flush=True)
    log("measuring the machine's ceilings (GEMM rate, copy bandwidth) ...")
    ceilings = measure_ceilings(device)
    log(f"  GEMM {ceilings['matmul_tflops']:.3f} TFLOP/s ({ceilings['matmul_dtype']}), "
        f"copy {ceilings['copy_gbps']:.1f} GB/s")
    rows = []
    t0 = time.perf_counter()
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}] {case.label}  (elapsed {time.perf_counter() - t0:.0f} s)")
        rows += run_case(case, backends, device, warmup, repeats, ceilings, log)
    return {"ceilings": ceilings, "rows": rows}
