"""Write a file so that readers only ever see the old version or the complete new one."""

from __future__ import annotations

import contextlib
import os
import secrets


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
