"""CCAMConfig: the projector's hyper-parameters, named as in Video-CCAM's projector_config."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from .checks import check_int, check_probability

# gate activation of the MLP: mlp(u) = down_proj(act(gate_proj(u)) * up_proj(u))
HIDDEN_ACTS = ("swiglu", "silu", "geglu", "gelu")

CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class CCAMConfig:
    """Hyper-parameters of :class:`ccam_kernels.CCAMProjector` (defaults: Video-CCAM-v1.2)."""

    num_query: int = 1024
    hidden_size: int = 1024
    cross_hidden_size: int = 1152
    num_heads: int = 16
    num_key_value_heads: int = 16
    intermediate_size: int = 4096
    output_size: int = 3584
    hidden_act: str = "swiglu"
    attention_bias: bool = True
    mlp_bias: bool = True
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.1
    dropout: float = 0.1

    def __post_init__(self):
        for name in ("num_query", "hidden_size", "cross_hidden_size", "num_heads", "num_key_value_heads",
                     "intermediate_size", "output_size"):
            check_int(name, getattr(self, name))
        if self.hidden_size % self.num_heads != 0:
            raise ValueError(
                f"hidden_size must be a multiple of num_heads, got hidden_size={self.hidden_size}, "
                f"num_heads={self.num_heads}"
            )
        if self.num_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_heads must be a multiple of num_key_value_heads, got num_heads={self.num_heads}, "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {list(HIDDEN_ACTS)}, got {self.hidden_act!r}")
        for name in ("attention_bias", "mlp_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        eps = self.layer_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"layer_norm_eps must be a float, got {type(eps).__name__}")
        if not eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {eps}")
        check_probability("attention_dropout", self.attention_dropout)
        check_probability("dropout", self.dropout)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> "CCAMConfig":
        """Build from a dict: a flat projector config, or a checkpoint config holding one under
        "projector_config". Keys this class does not know (e.g. "model_type") are ignored."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        if "projector_config" in d:
            d = d["projector_config"]
            if not isinstance(d, dict):
                raise TypeError(f"config['projector_config'] must be a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_json_file(cls, path) -> "CCAMConfig":
        """Read a config.json (a file, or a directory holding one)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json_file(self, path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")
