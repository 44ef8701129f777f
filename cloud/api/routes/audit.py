"""Audit events: who did what to what, when."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.deps import OperatorDep, PageDep, SessionDep
from cloud.api.schemas import AuditEventPublic, Page
from cloud.db import crud

router = APIRouter(prefix="/audit", tags=["audit"])


@router.get("", response_model=Page[AuditEventPublic])
def list_events(session: SessionDep, _: OperatorDep, page: PageDep,
                subject: Annotated[str | None, Query(max_length=128)] = None,
                action: Annotated[str | None, Query(max_length=64)] = None) -> dict:
    """Audit events, oldest first, optionally for one subject and/or action."""
    items = crud.list_audit_events(session, subject=subject, action=action, offset=page.offset,
                                   limit=page.limit)
    return {"items": items, "offset": page.offset, "limit": page.limit,
            "total": crud.count_audit_events(session, subject=subject, action=action)}
