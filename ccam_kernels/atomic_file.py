"""Write a file so that readers only ever see the old version or the complete new one; write
several files so that readers who check them see the old set, the new set, or an error."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from typing import Callable, Dict


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on any error
    it is deleted and ``path`` is left as it was.

    The temporary file lives in the same directory because ``os.replace`` is atomic only
    within one file system. It is created with mode 0o666 so the umask applies as it would to
    a plain ``open`` (tempfile.mkstemp would leave the checkpoint readable by its owner only),
    and fsynced before the rename, so a crash right after cannot leave an empty file behind.
    Nesting two of these stages both files: neither replaces its target until both are written.
    """
    path = os.path.abspath(os.fspath(path))
    directory, name = os.path.split(path)
    tmp = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = os.stat(tmp).st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer that recreates the file (safetensors does) may narrow it
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- several files as one ---------------------------------------------------------------------
#
# One rename is atomic; two are not. A checkpoint (config.json and its weights) written by two
# renames could be caught between them, holding new weights with the old config, which loads
# silently with, say, the old activation. So a set of files written together carries a
# manifest: for each file the size and SHA-256 of the new content and of the content it
# replaces. The manifest is renamed into place before the files, and a reader refuses a file
# that still holds the replaced content: every moment of a save then reads as the old set, the
# new set, or an error. A file that holds neither was changed by hand after the save (an edited
# config.json) and is read as it is. Swapping a whole folder instead would need the parent
# directory to be writable and the folder not to be a mount point (a container's output volume
# is one), and would have to carry over the user's other files; the manifest needs neither.

MANIFEST_FILE = "ccam_manifest.json"
MANIFEST_FORMAT = "ccam_kernels files written together, v1"


def _digest_or_none(path: str):
    return _digest(path) if os.path.isfile(path) else None


def _digest(path: str) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"bytes": os.path.getsize(path), "sha256": sha.hexdigest()}


def _listed(directory: str) -> dict:
    """{name: {"new": digest, "replaces": digest or None}} of the manifest in ``directory``; {}
    without one. A manifest that cannot be read is a ValueError: it is ours, written
    atomically, so it was changed by hand."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
        ok = isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT
        files = manifest.get("files") if ok else None
        why = None if isinstance(files, dict) else f"not a {MANIFEST_FORMAT!r} manifest"
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        why = str(exc)
    if why is not None:
        raise ValueError(f"checkpoint {directory!r} is not whole: its {MANIFEST_FILE} cannot be read ({why}); "
                         f"save the checkpoint again, or delete {MANIFEST_FILE} to load the files as they are")
    return files


def write_together(directory, writers: Dict[str, Callable[[str], None]]) -> None:
    """Write the files ``{name: writer}`` of ``directory`` (each ``writer(tmp_path)`` writes one)
    so that :func:`check_together` sees the old files, the new ones, or an error, never a mix.

    Steps: every file is staged beside its target (``atomic_path``); files that the previous
    manifest listed and this save does not write are deleted (a stale ``pytorch_model.bin``
    would otherwise be read instead of a new ``model.safetensors``); the new manifest replaces
    the old one; then each file replaces its target. A failure before the manifest's rename
    leaves the old set; after it, the files not yet renamed still hold the content the manifest
    says they replace, which ``check_together`` refuses."""
    directory = os.path.abspath(os.fspath(directory))
    old = _listed(directory)
    with contextlib.ExitStack() as stack:
        # Exit order is the reverse of entry: the manifest, entered last, is renamed first.
        staged = {name: stack.enter_context(atomic_path(os.path.join(directory, name))) for name in writers}
        for name, write in writers.items():
            write(staged[name])
        digests = {name: {"new": _digest(tmp), "replaces": _digest_or_none(os.path.join(directory, name))}
                   for name, tmp in staged.items()}
        for name in sorted(set(old) - set(writers)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))
        manifest_tmp = stack.enter_context(atomic_path(os.path.join(directory, MANIFEST_FILE)))
        with open(manifest_tmp, "w", encoding="utf-8") as f:
            json.dump({"format": MANIFEST_FORMAT, "files": digests}, f, indent=2, sort_keys=True)
            f.write("\n")
    _fsync_directory(directory)


def listed_files(directory) -> set:
    """Names of the files the manifest in ``directory`` lists (empty without one)."""
    return set(_listed(os.path.abspath(os.fspath(directory))))


def check_together(directory, names) -> None:
    """Raise ValueError if one of ``names`` (files of ``directory`` about to be read) still holds
    the content that its manifest says the last save replaced: that save stopped between the
    manifest's rename and this file's. No manifest: no check (a checkpoint written by other
    tools); a file the manifest does not list, or that holds neither the new nor the replaced
    content (edited by hand since), is the user's own and is read as it is."""
    directory = os.path.abspath(os.fspath(directory))
    listed = _listed(directory)
    for name in names:
        entry = listed.get(name)
        if not isinstance(entry, dict) or not entry.get("replaces"):
            continue  # not ours, or nothing was replaced: no old content to mix in
        now = _digest_or_none(os.path.join(directory, name))
        if now == entry["replaces"] and now != entry.get("new"):
            raise ValueError(
                f"checkpoint {directory!r} is not whole: {name} is still the file that the last "
                f"save_pretrained replaced, while its {MANIFEST_FILE} and maybe other files are that save's (it "
                f"was interrupted); save the checkpoint again, or delete {MANIFEST_FILE} to load the files "
                f"as they are")


def _fsync_directory(directory: str) -> None:
    """Make the renames durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
