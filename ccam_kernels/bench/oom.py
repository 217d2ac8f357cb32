"""Whether an error is an allocation failure, on any device: such a failure is an `oom` row of
ccam-bench, never a traceback nor an `error` row."""

from __future__ import annotations

import torch

# What each allocator says when it runs out: CUDA's caching allocator and the other devices'
# ("CUDA out of memory", "MPS backend out of memory", "XPU out of memory"), torch's CPU
# allocator ("DefaultCPUAllocator: can't allocate memory: ... Error code 12 (Cannot allocate
# memory)" on POSIX, "DefaultCPUAllocator: not enough memory" on Windows), and Python's own
# MemoryError (as the last line of a worker process's stderr).
OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory", "memoryerror")


def is_oom_message(text: str) -> bool:
    text = text.lower()
    return any(m in text for m in OOM_MESSAGES)


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or is_oom_message(str(exc))
