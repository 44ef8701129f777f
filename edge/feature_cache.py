"""The device's feature cache: visual tokens per local image, for one bundle version, on disk.

The encoder and connector are frozen, so a device computes each local image's visual tokens
(V, d) once per bundle and reuses them every round; only the adapters run per step. Entries
are keyed by the image's *content* hash (mode, size, pixels), so a renamed file still hits and
an edited one misses. Layout::

    <root>/<bundle_version>/.fednano-feature-cache   marker: this folder is ours
    <root>/<bundle_version>/<ab>/<abcdef...>.safetensors   {"tokens": (V, d)} + metadata

Opening the cache for a new bundle version deletes the folders of other versions (only ones
carrying the marker): their tokens came from another encoder. Writes go to a temp file in the
same folder, are fsynced and renamed, so a crash leaves a complete entry or none; leftover
temp files and unreadable entries are dropped. The cache is bounded by bytes and entries
(the profile's ``feature_cache`` section): the least recently used entries go first, and use
is the file's mtime, so the order survives restarts. One process per cache folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from shared.files import atomic_write

if TYPE_CHECKING:
    from edge.profiles import FeatureCacheSettings

log = logging.getLogger(__name__)

MARKER_NAME = ".fednano-feature-cache"
TENSOR_NAME = "tokens"
SUFFIX = ".safetensors"
_TMP_PREFIX = ".tmp-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

ImageLoader = Callable[[str], Image.Image]  # image key -> PIL image
Encoder = Callable[[Sequence[Image.Image]], torch.Tensor]  # images -> (B, V, d)


def image_digest(image: Image.Image) -> str:
    """sha256 of an image's mode, size and pixels: the cache key."""
    digest = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    dropped: int = 0  # unreadable entries removed


class FeatureCache:
    """Visual tokens (V, d) per image content hash for one bundle version, bounded, on disk."""

    def __init__(
        self, root: Path, bundle_version: str, *, max_bytes: int = 1024 * 2**20,
        max_entries: int = 100_000, dtype: torch.dtype = torch.float32,
    ) -> None:
        if not _NAME.match(bundle_version):
            raise ValueError(f"bundle_version must be a plain folder name, got {bundle_version!r}")
        if max_bytes < 1 or max_entries < 1:
            raise ValueError(f"limits must be >= 1, got max_bytes={max_bytes!r}, "
                             f"max_entries={max_entries!r}")
        if dtype not in (torch.float32, torch.float16):
            raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype!r}")
        self.root = Path(root)
        self.bundle_version = bundle_version
        self.directory = self.root / bundle_version
        self.max_bytes, self.max_entries, self.dtype = max_bytes, max_entries, dtype
        self.stats = CacheStats()
        self._entries: OrderedDict[str, int] = OrderedDict()  # digest -> bytes, oldest first
        self._drop_stale_versions()
        self._open()

    @classmethod
    def from_settings(
        cls, settings: FeatureCacheSettings, state_dir: Path, bundle_version: str,
    ) -> FeatureCache:
        """A cache with a device profile's folder (relative to ``state_dir``) and limits."""
        root = settings.dir if settings.dir.is_absolute() else Path(state_dir) / settings.dir
        return cls(root, bundle_version, max_bytes=settings.max_mib * 2**20,
                   max_entries=settings.max_entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: object) -> bool:
        return digest in self._entries

    @property
    def size_bytes(self) -> int:
        return sum(self._entries.values())

    # -------------------------------------------------------------------------- opening

    def _drop_stale_versions(self) -> None:
        if not self.root.is_dir():
            return
        for folder in self.root.iterdir():
            if folder.name != self.bundle_version and (folder / MARKER_NAME).is_file():
                log.info("feature cache: dropping %s (bundle changed to %s)", folder.name,
                         self.bundle_version)
                shutil.rmtree(folder)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / MARKER_NAME).write_text(self.bundle_version + "\n", encoding="utf-8")
        found: list[tuple[int, str, int]] = []  # (mtime_ns, digest, size)
        for path in self.directory.glob(f"*/*{SUFFIX}"):
            if path.name.startswith(_TMP_PREFIX) or not _DIGEST.match(path.stem):
                path.unlink(missing_ok=True)  # a write interrupted by a crash
                continue
            stat = path.stat()
            found.append((stat.st_mtime_ns, path.stem, stat.st_size))
        for _, digest, size in sorted(found):
            self._entries[digest] = size
        self._evict()

    def _path(self, digest: str) -> Path:
        if not _DIGEST.match(digest):
            raise ValueError(f"digest must be 64 lowercase hex characters, got {digest!r}")
        return self.directory / digest[:2] / f"{digest}{SUFFIX}"

    # ------------------------------------------------------------------------ get / put

    def get(self, digest: str) -> torch.Tensor | None:
        """The cached (V, d) float32 tokens of ``digest``, or None (and marks it recently used)."""
        path = self._path(digest)
        if digest not in self._entries:
            return None
        tokens = self._read(path)
        if tokens is None:
            self._forget(digest)
            self.stats.dropped += 1
            return None
        os.utime(path)
        self._entries.move_to_end(digest)
        return tokens

    def _read(self, path: Path) -> torch.Tensor | None:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                tokens = handle.get_tensor(TENSOR_NAME)
        except (OSError, SafetensorError) as err:
            log.warning("feature cache: unreadable entry %s (%s); dropping it", path.name, err)
            return None
        if metadata.get("bundle_version") != self.bundle_version or tokens.dim() != 2:
            log.warning("feature cache: %s is not a (V, d) entry of bundle %s; dropping it",
                        path.name, self.bundle_version)
            return None
        return tokens.float()

    def put(self, digest: str, tokens: torch.Tensor) -> None:
        """Store (V, d) ``tokens`` for ``digest`` (atomic write), then enforce the limits."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (V, d), got shape {tuple(tokens.shape)}")
        if not bool(torch.isfinite(tokens).all()):
            raise ValueError("tokens contain NaN or Inf; refusing to cache them")
        path = self._path(digest)
        data = save({TENSOR_NAME: tokens.detach().to(self.dtype).contiguous()},
                    metadata={"bundle_version": self.bundle_version, "digest": digest})
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data, prefix=_TMP_PREFIX, suffix=SUFFIX)
        self._entries[digest] = len(data)
        self._entries.move_to_end(digest)
        self._evict()

    def _evict(self) -> None:
        total = self.size_bytes
        while self._entries and (total > self.max_bytes or len(self._entries) > self.max_entries):
            digest, size = next(iter(self._entries.items()))
            self._forget(digest)
            total -= size
            self.stats.evictions += 1

    def _forget(self, digest: str) -> None:
        self._entries.pop(digest, None)
        self._path(digest).unlink(missing_ok=True)

    def clear(self) -> None:
        """Remove every entry of this bundle version."""
        for digest in list(self._entries):
            self._forget(digest)

    # --------------------------------------------------------------------------- lookup

    def lookup(
        self, keys: Sequence[str], load_image: ImageLoader, encode: Encoder, *,
        batch_size: int = 8, progress: bool = False,
    ) -> torch.Tensor:
        """Visual tokens (N, V, d) of the images behind ``keys``; misses are encoded and stored.

        Every call loads the images to hash them (a 64 px PNG: well under a millisecond), so
        an image changed on disk is never served stale tokens.
        """
        if not keys:
            raise ValueError("lookup needs at least one key, got an empty sequence")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        found: dict[str, torch.Tensor] = {}
        digests, missing = [], {}
        for key in keys:
            image = load_image(key)
            digest = image_digest(image)
            digests.append(digest)
            if digest in found or digest in missing:
                continue
            tokens = self.get(digest)
            if tokens is None:
                missing[digest] = image
            else:
                found[digest] = tokens
        self.stats.hits += len(found)
        self.stats.misses += len(missing)
        found.update(self._encode(missing, encode, batch_size, progress))
        return torch.stack([found[d] for d in digests])  # (N, V, d)

    def _encode(
        self, images: dict[str, Image.Image], encode: Encoder, batch_size: int, progress: bool,
    ) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        digests = list(images)
        bar = tqdm(total=len(digests), desc="visual tokens", unit="img",
                   disable=not progress or not digests)
        with bar:
            for start in range(0, len(digests), batch_size):
                chunk = digests[start:start + batch_size]
                tokens = encode([images[d] for d in chunk])  # (b, V, d)
                if tokens.dim() != 3 or tokens.shape[0] != len(chunk):
                    raise ValueError(f"encode returned shape {tuple(tokens.shape)} for "
                                     f"{len(chunk)} images; expected ({len(chunk)}, V, d)")
                for digest, row in zip(chunk, tokens, strict=True):
                    self.put(digest, row)
                    out[digest] = row.to(self.dtype).float()  # what a later get() returns
                bar.update(len(chunk))
        return out

    def visual_lookup(
        self, load_image: ImageLoader, encode: Encoder, *, batch_size: int = 8,
    ) -> Callable[[Sequence[str]], torch.Tensor]:
        """A ``shared.batches.VisualLookup`` (image keys -> (N, V, d)) backed by this cache."""
        def lookup(keys: Sequence[str]) -> torch.Tensor:
            return self.lookup(keys, load_image, encode, batch_size=batch_size)

        return lookup
