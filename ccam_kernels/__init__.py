"""ccam_kernels: fused block-causal cross-attention for Video-CCAM projectors.

Public API:
    ccam_attention(q, k, v, frame_counts, tokens_per_frame, *, scale=None, backend="auto")
    frame_of_query(num_query, num_frames)
    available_backends()
    CCAMConfig, CCAMProjector
"""

from .attention import available_backends, ccam_attention
from .config import CCAMConfig
from .mask import frame_of_query
from .projector import CCAMProjector

__version__ = "0.1.0"

__all__ = [
    "ccam_attention",
    "frame_of_query",
    "available_backends",
    "CCAMConfig",
    "CCAMProjector",
    "__version__",
]
