"""The CPU emulator's C interface (csrc/emu/capi.cpp) through ctypes, for the emulator's own
tests: build a library from a copy of csrc/ (possibly mutated), run each kernel on torch CPU
tensors, run single instructions and fault probes. No torch headers: a build takes seconds."""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import torch

from ccam_kernels.backends import tiling

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("emu/capi.cpp", "emu/runtime.cpp", "emu/ptx.cpp", "emu/ptx_hopper.cpp")


class EmuTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("elem_size", ctypes.c_int64), ("ndim", ctypes.c_int32),
                ("writable", ctypes.c_int32), ("sizes", ctypes.c_int64 * 5), ("strides", ctypes.c_int64 * 5)]


class EmuProblem(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("bf16", "batch", "num_query", "heads", "group", "tokens_per_frame",
                                                "head_dim", "num_splits", "schedule")] + [
        ("scale", ctypes.c_float), ("seed", ctypes.c_uint64)]


def csrc_copy(dest: pathlib.Path, replace: dict | None = None) -> pathlib.Path:
    """Copy csrc/ccam and csrc/emu to dest; replace: {relative path: (old, new)}, each old text
    must occur (a mutation that no longer applies fails loudly)."""
    for sub in ("ccam", "emu"):
        shutil.copytree(CSRC / sub, dest / sub, dirs_exist_ok=True)
    for rel, (old, new) in (replace or {}).items():
        path = dest / rel
        text = path.read_text()
        assert old in text, f"mutation target not found in {rel}: {old!r}"
        path.write_text(text.replace(old, new, 1))
    return dest


FLAGS = ["-std=c++20", "-O1", "-DCCAM_EMULATE", "-fPIC"]


def _cache_dir() -> pathlib.Path:
    cache = pathlib.Path(os.environ.get("CCAM_EMU_CACHE", pathlib.Path(tempfile.gettempdir()) / "ccam_emu_capi"))
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def _digest(*trees) -> str:
    digest = hashlib.sha256()
    for tree in trees:
        for p in sorted(tree.iterdir()):
            digest.update(p.name.encode() + p.read_bytes())
    return digest.hexdigest()[:16]


def _gxx(args):
    proc = subprocess.run([os.environ.get("CXX", "g++"), *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError("g++ failed:\n" + proc.stderr[-4000:])


def machine_objects() -> list[pathlib.Path]:
    """runtime.o and ptx.o of the real csrc/emu (the machine itself, never mutated), cached."""
    out = []
    for name in SOURCES[1:]:
        obj = _cache_dir() / f"{pathlib.Path(name).stem}_{_digest(CSRC / 'emu')}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            _gxx([*FLAGS, "-c", str(CSRC / name), "-o", str(tmp)])
            tmp.replace(obj)
        out.append(obj)
    return out


def build(src: pathlib.Path, out: pathlib.Path, small: bool = True) -> pathlib.Path:
    """g++ the C interface of the kernels in src (a csrc-like tree, possibly mutated) and link
    it with the machine objects; small: fp16 kernels at head dims 16..32 only (seconds to build)."""
    _gxx([*FLAGS, "-shared", "-Wl,-Bsymbolic", *(["-DCCAM_EMU_FP16_D32_ONLY"] if small else []), str(src / SOURCES[0]),
          *(str(o) for o in machine_objects()), "-o", str(out)])
    return out


UBSAN = ["-fsanitize=undefined", "-fno-sanitize-recover=all"]


def build_ubsan(src: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    """The small library with UndefinedBehaviorSanitizer in every source: an out-of-bounds index
    into a kernel's register arrays, a signed overflow or a misaligned pointer aborts the
    process with a report. Run it in a subprocess."""
    _gxx([*FLAGS, *UBSAN, "-shared", "-Wl,-Bsymbolic", "-DCCAM_EMU_FP16_D32_ONLY", *(str(src / s) for s in SOURCES),
          "-o", str(out)])
    return out


def cached_ubsan_library() -> pathlib.Path:
    """build_ubsan of the real sources, built once per source state."""
    lib = _cache_dir() / f"libccam_emu_ubsan_{_digest(CSRC / 'ccam', CSRC / 'emu')}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        build_ubsan(CSRC, tmp)
        tmp.replace(lib)
    return lib


def cached_library(small: bool = True) -> "Emu":
    """The library of the real sources, built once per source state."""
    lib = _cache_dir() / f"libccam_emu_{_digest(CSRC / 'ccam', CSRC / 'emu')}_{int(small)}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        build(CSRC, tmp, small)
        tmp.replace(lib)
    return Emu(lib)


def hopper_library() -> pathlib.Path:
    """The sm_90a C interface (csrc/emu/capi_hopper.cpp) of the real sources, built once per
    source state."""
    path = _cache_dir() / f"libccam_emu_hopper_{_digest(CSRC / 'ccam', CSRC / 'emu')}.so"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        _gxx([*FLAGS, "-shared", "-Wl,-Bsymbolic", str(CSRC / "emu" / "capi_hopper.cpp"),
              *(str(o) for o in machine_objects()), "-o", str(tmp)])
        tmp.replace(path)
    return path


class Sm90:
    """The emulated sm_90a forward of one library (the real sources or a mutant)."""

    def __init__(self, path: pathlib.Path):
        self.lib = ctypes.CDLL(str(path))
        self.lib.ccam_emu_last_grid_wgmma.restype = ctypes.c_int64

    def forward(self, q, k, v, counts, P, scale, splits=1, ranges=None, schedule=0, seed=0):
        out, lse = run_forward(self.lib, "ccam_emu_fwd_sm90", q, k, v, counts, P, scale, splits, schedule, seed,
                               ranges)
        if splits > 1:
            return tiling.merge_splits(out, lse)
        return out, lse

    def dq(self, dout, q, k, v, out, lse, counts, P, scale, dq_splits=1, schedule=0, seed=0):
        """The sm_90a dQ pass on the forward's (out float32, lse): dq_rows (B, N, H, D) float32,
        the splits summed in split order (as cuda_backend does)."""
        plan = tiling.window_plan(counts, tiling.whole_videos(counts), P, 64, q.device)
        delta = tiling.softmax_delta(dout, out)
        dq_rows = torch.empty(*((dq_splits,) if dq_splits > 1 else ()), len(counts), *q.shape[-3:])
        tensors = [(dout, 0), (q, 0), (k, 0), (v, 0), (lse, 0), (delta, 0), *((x, 0) for x in plan[:4]), (dq_rows, 1)]
        arr = (EmuTensor * len(tensors))(*(_tensor(x, w) for x, w in tensors))
        call(self.lib, "ccam_emu_bwd_dq_sm90", ctypes.byref(problem(q, k, counts, P, scale, 1, schedule, seed)), arr)
        return dq_rows.sum(0) if dq_splits > 1 else dq_rows

    def launch_record(self) -> dict:
        """The last grid: {"grid", "threads", "smem_bytes", "wgmma_n8_per_cta": each block's wgmma
        work in m64n8k16 steps, in launch order}."""
        geometry = (ctypes.c_int64 * 5)()
        n = self.lib.ccam_emu_last_grid_wgmma(geometry, None, 0)
        counts = (ctypes.c_int64 * max(n, 1))()
        self.lib.ccam_emu_last_grid_wgmma(geometry, counts, n)
        return {"grid": tuple(geometry[:3]), "threads": geometry[3], "smem_bytes": geometry[4],
                "wgmma_n8_per_cta": list(counts[:n])}


def _tensor(x: torch.Tensor, writable: bool = False) -> EmuTensor:
    t = EmuTensor()
    t.data, t.elem_size, t.ndim, t.writable = x.data_ptr(), x.element_size(), x.dim(), int(writable)
    for i, (n, s) in enumerate(zip(x.shape, x.stride())):
        t.sizes[i], t.strides[i] = n, s
    return t


class EmulatorError(RuntimeError):
    pass


def call(lib, fn: str, *args) -> None:
    """Call a C-interface entry (its last two arguments: an error buffer and its size); its
    error, if any, raised as EmulatorError."""
    err = ctypes.create_string_buffer(4096)
    if getattr(lib, fn)(*args, err, len(err)):
        raise EmulatorError(err.value.decode())


def problem(q, k, counts, P, scale, splits, schedule, seed) -> "EmuProblem":
    N, H, D = q.shape[-3:]
    return EmuProblem(bf16=int(q.dtype == torch.bfloat16), batch=len(counts), num_query=N, heads=H,
                      group=H // k.shape[1], tokens_per_frame=P, head_dim=D, num_splits=splits,
                      schedule=schedule, scale=scale, seed=seed)


def run_forward(lib, fn: str, q, k, v, counts, P, scale, splits=1, schedule=0, seed=0, ranges=None):
    """An emulated forward entry (``ccam_emu_fwd`` or ``ccam_emu_fwd_sm90``, same tensors):
    (out (B, N, H, D) in q's dtype or (S, B, N, H, D) float32 partials, lse). ranges: the frame
    window of each sample whose keys k, v hold (default: the whole videos)."""
    N, H, D = q.shape[-3:]
    B = len(counts)
    plan = tiling.window_plan(counts, tuple(ranges or tiling.whole_videos(counts)), P, 64, q.device)
    out = torch.empty(*((splits,) if splits > 1 else ()), B, N, H, D,
                      dtype=torch.float32 if splits > 1 else q.dtype)
    lse = torch.empty(*((splits,) if splits > 1 else ()), B, H, N)
    tensors = [(q, 0), (k, 0), (v, 0), *((x, 0) for x in plan[:4]), (out, 1), (lse, 1)]
    arr = (EmuTensor * len(tensors))(*(_tensor(x, w) for x, w in tensors))
    call(lib, fn, ctypes.byref(problem(q, k, counts, P, scale, splits, schedule, seed)), arr)
    return out, lse


class Emu:
    def __init__(self, path: pathlib.Path):
        self.path = path
        self.lib = ctypes.CDLL(str(path))
        self.lib.ccam_emu_last_grid.restype = ctypes.c_int64
        self.grids = {}  # kernel entry ("ccam_emu_fwd", ...) -> its last launch_record()

    def _call(self, fn, *args):
        call(self.lib, fn, *args)

    def _run(self, fn, pb, tensors):
        arr = (EmuTensor * len(tensors))(*(_tensor(x, w) for x, w in tensors))
        self._call(fn, ctypes.byref(pb), arr)
        self.grids[fn] = self.launch_record()

    def launch_record(self) -> dict:
        """The emulator's last grid: {"grid": (x, y, z), "threads", "smem_bytes", "mma_per_cta":
        the mma.sync warp instructions each block executed, in launch order (x fastest)}."""
        geometry = (ctypes.c_int64 * 5)()
        n = self.lib.ccam_emu_last_grid(geometry, None, 0)
        counts = (ctypes.c_int64 * max(n, 1))()
        self.lib.ccam_emu_last_grid(geometry, counts, n)
        return {"grid": tuple(geometry[:3]), "threads": geometry[3], "smem_bytes": geometry[4],
                "mma_per_cta": list(counts[:n])}

    def forward(self, q, k, v, counts, P, scale, splits=1, schedule=0, seed=0, ranges=None):
        """(out (B, N, H, D) in q's dtype or (S, B, N, H, D) float32 partials, lse). ranges: the
        frame window of each sample whose keys k, v hold (default: the whole videos)."""
        out, lse = run_forward(self.lib, "ccam_emu_fwd", q, k, v, counts, P, scale, splits, schedule, seed, ranges)
        self.grids["ccam_emu_fwd"] = self.launch_record()
        return out, lse

    def backward(self, dout, q, k, v, out, lse, counts, P, scale, schedule=0, seed=0, ranges=None, dlse=None,
                 dq_splits=1):
        """(dq_rows (B, N, H, D) float32, dk, dv). With ranges (and the LSE's gradient dlse):
        the backward of a partial call over those frame windows (as cuda_backend.partial_backward).
        dq_splits > 1: the dQ pass splits each query tile's keys; its partials are summed here
        in split order (as cuda_backend does)."""
        plan = tiling.window_plan(counts, tuple(ranges or tiling.whole_videos(counts)), P, 64, q.device)
        if ranges is None:
            delta = tiling.softmax_delta(dout, out)
        else:
            lse, delta = tiling.partial_softmax_rows(dout, dlse, out, lse)
        dq_rows = torch.empty(*((dq_splits,) if dq_splits > 1 else ()), len(counts), *q.shape[-3:])
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        pb = problem(q, k, counts, P, scale, 1, schedule, seed)
        common = [(dout, 0), (q, 0), (k, 0), (v, 0), (lse, 0), (delta, 0), *((x, 0) for x in plan[:4])]
        self._run("ccam_emu_bwd_dq", pb, common + [(dq_rows, 1)])
        self._run("ccam_emu_bwd_dkdv", pb, common + [(plan.tile_sample, 0), (plan.tile_start, 0), (dk, 1), (dv, 1)])
        return (dq_rows.sum(0) if dq_splits > 1 else dq_rows), dk, dv

    # single instructions
    def mma(self, a, b, c, bf16):
        """a: (32, 4) uint32 registers as int64, b: (32, 2), c: (32, 4) float32 -> d (32, 4)."""
        a32 = (ctypes.c_uint32 * 128)(*a.flatten().tolist())
        b32 = (ctypes.c_uint32 * 64)(*b.flatten().tolist())
        c = c.float().contiguous()
        d = torch.empty(32, 4)
        self._call("ccam_emu_mma", int(bf16), a32, b32, ctypes.c_void_p(c.data_ptr()), ctypes.c_void_p(d.data_ptr()))
        return d

    def ldmatrix(self, smem_words, offsets, trans):
        """smem_words: list of 16-bit ints; offsets: 32 element offsets -> (32, 4) registers."""
        n = len(smem_words)
        words = (ctypes.c_uint16 * n)(*smem_words)
        offs = (ctypes.c_int32 * 32)(*offsets)
        out = (ctypes.c_uint32 * 128)()
        self._call("ccam_emu_ldmatrix", int(trans), words, n, offs, out)
        return [list(out[4 * l:4 * l + 4]) for l in range(32)]

    def cp_async(self, src_words, valid, pending):
        groups = len(valid)
        src = torch.tensor(src_words, dtype=torch.int16)
        vals = (ctypes.c_int32 * groups)(*valid)
        seen = (ctypes.c_uint16 * (8 * groups))()
        self._call("ccam_emu_cp_async", ctypes.c_void_p(src.data_ptr()), vals, groups, pending, seen)
        return list(seen)

    def ex2(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        y = torch.empty_like(x)
        self.lib.ccam_emu_ex2(ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()), x.numel())
        return y

    def shuffle(self, op, lane_mask, x):
        x = x.float().contiguous()
        y = torch.empty(32)
        self._call("ccam_emu_shuffle", op, lane_mask, ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(y.data_ptr()))
        return y

    def fault(self, which):
        self._call("ccam_emu_fault", which)
