"""ccam_kernels: fused block-causal cross-attention for Video-CCAM projectors.

Public API (shapes, dtypes and every error: docs/reference.md):

    ccam_attention(q, k, v, frame_counts, tokens_per_frame, *, scale=None, dropout_p=0.0, backend='auto') -> torch.Tensor
    frame_of_query(num_query, num_frames, *, device=None) -> torch.Tensor
    available_backends() -> list[str]
    CCAMConfig, CCAMProjector (forward, stream, from_pretrained, save_pretrained)

Long videos, in ccam_kernels.long_video: ccam_partial_attention, merge_partials, ProjectorStream.
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
