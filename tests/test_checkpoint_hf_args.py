"""from_pretrained with what Hugging Face users type (docs/reference.md §4.3): torch_dtype= /
dtype= as names or "auto", device_map, subfolder, a Hub repo id (huggingface_hub replaced by a
stand-in: no network), save_pretrained(safe_serialization=False), and the unexpected-keys
message of a full model's checkpoint."""

from __future__ import annotations

import os
import shutil
import sys
import types

import pytest
import torch

from ccam_kernels import CCAMConfig, CCAMProjector

from test_checkpoint_inputs import SMALL, make_projector


def _same(a: CCAMProjector, b: CCAMProjector):
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va.to(vb.dtype), vb, rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,expected", [
    ({"torch_dtype": torch.bfloat16}, torch.bfloat16),
    ({"torch_dtype": "bfloat16"}, torch.bfloat16),
    ({"dtype": "float16"}, torch.float16),
    ({"torch_dtype": "torch.float64"}, torch.float64),
    ({"dtype": "auto"}, torch.float32),
    ({"torch_dtype": "auto", "dtype": "auto"}, torch.float32),
    ({}, torch.float32),
])
def test_dtype_and_torch_dtype(tmp_path, kwargs, expected):
    proj = make_projector()
    proj.save_pretrained(tmp_path)
    loaded = CCAMProjector.from_pretrained(tmp_path, **kwargs)
    assert loaded.dtype == expected
    torch.testing.assert_close(loaded.query, proj.query.to(expected))


def test_dtype_errors(tmp_path):
    make_projector().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"dtype must be a torch.dtype, 'auto' or one of \["):
        CCAMProjector.from_pretrained(tmp_path, torch_dtype="bf17")
    with pytest.raises(ValueError, match="pass dtype= or torch_dtype= \\(the same argument\\), not both"):
        CCAMProjector.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.bfloat16)


@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}, torch.device("cpu")])
def test_device_map_puts_the_projector_on_one_device(tmp_path, device_map):
    make_projector().save_pretrained(tmp_path)
    loaded = CCAMProjector.from_pretrained(tmp_path, device_map=device_map)
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and device_map == "auto" \
        else torch.device("cpu")
    assert loaded.device == expected


def test_device_map_errors(tmp_path):
    make_projector().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device_map must put the whole projector on one device"):
        CCAMProjector.from_pretrained(tmp_path, device_map={"attn": "cpu", "mlp": "cpu"})
    with pytest.raises(ValueError, match="pass device= or device_map=, not both"):
        CCAMProjector.from_pretrained(tmp_path, device="cpu", device_map="cpu")


def test_subfolder_and_torch_state_dict(tmp_path):
    proj = make_projector()
    proj.save_pretrained(tmp_path / "projector", safe_serialization=False)
    assert sorted(os.listdir(tmp_path / "projector")) == ["ccam_manifest.json", "config.json", "modeling_ccam.py",
                                                         "pytorch_model.bin"]
    _same(CCAMProjector.from_pretrained(tmp_path, subfolder="projector"), proj)
    # Saving the other format over it replaces the file (a stale one would shadow the new).
    proj2 = make_projector()
    proj2.save_pretrained(tmp_path / "projector", auto_map=False)
    # The files the previous save's manifest listed and this one does not write are gone.
    assert sorted(os.listdir(tmp_path / "projector")) == ["ccam_manifest.json", "config.json", "model.safetensors"]
    _same(CCAMProjector.from_pretrained(tmp_path / "projector"), proj2)
    proj.save_pretrained(tmp_path / "projector", safe_serialization=False)
    _same(CCAMProjector.from_pretrained(tmp_path / "projector"), proj)


def _fake_hub(monkeypatch, snapshot_download):
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(snapshot_download=snapshot_download))


def test_hub_repo_id_is_downloaded_with_huggingface_hub(tmp_path, monkeypatch):
    proj = make_projector()
    repo = tmp_path / "snapshot"
    proj.save_pretrained(repo / "proj", safe_serialization=False)
    calls = []

    def snapshot_download(repo_id, *, revision=None, cache_dir=None, allow_patterns=None):
        calls.append((repo_id, revision, cache_dir, tuple(allow_patterns)))
        return str(repo)

    _fake_hub(monkeypatch, snapshot_download)
    monkeypatch.chdir(tmp_path)  # no local folder named like the repo
    loaded = CCAMProjector.from_pretrained("someone/video-ccam", subfolder="proj", revision="abc123",
                                           cache_dir=str(tmp_path / "cache"), torch_dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    repo_id, revision, cache_dir, patterns = calls[0]
    assert (repo_id, revision, cache_dir) == ("someone/video-ccam", "abc123", str(tmp_path / "cache"))
    assert "proj/*.safetensors" in patterns and "proj/*.bin" in patterns and "proj/config.json" not in patterns
    # A local folder of that name wins over the Hub.
    shutil.copytree(repo, tmp_path / "someone" / "video-ccam")
    CCAMProjector.from_pretrained("someone/video-ccam", subfolder="proj")
    assert len(calls) == 1


def test_hub_errors_name_the_extra_and_the_failure(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # not installed
    with pytest.raises(ImportError, match=r"needs huggingface_hub: pip install 'ccam_kernels\[hf\]'"):
        CCAMProjector.from_pretrained("someone/video-ccam")

    def offline(repo_id, **kwargs):
        raise ConnectionError("no network")

    _fake_hub(monkeypatch, offline)
    with pytest.raises(OSError, match="could not be downloaded from the Hugging Face Hub .*no network"):
        CCAMProjector.from_pretrained("someone/video-ccam")
    with pytest.raises(ValueError, match="revision= applies to a Hub repo id"):
        CCAMProjector.from_pretrained(str(tmp_path), revision="main")
    with pytest.raises(TypeError, match="subfolder must be a str, got int"):
        CCAMProjector.from_pretrained(str(tmp_path), subfolder=3)


def test_full_checkpoint_lists_twenty_unexpected_keys_and_suggests_a_key_map(tmp_path):
    proj = make_projector()
    state = {f"model.mm_projector.{k}": v for k, v in proj.state_dict().items()}
    state.update({f"model.layers.{i}.weight": torch.zeros(2) for i in range(30)})
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as info:
        CCAMProjector.from_pretrained(tmp_path / "model.safetensors", config=CCAMConfig(**SMALL))
    message = str(info.value)
    listed = message.split("key_map): [", 1)[1].split("]", 1)[0]
    assert listed.count("'") == 40  # 20 keys shown
    n_params = len(proj.state_dict())
    assert f" and {n_params + 30 - 20} more" in message
    suggestion = f"key_map=lambda k: k[19:] if k.startswith('model.mm_projector.') else None"
    assert f"{n_params} of the {n_params} parameters are under the prefix 'model.mm_projector.'" in message
    assert suggestion in message
    key_map = eval(suggestion.split("=", 1)[1])  # the suggestion works as written
    _same(CCAMProjector.from_pretrained(tmp_path / "model.safetensors", key_map, config=CCAMConfig(**SMALL)), proj)
