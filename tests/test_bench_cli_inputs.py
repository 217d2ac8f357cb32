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


# ---- ccam-bench --bench long: every flag checked before any case (issue 21 item 7) ----------

LONG = ["--bench", "long", "--frames", "4", "--procs", "1", "--parallel-frames", "2", "--repeats", "1"]


@pytest.fixture
def no_long_cases(monkeypatch):
    """The long bench's points and frame-parallel runs fail the test if one ever starts."""
    from ccam_kernels.bench import long_video

    def started(*args, **kwargs):
        raise AssertionError("a long-bench case ran although a flag is bad")

    monkeypatch.setattr(long_video, "_spawn_point", started)
    monkeypatch.setattr(long_video, "_run_parallel", started)


@pytest.mark.parametrize("flag,value", [("--repeats", "0"), ("--chunk", "0"), ("--chunk", "-3"), ("--threads", "0"),
                                        ("--parallel-frames", "0"), ("--repeats", "x"), ("--procs", "0")])
def test_long_bench_refuses_a_bad_value_before_any_case(flag, value, capsys, no_long_cases, tmp_path):
    with pytest.raises(SystemExit) as exc:
        cli.main([*LONG, flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [_existing_file, _missing_parent], ids=["existing-file", "missing-parent"])
def test_long_bench_refuses_an_unusable_out_before_any_case(make, tmp_path, capsys, no_long_cases):
    out, reason = make(tmp_path)
    before = sorted(os.listdir(tmp_path))
    assert cli.main([*LONG, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "ccam-bench: --out" in err and re.search(reason, err)
    assert sorted(os.listdir(tmp_path)) == before


def test_long_bench_allocation_failures_are_oom_rows(tmp_path, monkeypatch):
    """A point whose worker ran out of memory (its last stderr line: torch's CPU allocator,
    CUDA's, Python's MemoryError) and a frame-parallel run that did are `oom` rows; any other
    failure stays an `error` row."""
    import json

    from ccam_kernels.bench import long_video

    cpu = ("RuntimeError: [enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
           "you tried to allocate 35184372088832 bytes. Error code 12 (Cannot allocate memory)")
    failures = {(4, "one-shot"): cpu, (4, "stream"): "torch.OutOfMemoryError: CUDA out of memory.",
                (5, "one-shot"): "MemoryError", (5, "stream"): "ValueError: kaputt"}

    def point(spec):
        if "modes" in spec:  # the timing run of both modes: nothing left to time
            return {"error": "unused"}
        return {"error": failures[(spec["frames"], spec["mode"])]}

    def parallel(world, *args):
        raise RuntimeError(f"process 0 terminated with exit code 1\n{cpu}")

    monkeypatch.setattr(long_video, "_spawn_point", point)
    monkeypatch.setattr(long_video, "_run_parallel", parallel)
    code = cli.main([*LONG, "--frames", "4,5", "--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "long.json").read_text())["rows"]
    status = {(r["frames"], r["mode"]): r["status"] for r in rows}
    assert status == {(4, "one-shot"): "oom", (4, "stream"): "oom", (5, "one-shot"): "oom", (5, "stream"): "error",
                      (2, "frame-parallel"): "oom"}
    assert code == 1  # the one real error
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
