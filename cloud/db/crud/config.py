"""Small JSON documents shared by the cloud's processes (``settings`` table)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from cloud.db.models import Setting, utcnow


def get_setting(session: Session, *, key: str) -> dict[str, Any] | None:
    """The document stored under ``key``, or None."""
    row = session.get(Setting, key)
    return None if row is None else dict(row.value)


def put_setting(session: Session, *, key: str, value: Mapping[str, Any]) -> Setting:
    """Store (insert or replace) the document under ``key``."""
    if not key or len(key) > 64:
        raise ValueError(f"setting key must be 1-64 characters, got {key!r}")
    row = session.get(Setting, key, with_for_update=True)
    if row is None:
        row = Setting(key=key, value=dict(value), updated_at=utcnow())
        session.add(row)
    else:
        row.value = dict(value)
        row.updated_at = utcnow()
    session.flush()
    return row
