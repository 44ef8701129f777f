"""Fetch a NanoEdge bundle archive by URL, check its sha256, unpack it in place of the old one.

``fednano-edge fetch-bundle URL --sha256 HEX --dest DIR``: the archive (the cloud's
``<bundle_version>.tar``) is streamed to a temp file next to ``DIR`` while hashing, with a size
cap; a digest other than the one given refuses it before anything is unpacked. Unpacking goes
through ``shared.bundle.unpack_bundle``, which refuses links and nested paths, verifies every
file against the manifest and only then moves the folder to ``DIR``. http(s):// and file://
URLs; the expected sha256 comes from the operator (the cloud's bundle listing), not from the
server that serves the bytes.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import urlsplit

from shared.bundle import BundleError, BundleManifest, read_manifest, unpack_bundle

SCHEMES = ("http", "https", "file")
DEFAULT_MAX_BYTES = 1024 * 2**20
_CHUNK = 1 << 20
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class FetchError(BundleError):
    """The bundle could not be downloaded, or is not the one asked for; nothing was installed."""


Progress = Callable[[int, "int | None"], None]  # (bytes received, total size if announced)


def fetch_bundle(url: str, sha256: str, dest: Path, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 timeout_s: float = 60.0, progress: Progress | None = None) -> BundleManifest:
    """Download the archive at ``url``, check ``sha256``, unpack and verify it into ``dest``.

    ``progress(received, total)`` is called after every chunk (``total``: the announced
    Content-Length, or None).
    """
    expected = sha256.strip().lower()
    if not _SHA256.match(expected):
        raise ValueError(f"sha256 must be 64 hex digits, got {sha256!r}")
    if urlsplit(url).scheme not in SCHEMES:
        raise ValueError(f"URL scheme must be one of {list(SCHEMES)}, got {url!r}")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.download-")
    try:
        with os.fdopen(fd, "wb") as out:
            digest = _download(url, out, max_bytes, timeout_s, progress)
        if digest != expected:
            raise FetchError(f"sha256 mismatch for {url}: expected {expected}, got {digest}; "
                             "nothing was installed")
        unpack_bundle(Path(tmp), dest)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return read_manifest(dest)


def _download(url: str, out: BinaryIO, max_bytes: int, timeout_s: float,
              progress: Progress | None = None) -> str:
    """Stream ``url`` into ``out`` (a binary file); returns the hex sha256 of what came."""
    digest, size = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # schemes checked
            total = _announced_size(response)
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise FetchError(f"{url} is larger than the limit of {max_bytes:,} bytes")
                digest.update(chunk)
                out.write(chunk)
                if progress is not None:
                    progress(size, total)
    except OSError as err:  # URLError, HTTPError, timeouts, missing files
        raise FetchError(f"cannot download {url}: {err}") from err
    return digest.hexdigest()


def _announced_size(response: object) -> int | None:
    length = getattr(response, "headers", {}).get("Content-Length")
    return int(length) if length is not None and str(length).isdigit() else None
