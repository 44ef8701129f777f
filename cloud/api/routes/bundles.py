"""NanoEdge bundle downloads (when ``FEDNANO_BUNDLE_DIR`` is set): manifest, files, archive.

Devices fetch these with their config's ``bundle_url`` (``.../bundles/latest``, the newest
bundle's tar); every file download carries its sha256 from the manifest.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse

from cloud.api.deps import SettingsDep
from cloud.api.schemas import BundlePublic
from cloud.bundle_catalog import BundleEntry, bundle_file, find_bundle, list_bundles
from cloud.settings import CloudSettings
from shared.bundle import sha256_file

router = APIRouter(prefix="/bundles", tags=["bundles"])


def _root(settings: CloudSettings) -> Path:
    if settings.bundle_dir is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "no bundle folder is configured "
                            "(FEDNANO_BUNDLE_DIR)")
    return settings.bundle_dir


def _public(entry: BundleEntry) -> BundlePublic:
    m = entry.manifest
    return BundlePublic(bundle_version=m.bundle_version, base_version=m.base_version,
                        precision=m.precision, created_at=m.created_at,
                        files={n: r.model_dump() for n, r in m.files.items()},
                        archive=entry.archive is not None)


@router.get("", response_model=list[BundlePublic])
def list_all(settings: SettingsDep) -> list[BundlePublic]:
    """Exported bundles, newest first (public: devices download them)."""
    return [_public(e) for e in list_bundles(_root(settings))]


@router.get("/{version}", response_class=FileResponse)
def archive(version: str, settings: SettingsDep) -> FileResponse:
    """The bundle's tar (``latest``: the newest), with its sha256."""
    entry = find_bundle(_root(settings), version)
    if entry.archive is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"bundle {version} has no archive: "
                            "export it with --archive or fetch its files one by one")
    digest = sha256_file(entry.archive)
    return FileResponse(entry.archive, media_type="application/x-tar",
                        filename=entry.archive.name,
                        headers={"X-Checksum-SHA256": digest, "ETag": f'"{digest}"'})


@router.get("/{version}/files/{name}", response_class=FileResponse)
def file(version: str, name: str, settings: SettingsDep) -> FileResponse:
    """One file of a bundle (``manifest.json`` lists the others with their sha256)."""
    path, digest = bundle_file(find_bundle(_root(settings), version), name)
    headers = {"X-Checksum-SHA256": digest, "ETag": f'"{digest}"'} if digest else {}
    return FileResponse(path, filename=name, headers=headers)
