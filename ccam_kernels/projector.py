"""CCAMProjector: the Video-CCAM cross-attention projector, built on ``ccam_attention``.

Shapes (docs/reference.md §4.2): features (F, P, Cv) with split_sizes [T_1 .. T_B], or (B, T, P, Cv)
-> (B, N, O). Parameter names are the state_dict keys of this library.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .api_types import AttentionFn, DeviceLike, FrameCounts, KeyMap, PathLike, ProcessGroup
from .attention import BACKENDS, ccam_attention
from .checks import frame_counts_arg
from .config import CCAMConfig

if TYPE_CHECKING:  # imported where used: long_video builds on this module
    from .long_video.stream import ProjectorStream

_GATE_ACTS = {
    "swiglu": F.silu,
    "silu": F.silu,
    "geglu": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
}


class CCAMAttention(nn.Module):
    """The projections around the attention op: q/k/v/o_proj."""

    def __init__(self, cfg: CCAMConfig):
        super().__init__()
        kv_width = cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.cross_hidden_size, kv_width, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.cross_hidden_size, kv_width, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.attention_bias)


class CCAMMLP(nn.Module):
    """mlp(u) = down_proj(act(gate_proj(u)) * up_proj(u))."""

    def __init__(self, cfg: CCAMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.act = _GATE_ACTS[cfg.hidden_act]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(u)) * self.up_proj(u))


def _autocast_dtype(device_type: str):
    """The dtype torch.autocast runs for tensors of this device type, or None outside it."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class CCAMProjector(nn.Module):
    """N learnable queries read the visual tokens of every frame under the CCAM mask.

    Args:
        config: a :class:`CCAMConfig` (or a dict accepted by ``CCAMConfig.from_dict``).
        backend: passed to :func:`ccam_kernels.ccam_attention` ("auto", "reference", "torch", ...);
            or a callable with ccam_attention's signature, ``fn(q, k, v, frame_counts,
            tokens_per_frame, *, dropout_p)``, to run the module on another attention (the
            benchmarks use this to run the projector on FlexAttention).

    forward(features, split_sizes=None):
        features: (F, P, Cv) frames of all samples, packed, with split_sizes = [T_1 .. T_B]
            (a sequence of ints or an int64 tensor summing to F); or (B, T, P, Cv) with
            split_sizes=None. device must match the module's parameters, and dtype too
            (or, inside torch.autocast, be the autocast dtype).
        returns: (B, N, output_size).
        group: a torch.distributed process group: this rank's ``features`` are its consecutive
            frames of each video (split_sizes may hold zeros) and every rank returns the whole
            batch's output (ccam_kernels.long_video.distributed).

    stream(total_frames): one video pushed chunk by chunk, inference only (long_video.stream).

    No state beyond the parameters: every call computes the query side (query_norm + q_proj
    of the learnable queries, 2*N*C^2 FLOPs, well under 1% of a forward) and reads W_k and W_v
    as they are, so an output never depends on what ran before (optimizer steps of any kind,
    load_state_dict, replaced parameters, writes through ``p.data``, dtype round trips).

    Under ``torch.autocast`` the features may also be in the autocast dtype (bf16 features
    into a float32 module under ``autocast("cpu", torch.bfloat16)``); the projections and the
    attention then run in that dtype, as autocast decides for each op.
    """

    def __init__(self, config: Union[CCAMConfig, dict, None] = None,
                 backend: Union[str, AttentionFn] = "auto") -> None:
        super().__init__()
        if config is None:
            config = CCAMConfig()
        elif isinstance(config, dict):
            config = CCAMConfig.from_dict(config)
        elif not isinstance(config, CCAMConfig):
            raise TypeError(f"config must be a CCAMConfig or a dict, got {type(config).__name__}")
        if not isinstance(backend, str) and not callable(backend):
            raise TypeError(f"backend must be a str or a callable, got {type(backend).__name__}")
        if isinstance(backend, str) and backend != "auto" and backend not in BACKENDS:
            raise ValueError(f"backend must be one of {['auto', *BACKENDS]}, got {backend!r}")
        self.config = cfg = config
        self.backend = backend
        self.query = nn.Parameter(torch.empty(cfg.num_query, cfg.hidden_size))
        self.query_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.feature_norm = nn.LayerNorm(cfg.cross_hidden_size, eps=cfg.layer_norm_eps)
        self.attn = CCAMAttention(cfg)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = CCAMMLP(cfg)
        self.out_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.output_size, bias=True)
        self.dropout = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.query, std=0.02)

    # -- query side ------------------------------------------------------------------------

    def query_states(self) -> torch.Tensor:
        """(N, H, D): q_proj(query_norm(query)), computed on every call (nothing is cached)."""
        cfg = self.config
        q = self.attn.q_proj(self.query_norm(self.query))
        return q.view(cfg.num_query, cfg.num_heads, cfg.head_dim)

    def invalidate_query_cache(self) -> None:
        """Deprecated no-op, kept so that code written for earlier versions still runs: the
        projector no longer caches anything, so there is nothing to invalidate."""
        warnings.warn(
            "CCAMProjector.invalidate_query_cache() does nothing: the projector keeps no cache "
            "(every forward reads the parameters as they are); remove the call",
            DeprecationWarning,
            stacklevel=2,
        )

    # -- forward ---------------------------------------------------------------------------

    def _check_features(self, features, split_sizes):
        cfg = self.config
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() == 4:
            if split_sizes is not None:
                raise ValueError(
                    f"split_sizes must be None when features is (B, T, P, Cv), got {split_sizes!r} "
                    f"with features of shape {tuple(features.shape)}"
                )
            b, t = features.shape[:2]
            split_sizes = (t,) * b
            features = features.reshape(b * t, *features.shape[2:])
        elif features.dim() == 3:
            if split_sizes is None:
                raise ValueError("split_sizes is required when features is (F, P, Cv)")
            split_sizes = frame_counts_arg("split_sizes", split_sizes)
            # (a tensor only while torch.compile traces: its values are checked by the op)
            if not isinstance(split_sizes, torch.Tensor) and sum(split_sizes) != features.shape[0]:
                raise ValueError(
                    f"split_sizes {list(split_sizes)} add up to {sum(split_sizes)} frames, "
                    f"but features has F={features.shape[0]}"
                )
        else:
            raise ValueError(f"features must be (F, P, Cv) or (B, T, P, Cv), got shape {tuple(features.shape)}")
        if features.shape[-1] != cfg.cross_hidden_size:
            raise ValueError(
                f"features width must equal cross_hidden_size={cfg.cross_hidden_size}, got {features.shape[-1]}"
            )
        if min(features.shape) < 1:
            raise ValueError(f"features must not be empty, got shape {tuple(features.shape)}")
        param = self.query
        if features.dtype != param.dtype and features.dtype != _autocast_dtype(features.device.type):
            raise ValueError(
                f"features dtype must match the module's ({param.dtype}), or the autocast dtype inside "
                f"torch.autocast, got {features.dtype}"
            )
        if features.device != param.device:
            raise ValueError(f"features device must match the module's ({param.device}), got {features.device}")
        return features, split_sizes

    def _fused_projection(self, x: torch.Tensor) -> bool:
        """Whether feature_norm + k_proj + v_proj run as the fused Triton kernel: with the
        triton backend (named, or what "auto" picks for these tensors), by the dispatcher's
        own placement rules."""
        if callable(self.backend) or self.backend not in ("triton", "auto"):
            return False
        # Under autocast the projections (and so the attention) run in the autocast dtype.
        dtype = _autocast_dtype(x.device.type) or x.dtype
        return BACKENDS["triton"].refuses_placement(x.device.type, dtype, auto=self.backend == "auto") is None

    def _keys_values(self, x: torch.Tensor):
        """(M, Cv) packed features -> k, v (M, Hkv, D): LayerNorm, then the K and V projections."""
        cfg = self.config
        shape = (-1, cfg.num_key_value_heads, cfg.head_dim)
        if not self._fused_projection(x):
            z = self.feature_norm(x)
            return self.attn.k_proj(z).view(shape), self.attn.v_proj(z).view(shape)
        from .backends.triton_projection import layernorm_kv

        kp, vp, norm = self.attn.k_proj, self.attn.v_proj, self.feature_norm
        kv = layernorm_kv(x, norm.weight, norm.bias, kp.weight, vp.weight, kp.bias, vp.bias, norm.eps)
        width = kp.weight.shape[0]
        # Halves of the (M, 2C) result viewed in place: rows of stride 2C, what the kernels read.
        return kv[:, :width].view(shape), kv[:, width:].view(shape)

    def forward(self, features: torch.Tensor, split_sizes: Optional[FrameCounts] = None, *,
                group: Optional[ProcessGroup] = None) -> torch.Tensor:
        """The projector's output for a batch of videos (docs/reference.md §4.2).

        Args:
            features: (F, P, Cv), the visual tokens of every frame of every video, packed video by
                video (F = sum(split_sizes) frames of P tokens, Cv = cross_hidden_size); or
                (B, T, P, Cv) when every video has T frames. On the module's device and in its
                dtype, or, inside torch.autocast, in the autocast dtype (the projections and the
                attention then run in that dtype).
            split_sizes: frames T_b of each video, B ints >= 1 adding up to F: a sequence of ints,
                a 1-D integer NumPy array or a 1-D integer tensor (a tensor never recompiles under
                torch.compile). Required for 3-D features, None for 4-D ones.
            group: a torch.distributed process group for the frame-parallel forward
                (docs/reference.md §5.3): ``features`` are then this rank's consecutive frames of
                each video, split_sizes may hold zeros, and every rank returns the whole batch's
                output; when every rank backpropagates the same loss, every rank holds each
                parameter's whole gradient.

        Returns:
            (B, N, output_size) in the module's dtype (the autocast dtype under torch.autocast).

        Raises:
            TypeError, ValueError: features that are not a tensor, of the wrong rank, width
                (!= cross_hidden_size), dtype or device, or empty; split_sizes missing, given with
                4-D features, of a wrong form, < 1, or not adding up to F (the message names
                the argument; docs/reference.md §8.2, §8.5). With ``group``, the same on every
                rank, naming the rank whose arguments were bad (§8.7).
            RuntimeError: with ``group``, no initialized process group, a callable backend (no
                partial attention), or a backend that cannot take the module's device, dtype or
                head dim.
        """
        if group is not None:  # frame-parallel over a process group: see long_video/distributed.py
            from .long_video.distributed import frame_parallel_forward

            return frame_parallel_forward(self, features, split_sizes, group)
        cfg = self.config
        features, split_sizes = self._check_features(features, split_sizes)
        num_frames, tokens_per_frame = features.shape[:2]
        batch = split_sizes.shape[0] if isinstance(split_sizes, torch.Tensor) else len(split_sizes)

        q = self.query_states()  # (N, H, D), shared by every sample
        k, v = self._keys_values(features.reshape(num_frames * tokens_per_frame, cfg.cross_hidden_size))
        dropout_p = cfg.attention_dropout if self.training else 0.0
        backend = self.backend
        if callable(backend):
            attn = backend(q, k, v, split_sizes, tokens_per_frame, dropout_p=dropout_p)
        else:
            attn = ccam_attention(q, k, v, split_sizes, tokens_per_frame, dropout_p=dropout_p, backend=backend)
        # attn: (B, N, H, D)
        h = self.query + self.dropout(self.attn.o_proj(attn.reshape(batch, cfg.num_query, cfg.hidden_size)))
        h = h + self.dropout(self.mlp(self.mlp_norm(h)))
        return self.out_proj(self.out_norm(h))

    def stream(self, total_frames: int) -> "ProjectorStream":
        """A :class:`~ccam_kernels.long_video.stream.ProjectorStream` for one video of
        ``total_frames`` frames: ``push((t, P, Cv))`` chunks, then ``finish()`` -> (1, N, O),
        equal to ``self(all_frames, [total_frames])``; in training mode differentiable, with
        the same attention dropout under the same torch.manual_seed."""
        from .long_video.stream import ProjectorStream

        return ProjectorStream(self, total_frames)

    # -- checkpoints -----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: PathLike, key_map: Optional[KeyMap] = None, *,
                        config: Union[CCAMConfig, dict, None] = None, backend: Union[str, AttentionFn] = "auto",
                        dtype: Optional[torch.dtype] = None,
                        device: Optional[DeviceLike] = None) -> "CCAMProjector":
        """Load a projector from a directory (config.json + model.safetensors or a torch state
        dict file) or from a weights file with ``config`` given. The module is returned in eval
        mode (dropout off), ready for inference; call ``.train()`` to fine-tune.
        See :mod:`ccam_kernels.checkpoint`; the format and every error: docs/reference.md §4.3, §8.6."""
        from .checkpoint import load_projector

        return load_projector(cls, path, key_map=key_map, config=config, backend=backend, dtype=dtype, device=device)

    def save_pretrained(self, path: PathLike) -> None:
        """Write config.json and model.safetensors into directory ``path`` (created if needed)."""
        from .checkpoint import save_projector

        save_projector(self, path)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
