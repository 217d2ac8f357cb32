"""ccam_kernels: fused block-causal cross-attention for Video-CCAM projectors.

Public API (shapes, dtypes and every error: docs/reference.md):

    ccam_attention(q, k, v, frame_counts, tokens_per_frame, *, scale=None, dropout_p=0.0, backend='auto') -> torch.Tensor
    frame_of_query(num_query, num_frames, *, device=None) -> torch.Tensor
    available_backends() -> list[str]
    CCAMConfig, CCAMProjector (forward, stream, from_pretrained, save_pretrained)

Long videos, in ccam_kernels.long_video: ccam_partial_attention, merge_partials, ProjectorStream.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# The public names load on first use (PEP 562), so that a command line that needs none of them
# (``ccam-bench --help``) answers without importing torch; ``from ccam_kernels import X`` and
# ``ccam_kernels.X`` work as with eager imports.
_PUBLIC = {
    "ccam_attention": ".attention",
    "available_backends": ".attention",
    "CCAMConfig": ".config",
    "frame_of_query": ".mask",
    "CCAMProjector": ".projector",
}

__all__ = [
    "ccam_attention",
    "frame_of_query",
    "available_backends",
    "CCAMConfig",
    "CCAMProjector",
    "__version__",
]

if TYPE_CHECKING:
    from .attention import available_backends, ccam_attention
    from .config import CCAMConfig
    from .mask import frame_of_query
    from .projector import CCAMProjector


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    try:  # a submodule (ccam_kernels.backends, ...), as an eager __init__ would have loaded it
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
