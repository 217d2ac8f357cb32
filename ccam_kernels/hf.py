"""transformers classes around the projector (the optional ``[hf]`` extra).

    CCAMProjectorConfig   a PretrainedConfig holding the CCAMConfig fields (checked by CCAMConfig)
    CCAMProjectorModel    a PreTrainedModel holding a CCAMProjector as ``.projector``

A folder written by ``CCAMProjector.save_pretrained`` names both in its config.json
``auto_map`` and holds modeling_ccam.py, which imports them from here, so

    AutoModel.from_pretrained(folder, trust_remote_code=True, torch_dtype=..., device_map=...)

returns a CCAMProjectorModel, called as Video-CCAM calls its projector: ``model(pixel_values,
split_sizes)``. Its weights are the projector's, under the ``projector.`` prefix in the model and
without it in our checkpoints (transformers' base-model prefix maps one to the other). A model
that holds a vision encoder and an LLM holds a plain CCAMProjector, or this model, as any
submodule.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

try:
    from transformers import PretrainedConfig, PreTrainedModel
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError(f"ccam_kernels.hf needs transformers: pip install 'ccam_kernels[hf]' ({exc})") from None

from .api_types import FrameCounts, PathLike
from .config import CCAMConfig
from .hf_files import MODEL_TYPE
from .projector import CCAMProjector

_FIELDS = tuple(f.name for f in dataclasses.fields(CCAMConfig))


class CCAMProjectorConfig(PretrainedConfig):
    """The CCAMConfig fields as a transformers PretrainedConfig (``model_type`` "ccam_projector");
    values are checked by CCAMConfig, defaults are its (Video-CCAM v1.2)."""

    model_type = MODEL_TYPE

    def __init__(self, **kwargs) -> None:
        fields = {name: kwargs.pop(name) for name in _FIELDS if name in kwargs}
        ccam = CCAMConfig(**fields)  # the one place the values are checked
        super().__init__(**kwargs)
        for name, value in ccam.to_dict().items():
            setattr(self, name, value)

    def to_ccam_config(self) -> CCAMConfig:
        """The :class:`CCAMConfig` of these fields."""
        return CCAMConfig(**{name: getattr(self, name) for name in _FIELDS})

    @classmethod
    def from_ccam_config(cls, config: CCAMConfig, **kwargs) -> "CCAMProjectorConfig":
        """From a :class:`CCAMConfig` (``kwargs``: PretrainedConfig's own, e.g. dtype)."""
        return cls(**config.to_dict(), **kwargs)


class CCAMProjectorModel(PreTrainedModel):
    """A :class:`CCAMProjector` as a transformers model: ``forward(features, split_sizes=None)``
    is the projector's (docs/reference.md §4.2); ``.projector`` is the module itself."""

    config_class = CCAMProjectorConfig
    base_model_prefix = "projector"
    main_input_name = "features"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CCAMProjector"]

    def __init__(self, config: CCAMProjectorConfig) -> None:
        super().__init__(config)
        self.projector = CCAMProjector(config.to_ccam_config())
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """The projector's own initialization (Linear and LayerNorm defaults, query ~ N(0, 0.02²)),
        for weights a checkpoint does not fill."""
        if isinstance(module, CCAMProjector):
            torch.nn.init.normal_(module.query, std=0.02)
        elif isinstance(module, (torch.nn.Linear, torch.nn.LayerNorm)):
            module.reset_parameters()

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None) -> None:
        """The projector's activation checkpointing (CCAMProjector.gradient_checkpointing_enable)."""
        self.projector.gradient_checkpointing_enable(gradient_checkpointing_kwargs)

    def gradient_checkpointing_disable(self) -> None:
        """Turn the projector's activation checkpointing off."""
        self.projector.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        """Whether the projector checkpoints its activations."""
        return self.projector.is_gradient_checkpointing

    def forward(self, features: torch.Tensor, split_sizes: Optional[FrameCounts] = None) -> torch.Tensor:
        """(F, P, Cv) with split_sizes, (B, T, P, Cv), or padded (B, T_max, P, Cv) with split_sizes
        -> (B, N, O): CCAMProjector.forward."""
        return self.projector(features, split_sizes)

    def save_pretrained(self, save_directory: PathLike, *, safe_serialization: bool = True,
                        **unsupported) -> None:
        """The projector's own checkpoint (CCAMProjector.save_pretrained: config.json, the weights
        without the ``projector.`` prefix, auto_map and modeling_ccam.py), which both
        ``CCAMProjector.from_pretrained`` and ``AutoModel.from_pretrained(trust_remote_code=True)``
        load. (transformers' own would copy this library's source files into the folder.)"""
        if unsupported:
            raise TypeError(f"CCAMProjectorModel.save_pretrained takes save_directory and safe_serialization "
                            f"only, got {sorted(unsupported)}")
        self.projector.save_pretrained(save_directory, safe_serialization=safe_serialization)

    def to_projector(self) -> CCAMProjector:
        """The wrapped :class:`CCAMProjector` (shares the parameters)."""
        return self.projector
