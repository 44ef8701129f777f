"""Updates across rounds, newest first: e.g. every rejected update with its reason."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.deps import OperatorDep, PageDep, SessionDep
from cloud.api.schemas import Page, UpdatePublic
from cloud.db import crud
from cloud.db.models import UpdateStatus
from shared.identity import DEVICE_ID_MAX_LENGTH

router = APIRouter(prefix="/updates", tags=["updates"])


@router.get("", response_model=Page[UpdatePublic])
def list_updates(session: SessionDep, _: OperatorDep, page: PageDep,
                 status: Annotated[UpdateStatus | None, Query()] = None,
                 device_id: Annotated[str | None, Query(max_length=DEVICE_ID_MAX_LENGTH)] = None,
                 ) -> dict:
    """Updates of every round, newest first, optionally one status (``rejected``) or device."""
    items = crud.list_updates_by(session, status=status, device_id=device_id,
                                 offset=page.offset, limit=page.limit)
    return {"items": items, "offset": page.offset, "limit": page.limit,
            "total": crud.count_updates_by(session, status=status, device_id=device_id)}
