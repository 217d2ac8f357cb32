"""ccam-bench's --out check, run before any case so a long run never dies at its first write."""

from __future__ import annotations

import os
import tempfile


def check_out_dir(path: str) -> None:
    """Make sure results can be written into folder ``path``; raise ValueError saying why not.

    ``path`` may exist (a folder; earlier results in it are replaced) or be new, in which case
    it is created now, but only inside an existing folder: a missing parent is most likely a
    typo, and the run would otherwise scatter results into a tree nobody asked for.
    Writability is probed by creating a file, not with os.access, which answers yes for root
    even where writes fail (read-only mounts).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--out {path!r} is an existing file; expected a folder (existing or new)")
    if not os.path.isdir(path):
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise ValueError(f"--out {path!r}: its parent folder {parent!r} does not exist")
        try:
            os.mkdir(path)
        except OSError as exc:
            raise ValueError(f"--out {path!r} cannot be created: {exc.strerror or exc}") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"--out {path!r} is not writable: {exc.strerror or exc}") from None
