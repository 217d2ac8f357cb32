"""CCAMProjector: the Video-CCAM cross-attention projector, built on ``ccam_attention``.

Shapes (docs/reference.md §4.2): features (F, P, Cv) with split_sizes [T_1 .. T_B], (B, T, P, Cv),
or (B, T_max, P, Cv) padded with split_sizes [T_1 .. T_B] -> (B, N, O). Parameter names are the
state_dict keys of this library.
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


# The dtypes autocast casts to its own (it leaves float64 alone, so a float64 tensor next to a
# lower-precision one stays a dtype mismatch under autocast too).
_AUTOCAST_CASTS = (torch.float16, torch.bfloat16, torch.float32)


def _unpad(frames: torch.Tensor, counts):
    """(B, T_max, P, Cv) padded frames and their counts T_b <= T_max -> the packed (F, P, Cv)
    frames and the counts: padding frames are dropped here, before any projection, so no K/V
    is ever computed for them (and their gradient is zero)."""
    b, t = frames.shape[:2]
    if isinstance(counts, torch.Tensor):  # only while torch.compile traces: values are data
        if counts.shape[0] != b:
            raise ValueError(f"split_sizes has {counts.shape[0]} videos but padded features (B, T_max, P, Cv) "
                             f"has B={b}, got features of shape {tuple(frames.shape)}")
        keep = torch.arange(t, device=frames.device) < counts.to(frames.device)[:, None]
        return frames[keep], counts
    if len(counts) != b:
        raise ValueError(f"split_sizes has {len(counts)} videos but padded features (B, T_max, P, Cv) has B={b}, "
                         f"got features of shape {tuple(frames.shape)}")
    if max(counts) > t:
        raise ValueError(f"split_sizes {list(counts)} must be <= T_max={t} (the padded frame axis of features "
                         f"of shape {tuple(frames.shape)})")
    flat = frames.reshape(b * t, *frames.shape[2:])
    if min(counts) == t:
        return flat, counts
    rows = torch.tensor([i * t + f for i, c in enumerate(counts) for f in range(c)], device=frames.device)
    return flat.index_select(0, rows), counts


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
            split_sizes=None; or (B, T_max, P, Cv) padded, with split_sizes [T_1 .. T_B] <= T_max
            (padding frames are dropped before any projection). device must match the module's
            parameters, and dtype too (inside torch.autocast another of float16/bfloat16/float32
            is cast to the autocast dtype).
        returns: (B, N, output_size).
        group: a torch.distributed process group: this rank's ``features`` are its consecutive
            frames of each video (split_sizes may hold zeros) and every rank returns the whole
            batch's output (ccam_kernels.long_video.distributed).

    stream(total_frames): one video pushed chunk by chunk, inference only (long_video.stream).

    No state beyond the parameters: every call computes the query side (query_norm + q_proj
    of the learnable queries, 2*N*C^2 FLOPs, well under 1% of a forward) and reads W_k and W_v
    as they are, so an output never depends on what ran before (optimizer steps of any kind,
    load_state_dict, replaced parameters, writes through ``p.data``, dtype round trips).

    Under ``torch.autocast`` features in a dtype other than the module's are cast to the
    autocast dtype, as ``nn.Linear`` casts its input (float32 features into a bfloat16 module,
    bfloat16 or float16 ones into a float32 module, under ``autocast("cpu", torch.bfloat16)``);
    the projections and the attention then run in that dtype, as autocast decides for each op.
    float64 is never cast (autocast leaves it alone), and outside autocast a dtype mismatch is
    an error.
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
        self._config = cfg = config
        self._checkpointing = None  # gradient_checkpointing_enable()'s checkpoint kwargs, or None
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

    # -- what transformers code asks of a model -------------------------------------------

    @property
    def config(self) -> CCAMConfig:
        """The :class:`CCAMConfig` (read-only: a changed config would not match the parameters;
        build a new module from ``dataclasses.replace(proj.config, ...)``)."""
        return self._config

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype."""
        return self.query.dtype

    @property
    def device(self) -> torch.device:
        """The parameters' device."""
        return self.query.device

    def num_parameters(self, only_trainable: bool = False) -> int:
        """The number of parameter elements (those with requires_grad only, if asked)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether gradient_checkpointing_enable() is in effect."""
        return self._checkpointing is not None

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """Activation checkpointing in training: the attention block (feature norm, K/V
        projection, attention) and the MLP block keep only their inputs and run again in the
        backward (torch.utils.checkpoint, non-reentrant unless the kwargs say otherwise; the
        dropout masks are replayed). Gradients equal those without it; in eval mode or without
        grad nothing changes."""
        if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
            raise TypeError(f"gradient_checkpointing_kwargs must be a dict or None, got "
                            f"{type(gradient_checkpointing_kwargs).__name__}")
        self._checkpointing = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}

    def gradient_checkpointing_disable(self) -> None:
        """Keep every activation again (the default)."""
        self._checkpointing = None

    # -- query side ------------------------------------------------------------------------

    def query_states(self) -> torch.Tensor:
        """(N, H, D): q_proj(query_norm(query)), computed on every call (nothing is cached)."""
        return self._query_states()

    def _query_states(self, weights=None) -> torch.Tensor:
        """query_states(), with ``weights`` optionally standing in for (query, query_norm.weight,
        query_norm.bias, q_proj.weight, q_proj.bias) (the frame-parallel forward's summed views)."""
        cfg = self.config
        if weights is None:
            weights = (self.query, self.query_norm.weight, self.query_norm.bias, self.attn.q_proj.weight,
                       self.attn.q_proj.bias)
        query, nw, nb, qw, qb = weights
        q = F.linear(F.layer_norm(query, (cfg.hidden_size,), nw, nb, self.query_norm.eps), qw, qb)
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
            b, t = features.shape[:2]
            if split_sizes is None:
                split_sizes = (t,) * b
                features = features.reshape(b * t, *features.shape[2:])
            else:
                features, split_sizes = _unpad(features, frame_counts_arg("split_sizes", split_sizes))
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
        if features.device != param.device:
            raise ValueError(f"features device must match the module's ({param.device}), got {features.device}")
        if features.dtype != param.dtype:
            autocast = _autocast_dtype(features.device.type)
            # A float16 module under bfloat16 autocast (or the reverse) is left out: its
            # LayerNorms would meet the other 16-bit dtype, which they refuse on CPU.
            if autocast is None or features.dtype not in _AUTOCAST_CASTS or param.dtype not in (torch.float32, autocast):
                raise ValueError(
                    f"features dtype must match the module's ({param.dtype}), or the autocast dtype inside "
                    f"torch.autocast, got {features.dtype}"
                    + ("" if autocast is None else
                       f" (under autocast, float16, bfloat16 and float32 features are cast to {autocast} "
                       f"for a float32 or {autocast} module; float64 is never cast)")
                )
            # What nn.Linear does under autocast, done once at the entrance: the LayerNorm
            # before k_proj is no autocast op on CPU and refuses float32 input with bfloat16
            # weights, and its output is cast to the autocast dtype by k_proj anyway.
            features = features.to(autocast)
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

    def _keys_values(self, x: torch.Tensor, weights=None):
        """(M, Cv) packed features -> k, v (M, Hkv, D): LayerNorm, then the K and V projections.

        ``weights`` optionally stands in for (feature_norm.weight, feature_norm.bias,
        k_proj.weight, k_proj.bias, v_proj.weight, v_proj.bias): the frame-parallel forward
        passes views whose gradient is summed over its process group."""
        cfg = self.config
        shape = (-1, cfg.num_key_value_heads, cfg.head_dim)
        if weights is not None or not self._fused_projection(x):
            if weights is None:
                weights = (self.feature_norm.weight, self.feature_norm.bias, self.attn.k_proj.weight,
                           self.attn.k_proj.bias, self.attn.v_proj.weight, self.attn.v_proj.bias)
            nw, nb, kw, kb, vw, vb = weights
            z = F.layer_norm(x, (cfg.cross_hidden_size,), nw, nb, self.feature_norm.eps)
            return F.linear(z, kw, kb).view(shape), F.linear(z, vw, vb).view(shape)
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
                (B, T, P, Cv) when every video has T frames, or (B, T_max, P, Cv) padded, with
                split_sizes giving each video's T_b <= T_max (the padding frames are dropped
                before the K/V projection: the same numbers as the packed call). On the module's
                device and in its dtype; inside torch.autocast features in another of
                float16/bfloat16/float32 (module too) are cast to the autocast dtype, as nn.Linear
                casts its input (the projections and the attention then run in that dtype).
            split_sizes: frames T_b of each video, B ints >= 1 adding up to F: a sequence of ints,
                a 1-D integer NumPy array or a 1-D integer tensor (a tensor never recompiles under
                torch.compile). Required for 3-D features; for 4-D ones None (every video has T
                frames) or the B counts T_b <= T_max of padded frames.
            group: a torch.distributed process group for the frame-parallel forward
                (docs/reference.md §5.3): ``features`` are then this rank's consecutive frames of
                each video, split_sizes may hold zeros, and every rank returns the whole batch's
                output; when every rank backpropagates the same loss, every rank holds each
                parameter's whole gradient.

        Returns:
            (B, N, output_size) in the module's dtype (the autocast dtype under torch.autocast).

        Raises:
            TypeError, ValueError: features that are not a tensor, of the wrong rank, width
                (!= cross_hidden_size), dtype or device, or empty; split_sizes missing, of a
                wrong form, < 1, not adding up to F, or (padded 4-D features) not B counts
                <= T_max (the message names the argument; docs/reference.md §8.2, §8.5). With
                ``group``, the same on every rank, naming the rank whose arguments were bad (§8.7).
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

        q = self.query_states()  # (N, H, D), shared by every sample
        x = features.reshape(num_frames * tokens_per_frame, cfg.cross_hidden_size)
        dropout_p = cfg.attention_dropout if self.training else 0.0
        backend = self.backend
        if self._checkpointing is not None and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            # K and V (F*P rows) are the largest activations: recompute them in the backward.
            attn = checkpoint(self._attend, q, x, split_sizes, tokens_per_frame, dropout_p, backend,
                              **self._checkpointing)
            return self._head(attn, checkpoint_mlp=True)
        attn = self._attend(q, x, split_sizes, tokens_per_frame, dropout_p, backend)
        return self._head(attn)

    def _attend(self, q, x, split_sizes, tokens_per_frame, dropout_p, backend) -> torch.Tensor:
        """(M, Cv) packed features -> (B, N, H, D): K/V projection, then the attention."""
        k, v = self._keys_values(x)
        if callable(backend):
            return backend(q, k, v, split_sizes, tokens_per_frame, dropout_p=dropout_p)
        return ccam_attention(q, k, v, split_sizes, tokens_per_frame, dropout_p=dropout_p, backend=backend)

    def _mlp_block(self, h: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.mlp(self.mlp_norm(h)))

    def _head(self, attn: torch.Tensor, checkpoint_mlp: bool = False) -> torch.Tensor:
        """(B, N, H, D) attention output -> (B, N, O): o_proj, residual, MLP, out_proj (the
        steps after the attention, shared with the long-video paths)."""
        cfg = self.config
        h = self.query + self.dropout(self.attn.o_proj(attn.reshape(attn.shape[0], cfg.num_query, cfg.hidden_size)))
        if checkpoint_mlp:
            from torch.utils.checkpoint import checkpoint

            return self.out_proj(self.out_norm(h + checkpoint(self._mlp_block, h, **self._checkpointing)))
        h = h + self._mlp_block(h)
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
                        dtype: Union[torch.dtype, str, None] = None, device: Optional[DeviceLike] = None,
                        torch_dtype: Union[torch.dtype, str, None] = None,
                        device_map: Union[DeviceLike, dict, None] = None, subfolder: str = "",
                        revision: Optional[str] = None, cache_dir: Optional[PathLike] = None) -> "CCAMProjector":
        """Load a projector from a directory (config.json + model.safetensors or a torch state
        dict file), from a weights file with ``config`` given, or from a Hugging Face Hub repo
        id (downloaded with huggingface_hub, the ``[hf]`` extra, at ``revision`` into
        ``cache_dir``). ``subfolder`` is read inside it. The module is returned in eval mode
        (dropout off), ready for inference; call ``.train()`` to fine-tune.

        Besides ``dtype`` and ``device``, takes what transformers users type: ``torch_dtype``
        (an alias of ``dtype``), either as a torch.dtype, a name ("bfloat16") or "auto" (the
        checkpoint's dtype, also what None does); ``device_map`` as a device, "auto" (the
        current CUDA device, else the CPU) or ``{"": device}``: the projector is never split.
        See :mod:`ccam_kernels.checkpoint`; the format and every error: docs/reference.md §4.3, §8.6."""
        from .checkpoint import load_projector
        from .hub import resolve_device, resolve_dtype, resolve_path

        dtype = resolve_dtype(dtype, torch_dtype)
        device = resolve_device(device, device_map)
        path = resolve_path(path, subfolder, revision, cache_dir)
        return load_projector(cls, path, key_map=key_map, config=config, backend=backend, dtype=dtype, device=device)

    def save_pretrained(self, path: PathLike, *, safe_serialization: bool = True, auto_map: bool = True) -> None:
        """Write config.json and model.safetensors (``safe_serialization=False``:
        pytorch_model.bin) into directory ``path`` (created if needed). With ``auto_map`` (the
        default) config.json also names this library's transformers classes and the folder
        gets modeling_ccam.py, so that ``transformers.AutoModel.from_pretrained(path,
        trust_remote_code=True)`` loads it (:mod:`ccam_kernels.hf`, the ``[hf]`` extra)."""
        from .checkpoint import save_projector

        if not isinstance(safe_serialization, bool) or not isinstance(auto_map, bool):
            raise TypeError(f"safe_serialization and auto_map must be bools, got {type(safe_serialization).__name__} "
                            f"and {type(auto_map).__name__}")
        if auto_map:
            from .hf_files import AUTO_MAP_CONFIG, MODELING_FILE, modeling_source

            save_projector(self, path, safe_serialization=safe_serialization, config_extra=AUTO_MAP_CONFIG,
                           extra_files={MODELING_FILE: modeling_source()})
        else:
            save_projector(self, path, safe_serialization=safe_serialization)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
