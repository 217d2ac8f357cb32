"""Reading and writing projector checkpoints.

A checkpoint is a directory with config.json (a flat projector config, or one nested under
"projector_config") and the weights: model.safetensors (or several *.safetensors shards), or a
torch state dict (pytorch_model.bin, *.pt, *.pth). ``key_map`` renames checkpoint keys to this
library's names: a dict {checkpoint_key: our_key} (keys not in it keep their name) or a
callable checkpoint_key -> our_key. Mapping a key to None drops it on purpose (e.g. the LLM's
weights in a full Video-CCAM checkpoint). Any other key that is not ours, and any of our
parameters left unfilled, is a ValueError that names it.

Nothing is guessed: a weights file that cannot be parsed, a key found in two shards, or an
integer/bool tensor for a floating-point parameter is a ValueError naming the file or key.

Saving writes config.json and the weights together with a manifest (their sizes and SHA-256,
:func:`ccam_kernels.atomic_file.write_together`), and loading checks the files it reads against
it: a checkpoint caught in the middle of a save loads as the old one or raises, never as new
weights with the old config.
"""

from __future__ import annotations

import glob
import json
import os

import torch

from .atomic_file import check_together, listed_files, write_together
from .config import CONFIG_FILE, CCAMConfig

SAFETENSORS_FILE = "model.safetensors"
TORCH_FILE = "pytorch_model.bin"
TORCH_PATTERNS = ("pytorch_model.bin", "pytorch_model-*.bin", "*.pt", "*.pth")


def _weight_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    for pattern in (SAFETENSORS_FILE, "*.safetensors", *TORCH_PATTERNS):
        found = sorted(glob.glob(os.path.join(path, pattern)))
        if found:
            return found
    raise FileNotFoundError(f"no weights in {path!r}: expected {SAFETENSORS_FILE}, *.safetensors or a torch state dict")


def _read_file(file: str) -> dict:
    safetensors = file.endswith(".safetensors")
    with open(file, "rb"):  # a file we may not open keeps its OSError (it names the file)
        pass
    try:
        if safetensors:
            from safetensors.torch import load_file

            part = load_file(file)
        else:
            part = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - parsers raise many types for a damaged file (OSError too)
        kind = "safetensors" if safetensors else "torch state dict"
        raise ValueError(f"cannot read weights file {file!r}: truncated, corrupt or not a {kind} file "
                         f"({type(exc).__name__}: {exc})") from exc
    if isinstance(part, dict) and set(part) == {"state_dict"}:
        part = part["state_dict"]
    if not isinstance(part, dict):
        raise ValueError(f"{file!r} does not hold a state dict (got {type(part).__name__})")
    for key, value in part.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{file!r} holds {type(value).__name__} under key {key!r}; expected only tensors")
    return part


def read_state_dict(path) -> dict[str, torch.Tensor]:
    """All tensors of a weights file, or of every weights file of a directory (shards).
    A key in two shards is a ValueError naming both files: which copy wins would be arbitrary."""
    state, origin = {}, {}
    for file in _weight_files(os.fspath(path)):
        for key, value in _read_file(file).items():
            if key in origin:
                raise ValueError(f"key {key!r} is in two weights files: {origin[key]!r} and {file!r}")
            state[key], origin[key] = value, file
    return state


def apply_key_map(state: dict, key_map) -> dict:
    """Rename checkpoint keys; drop those mapped to None."""
    if key_map is None:
        return dict(state)
    if isinstance(key_map, dict):
        rename = lambda key: key_map.get(key, key)  # noqa: E731
    elif callable(key_map):
        rename = key_map
    else:
        raise TypeError(f"key_map must be a dict, a callable or None, got {type(key_map).__name__}")
    out, source = {}, {}
    for key, value in state.items():
        new = rename(key)
        if new is None:
            continue
        if not isinstance(new, str):  # a non-str key would only fail later, in load_state_dict
            raise TypeError(f"key_map must map each key to a str or None, got {type(new).__name__} for {key!r}")
        if new in out:
            raise ValueError(f"key_map maps both {source[new]!r} and {key!r} to {new!r}")
        out[new], source[new] = value, key
    return out


SHOWN_KEYS = 20


def describe_unexpected(unexpected: list, ours: set) -> str:
    """The first SHOWN_KEYS unexpected keys and how many more; and, when some of them are our
    parameter names under one common prefix (a full model's checkpoint, e.g.
    "mm_projector.query"), the key_map that keeps exactly those."""
    text = repr(unexpected[:SHOWN_KEYS])
    if len(unexpected) > SHOWN_KEYS:
        text += f" and {len(unexpected) - SHOWN_KEYS} more"
    prefixes = {}
    for key in unexpected:
        for name in ours:
            if key.endswith("." + name):
                prefix = key[:-len(name)]
                prefixes.setdefault(prefix, set()).add(name)
    if prefixes:
        prefix, names = max(prefixes.items(), key=lambda item: (len(item[1]), -len(item[0])))
        text += (f"; {len(names)} of the {len(ours)} parameters are under the prefix {prefix!r}: "
                 f"key_map=lambda k: k[{len(prefix)}:] if k.startswith({prefix!r}) else None "
                 f"keeps those and drops every other key")
    return text


def check_keys(module: torch.nn.Module, state: dict) -> None:
    """Raise ValueError naming every unexpected key, missing parameter or shape mismatch."""
    ours = module.state_dict()
    unexpected = sorted(set(state) - set(ours))
    missing = sorted(set(ours) - set(state))
    problems = []
    if unexpected:
        problems.append(f"unexpected keys (not parameters of {type(module).__name__}; rename or drop them "
                        f"with key_map): {describe_unexpected(unexpected, set(ours))}")
    if missing:
        problems.append(f"missing keys (parameters the checkpoint does not fill): {missing}")
    for key in sorted(set(state) & set(ours)):
        if tuple(state[key].shape) != tuple(ours[key].shape):
            problems.append(f"shape mismatch for {key!r}: checkpoint {tuple(state[key].shape)}, "
                            f"model {tuple(ours[key].shape)}")
        # load_state_dict would cast silently; integer or bool weights mean a wrong tensor.
        if ours[key].is_floating_point() and not state[key].is_floating_point():
            problems.append(f"dtype mismatch for {key!r}: checkpoint {state[key].dtype}, model parameter is "
                            f"floating point (integer, bool and complex tensors are not converted)")
    if problems:
        raise ValueError("cannot load checkpoint: " + "; ".join(problems))


def _check_load_args(path, dtype, device):
    if not isinstance(path, (str, bytes, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if dtype is not None:
        if not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype or None, got {type(dtype).__name__}")
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must be a torch.device or a device string, got {device!r} ({exc})") from None
        if device.type == "meta":
            # Meta tensors hold no data: "loading" would silently discard every weight read.
            raise ValueError("device='meta' is refused: meta tensors hold no data, so the checkpoint's weights "
                             "would be discarded; for a weightless module build CCAMProjector(config) under "
                             "`with torch.device('meta'):`")
        try:  # before any file is read; torch's own refusal is a bare AssertionError for some builds
            torch.empty(0, device=device)
        except (AssertionError, RuntimeError, NotImplementedError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"device {str(device)!r} cannot hold tensors on this machine: {reason}") from None
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint path {path!r} does not exist")
    return path, device


def load_projector(cls, path, *, key_map=None, config=None, backend="auto", dtype=None, device=None):
    path, device = _check_load_args(path, dtype, device)
    config_from_file = config is None
    if config is None:
        config_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
        config_path = os.path.join(config_dir, CONFIG_FILE)
        if not os.path.exists(config_path):
            raise FileNotFoundError(f"no {CONFIG_FILE} in {config_dir!r}: pass config=")
        config = CCAMConfig.from_json_file(config_path)
    elif isinstance(config, dict):
        config = CCAMConfig.from_dict(config)
    raw = read_state_dict(path)
    _check_written_together(path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path)),
                            [CONFIG_FILE] if config_from_file else [], _weight_files(path))
    state = apply_key_map(raw, key_map)
    module = cls(config, backend=backend)
    check_keys(module, state)
    if dtype is None:
        float_dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
        dtype = float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32
    module.to(dtype=dtype, device=device)
    module.load_state_dict(state, strict=True)
    return module.eval()


def _check_written_together(directory: str, config_names: list, weight_files: list) -> None:
    """The files about to be read match the manifest of their folder, if it has one."""
    by_folder = {}
    for file in weight_files:
        folder, name = os.path.split(os.path.abspath(file))
        by_folder.setdefault(folder, []).append(name)
    by_folder.setdefault(os.path.abspath(directory), []).extend(config_names)
    for folder, names in by_folder.items():
        check_together(folder, names)


def save_projector(module, path, *, safe_serialization=True, config_extra=None, extra_files=None) -> None:
    """config.json and model.safetensors (or pytorch_model.bin), written together
    (``write_together``): each staged in a temporary file beside it, then the manifest, then the
    files renamed into place. A failure leaves the old checkpoint, or files that from_pretrained
    refuses, and no partial file. ``config_extra``: more keys for config.json (transformers'
    auto_map); ``extra_files``: {name: text} written with them (modeling_ccam.py)."""

    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"save_pretrained needs a directory, but {path!r} is an existing file")
    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    weights_file = SAFETENSORS_FILE if safe_serialization else TORCH_FILE
    # The other format's file would shadow (or be shadowed by) this one on the next load. One the
    # previous manifest listed is deleted by write_together; an unlisted one (an older save) here.
    other = os.path.join(path, TORCH_FILE if safe_serialization else SAFETENSORS_FILE)
    if os.path.exists(other) and os.path.basename(other) not in listed_files(path):
        os.remove(other)

    def write_weights(tmp):
        if safe_serialization:
            from safetensors.torch import save_file

            save_file(state, tmp, metadata={"format": "pt"})
        else:
            torch.save(state, tmp)

    def write_config(tmp):
        module.config.to_json_file(tmp)
        if config_extra:
            with open(tmp, encoding="utf-8") as f:
                config = json.load(f)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({**config, **config_extra}, indent=2) + "\n")

    def write_text(text):
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
        return write

    write_together(path, {weights_file: write_weights, CONFIG_FILE: write_config,
                          **{name: write_text(text) for name, text in (extra_files or {}).items()}})
