"""Every ```python block of README.md and docs/*.md runs as written (issue 24 item 6), in order,
one namespace per document, in a fresh folder: a block defines what it uses or takes it from
an earlier block of its page. Only the sizes change: SHRINK turns Video-CCAM v1.2 shapes into
small ones (each rule must still match somewhere, so a block cannot drift out of the test), and
torch.compile captures with backend="eager" (the graph and its guards, not Inductor's code
generation: tests/test_modes.py compiles for real). Blocks fenced ```python gpu need CUDA and run
in the gpu test only."""

from __future__ import annotations

import pathlib
import re
import socket

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python( gpu)?\n(.*?)^```", re.S | re.M)
SMALL = dict(num_query=24, hidden_size=32, cross_hidden_size=24, num_heads=4, num_key_value_heads=2,
             intermediate_size=48, output_size=40)
SHRINK = [
    ("N, H, Hkv, D, P = 1024, 16, 16, 64, 729", "N, H, Hkv, D, P = 48, 4, 2, 16, 5"),
    ("CCAMConfig()", "CCAMConfig(**SMALL)"),
    ("729, 1152", "5, 24"),
    ("P, Cv = 729,", "P, Cv = 5,"),
    ("torch.compile(proj,", 'torch.compile(proj, backend="eager",'),
]


def _blocks(doc: pathlib.Path):
    """(gpu, code, line) of each python block."""
    text = doc.read_text(encoding="utf-8")
    return [(bool(m.group(1)), m.group(2), text[:m.start()].count("\n") + 1) for m in FENCE.finditer(text)]


WITH_BLOCKS = [doc for doc in DOCS if _blocks(doc)]


def _shrink(code: str, used: set) -> str:
    for old, new in SHRINK:
        if old in code:
            used.add(old)
            code = code.replace(old, new)
    return code


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_doc(doc, tmp_path, monkeypatch, gpu: bool, used: set):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CCAM_CUDA_EMULATE", raising=False)  # a block may set it: undone afterwards
    # A block that starts a process group gets a group of one (torchrun sets these).
    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    namespace = {"SMALL": SMALL, "__name__": "__doc_block__"}
    ran = 0
    try:
        for needs_gpu, code, line in _blocks(doc):
            if needs_gpu and not gpu:
                continue
            try:
                exec(compile(_shrink(code, used), f"{doc.relative_to(ROOT)}:{line}", "exec"), namespace)
            except Exception as exc:
                raise AssertionError(f"{doc.relative_to(ROOT)}, the block at line {line}: "
                                     f"{type(exc).__name__}: {exc}") from exc
            ran += 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return ran


USED: set = set()


@pytest.mark.parametrize("doc", WITH_BLOCKS, ids=[str(d.relative_to(ROOT)) for d in WITH_BLOCKS])
def test_python_blocks_run_as_written(doc, tmp_path, monkeypatch):
    if doc.name == "huggingface.md":
        pytest.importorskip("transformers", reason="the [hf] extra (part of [test])")
    ran = _run_doc(doc, tmp_path, monkeypatch, gpu=False, used=USED)
    assert ran >= 1 or all(gpu for gpu, _, _ in _blocks(doc))


def test_every_shrink_rule_still_matches_a_block():
    used = set()
    for doc in WITH_BLOCKS:
        for _, code, _ in _blocks(doc):
            _shrink(code, used)
    assert used == {old for old, _ in SHRINK}, f"unused: {[o for o, _ in SHRINK if o not in used]}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("doc", [d for d in WITH_BLOCKS if any(g for g, _, _ in _blocks(d))],
                         ids=lambda d: str(d.relative_to(ROOT)))
def test_gpu_blocks_run_as_written(doc, tmp_path, monkeypatch):
    assert _run_doc(doc, tmp_path, monkeypatch, gpu=True, used=set()) >= 1
