"""Crash-safe file writes, shared by the device (state, feature cache) and the cloud (blobs,
registry files, the base's manifest, bundle archives)."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO


@contextmanager
def atomic_writer(path: Path, *, prefix: str = ".tmp-", suffix: str = "",
                  mode: int | None = None, gid: int | None = None,
                  sync_dir: bool = False) -> Iterator[BinaryIO]:
    """A binary handle whose contents replace ``path`` when the block ends without an error.

    A crash, or an exception in the block, leaves the old file (or none) and no temp file:
    the temp file (``prefix``/``suffix`` let a folder scan recognise stray ones) is written in
    the same folder, fsynced and renamed over ``path``. Its mode is ``mode`` (default 0600,
    ``mkstemp``'s), its group ``gid`` if given; ``sync_dir`` also fsyncs the folder so the
    rename itself survives a power loss.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            if gid is not None:
                os.fchown(handle.fileno(), -1, gid)
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir:
        fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes, *, prefix: str = ".tmp-", suffix: str = "",
                 mode: int | None = None, gid: int | None = None,
                 sync_dir: bool = False) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one
    (``atomic_writer``)."""
    with atomic_writer(path, prefix=prefix, suffix=suffix, mode=mode, gid=gid,
                       sync_dir=sync_dir) as handle:
        handle.write(data)


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
