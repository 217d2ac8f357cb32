"""Module layering: long_video builds on the projector, never the other way round. The
projector's own steps (query side, feature norm + K/V projection, the head after the
attention) live in projector.py; its long-video entry points (forward(group=), stream()) only
hand over to long_video where they are called, so importing the projector loads no long-video
code and no long-video module needs the projector's file to hold anything but the module."""

import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1] / "ccam_kernels"


def _module_level_imports(path: pathlib.Path) -> set[str]:
    """The modules a file imports at its top level (TYPE_CHECKING blocks excluded)."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_projector_imports_no_long_video_module_at_load():
    imports = _module_level_imports(PKG / "projector.py")
    assert not [name for name in imports if "long_video" in name], imports
    code = "import sys, ccam_kernels; print(sorted(m for m in sys.modules if 'long_video' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


def test_long_video_uses_the_projectors_own_steps():
    assert not (PKG / "long_video" / "parts.py").exists()
    for path in (PKG / "long_video").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        for step in ("layer_norm(", "linear(", "q_proj(", "k_proj(", "o_proj(", "mlp("):
            assert step not in text, f"{path.name} recomputes a projector step ({step})"
