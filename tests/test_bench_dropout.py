"""ccam-bench --dropout P: every attention contestant timed with dropout P and without it in the
same interleaved rounds, the cost of dropout in the tables; flex unsupported (no dropout)."""

import json

import pytest
import torch

from ccam_kernels import CCAMConfig
from ccam_kernels.bench import contestants as C
from ccam_kernels.bench.__main__ import main
from ccam_kernels.bench.runner import BenchCase, add_dropout_costs, add_speedups

TINY = dict(num_query=13, hidden_size=32, cross_hidden_size=12, num_heads=2, num_key_value_heads=1,
            intermediate_size=24, output_size=10)
CPU = torch.device("cpu")


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"projector_config": TINY}))
    return str(path)


def test_ccam_bench_dropout_end_to_end(tmp_path, tiny_config, capsys):
    out = tmp_path / "bench"
    names = [n for n in ("reference", "torch", "sdpa-flash", "flex") if n in C.default_contestants("attention", CPU)]
    rc = main(["--config", tiny_config, "--frames", "3", "--batch", "2", "--tokens-per-frame", "3",
               "--pass", "fwd+bwd", "--dropout", "0.2", "--backends", ",".join(names), "--repeats", "1",
               "--rounds", "2", "--warmup", "0", "--out", str(out)])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert {r["bench"] for r in rows} == {"attention"}  # --dropout alone: the attention bench
    assert len(rows) == 2 * len(names)  # (without, with dropout) x contestants
    for case in ([3, 3],):
        mine = {(r["backend"], r["dropout_p"]): r for r in rows if r["frame_counts"] == case}
        assert set(mine) == {(n, p) for n in names for p in (0.0, 0.2)}
        for name in ("reference", "torch"):
            plain, drop = mine[name, 0.0], mine[name, 0.2]
            assert plain["status"] == drop["status"] == "ok", (plain, drop)
            # the same seed for the checked calls: ours applies the reference's mask
            assert drop["max_rel_err"] < 1e-5 and plain["max_rel_err"] < 1e-5
            assert drop["no_dropout_ms"] == plain["median_ms"]
            assert drop["dropout_cost"] == pytest.approx(drop["median_ms"] / plain["median_ms"])
            assert plain["dropout_cost"] is None and plain["no_dropout_ms"] is None
            # speedups compare rows of one dropout
            assert drop["dense_peer"] in ("reference", "sdpa-flash") and plain["dense_peer"] in ("reference", "sdpa-flash")
        if "flex" in names:
            assert mine["flex", 0.2]["status"] == "unsupported"
            assert "no attention dropout" in mine["flex", 0.2]["reason"]
        if "sdpa-flash" in names:  # SDPA's own mask: no error column; on CPU torch 2.13 refuses dropout
            sdpa = mine["sdpa-flash", 0.2]
            assert sdpa["max_rel_err"] is None
            assert sdpa["status"] == "ok" or "dropout" in sdpa["reason"]
    md = (out / "results.md").read_text()
    assert "x w/o dropout" in md and "With --dropout" in md
    summary = (out / "summary.md").read_text()
    assert "torch dropout 0.2" in summary and "x w/o dropout]" in summary
    printed = capsys.readouterr().out
    assert "ms w/o dropout" in printed

    assert main(["compare", str(out), str(out)]) == 0  # rows with and without dropout kept apart
    assert "torch dropout 0.2" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--dropout", "0"], ["--dropout", "1"], ["--dropout", "x"], ["--dropout", "nan"]])
def test_ccam_bench_rejects_bad_dropout(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2


def test_ccam_bench_dropout_is_for_the_attention_bench(tmp_path, capsys):
    assert main(["--dropout", "0.1", "--bench", "projector", "--out", str(tmp_path)]) == 2
    assert "attention bench only" in capsys.readouterr().err


def test_cases_carry_the_dropout():
    from ccam_kernels.bench.__main__ import build_cases, build_parser

    cases = build_cases(build_parser().parse_args(["--dropout", "0.1", "--frames", "4", "--pass", "fwd+bwd"]), CPU)
    assert [(c.bench, c.dropout_p, c.dropouts) for c in cases] == [("attention", 0.1, (0.0, 0.1))]
    assert "dropout=0.1" in cases[0].label
    plain = build_cases(build_parser().parse_args(["--frames", "4"]), CPU)
    assert {c.dropout_p for c in plain} == {0.0} and plain[0].dropouts == (0.0,)


def test_dropout_costs_and_speedups_pair_rows_of_one_dropout():
    rows = [dict(backend="reference", kind="reference", dropout_p=0.0, median_ms=4.0),
            dict(backend="torch", kind="ours", dropout_p=0.0, median_ms=2.0),
            dict(backend="reference", kind="reference", dropout_p=0.1, median_ms=8.0),
            dict(backend="torch", kind="ours", dropout_p=0.1, median_ms=2.5),
            dict(backend="flex", kind="anchor", dropout_p=0.1, median_ms=None)]
    add_speedups(rows)
    add_dropout_costs(rows)
    assert rows[1]["speedup_vs_dense"] == 2.0 and rows[3]["speedup_vs_dense"] == 3.2  # 8 / 2.5, not 4 / 2.5
    assert rows[3]["no_dropout_ms"] == 2.0 and rows[3]["dropout_cost"] == 1.25
    assert rows[2]["dropout_cost"] == 2.0 and "dropout_cost" not in rows[1] and "dropout_cost" not in rows[4]


def test_flex_contestant_refuses_dropout():
    case = BenchCase("attention", "fwd", (2,), torch.float32, CCAMConfig(**TINY), 3, 0.1)
    with pytest.raises(C.Unsupported, match="no attention dropout"):
        C.make_contestant("attention", "flex", 0.1).prepare(C.AttentionInputs(case, CPU, 1))
