"""Atomic file writes: a temporary file in the same folder, flushed to disk, then renamed over the target.

A reader (or a crash) sees the old file or the new one, never half of either.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, IO


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


class UnwritablePath(ValueError):
    """A folder the product must write to and cannot; the message names it and the reason."""


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a folder (or file) that cannot be made or written, writing nothing to find out: the
    nearest part of the path that exists must be a folder this process may write in."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe != path and not probe.is_dir():
        raise UnwritablePath(f"{path}: cannot be made, {probe} is a file")
    if not os.access(probe, os.W_OK | (os.X_OK if probe.is_dir() else 0)):
        where = "" if probe == path else f", {probe} is not writable"
        raise UnwritablePath(f"{path}: cannot write there (permission denied or a read-only file system{where})")
    return path
