"""benchmarks/gpu_suite.sh, run on CPU at a tiny sweep: every step, every output file. (On a
GPU machine the same script runs the real sweep; this keeps it from rotting in between.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = {"num_query": 8, "hidden_size": 16, "cross_hidden_size": 12, "num_heads": 2, "num_key_value_heads": 2,
        "intermediate_size": 24, "output_size": 10}


def test_gpu_suite_script_end_to_end_on_cpu(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "suite"
    env = dict(os.environ, CCAM_SUITE_SKIP_INSTALL="1", CCAM_SUITE_REQUIRE_GPU="0", CCAM_GPU_TEST_SECONDS="300",
               CCAM_SUITE_BENCH_ARGS=f"--config {config} --frames 1,2 --tokens-per-frame 3 --bench attention "
                                     "--backends reference,torch --repeats 1 --device cpu",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out), "1"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr + (out / "bench.log").read_text()
    for name in ("env.txt", "tests.log", "tests.xml", "bench.log", "results.json", "results.md", "summary.md",
                 "latency.png", "SUITE.md", "suite.log"):
        assert (out / name).is_file(), name
    doc = json.loads((out / "results.json").read_text())
    assert {r["backend"] for r in doc["rows"]} == {"reference", "torch"}
    assert all(r["status"] == "ok" for r in doc["rows"]) and len(doc["rows"]) == 4
    report = (out / "SUITE.md").read_text()
    assert "| ccam-bench | ok |" in report and "| GPU tests (pytest -m 'gpu or triton') | ok |" in report
    assert "| reference | torch |" in report  # the summary table is in the report
    assert "torch" in (out / "env.txt").read_text()


def test_gpu_suite_script_fails_without_a_gpu(tmp_path):
    """No CUDA device is a failed step, never a green report of skipped tests."""
    if __import__("torch").cuda.is_available():
        return  # on a GPU machine this check passes by design; the CPU run covers the failure
    out = tmp_path / "suite"
    env = dict(os.environ, CCAM_SUITE_SKIP_INSTALL="1", CCAM_GPU_TEST_SECONDS="300",
               CCAM_SUITE_BENCH_ARGS="--frames 1 --tokens-per-frame 2 --bench attention --backends reference "
                                     "--repeats 1 --device cpu --config " + str(_tiny_config(tmp_path)),
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), str(out), "1"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3
    assert "| torch sees a CUDA device | FAILED (exit 3) |" in (out / "SUITE.md").read_text()
    assert (out / "results.json").is_file()  # later steps still ran


def _tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return path
