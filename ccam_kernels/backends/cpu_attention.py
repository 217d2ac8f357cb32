"""The torch backend's native CPU forward (float32): csrc/cpu/attention_forward.cpp, built into
the native CPU library (ccam_kernels/cpu_native.py), its products on torch's own BLAS.

    forward(q, k, v, frame_counts, P, scale) -> (out (B, N, H, D), lse (B, H, N)) | None

q (N, H, D) shared or (B, N, H, D), k, v packed (L, Hkv, D), all float32 on CPU. None when there
is no native build or no BLAS to call (the caller then runs the torch engines: same formula).

Why native: the torch engines run each block in PyTorch's fused CPU attention kernel, or as
separate matmul / exp / sum passes over (rows, keys) tensors in memory, and reached about half
the machine's GEMM rate on the live FLOPs (docs/torch.md). Here every (sample, head) is one task:
per chunk of keys (a frame of 729 keys at v1.2) its K and V are packed once for all row blocks,
and per block of 128 query rows the scores, the softmax update and the output product run on
an L2-resident tile; the threads split the tasks, largest first, each product single-threaded.

The BLAS is the one inside torch's own library (libtorch_cpu): its Fortran ``sgemm_``, and with
MKL (torch's x86 builds) ``MKL_Set_Num_Threads_Local`` (so a worker's products do not start
threads of their own) and the packed-operand API (``cblas_sgemm_pack``/``_compute``). Their
addresses are handed to the library once; a torch without ``sgemm_`` exported gets None here.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Optional

import torch

from .. import cpu_native
from ..mask import first_query_of_frame, key_offsets

__all__ = ["forward", "available", "ENTRY"]

ENTRY = "ccam_cpu_attention_forward_f32"
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
# csrc/cpu/attention_forward.cpp's ccam_cpu_attention_forward_f32
_ARGTYPES = [_PTR] * 5 + [_I64] * 6 + [_PTR] * 3 + [ctypes.c_float, _I64, _I64]
_lock = threading.Lock()
_state: dict = {}


def _blas_addresses() -> Optional[list]:
    """[sgemm_, MKL_Set_Num_Threads_Local, pack_get_size, pack, compute] from torch's library
    (None for the ones it lacks), or None without sgemm_."""
    path = os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so")
    try:
        lib = ctypes.CDLL(path)
    except OSError:
        return None

    def address(name):
        fn = getattr(lib, name, None)
        return None if fn is None else ctypes.cast(fn, ctypes.c_void_p).value

    names = ("sgemm_", "MKL_Set_Num_Threads_Local", "cblas_sgemm_pack_get_size", "cblas_sgemm_pack",
             "cblas_sgemm_compute")
    found = [address(n) for n in names]
    return found if found[0] is not None else None


def _entry():
    """The library's forward entry point with its BLAS set, or None (decided once)."""
    with _lock:
        if "entry" not in _state:
            entry = None
            setup = cpu_native.function("ccam_cpu_attention_set_blas", [_PTR] * 5)
            blas = _blas_addresses() if setup is not None else None
            if blas is not None:
                setup(*blas)
                entry = cpu_native.function(ENTRY, _ARGTYPES, ctypes.c_int)
            _state["entry"] = entry
        return _state["entry"]


def available() -> bool:
    return _entry() is not None


def reset() -> None:
    """Forget the decision (tests: after cpu_native.reset())."""
    with _lock:
        _state.clear()


def _frame_starts(num_query: int, frame_counts) -> tuple[torch.Tensor, torch.Tensor]:
    """first_query_of_frame of every sample, concatenated, and where each sample's starts."""
    starts, offsets = [], [0]
    for t in frame_counts:
        starts += first_query_of_frame(num_query, int(t))
        offsets.append(len(starts))
    return torch.tensor(starts, dtype=torch.int64), torch.tensor(offsets, dtype=torch.int64)


def forward(q, k, v, frame_counts, tokens_per_frame: int, scale: float, *, blas: bool = False):
    """(out, lse) of the float32 inputs, or None when there is no native build. ``blas``: the
    products on the BLAS, not the library's own AVX2 kernels (which it uses where it has them)."""
    entry = _entry()
    if entry is None:
        return None
    q, k, v = (x.contiguous() for x in (q, k, v))
    N, H, D = q.shape[-3:]
    B = len(frame_counts)
    first, first_offsets = _frame_starts(N, frame_counts)
    key_offs = torch.tensor(key_offsets(frame_counts, tokens_per_frame), dtype=torch.int64)
    out = torch.empty(B, N, H, D, dtype=torch.float32)
    lse = torch.empty(B, H, N, dtype=torch.float32)
    rc = entry(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(), B,
               0 if q.dim() == 3 else N * H * D, N, H, k.shape[1], D, first.data_ptr(), first_offsets.data_ptr(),
               key_offs.data_ptr(), float(scale), torch.get_num_threads(), int(blas))
    if rc != 0:
        raise RuntimeError(f"{ENTRY} failed ({rc})")
    return out, lse
