"""JIT builds of C++ sources, done once per source state and shared safely: the folder scheme of
the CUDA emulation build (cuda_build.load_emulator) and of the native CPU build (cpu_native).

A build lives in ``extensions_root()`` (TORCH_EXTENSIONS_DIR, torch's extension folder) under a
name that ends in a hash of everything its binary depends on (``source_digest``): two
checkouts sharing one extensions folder share a binary exactly when their sources are the same.
``build_once`` makes that folder appear only complete: each builder compiles into a fresh
folder of its own and renames it into place (one atomic rename; when another builder got there
first, its folder is used and this one is dropped). So concurrent builders never load a
half-written binary, and no tree loads another tree's.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import sys
import tempfile
from typing import Callable, Iterable

__all__ = ["extensions_root", "source_digest", "build_once"]


def extensions_root() -> pathlib.Path:
    """Where torch.utils.cpp_extension puts a JIT build's folder: $TORCH_EXTENSIONS_DIR, else
    its per-user cache folder for this Python and accelerator (as torch names it)."""
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return pathlib.Path(os.environ["TORCH_EXTENSIONS_DIR"])
    accelerator = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip else
                   f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return pathlib.Path(get_default_build_root()) / f"{python}_{accelerator}"


def source_digest(root: pathlib.Path, files: Iterable[pathlib.Path], extra: Iterable[str]) -> str:
    """16 hex digits of a hash of ``files`` (each by its path relative to ``root`` and its bytes,
    in sorted order; never by the tree's path or the files' times: a copy of a tree keeps the
    times) and of the ``extra`` strings (flags, compiler, versions)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        data = path.read_bytes()
        digest.update(f"{path.relative_to(root).as_posix()}\0{len(data)}\0".encode() + data)
    digest.update("\0".join(extra).encode())
    return digest.hexdigest()[:16]


def build_once(name: str, filename: str, build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """The finished ``extensions_root() / name / filename``, built first when it is missing:
    ``build(folder)`` writes ``filename`` (and whatever else) into a fresh folder, which is
    then renamed to ``name`` (when another builder's finished folder is there by then, that
    one is kept and this one dropped). A library that ``build`` loaded from its folder stays
    mapped after the rename."""
    root = extensions_root()
    final = root / name
    library = final / filename
    if library.exists():
        return library
    root.mkdir(parents=True, exist_ok=True)
    fresh = pathlib.Path(tempfile.mkdtemp(prefix=f"{name}.building-", dir=root))
    try:
        build(fresh)
        try:
            os.rename(fresh, final)
        except OSError:
            if not library.exists():  # not another builder's finished folder: something else is wrong
                raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)  # gone already when the rename succeeded
    return library
