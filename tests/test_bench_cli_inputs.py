"""ccam-bench argument checks (issue 13 item 7): an unusable --out is refused before any case
runs, and --max-minutes must be a positive finite number; --help answers without importing
torch, and its usage line names compare and --bench long (issue 24 item 7)."""

from __future__ import annotations

import os
import re

import pytest

import ccam_kernels.bench.__main__ as cli
from ccam_kernels.bench import runner
from ccam_kernels.bench.out_dir import check_out_dir

LIGHT = ["--bench", "attention", "--backends", "reference", "--frames", "1", "--tokens-per-frame", "1"]


@pytest.fixture
def no_cases(monkeypatch):
    """run_suite that fails the test if main ever gets as far as running a case."""
    def run_suite(*args, **kwargs):
        raise AssertionError("a case ran although --out is unusable")
    monkeypatch.setattr(runner, "run_suite", run_suite)  # main imports it from there when it runs


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "0", "-1", "abc", "1e999"])
def test_max_minutes_must_be_positive_and_finite(value, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--max-minutes", value, *LIGHT])
    assert exc.value.code == 2
    assert "--max-minutes" in capsys.readouterr().err


def test_max_minutes_accepts_a_fraction():
    assert cli.build_parser().parse_args(["--max-minutes", "0.5"]).max_minutes == 0.5


def _existing_file(tmp_path):
    (tmp_path / "results").write_text("not a folder")
    return tmp_path / "results", "is an existing file"


def _missing_parent(tmp_path):
    return tmp_path / "no-such-dir" / "out", "parent folder .* does not exist"


def _parent_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    return tmp_path / "f" / "out", "parent folder .* does not exist"


@pytest.mark.parametrize("make", [_existing_file, _missing_parent, _parent_is_a_file],
                         ids=["existing-file", "missing-parent", "parent-is-a-file"])
def test_unusable_out_is_refused_before_any_case(tmp_path, capsys, no_cases, make):
    out, reason = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert cli.main([*LIGHT, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ccam-bench: --out" in err and str(out) in err
    assert re.search(reason, err)
    assert sorted(os.listdir(tmp_path)) == before  # nothing created


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only-mode folders; test_probe_failure_is_reported covers it")
def test_read_only_out_is_refused(tmp_path, capsys, no_cases):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        assert cli.main([*LIGHT, "--out", str(out)]) == 2
    finally:
        out.chmod(0o755)
    assert "is not writable" in capsys.readouterr().err


def test_probe_failure_is_reported(tmp_path, capsys, no_cases, monkeypatch):
    # What a read-only mount does to root as well: creating a file fails.
    import ccam_kernels.bench.out_dir as out_dir

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(out_dir.tempfile, "TemporaryFile", refuse)
    assert cli.main([*LIGHT, "--out", str(tmp_path)]) == 2
    assert f"--out {str(tmp_path)!r} is not writable: Permission denied" in capsys.readouterr().err


def test_new_out_in_an_existing_folder_is_created_and_left_clean(tmp_path):
    check_out_dir(str(tmp_path / "new"))
    assert os.listdir(tmp_path / "new") == []  # the probe file is gone
    (tmp_path / "new" / "results.json").write_text("{}")
    check_out_dir(str(tmp_path / "new"))  # an existing folder with results in it is fine
    assert os.listdir(tmp_path / "new") == ["results.json"]


def test_usable_out_lets_the_run_start(tmp_path, monkeypatch):
    class Started(Exception):
        pass

    def run_suite(cases, *args, **kwargs):
        raise Started(len(cases))

    monkeypatch.setattr(runner, "run_suite", run_suite)  # main imports it from there when it runs
    with pytest.raises(Started):
        cli.main([*LIGHT, "--max-minutes", "0.5", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out").is_dir()


def test_help_imports_no_torch_and_names_compare():
    import subprocess
    import sys

    code = ("import sys; from ccam_kernels.bench.__main__ import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    usage = out.split("\n\n", 1)[0]
    assert "ccam-bench compare A B" in usage and "--bench long" in usage
    assert out.strip().endswith("NO TORCH")


def test_names_offered_without_torch_are_the_ones_that_run():
    from ccam_kernels.attention import BACKENDS
    from ccam_kernels.bench import contestants, names

    assert names.OUR_BACKENDS == tuple(n for n in BACKENDS if n != "reference")
    assert names.SDPA_NAMES == tuple(contestants.SDPA_ANCHORS)
    assert names.BENCHES == runner.BENCHES and names.PASSES == runner.PASSES
