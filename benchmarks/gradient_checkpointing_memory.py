"""python benchmarks/gradient_checkpointing_memory.py [cpu|cuda] [frames]

Saved activations (bytes autograd keeps for the backward) and, on CUDA, peak memory of one
training forward+backward of the v1.2 projector, with and without gradient checkpointing."""
import sys, time, torch
from ccam_kernels import CCAMConfig, CCAMProjector
dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
frames = int(sys.argv[2]) if len(sys.argv) > 2 else 16
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
torch.manual_seed(0)
proj = CCAMProjector(CCAMConfig(), backend="auto").to(dev, dtype).train()
x = torch.randn(frames, 729, 1152, device=dev, dtype=dtype)
for ckpt in (False, True, False, True):
    proj.gradient_checkpointing_enable() if ckpt else proj.gradient_checkpointing_disable()
    saved = 0
    def pack(t):
        global saved
        saved += t.numel() * t.element_size(); return t
    if dev == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = proj(x, [frames])
    y.float().square().mean().backward()
    if dev == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev == "cuda" else float("nan")
    proj.zero_grad(set_to_none=True)
    print(f"{dev} {dtype} T={frames} checkpointing={ckpt}: saved {saved / 2**20:.1f} MiB, peak above start {peak:.1f} MiB, fwd+bwd {dt*1e3:.0f} ms")
