"""Atomic file writes: write a temporary file next to the destination, flush it to disk, rename it over."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a fresh temporary file in the destination's folder, fsync it, and rename it
    to ``path``; on any failure (including KeyboardInterrupt) the temporary file is removed and an existing
    ``path`` is left untouched."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):  # else mkstemp's error would name the temporary file, not the destination
        raise FileNotFoundError(f"cannot write {path}: the folder {directory} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=".linadapt-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _file_mode(path: str) -> int:
    """The mode the written file gets: an existing file's, else what ``open`` would give (0o666 minus the
    umask) — mkstemp's private 0o600 would make reports and models unreadable to others."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)

    atomic_write(path, write)
