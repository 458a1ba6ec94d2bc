"""Writing files so that a kill at any moment leaves the old file or the new one, never half of one.

Every file cadence writes into a run folder (checkpoints, recipe.yaml, metrics.jsonl rewrites,
exported weights) and every file ``cadence prepare`` writes goes through :func:`write_atomic`.
Torch-free.
"""

from __future__ import annotations

import errno
import os
import tempfile
from typing import BinaryIO, Callable

TMP_PREFIX = ".tmp-"  # write_atomic's temporary files; a kill mid-write can leave one
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # (read once: files written atomically get the usual 0o666 & ~umask, not mkstemp's 0o600)


def write_atomic(path: str, write: Callable[[BinaryIO], object], *, durable: bool = True,
                 suffix: str | None = None) -> None:
    """Call ``write(f)`` on a temporary file in ``path``'s folder, then rename it over ``path``.

    ``durable``: fsync the file before the rename and the folder after it, so that after a power cut
    the previous file stays until the new one is complete on disk. Without it (``cadence prepare``'s
    image copies, synced once with ``os.sync()`` before their manifest) a crash still never exposes
    half a file under ``path``. A failed write (disk full, no permission) raises ``OSError`` naming
    ``path``, with the previous file untouched and no temporary file left. ``suffix``: the temporary
    file's (default: ``path``'s extension; ``cadence prepare`` uses one no image loader lists)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=os.path.splitext(path)[1] if suffix is None else suffix,
                                   dir=folder)
        os.chmod(tmp, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            _fsync_folder(folder)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(text: str, path: str) -> None:
    """``text`` (UTF-8) to ``path``, durably (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that can't sync folders
            raise
    finally:
        os.close(fd)


def remove_partial(folder: str) -> list[str]:
    """Delete what a killed :func:`write_atomic` left behind in ``folder`` (``.tmp-*`` files, never
    complete ones); returns their names."""
    if not os.path.isdir(folder):
        return []
    left = sorted(f for f in os.listdir(folder) if f.startswith(TMP_PREFIX))
    for name in left:
        os.unlink(os.path.join(folder, name))
    return left
