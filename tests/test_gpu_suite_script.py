"""benchmarks/gpu_suite.sh on CPU, in seconds: the plan and its deadline (dry run), and the real
script with stub commands on the PATH (a fake `python` and `compute-sanitizer` that answer each
step as the real ones would, or hang): what each step is asked to run, at most 6 files in OUT,
the deadline enforced on a step that hangs. The helpers the script calls (smoke.py,
suite_table.py, suite_env.py) are tested here for real, at small sizes."""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"
STEPS = ["env", "build", "memcheck", "racecheck", "smoke", "tests", "prewarm", "bench-attention", "bench-flex",
         "results", "bench-projector", "results-projector", "triton"]

# The fake python: logs its arguments (and the build's arch), answers each step, and sleeps
# forever in the step named by STUB_HANG. suite_table.py runs for real (the real interpreter).
STUB_PYTHON = r"""#!/usr/bin/env bash
echo "python $* ARCHS=${CCAM_CUDA_ARCHS:-} REQUIRE_CUDA=${CCAM_REQUIRE_CUDA_BACKEND:-}" >> "$STUB_CALLS"
step=other
case " $* " in
  *" benchmarks/suite_env.py "*) step=env ;;
  *" -m pip "*) step=build ;;
  *" benchmarks/smoke.py "*) step=smoke ;;
  *" benchmarks/prewarm.py "*) step=prewarm ;;
  *" --backends flex "*) step=bench-flex ;;
  *" --bench attention "*) step=bench-attention ;;
  *" --bench projector "*) step=bench-projector ;;
  *" benchmarks/suite_table.py "*) exec "$STUB_REAL_PYTHON" "$@" ;;
  *" -m triton "*) step=triton ;;
  *" -m pytest "*) step=tests ;;
  *" benchmarks/sanitize_case.py "*) step=sanitize ;;
esac
if [ "$step" = "${STUB_HANG:-}" ]; then sleep 1000; fi
case $step in
  env)
    if [ -n "${STUB_NO_GPU:-}" ]; then echo "gpu: torch sees no CUDA device" > "$2"; exit 3; fi
    printf 'commit: abc\npython 3\ngpu Fake H200 141 GiB sm_90 132 SMs; build arch 90a\n' > "$2"; echo 90a ;;
  smoke) echo "| backend | out | dq | dk | dv | s | verdict |"; echo "| triton | 1e-3 | 2e-3 | 2e-3 | 2e-3 | 9.0 | ok |" ;;
  bench-*)
    all="$*"; out=${all##*--out }; mkdir -p "$out"
    kind=${step#bench-}
    "$STUB_REAL_PYTHON" -c "import json, sys; d = json.load(open(sys.argv[1])); k = sys.argv[2]; d['rows'] = [r for r in d['rows'] if (r['backend'] == 'flex') == (k == 'flex') and (k == 'flex' or r['bench'] == k)]; json.dump(d, open(sys.argv[3], 'w'))" \
      "$STUB_RESULTS" "$kind" "$out/results.json"
    echo png > "$out/latency.png"; echo "summary" > "$out/summary.md" ;;
  tests | triton) echo "7 passed in 1.00s"; all="$*"; echo "<testsuite/>" > "${all##*--junitxml=}" ;;
  sanitize) echo "sanitize case: max rel err 1e-3" ;;
  prewarm) echo "prewarm T=96 B=1: 1.0 s" ;;
esac
"""
STUB_SANITIZER = """#!/usr/bin/env bash
tool=$2; shift 4
"$@" && echo "========= ERROR SUMMARY: 0 errors ($tool)"
"""


def _row(bench, pass_, backend, kind, frames, batch, ms):
    return {"bench": bench, "pass": pass_, "backend": backend, "kind": kind, "frames": frames,
            "frame_counts": [frames] * batch, "batch": batch, "dtype": "bfloat16", "status": "ok", "median_ms": ms}


RESULTS = {"schema": 1, "commit": "0123456789abcdef", "date": "2026-12-01T10:00:00+00:00", "device": "NVIDIA H200",
           "complete": True, "elapsed_s": 10.0,
           "rows": [_row("attention", "fwd", "triton", "ours", 96, 8, 2.0),
                    _row("attention", "fwd", "cuda", "ours", 96, 8, 3.0),
                    _row("attention", "fwd", "flex", "anchor", 96, 8, 4.0),
                    _row("attention", "bwd", "cuda", "ours", 16, 1, 5.0),
                    _row("attention", "bwd", "sdpa-cudnn", "anchor", 16, 1, 2.5),
                    _row("projector", "fwd", "triton", "ours", 96, 1, 9.0),
                    _row("projector", "fwd", "reference", "reference", 96, 1, 90.0),
                    dict(_row("projector", "fwd", "cuda", "ours", 96, 1, 1.0), status="wrong")]}


def _run_suite(tmp_path, budget=280, **stub_env):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("python3", STUB_PYTHON), ("compute-sanitizer", STUB_SANITIZER)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (tmp_path / "fixture.json").write_text(json.dumps(RESULTS))
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", CCAM_SUITE_SECONDS=str(budget),
               CCAM_SUITE_PYTHON=str(bin_dir / "python3"),
               STUB_CALLS=str(tmp_path / "calls.txt"), STUB_REAL_PYTHON=sys.executable,
               STUB_RESULTS=str(tmp_path / "fixture.json"), **stub_env)
    for name in ("CCAM_SUITE_DRY_RUN", "CCAM_SUITE_SKIP_INSTALL"):
        env.pop(name, None)
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True, text=True, timeout=120)
    return proc, out, time.monotonic() - start, (tmp_path / "calls.txt").read_text()


def test_dry_run_plan_fits_the_default_deadline(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], capture_output=True, text=True,
                          env=dict(os.environ, CCAM_SUITE_DRY_RUN="1"), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "deadline 280 s" in proc.stdout
    planned = re.findall(r"^step (\S+) +limit +(\d+) s \(cap +(\d+) s\), done by +(\d+) s", proc.stdout, re.M)
    named = re.findall(r"^step (\S+)", proc.stdout, re.M)
    assert named == STEPS  # the order of evidence per minute
    # Even if every step used its whole limit, the call ends inside the deadline.
    ends = [int(end) for *_, end in planned]
    assert ends == sorted(ends) and ends[-1] <= 280
    assert all(int(limit) <= int(cap) for _, limit, cap, _ in planned)
    assert [name for name, *_ in planned][:4] == STEPS[:4]
    assert not any((tmp_path / "out").iterdir())  # a dry run writes nothing


def test_suite_with_stub_commands_leaves_three_files(tmp_path):
    proc, out, seconds, calls = _run_suite(tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["SUITE.md", "logs.tar.gz", "results.json"]
    # What each step was asked to run: one architecture, the target rows, the cuda tests required.
    assert "-m pip install --no-build-isolation --no-deps -e . ARCHS=90a" in calls
    assert "--require torch,triton,cuda" in calls
    assert re.search(r"--bench attention --pass fwd,bwd --frames 96,16 --batch 1,8 --backends (\S+) --max-minutes 0\.7 ",
                     calls)
    assert "flex" not in re.search(r"--frames 96,16 --batch 1,8 --backends (\S+)", calls).group(1)
    assert re.search(r"--bench attention --pass fwd,bwd --frames 96 --batch 1 --backends flex --max-minutes 0\.3 ", calls)
    assert re.search(r"--bench projector --pass fwd,fwd\+bwd --frames 96 --batch 1 --backends \S+ --max-minutes 0\.3 ",
                     calls)
    assert "tests/test_gpu.py tests/test_cuda.py" in calls and "REQUIRE_CUDA=1" in calls
    assert calls.count("benchmarks/sanitize_case.py --backends cuda,triton") == 2 and "-m triton tests" in calls
    # first contact: the sanitizers right after the build, correctness before any benchmark
    order = [calls.index(s) for s in ("-m pip", "sanitize_case.py", "benchmarks/smoke.py", "tests/test_gpu.py",
                                      "benchmarks/prewarm.py", "--bench attention")]
    assert order == sorted(order)

    report = (out / "SUITE.md").read_text()
    for step in STEPS:
        assert re.search(rf"^\| {step} \| \d+ \| ok \|", report, re.M), step
    assert "| attention | fwd | 96 | 8 | bfloat16 | **triton** (ours) | triton 2.000 | flex 4.000 | 2.00x |" in report
    assert "| attention | bwd | 16 | 1 | bfloat16 | **sdpa-cudnn** | cuda 5.000 | sdpa-cudnn 2.500 | 0.50x |" in report
    assert "| projector | fwd | 96 | 1 | bfloat16 | **triton** (ours) | triton 9.000 |" in report  # a wrong row never wins
    assert "7 passed" in report and "ERROR SUMMARY: 0 errors (memcheck)" in report
    # the model's prediction next to each timed row of our kernels (fwd 96 x 8 triton and cuda, bwd 16 x 1 cuda)
    predicted = re.findall(r"^\| (fwd|bwd) \| (\d+) \| (\d) \| bfloat16 \| (cuda|triton) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                           report, re.M)
    assert sorted(p[:4] for p in predicted) == [("bwd", "16", "1", "cuda"), ("fwd", "96", "8", "cuda"),
                                                ("fwd", "96", "8", "triton")]
    assert all(float(p[5]) > 0 for p in predicted)
    assert "benchmarks/results/h200_2026-12-01_0123456.json" in report
    merged = json.loads((out / "results.json").read_text())
    assert len(merged["rows"]) == len(RESULTS["rows"]) and len(merged["runs"]) == 3
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = {Path(n).as_posix().lstrip("./") for n in tar.getnames()}
    assert {"env.txt", "build.log", "smoke.log", "bench-attention/latency.png", "bench-projector/results.json",
            "tests.xml", "tests-triton.log", "sanitizer-racecheck.log", "suite.log"} <= names


def test_deadline_holds_when_a_step_hangs_and_no_gpu_is_a_failure(tmp_path):
    """A 6-second budget with the smoke hanging: the step is killed at its limit, later steps
    are reported as not run, the call ends inside the budget, and a machine whose torch sees
    no GPU is a failed step (exit 3), never a green report."""
    proc, out, seconds, _ = _run_suite(tmp_path, budget=6, STUB_HANG="smoke", STUB_NO_GPU="1")
    assert seconds <= 6 + 3, seconds  # the hung step was stopped (sleep 1000 would never end)
    assert proc.returncode == 3, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["SUITE.md", "logs.tar.gz"]
    report = (out / "SUITE.md").read_text()
    assert re.search(r"^\| env \| \d+ \| FAILED \(exit 3\) \|", report, re.M)
    assert re.search(r"^\| smoke \| \d+ \| TIMED OUT", report, re.M)
    assert re.search(r"^\| bench-attention \| - \| not run: \d+ s left", report, re.M)


def _load(script):
    """A benchmarks/ script as a module, to call its main() in this process (torch is imported
    once for the session, not once per subprocess)."""
    spec = importlib.util.spec_from_file_location(f"_suite_{script}", ROOT / "benchmarks" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_script_on_cpu(tmp_path, capsys):
    """The smoke at a small shape on CPU (torch only, to keep it quick): the errors are measured
    and within the float32 limits, and a backend that is required but not usable here (cuda)
    fails the smoke with its reason, after the usable ones ran."""
    out = tmp_path / "smoke.json"
    code = _load("smoke").main(["--tiny", "--frames", "3", "--batch", "2", "--backends", "torch", "--json", str(out),
                                "--require", "torch,cuda"])
    printed = capsys.readouterr().out
    assert code == 1 and "cuda: required but not usable here" in printed
    doc = json.loads(out.read_text())
    assert [r["backend"] for r in doc["rows"]] == ["torch"]
    row = doc["rows"][0]
    assert row["ok"] and all(0 < row[g] <= 2e-5 for g in ("out", "dq", "dk", "dv")), row
    assert "| torch |" in printed and len(doc["problems"]) == 1
    assert _load("smoke").main(["--tiny", "--frames", "1", "--backends", "torch", "--require", "torch"]) == 0


def test_env_step_without_a_gpu_exits_3_and_writes_the_environment(tmp_path, capsys, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the no-GPU answer")
    env_txt = tmp_path / "env.txt"
    monkeypatch.chdir(ROOT)
    assert _load("suite_env").main([str(env_txt)]) == 3
    assert capsys.readouterr().out == ""
    text = env_txt.read_text()
    assert "torch sees no CUDA device" in text and "torch " in text and "commit: " in text


def test_merge_refuses_runs_of_different_commits_and_skips_missing_ones(tmp_path, capsys):
    table = _load("suite_table")
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(RESULTS))
    b.write_text(json.dumps(dict(RESULTS, commit="fedcba9876543210")))
    with pytest.raises(SystemExit, match="differ in commit"):
        table.merge([str(a), str(b)])
    merged = table.merge([str(a), str(tmp_path / "missing.json")])
    assert merged["rows"] == RESULTS["rows"] and "leaving out" in capsys.readouterr().err
    assert table.results_stem(merged) == "h200_2026-12-01_0123456"
