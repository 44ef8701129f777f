"""Operator API tokens: 256 random bits, shown once, stored as a SHA-256 digest."""

from __future__ import annotations

import secrets

from sqlalchemy.orm import Session

from cloud.db import crud
from cloud.db.models import ApiToken

TOKEN_PREFIX = "fnt_"


def new_token() -> str:
    """A fresh operator token (``fnt_`` + 43 URL-safe characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def create_operator_token(session: Session, *, name: str,
                          actor: str = "system") -> tuple[ApiToken, str]:
    """Store a new token for operator ``name``; returns the row and the token (shown once)."""
    token = new_token()
    row = crud.create_token(session, name=name, token=token)
    crud.record_audit(session, actor=actor, action="token.create", subject=f"operator:{name}",
                      details={"token_id": row.id, "prefix": row.prefix})
    return row, token


def operator_for(session: Session, token: str) -> str | None:
    """The operator name of an active token, or None (unknown or revoked)."""
    row = crud.find_token(session, token=token)
    return None if row is None else row.name
