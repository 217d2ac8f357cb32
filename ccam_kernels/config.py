"""CCAMConfig: the projector's hyper-parameters, named as in Video-CCAM's projector_config."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from .api_types import PathLike
from .atomic_file import atomic_path
from .checks import check_int, check_probability

# gate activation of the MLP: mlp(u) = down_proj(act(gate_proj(u)) * up_proj(u))
HIDDEN_ACTS = ("swiglu", "silu", "geglu", "gelu")

CONFIG_FILE = "config.json"

# Keys that Hugging Face's PretrainedConfig writes into every config.json: bookkeeping, not
# hyper-parameters, so from_dict drops them without a warning. Any other unknown key warns,
# since it is most likely a typo ("num_querys") that would otherwise silently take a default.
HF_METADATA_KEYS = frozenset({
    "model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "auto_map",
    "_name_or_path", "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
})

INT_FIELDS = ("num_query", "hidden_size", "cross_hidden_size", "num_heads", "num_key_value_heads",
              "intermediate_size", "output_size")
BOOL_FIELDS = ("attention_bias", "mlp_bias")


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
        # Store plain Python values: a NumPy scalar (np.int64 from a NumPy-built dict) compares
        # equal but does not serialize, so save_pretrained would write a broken config.json.
        for name in INT_FIELDS:
            object.__setattr__(self, name, check_int(name, getattr(self, name)))
        for name in BOOL_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
            object.__setattr__(self, name, bool(value))
        for name in ("layer_norm_eps", "attention_dropout", "dropout"):
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        if not isinstance(self.hidden_act, str):
            raise TypeError(f"hidden_act must be a str, one of {list(HIDDEN_ACTS)}, got {type(self.hidden_act).__name__}")
        object.__setattr__(self, "hidden_act", str(self.hidden_act))
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
        if not (math.isfinite(self.layer_norm_eps) and self.layer_norm_eps > 0):
            raise ValueError(f"layer_norm_eps must be finite and > 0, got {self.layer_norm_eps}")
        check_probability("attention_dropout", self.attention_dropout)
        check_probability("dropout", self.dropout)

    @property
    def head_dim(self) -> int:
        """D = hidden_size // num_heads."""
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, d: dict) -> "CCAMConfig":
        """Build from a dict: a flat projector config, or a checkpoint config holding one under
        "projector_config" (the outer keys are the whole model's and are not read). NumPy
        scalars become Python numbers. A key this class does not know warns (UserWarning,
        naming it), except Hugging Face metadata (``HF_METADATA_KEYS``); it is then ignored.
        A dict that sets ``num_heads`` but not ``num_key_value_heads`` gets
        ``num_key_value_heads = num_heads``, as Hugging Face configs do (other missing keys
        take the v1.2 defaults)."""
        values, unknown = _split_keys(d)
        if unknown:
            warnings.warn(f"CCAMConfig ignores unknown config keys: {_describe_unknown(unknown)}",
                          UserWarning, stacklevel=2)
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: PathLike) -> "CCAMConfig":
        """Read a config.json (a file, or a directory holding one). Besides from_dict's warning
        about unknown keys, warns naming each field the file does not set (it takes the
        default, which is Video-CCAM v1.2's value)."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        with open(path, encoding="utf-8") as f:
            try:
                d = json.load(f)
            except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
                raise ValueError(f"{path!r} is not a valid JSON config file: {exc}") from None
        values, unknown = _split_keys(d)
        if unknown:
            warnings.warn(f"{path}: CCAMConfig ignores unknown config keys: {_describe_unknown(unknown)}",
                          UserWarning, stacklevel=2)
        defaulted = [f.name for f in dataclasses.fields(cls) if f.name not in values]
        if defaulted:
            warnings.warn(f"{path} does not set {defaulted}; they take the defaults "
                          f"{ {name: getattr(cls, name) for name in defaulted} }", UserWarning, stacklevel=2)
        return cls(**values)

    def to_dict(self) -> dict:
        """The fields as a plain dict: what config.json holds and ``from_dict`` reads back."""
        return dataclasses.asdict(self)

    def to_json_file(self, path: PathLike) -> None:
        """Write config.json atomically: serialized first, then a temporary file beside
        ``path`` renamed over it, so a failure never leaves a half-written file."""
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)


def _as_float(name: str, value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    return float(value)


def _split_keys(d) -> tuple[dict, list]:
    """(the values of our fields, the unknown non-metadata keys) of a flat or nested config."""
    if not isinstance(d, dict):
        raise TypeError(f"config must be a dict, got {type(d).__name__}")
    if "projector_config" in d:
        d = d["projector_config"]
        if not isinstance(d, dict):
            raise TypeError(f"config['projector_config'] must be a dict, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(CCAMConfig)}
    values = {k: v for k, v in d.items() if k in names}
    # As in Hugging Face configs: a config that names its heads but not its key/value heads
    # means one key/value head per query head (plain multi-head attention), not v1.2's 16.
    if "num_heads" in values and "num_key_value_heads" not in values:
        values["num_key_value_heads"] = values["num_heads"]
    unknown = [k for k in d if k not in names and k not in HF_METADATA_KEYS]
    return values, unknown


def _describe_unknown(keys) -> str:
    names = [f.name for f in dataclasses.fields(CCAMConfig)]
    parts = []
    for key in keys:
        close = difflib.get_close_matches(str(key), names, n=1)
        parts.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
    return ", ".join(parts) + f"; known keys: {names}"
