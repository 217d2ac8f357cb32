"""Type aliases for the annotations of the public API (docs/reference.md §3 to §5).

Annotations only: nothing here is checked at run time (ccam_kernels/checks.py does that).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch

# Frames per sample: ints, a 1-D integer NumPy array or a 1-D integer tensor (docs/reference.md §3.1).
FrameCounts = Union[Sequence[int], np.ndarray, torch.Tensor]
# (first, end) frame pairs, one per sample (docs/reference.md §5.1).
FrameRanges = Union[Sequence[Sequence[int]], torch.Tensor]
DeviceLike = Union[torch.device, str, int]
PathLike = Union[str, os.PathLike]
# An attention with ccam_attention's calling convention, for CCAMProjector(backend=...).
AttentionFn = Callable[..., torch.Tensor]
# (out, lse) pairs of partial attention over disjoint frame ranges (docs/reference.md §5.1).
Partials = Iterable[tuple[torch.Tensor, torch.Tensor]]
# Checkpoint key -> our key, or None to drop it (docs/reference.md §4.3).
KeyMap = Union[dict, Callable[[str], Optional[str]]]

try:
    from torch.distributed import ProcessGroup
except ImportError:  # a PyTorch build without torch.distributed: group= is refused there anyway
    ProcessGroup = object

__all__ = ["FrameCounts", "FrameRanges", "DeviceLike", "PathLike", "AttentionFn", "KeyMap", "Partials", "ProcessGroup"]
