"""Content-addressed blob storage on disk: received updates and adapter versions.

A blob lives at ``root/ab/cdef...`` named by the SHA-256 of its bytes, written atomically (a
temp file renamed into place), so storing the same bytes twice is a no-op and a half-written
file is never visible. Reading checks the digest again: a corrupted file is an error, not data.
Several blobs stored together (``store``: one batch of received updates) are fsynced
concurrently: on ext4 one journal commit then covers many files instead of one commit each.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# Threads that fsync one batch's files at once (the GIL is released during fsync).
SYNC_THREADS = 16
_SHA256_HEX = re.compile("[0-9a-f]{64}")


class BlobIntegrityError(RuntimeError):
    """A stored blob is missing or no longer matches its SHA-256."""


@dataclass(frozen=True)
class Blob:
    """Where a blob was stored and what it is."""

    sha256: str
    size: int
    path: Path


class BlobStore:
    """SHA-256-addressed files under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._temp_names = itertools.count()

    def path_of(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        if not (isinstance(sha256, str) and _SHA256_HEX.fullmatch(sha256)):
            raise ValueError(f"expected a lowercase hex sha256, got {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def address(self, data: bytes) -> Blob:
        """Where ``data`` is stored, or will be once ``store``d (nothing is written)."""
        digest = hashlib.sha256(data).hexdigest()
        return Blob(digest, len(data), self.path_of(digest))

    def put(self, data: bytes) -> Blob:
        """Store ``data`` (once); returns its digest, size and path."""
        blob = self.address(data)
        self.store([(blob, data)])
        return blob

    def store(self, blobs: Sequence[tuple[Blob, bytes]]) -> None:
        """Write every blob not stored yet (``address`` gave each ``Blob``), all durable when
        this returns: each to a temp file in its folder, fsynced (together, see the module
        docstring), then renamed into place. On an error no temp file is left behind; the
        blobs already renamed stay, which storing them again finds."""
        todo = {blob.path: data for blob, data in blobs if not blob.path.exists()}
        temps: list[tuple[int, Path, Path]] = []  # (fd, temp file, final path)
        try:
            for path, data in todo.items():
                temps.append((*self._write_temp(path, data), path))
            _fsync_all([fd for fd, _, _ in temps])
            for _, temp, path in temps:
                os.replace(temp, path)
        finally:
            for fd, temp, _ in temps:
                os.close(fd)
                temp.unlink(missing_ok=True)

    def _write_temp(self, path: Path, data: bytes) -> tuple[int, Path]:
        """``data`` in a new temp file beside ``path``, not yet fsynced: (fd, temp file)."""
        fd, temp = self._open_temp(path)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            temp.unlink(missing_ok=True)
            raise
        return fd, temp

    def _open_temp(self, path: Path) -> tuple[int, Path]:
        """A new temp file beside ``path``, named by process and counter (``O_EXCL``: never
        another's file) rather than by ``tempfile.mkstemp``, whose random names cost more
        than the write at this rate; the folder is made when missing."""
        while True:
            temp = path.parent / f".{path.name[:8]}.{os.getpid()}.{next(self._temp_names)}"
            try:
                return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), temp
            except FileExistsError:  # left by an earlier process with this pid
                continue
            except FileNotFoundError:
                if path.parent.is_dir():
                    raise
                path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, sha256: str) -> bytes:
        """The blob's bytes, checked against its digest; ``BlobIntegrityError`` otherwise."""
        path = self.path_of(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise BlobIntegrityError(f"blob {sha256[:12]} is missing from {self.root}") from None
        if hashlib.sha256(data).hexdigest() != sha256:
            raise BlobIntegrityError(f"blob {sha256[:12]} at {path} does not match its sha256")
        return data


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _fsync_all(fds: Sequence[int]) -> None:
    """fsync every descriptor; several at once from one process-wide pool of threads."""
    global _pool
    if len(fds) <= 1:
        for fd in fds:
            os.fsync(fd)
        return
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(SYNC_THREADS, thread_name_prefix="blob-fsync")
    list(_pool.map(os.fsync, fds))
