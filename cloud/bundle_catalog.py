"""Exported NanoEdge bundles on disk (``fednano bundle export --out DIR``), for downloads.

``DIR/<bundle_version>/`` holds a bundle's files and its ``manifest.json`` (sha256 and size of
every file); ``DIR/<bundle_version>.tar`` is its archive when one was written. Only folders
whose manifest validates are listed; file names are checked against the manifest, so a request
can never reach outside a bundle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from shared.bundle import MANIFEST_NAME, VERSION_PATTERN, BundleError, BundleManifest, read_manifest


class BundleNotFoundError(LookupError):
    """No such bundle, or no such file in it."""


@dataclass(frozen=True)
class BundleEntry:
    """One exported bundle: its folder, manifest and (optional) archive."""

    folder: Path
    manifest: BundleManifest

    @property
    def archive(self) -> Path | None:
        path = self.folder.with_suffix(".tar")
        return path if path.is_file() else None


def list_bundles(root: Path) -> list[BundleEntry]:
    """Valid bundles under ``root``, newest (by manifest ``created_at``) first."""
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.is_dir() and re.fullmatch(VERSION_PATTERN, folder.name):
            try:
                entries.append(BundleEntry(folder, read_manifest(folder)))
            except BundleError:
                continue  # a half-written or foreign folder is simply not offered
    return sorted(entries, key=lambda e: e.manifest.created_at, reverse=True)


def find_bundle(root: Path, version: str) -> BundleEntry:
    """The bundle ``version`` (or the newest for ``"latest"``); ``BundleNotFoundError``."""
    entries = list_bundles(root)
    if version == "latest" and entries:
        return entries[0]
    for entry in entries:
        if entry.manifest.bundle_version == version:
            return entry
    raise BundleNotFoundError(f"no bundle {version!r} in {root}")


def bundle_file(entry: BundleEntry, name: str) -> tuple[Path, str]:
    """A file of the bundle and its sha256 (from the manifest); ``manifest.json`` too."""
    if name == MANIFEST_NAME:
        return entry.folder / MANIFEST_NAME, ""
    record = entry.manifest.files.get(name)
    if record is None:
        raise BundleNotFoundError(f"bundle {entry.manifest.bundle_version} has no file {name!r}")
    return entry.folder / name, record.sha256
