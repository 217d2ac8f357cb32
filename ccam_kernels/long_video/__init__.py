"""Long videos: attention over a frame range merged by log-sum-exp (``partial``), a streaming
projector (``stream``, ``CCAMProjector.stream``) and a frame-parallel projector over
torch.distributed (``distributed``, ``CCAMProjector.forward(..., group=...)``)."""

from .partial import ccam_partial_attention, merge_partials
from .stream import ProjectorStream

__all__ = ["ccam_partial_attention", "merge_partials", "ProjectorStream"]
