"""Content-addressed blob storage on disk: received updates and adapter versions.

A blob lives at ``root/ab/cdef...`` named by the SHA-256 of its bytes, written atomically (a
temp file renamed into place), so storing the same bytes twice is a no-op and a half-written
file is never visible. Reading checks the digest again: a corrupted file is an error, not data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from shared.files import atomic_write


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

    def path_of(self, sha256: str) -> Path:
        """Where the blob with this digest lives (whether or not it exists)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"expected a lowercase hex sha256, got {sha256!r}")
        return self.root / sha256[:2] / sha256[2:]

    def put(self, data: bytes) -> Blob:
        """Store ``data`` (once); returns its digest, size and path."""
        digest = hashlib.sha256(data).hexdigest()
        path = self.path_of(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data, prefix=f".{path.name[:8]}.")
        return Blob(digest, len(data), path)

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
