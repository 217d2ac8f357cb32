"""The package without triton (a CPU install, where triton is the optional ``[triton]`` extra).

A child process sets ``sys.modules["triton"] = None`` before anything imports it: every
``import triton`` then raises ImportError and ``importlib.util.find_spec("triton")`` returns
None, as on a machine where it was never installed. TRITON_INTERPRET=1 is set too, so the
interpreter switch cannot make the triton backend look usable. In that process: import the
package, run ccam_attention (torch, reference, auto) and the projector against the float64
oracle with every gradient, ask for the triton backend (the error must say how to install
it), and run ccam-bench once at a tiny size and once asking for triton.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(num_query=7, hidden_size=16, cross_hidden_size=12, num_heads=2, num_key_value_heads=1,
            intermediate_size=24, output_size=10)

CHILD = r'''
import json, sys
sys.modules["triton"] = None  # as if triton were not installed
seed, config_path, out_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3]

import torch
import ccam_kernels
from ccam_kernels import CCAMConfig, CCAMProjector, available_backends, ccam_attention
from oracle import attention_oracle, projector_oracle

def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())

torch.manual_seed(seed)
got = {"backends": available_backends(), "triton_module": repr(sys.modules.get("triton")),
       "attention": {}, "projector": {}}
# Ragged batch: T = 1, T = 3 (not dividing N = 7), T = 9 > N; large logits (q scaled by 30).
N, H, Hkv, D, P, counts = 7, 4, 2, 8, 3, [1, 3, 9]
for backend in ("torch", "reference", "auto"):
    q = (torch.randn(len(counts), N, H, D) * 30).requires_grad_()
    k = torch.randn(sum(counts) * P, Hkv, D, requires_grad=True)
    v = torch.randn(sum(counts) * P, Hkv, D, requires_grad=True)
    out = ccam_attention(q, k, v, counts, P, backend=backend)
    dout = torch.randn_like(out)
    out.backward(dout)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention_oracle(q64, k64, v64, counts, P)
    ref.backward(dout.double())
    got["attention"][backend] = {"out": rel(out, ref), "dq": rel(q.grad, q64.grad),
                                 "dk": rel(k.grad, k64.grad), "dv": rel(v.grad, v64.grad)}

cfg = CCAMConfig.from_json_file(config_path)
splits = [1, 3, 9]
for backend in ("torch", "auto"):
    proj = CCAMProjector(cfg, backend=backend).eval()  # eval: the oracle has no dropout
    with torch.no_grad():
        for p in proj.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(sum(splits), P, cfg.cross_hidden_size, requires_grad=True)
    y = proj(x, splits)
    dy = torch.randn_like(y)
    y.backward(dy)
    params = {n: t.detach().double().requires_grad_() for n, t in proj.state_dict().items()}
    x64 = x.detach().double().requires_grad_()
    ref = projector_oracle(params, cfg, x64, splits)
    ref.backward(dy.double())
    named = dict(proj.named_parameters())
    got["projector"][backend] = {"out": rel(y, ref), "features": rel(x.grad, x64.grad),
                                 "params": {n: rel(p.grad, params[n].grad) for n, p in named.items()}}

errors = {}
q = torch.randn(N, H, D)
k = torch.randn(sum(counts) * P, Hkv, D)
try:
    ccam_attention(q, k, k, counts, P, backend="triton")
except Exception as exc:
    errors["attention"] = f"{type(exc).__name__}: {exc}"
try:
    CCAMProjector(cfg, backend="triton")(torch.randn(3, P, cfg.cross_hidden_size), [3])
except Exception as exc:
    errors["projector"] = f"{type(exc).__name__}: {exc}"
got["errors"] = errors

from ccam_kernels.bench.__main__ import main
got["bench_rc"] = main(["--config", config_path, "--bench", "attention", "--frames", "1,3",
                        "--tokens-per-frame", "3", "--backends", "reference,torch", "--repeats", "1",
                        "--rounds", "1", "--warmup", "0", "--out", out_dir])
got["bench_triton_rc"] = main(["--backends", "triton", "--out", out_dir])
got["triton_imported"] = sys.modules.get("triton") is not None
print("RESULT " + json.dumps(got))
'''


@pytest.fixture(scope="module")
def without_triton(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("no_triton")
    config = tmp / "config.json"
    config.write_text(json.dumps(TINY))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    # Fresh inputs every run; CCAM_TEST_SEED replays one (as conftest's seed fixture does).
    seed = int(os.environ.get("CCAM_TEST_SEED") or int.from_bytes(os.urandom(4), "little") >> 1)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(seed), str(config), str(tmp / "bench")],
                          capture_output=True, text=True, env=env, cwd=tmp, timeout=300)
    assert proc.returncode == 0, f"seed {seed}\n{proc.stdout}\n{proc.stderr}"
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), proc.stderr, tmp / "bench", seed


def test_the_package_imports_and_never_imports_triton(without_triton):
    got, _, _, _ = without_triton
    assert got["triton_module"] == "None" and got["triton_imported"] is False


def test_available_backends_omit_triton(without_triton):
    got, _, _, _ = without_triton
    assert "triton" not in got["backends"]
    assert got["backends"][-2:] == ["torch", "reference"]


def test_attention_matches_the_float64_oracle_with_every_gradient(without_triton):
    got, _, _, seed = without_triton
    assert set(got["attention"]) == {"torch", "reference", "auto"}
    for backend, errs in got["attention"].items():
        for name, err in errs.items():
            assert err <= 2e-5, f"{backend} {name}: {err} (seed {seed})"


def test_projector_matches_the_float64_oracle_with_every_gradient(without_triton):
    got, _, _, seed = without_triton
    assert set(got["projector"]) == {"torch", "auto"}
    for backend, errs in got["projector"].items():
        assert errs["out"] <= 1e-5 and errs["features"] <= 2e-5, (backend, errs, seed)
        assert errs["params"], "no parameter gradients compared"
        for name, err in errs["params"].items():
            if name == "attn.k_proj.bias":
                continue  # its exact gradient is zero (a constant shift of each softmax row)
            assert err <= 1e-4, f"{backend} {name}: {err} (seed {seed})"


def test_asking_for_triton_says_how_to_install_it(without_triton):
    got, _, _, _ = without_triton
    for where in ("attention", "projector"):
        message = got["errors"].get(where, "")
        assert message.startswith("RuntimeError: backend 'triton' cannot run here"), (where, message)
        assert 'pip install "ccam_kernels[triton]"' in message and "CUDA build of torch" in message


def test_ccam_bench_runs_and_notes_the_missing_triton(without_triton):
    got, stderr, out, _ = without_triton
    assert got["bench_rc"] == 0, stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["backend"] for r in rows} == {"reference", "torch"} and all(r["status"] == "ok" for r in rows)
    assert 'ccam-bench: no triton rows: triton is not installed: pip install "ccam_kernels[triton]"' in stderr
    # Asked for explicitly, triton is refused before any case runs, with the same hint.
    assert got["bench_triton_rc"] == 2
    assert "backends ['triton'] are not usable here" in stderr and 'pip install "ccam_kernels[triton]"' in stderr


def test_pyproject_makes_triton_an_extra_in_test():
    """`pip install .` pulls no triton; `.[triton]` and `.[test]` do (Linux x86_64 only)."""
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.split(";")[0].strip().startswith("triton")]
    marker = "triton; platform_system == 'Linux' and platform_machine == 'x86_64'"
    extras = project["optional-dependencies"]
    assert extras["triton"] == [marker] and marker in extras["test"]
