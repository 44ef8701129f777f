"""Audit events: who did what to what, when (never secrets)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.db.crud.filters import Q, matching
from cloud.db.crud.pages import paged
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
    query = paged(select(AuditEvent).order_by(AuditEvent.id), offset, limit)
    return list(session.scalars(_filtered(query, subject, action)))


def all_audit_events(session: Session, *, subject: str | None = None,
                     action: str | None = None) -> list[AuditEvent]:
    """Every matching audit event, oldest first: unpaged, for reports."""
    query = _filtered(select(AuditEvent).order_by(AuditEvent.id), subject, action)
    return list(session.scalars(query))


def count_audit_events(session: Session, *, subject: str | None = None,
                       action: str | None = None) -> int:
    """How many audit events match the filters."""
    query = _filtered(select(func.count()).select_from(AuditEvent), subject, action)
    return session.scalar(query) or 0


def _filtered(query: Q, subject: str | None, action: str | None) -> Q:
    return matching(query, (AuditEvent.subject, subject), (AuditEvent.action, action))
