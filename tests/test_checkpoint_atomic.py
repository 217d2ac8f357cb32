"""save_pretrained writes config.json and the weights as one (issue 21, item 5).

The issue's repro: the weights were renamed into place before config.json; when the second
rename failed, the folder held new weights with the old config, and from_pretrained loaded it
silently with the old activation (same shapes, other math). Here a failure is injected at every
step of a save (each rename, each writer, the stale-file cleanup), and after each the folder
must load as the old checkpoint, exactly, or raise; never as a mix.
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import safetensors.torch
import torch

from ccam_kernels import CCAMConfig, CCAMProjector
from ccam_kernels import atomic_file
from ccam_kernels.atomic_file import MANIFEST_FILE, write_together

SMALL = dict(num_query=9, hidden_size=16, cross_hidden_size=12, num_heads=4, num_key_value_heads=2,
             intermediate_size=8, output_size=10, attention_dropout=0.0, dropout=0.0)
NOT_WHOLE = "is not whole"


def make(seed, **changes):
    gen = torch.Generator().manual_seed(seed)
    proj = CCAMProjector(CCAMConfig(**{**SMALL, **changes}), backend="torch")
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return proj.eval()


OLD = dict(seed=1, hidden_act="swiglu")
NEW = dict(seed=2, hidden_act="gelu")  # same shapes as OLD: only the config tells them apart


def state_of(proj):
    return {k: v.detach().clone() for k, v in proj.state_dict().items()}


def outcome(path):
    """"old", "new" or "refused": what from_pretrained makes of the folder. A mix fails here."""
    try:
        loaded = CCAMProjector.from_pretrained(path)
    except ValueError as exc:
        assert NOT_WHOLE in str(exc) and MANIFEST_FILE in str(exc), exc
        return "refused"
    for name, kwargs in (("old", OLD), ("new", NEW)):
        ref = make(**kwargs)
        same = [torch.equal(a, b) for a, b in zip(state_of(loaded).values(), state_of(ref).values())]
        if all(same) and loaded.config == ref.config:
            return name
    raise AssertionError(f"{path} loads as neither the old nor the new checkpoint: config "
                         f"{loaded.config.hidden_act!r} with weights of neither")


def leftovers(path):
    return sorted(name for name in os.listdir(path) if name.endswith(".tmp"))


def counted(monkeypatch, module, name, fail_at):
    """Make module.name raise OSError on its call number ``fail_at`` (0-based); returns the list
    of calls made (to count a clean run's calls, pass fail_at=None)."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) - 1 == fail_at:
            raise OSError(5, f"{name} failed (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_the_issue_repro_config_rename_fails_after_the_weights(tmp_path, monkeypatch):
    make(**OLD).save_pretrained(tmp_path)
    real = os.replace

    def fail_on_config(src, dst):
        if os.path.basename(dst) == "config.json":
            raise OSError(5, "rename failed (simulated)")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_config)
    with pytest.raises(OSError, match="simulated"):
        make(**NEW).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert outcome(tmp_path) == "refused"  # before: "gelu" weights loaded with the "swiglu" config
    assert leftovers(tmp_path) == []
    make(**NEW).save_pretrained(tmp_path)  # saving again repairs it
    assert outcome(tmp_path) == "new"


def test_a_failed_rename_at_every_step_leaves_old_or_refused(tmp_path, monkeypatch):
    make(**OLD).save_pretrained(tmp_path / "probe")
    calls = counted(monkeypatch, os, "replace", None)
    make(**NEW).save_pretrained(tmp_path / "probe")
    monkeypatch.undo()
    targets = [os.path.basename(dst) for _, dst in calls]
    assert {"config.json", "model.safetensors", MANIFEST_FILE} <= set(targets)
    seen = []
    for step in range(len(calls)):
        folder = tmp_path / f"step{step}"
        make(**OLD).save_pretrained(folder)
        counted(monkeypatch, os, "replace", step)
        with pytest.raises(OSError, match="simulated"):
            make(**NEW).save_pretrained(folder)
        monkeypatch.undo()
        seen.append(outcome(folder))
        assert leftovers(folder) == [], step
        make(**NEW).save_pretrained(folder)
        assert outcome(folder) == "new"
    # The manifest is renamed before the files: until then the old checkpoint, after it refused.
    assert seen[0] == "old" and "refused" in seen and set(seen) <= {"old", "refused"}


def _fail_json_dump(*args, **kwargs):
    raise OSError(28, "No space left on device (simulated)")


WRITER_FAILURES = [
    ("weights", lambda mp: counted(mp, safetensors.torch, "save_file", 0)),
    ("config", lambda mp: counted(mp, CCAMConfig, "to_json_file", 0)),
    ("manifest", lambda mp: mp.setattr(atomic_file.json, "dump", _fail_json_dump)),
    ("fsync", lambda mp: counted(mp, os, "fsync", 1)),
    ("chmod", lambda mp: counted(mp, os, "chmod", 0)),
]


@pytest.mark.parametrize("inject", [f for _, f in WRITER_FAILURES], ids=[n for n, _ in WRITER_FAILURES])
def test_a_failed_writer_leaves_the_old_checkpoint(tmp_path, monkeypatch, inject):
    make(**OLD).save_pretrained(tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    inject(monkeypatch)
    with pytest.raises(OSError, match="simulated"):
        make(**NEW).save_pretrained(tmp_path)
    monkeypatch.undo()
    assert {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)} == before
    assert outcome(tmp_path) == "old"


def test_a_failed_first_save_leaves_nothing_loadable(tmp_path, monkeypatch):
    counted(monkeypatch, os, "replace", 2)  # the manifest and one file renamed, one not
    with pytest.raises(OSError, match="simulated"):
        make(**NEW).save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    with pytest.raises((ValueError, FileNotFoundError)):
        CCAMProjector.from_pretrained(tmp_path / "ckpt")


def test_the_manifest_lists_what_was_written_and_what_it_replaced(tmp_path):
    make(**OLD).save_pretrained(tmp_path)
    first = {name: (tmp_path / name).read_bytes() for name in ("config.json", "model.safetensors")}
    make(**NEW).save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    # modeling_ccam.py (for transformers' AutoModel) is written with them, the same text each time.
    assert sorted(manifest["files"]) == ["config.json", "model.safetensors", "modeling_ccam.py"]
    for name, entry in manifest["files"].items():
        assert entry["new"] == {"bytes": os.path.getsize(tmp_path / name),
                                "sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()}
        if name in first:
            assert entry["replaces"] == {"bytes": len(first[name]), "sha256": hashlib.sha256(first[name]).hexdigest()}
        else:
            assert entry["replaces"] == entry["new"]


def test_a_file_edited_by_hand_after_a_save_is_read_as_it_is(tmp_path):
    """Only the replaced content is refused: an edited config.json is the user's choice."""
    make(**OLD).save_pretrained(tmp_path)
    make(**NEW).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "silu"}))
    assert CCAMProjector.from_pretrained(tmp_path).config.hidden_act == "silu"


def test_deleting_the_manifest_loads_the_files_as_they_are(tmp_path, monkeypatch):
    make(**OLD).save_pretrained(tmp_path)
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (_ for _ in ()).throw(OSError(5, "simulated"))
                        if os.path.basename(dst) == "model.safetensors" else real(src, dst))
    with pytest.raises(OSError, match="simulated"):
        make(**NEW).save_pretrained(tmp_path)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"is not whole: model\.safetensors is still the file that the last "
                                         r"save_pretrained replaced.*delete ccam_manifest\.json"):
        CCAMProjector.from_pretrained(tmp_path)
    os.remove(tmp_path / MANIFEST_FILE)
    mixed = CCAMProjector.from_pretrained(tmp_path)  # what the user asked for: the new config, old weights
    assert mixed.config.hidden_act == NEW["hidden_act"]
    assert torch.equal(mixed.query, make(**OLD).query)


@pytest.mark.parametrize("text", ["{", "[]", '{"format": "other"}', '{"format": "%s", "files": 3}'
                                  % atomic_file.MANIFEST_FORMAT])
def test_a_manifest_of_another_shape_is_refused(tmp_path, text):
    make(**OLD).save_pretrained(tmp_path)
    (tmp_path / MANIFEST_FILE).write_text(text)
    with pytest.raises(ValueError, match=r"is not whole: its ccam_manifest\.json cannot be read"):
        CCAMProjector.from_pretrained(tmp_path)
