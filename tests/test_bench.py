"""The main job, ccam-bench, at tiny shapes: files written, schema, rows, errors."""

import json

import pytest
import torch

from ccam_kernels import CCAMConfig, available_backends
from ccam_kernels.bench.__main__ import main
from ccam_kernels.bench.flops import attention_flops, projector_flops


def test_attention_flops_counts_live_pairs_only():
    N, H, D, P, counts = 10, 3, 8, 4, (3, 7)
    live = 0
    for T in counts:  # brute force over every (query, key) pair
        live += sum(1 for i in range(N) for j in range(T * P) if j // P <= (i * T) // N)
    assert attention_flops(N, H, D, counts, P, "fwd") == 4 * H * D * live
    assert attention_flops(N, H, D, counts, P, "fwd+bwd") == 3.5 * 4 * H * D * live


def test_projector_flops_v12_at_96_frames():
    # The numbers: K/V projection 330 GFLOP, live attention ~148 GFLOP, rest ~35 GFLOP.
    cfg = CCAMConfig()
    total = projector_flops(cfg, (96,), 729, "fwd") / 1e9
    kv = 2 * 96 * 729 * 1152 * 2048 / 1e9
    attn = attention_flops(1024, 16, 64, (96,), 729, "fwd") / 1e9
    assert 325 < kv < 335 and 140 < attn < 155
    assert 30 < total - kv - attn < 40


def test_ccam_bench_writes_json_markdown_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["--frames", "1,3", "--tokens-per-frame", "2", "--repeats", "1", "--warmup", "0",
               "--backward", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    for key in ("schema", "commit", "date", "device", "torch", "triton", "cuda", "ceilings", "rows"):
        assert key in doc
    assert doc["schema"] == 1
    assert doc["ceilings"]["matmul_tflops"] > 0 and doc["ceilings"]["copy_gbps"] > 0
    backends = available_backends()
    # 2 benches x 2 passes x 2 frame counts, one row per backend
    assert len(doc["rows"]) == 2 * 2 * 2 * len(backends)
    for row in doc["rows"]:
        assert row["status"] == "ok"
        assert row["backend"] in backends
        assert row["median_ms"] > 0 and row["tflops"] > 0 and row["pct_of_ceiling"] > 0
        assert row["max_rel_err"] < 1e-4, row
        assert row["speedup_vs_reference"] > 0
        assert row["frames"] in (1, 3) and row["batch"] == 1 and row["dtype"] == "float32"
    assert "| backend |" in (out / "results.md").read_text().replace("|backend|", "| backend |")
    assert (out / "latency.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "median ms" in printed and "torch" in printed


@pytest.mark.parametrize("argv", [["--backends", "nope"], ["--frames", "0"], ["--dtype", "int8"],
                                  ["--tokens-per-frame", "0"], ["--repeats", "x"], ["--warmup", "-1"]])
def test_ccam_bench_rejects_bad_arguments(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a backend unusable on CPU")
def test_ccam_bench_refuses_unusable_backend(capsys, tmp_path):
    assert main(["--backends", "triton", "--out", str(tmp_path)]) == 2
    assert "not usable here" in capsys.readouterr().err
