"""Checkpoint inputs (issue 13 item 7): damaged weights files, keys in two shards, integer
weights, device="meta", missing paths are refused by name; save_pretrained is atomic."""

from __future__ import annotations

import os
import re

import pytest
import safetensors.torch
import torch
from safetensors.torch import save_file

from ccam_kernels import CCAMConfig, CCAMProjector

SMALL = dict(num_query=9, hidden_size=16, cross_hidden_size=12, num_heads=4, num_key_value_heads=2,
             intermediate_size=8, output_size=10, attention_dropout=0.0, dropout=0.0)


def make_projector() -> CCAMProjector:
    proj = CCAMProjector(CCAMConfig(**SMALL), backend="torch")
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn_like(p))
    return proj


def state_of(proj):
    return {k: v.detach().clone().contiguous() for k, v in proj.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def leftovers(directory):
    return sorted(name for name in os.listdir(directory) if name.endswith(".tmp"))


# ---------------------------------------------------------------------------------------------
# Damaged files.


def _damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_damaged_weights_file_is_a_value_error_naming_it(tmp_path, how, fmt):
    proj = make_projector()
    proj.save_pretrained(tmp_path)
    if fmt == "bin":
        os.remove(tmp_path / "model.safetensors")
        torch.save(state_of(proj), tmp_path / "pytorch_model.bin")
        weights = tmp_path / "pytorch_model.bin"
    else:
        weights = tmp_path / "model.safetensors"
    _damage(weights, how)
    with pytest.raises(ValueError, match=re.escape(repr(str(weights)))):
        CCAMProjector.from_pretrained(tmp_path)


def test_non_tensor_in_state_dict_is_named(tmp_path):
    proj = make_projector()
    proj.save_pretrained(tmp_path)
    os.remove(tmp_path / "model.safetensors")
    torch.save({**state_of(proj), "step": 7}, tmp_path / "weights.pt")
    with pytest.raises(ValueError, match=r"weights\.pt.*int under key 'step'"):
        CCAMProjector.from_pretrained(tmp_path)


def test_key_in_two_shards_names_both_files(tmp_path):
    proj = make_projector()
    proj.config.to_json_file(tmp_path / "config.json")
    state = state_of(proj)
    keys = sorted(state)
    first = {k: state[k] for k in keys[: len(keys) // 2]}
    second = {k: state[k] for k in keys[len(keys) // 2:]}
    first["query"] = torch.zeros_like(state["query"])  # "query" is in the second shard too
    assert "query" in second
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    save_file(second, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"'query' is in two weights files: .*model-00001-of-00002\.safetensors"
                                         r".*model-00002-of-00002\.safetensors"):
        CCAMProjector.from_pretrained(tmp_path)
    # without the duplicate the shards load, and every value comes from its file
    del first["query"]
    save_file(first, tmp_path / "model-00001-of-00002.safetensors")
    assert_same_state(state_of(CCAMProjector.from_pretrained(tmp_path)), state)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
def test_integer_or_bool_tensor_into_float_parameter_is_refused(tmp_path, dtype):
    proj = make_projector()
    proj.config.to_json_file(tmp_path / "config.json")
    state = state_of(proj)
    state["out_norm.weight"] = torch.ones_like(state["out_norm.weight"], dtype=dtype)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=rf"dtype mismatch for 'out_norm\.weight': checkpoint {dtype}"):
        CCAMProjector.from_pretrained(tmp_path)


def test_device_meta_is_refused_with_the_reason(tmp_path):
    make_projector().save_pretrained(tmp_path)
    for device in ("meta", torch.device("meta")):
        with pytest.raises(ValueError, match=r"device='meta' is refused: meta tensors hold no data"):
            CCAMProjector.from_pretrained(tmp_path, device=device)
    # what the message suggests does give a weightless module of the right shapes
    with torch.device("meta"):
        empty = CCAMProjector(CCAMConfig.from_json_file(tmp_path))
    assert empty.query.is_meta and empty.query.shape == (SMALL["num_query"], SMALL["hidden_size"])


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(device="nowhere:0"), ValueError, r"device must be a torch\.device.*'nowhere:0'"),
    (dict(device=3.5), ValueError, r"device must be"),
    (dict(dtype=torch.int64), ValueError, r"dtype must be a floating-point torch\.dtype, got torch\.int64"),
    (dict(dtype=32), TypeError, r"dtype must be a torch\.dtype or None, got int"),
    (dict(dtype="float17"), ValueError, r"dtype must be a torch\.dtype, 'auto' or one of"),
], ids=["device-string", "device-float", "dtype-int", "dtype-number", "dtype-str"])
def test_bad_dtype_or_device_is_named(tmp_path, kwargs, exc, pattern):
    make_projector().save_pretrained(tmp_path)
    with pytest.raises(exc, match=pattern):
        CCAMProjector.from_pretrained(tmp_path, **kwargs)


@pytest.mark.parametrize("key_map", [lambda key: 3, lambda key: ("a", key), {"query": b"query"}],
                         ids=["callable-int", "callable-tuple", "dict-bytes"])
def test_key_map_to_a_non_str_is_refused(tmp_path, key_map):
    make_projector().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match=r"key_map must map each key to a str or None, got (int|tuple|bytes) for '"):
        CCAMProjector.from_pretrained(tmp_path, key_map=key_map)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_device_this_build_cannot_use_is_a_clear_error(tmp_path):
    """torch's own refusal on a CPU build is a bare AssertionError; it is refused up front, by name."""
    make_projector().save_pretrained(tmp_path)
    for device in ("cuda", torch.device("cuda", 0)):
        with pytest.raises(RuntimeError, match=r"device 'cuda(:0)?' cannot hold tensors on this machine: "):
            CCAMProjector.from_pretrained(tmp_path, device=device)


def test_path_that_does_not_exist_says_so(tmp_path):
    missing = tmp_path / "no-such-checkpoint"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint path {str(missing)!r} does not exist")):
        CCAMProjector.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CCAMProjector.from_pretrained(missing / "model.safetensors", config=SMALL)
    with pytest.raises(TypeError, match="path must be"):
        CCAMProjector.from_pretrained(42)


# ---------------------------------------------------------------------------------------------
# Atomic saving.


def _fail_midway(state, filename, metadata=None):
    """Stand-in for safetensors' save_file that dies after writing part of the file."""
    with open(filename, "wb") as f:
        f.write(b"\x00" * 100)
    raise OSError(28, "No space left on device (simulated)")


def test_failed_weights_write_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    old = make_projector()
    old.save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "model.safetensors")}
    new = CCAMProjector(CCAMConfig(**{**SMALL, "output_size": 6}))  # a different config too
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway)
    with pytest.raises(OSError, match="simulated"):
        new.save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert leftovers(tmp_path) == []
    assert_same_state(state_of(CCAMProjector.from_pretrained(tmp_path)), state_of(old))


def test_failed_weights_write_into_a_new_folder_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _fail_midway)
    with pytest.raises(OSError, match="simulated"):
        make_projector().save_pretrained(tmp_path / "ckpt")
    assert os.listdir(tmp_path / "ckpt") == []  # no config.json without its weights


def test_failed_config_write_leaves_the_old_checkpoint_whole(tmp_path, monkeypatch):
    make_projector().save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in ("config.json", "model.safetensors")}

    def fail_midway(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write('{"num_query": ')
        raise OSError(5, "I/O error (simulated)")

    monkeypatch.setattr(CCAMConfig, "to_json_file", fail_midway)
    with pytest.raises(OSError, match="simulated"):
        make_projector().save_pretrained(tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert leftovers(tmp_path) == []


def test_saved_files_get_the_permissions_of_a_plain_write(tmp_path):
    make_projector().save_pretrained(tmp_path)
    (tmp_path / "plain").write_text("x")  # what open() gives under the current umask
    plain = os.stat(tmp_path / "plain").st_mode & 0o777
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == plain
    assert os.stat(tmp_path / "model.safetensors").st_mode & 0o777 == plain


def test_save_round_trip_and_overwrite(tmp_path):
    first, second = make_projector(), make_projector()
    first.save_pretrained(tmp_path)
    second.save_pretrained(tmp_path)  # replaces the first one whole
    assert_same_state(state_of(CCAMProjector.from_pretrained(tmp_path)), state_of(second))
    assert leftovers(tmp_path) == []


def test_save_onto_an_existing_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is an existing file"):
        make_projector().save_pretrained(tmp_path / "file")
