"""ccam-bench --bench long: routing from the ccam-bench command line, and its two workers run
in-process on a tiny video (the benchmark's numbers themselves are measured, never asserted)."""

from __future__ import annotations

import pytest
import torch

from ccam_kernels.bench import long_video
from ccam_kernels.bench.__main__ import main as bench_main


@pytest.mark.parametrize("argv,wanted", [
    (["--bench", "long"], True), (["--bench=long", "--frames", "96"], True),
    (["--bench", "projector"], False), (["--frames", "16"], False),
])
def test_is_long_request(argv, wanted):
    assert long_video.is_long_request(argv) is wanted


def test_bench_routes_long_to_its_parser(capsys):
    with pytest.raises(SystemExit):  # the long bench's own parser refuses a bad value
        bench_main(["--bench", "long", "--frames", "0"])
    assert "expected integers >= 1" in capsys.readouterr().err


def test_workers_on_a_tiny_video(tmp_path):
    spec = {"frames": 5, "chunk": 2, "device": "cpu", "threads": None}
    outputs = {}
    for mode in ("one-shot", "stream"):
        got = long_video._memory_worker({**spec, "mode": mode, "output": str(tmp_path / f"{mode}.pt")})
        assert got["peak_mem_mb"] >= 0 and got["tokens_per_frame"] == long_video.CPU_TOKENS_PER_FRAME
        outputs[mode] = torch.load(tmp_path / f"{mode}.pt")
    assert outputs["stream"].shape == (1, 256, 256)
    err = (outputs["stream"] - outputs["one-shot"]).norm() / outputs["one-shot"].norm()
    assert err <= 1e-5
    times = long_video._timing_worker({**spec, "modes": ["one-shot", "stream"], "repeats": 1})
    assert set(times) == {"one-shot", "stream"} and all(len(t) == 1 and t[0] > 0 for t in times.values())
