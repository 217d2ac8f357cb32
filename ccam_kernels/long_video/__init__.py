"""Long videos: attention over a frame range merged by log-sum-exp (``partial``), a streaming
projector (``stream``) and a frame-parallel projector over torch.distributed (``distributed``)."""

from .partial import ccam_partial_attention, merge_partials

__all__ = ["ccam_partial_attention", "merge_partials"]
