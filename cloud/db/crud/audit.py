"""Audit events: who did what to what, when (never secrets)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from cloud.db.crud.pages import check_page
from cloud.db.models import AuditEvent, utcnow


def record_audit(session: Session, *, actor: str, action: str, subject: str,
                 details: Mapping[str, Any] | None = None) -> AuditEvent:
    """Append an audit event, e.g. ``actor="operator:alice", action="device.revoke"``."""
    for name, value in (("actor", actor), ("action", action), ("subject", subject)):
        if not value:
            raise ValueError(f"audit {name} must not be empty, got {value!r}")
    event = AuditEvent(at=utcnow(), actor=actor, action=action, subject=subject,
                       details=dict(details or {}))
    session.add(event)
    session.flush()
    return event


def list_audit_events(session: Session, *, subject: str | None = None, action: str | None = None,
                      offset: int = 0, limit: int = 100) -> list[AuditEvent]:
    """Audit events, oldest first, optionally for one subject and/or action."""
    check_page(offset, limit)
    query = _filtered(select(AuditEvent), subject, action)
    return list(session.scalars(query.order_by(AuditEvent.id).offset(offset).limit(limit)))


def count_audit_events(session: Session, *, subject: str | None = None,
                       action: str | None = None) -> int:
    """How many audit events match the filters."""
    query = _filtered(select(func.count()).select_from(AuditEvent), subject, action)
    return session.scalar(query) or 0


def _filtered(query: Select, subject: str | None, action: str | None) -> Select:
    if subject is not None:
        query = query.where(AuditEvent.subject == subject)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    return query
