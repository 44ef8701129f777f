"""Crash-safe file writes, shared by the device (state, feature cache) and the cloud (blobs)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path, data: bytes, *, prefix: str = ".tmp-", suffix: str = "",
                 sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one.

    A temp file (``prefix``/``suffix`` let a folder scan recognise stray ones) in the same
    folder is written, fsynced and renamed over ``path``; ``sync_dir`` also fsyncs the folder
    so the rename itself survives a power loss.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable (POSIX; a no-op where folders can't open)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
