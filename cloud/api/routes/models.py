"""Global adapter versions: list, get, lineage, and the adapter download (sha256 + ETag)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Response, status
from sqlalchemy.orm import Session

from cloud.api.deps import BlobsDep, OperatorDep, PageDep, SessionDep
from cloud.api.schemas import LineageEntry, Page, VersionPublic
from cloud.db import crud
from cloud.db.crud import RecordNotFoundError
from cloud.db.models import AdapterVersion
from shared.messages import INT64_MAX

router = APIRouter(prefix="/models", tags=["models"])
FRAME_MEDIA_TYPE = "application/vnd.fednano.codec-frame"


@router.get("", response_model=Page[VersionPublic])
def list_versions(session: SessionDep, _: OperatorDep, page: PageDep) -> dict:
    """Adapter versions, newest first."""
    return {"items": crud.list_adapter_versions(session, offset=page.offset, limit=page.limit),
            "total": crud.count_adapter_versions(session), "offset": page.offset,
            "limit": page.limit}


def _version(session: Session, version: str) -> AdapterVersion:
    """``version`` is an id or ``latest``."""
    found = (crud.latest_adapter_version(session) if version == "latest" else
             crud.get_adapter_version(session, version_id=int(version))
             if version.isascii() and version.isdigit() and int(version) <= INT64_MAX
             else None)
    if found is None:
        raise RecordNotFoundError("adapter version", version)
    return found


@router.get("/{version}", response_model=VersionPublic)
def get_version(version: str, session: SessionDep, _: OperatorDep) -> object:
    """One version (an id, or ``latest``)."""
    return _version(session, version)


@router.get("/{version}/lineage", response_model=list[LineageEntry])
def lineage(version: str, session: SessionDep, _: OperatorDep) -> list[LineageEntry]:
    """The updates merged into a version, with their weights λ_k = n_k / N."""
    row = _version(session, version)
    return [LineageEntry(update_id=u.update_id, device_id=u.device_id, n_samples=u.n_samples,
                         weight=w) for u, w in crud.version_lineage(session, version_id=row.id)]


@router.get("/{version}/adapter", response_class=Response,
            responses={200: {"content": {FRAME_MEDIA_TYPE: {}}}, 304: {}})
def download_adapter(version: str, session: SessionDep, _: OperatorDep, blobs: BlobsDep,
                     if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The adapter state as a ``shared.codec`` frame; ``X-Checksum-SHA256`` and a strong ETag
    carry its sha256 (304 when ``If-None-Match`` already names it)."""
    row = _version(session, version)
    etag = f'"{row.blob_sha256}"'
    headers = {"ETag": etag, "X-Checksum-SHA256": row.blob_sha256,
               "Content-Disposition": f'attachment; filename="adapter-v{row.id}.fnc"'}
    if if_none_match is not None and etag in [t.strip() for t in if_none_match.split(",")]:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(blobs.get(row.blob_sha256), media_type=FRAME_MEDIA_TYPE, headers=headers)
