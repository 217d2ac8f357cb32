"""The arguments Hugging Face users type into ``from_pretrained``, turned into ours.

``torch_dtype=`` / ``dtype=`` as a torch.dtype, a name ("bfloat16") or "auto" (the
checkpoint's own dtype); ``device_map`` as a device or "auto" (the whole projector on one
device: it is small, so it is never split); ``subfolder``; and a Hub repo id, downloaded with
huggingface_hub (the optional ``[hf]`` extra) when no local path of that name exists.
"""

from __future__ import annotations

import os
import re
from typing import Optional

import torch

HF_EXTRA = "pip install 'ccam_kernels[hf]'"
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64", "float", "half", "double")
# The files a projector checkpoint may hold (docs/reference.md §4.3), and our modeling file.
HUB_PATTERNS = ("*.json", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.py")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def resolve_dtype(dtype, torch_dtype) -> Optional[torch.dtype]:
    """``dtype=`` or its transformers alias ``torch_dtype=`` -> a torch.dtype, or None for
    "auto" (keep the checkpoint's). Names are those of torch ("bfloat16", "float16", ...)."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"pass dtype= or torch_dtype= (the same argument), not both: got dtype={dtype!r}, "
                         f"torch_dtype={torch_dtype!r}")
    value = dtype if dtype is not None else torch_dtype
    if isinstance(value, str):
        if value == "auto":
            return None
        name = value.removeprefix("torch.")
        if name not in DTYPE_NAMES:
            raise ValueError(f"dtype must be a torch.dtype, 'auto' or one of {list(DTYPE_NAMES)}, got {value!r}")
        return getattr(torch, name)
    return value  # a torch.dtype, None, or a wrong type that load_projector names


def resolve_device(device, device_map):
    """``device=`` or ``device_map=`` -> one device (or None). device_map "auto" is the current
    CUDA device when there is one, else the CPU; a dict must put everything ("") on one device."""
    if device_map is None:
        return device
    if device is not None:
        raise ValueError(f"pass device= or device_map=, not both: got device={device!r}, device_map={device_map!r}")
    if isinstance(device_map, dict):
        if set(device_map) != {""}:
            raise ValueError(f"device_map must put the whole projector on one device ({{'': device}}), "
                             f"got {device_map!r}")
        device_map = device_map[""]
    if device_map == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device_map, int) and not isinstance(device_map, bool):
        return torch.device("cuda", device_map)
    return device_map


def looks_like_repo_id(path) -> bool:
    return isinstance(path, str) and _REPO_ID.match(path) is not None and not os.path.exists(path)


def resolve_path(path, subfolder: str = "", revision: Optional[str] = None, cache_dir=None):
    """A local checkpoint path (``path/subfolder``), downloading ``path`` as a Hub repo id when
    no local file or folder has that name. Anything else is returned as given, for
    load_projector's own checks."""
    if not isinstance(subfolder, str):
        raise TypeError(f"subfolder must be a str, got {type(subfolder).__name__}")
    if looks_like_repo_id(path):
        path = download(path, subfolder, revision, cache_dir)
    elif revision is not None:
        raise ValueError(f"revision= applies to a Hub repo id, but {path!r} is a local path")
    if subfolder and isinstance(path, (str, os.PathLike)):
        path = os.path.join(os.fspath(path), subfolder)
    return path


def download(repo_id: str, subfolder: str, revision, cache_dir) -> str:
    """The local snapshot folder of a Hub repo (only the files a checkpoint may hold)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"checkpoint path {repo_id!r} does not exist locally, and downloading it as a "
                          f"Hugging Face Hub repo id needs huggingface_hub: {HF_EXTRA}") from None
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    try:
        return snapshot_download(repo_id, revision=revision, cache_dir=cache_dir,
                                 allow_patterns=[prefix + pattern for pattern in HUB_PATTERNS])
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, auth: all end the same way
        raise OSError(f"checkpoint path {repo_id!r} does not exist locally and could not be downloaded from "
                      f"the Hugging Face Hub (revision={revision!r}): {type(exc).__name__}: {exc}") from exc
