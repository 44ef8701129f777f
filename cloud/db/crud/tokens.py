"""Operator API tokens: stored as SHA-256 digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.db.crud.errors import RecordNotFoundError
from cloud.db.crud.pages import check_page
from cloud.db.models import ApiToken, utcnow

TOKEN_PREFIX_LENGTH = 8


def token_digest(token: str) -> str:
    """The hex SHA-256 of a token (what the database stores)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_token(session: Session, *, name: str, token: str) -> ApiToken:
    """Store a new token for operator ``name`` (only its digest and first characters)."""
    if not name or len(name) > 128:
        raise ValueError(f"token name must be 1-128 characters, got {name!r}")
    if len(token) < 32:
        raise ValueError(f"a token needs at least 32 characters, got {len(token)}")
    row = ApiToken(name=name, prefix=token[:TOKEN_PREFIX_LENGTH], token_sha256=token_digest(token),
                   created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def find_token(session: Session, *, token: str, touch: bool = True) -> ApiToken | None:
    """The active token row matching ``token``, or None; ``touch`` records the use."""
    digest = token_digest(token)
    row = session.scalar(select(ApiToken).where(ApiToken.token_sha256 == digest))
    if row is None or not hmac.compare_digest(row.token_sha256, digest):
        return None
    if row.revoked_at is not None:
        return None
    if touch:
        row.last_used_at = utcnow()
        session.flush()
    return row


def revoke_token(session: Session, *, token_id: int, at: datetime | None = None) -> ApiToken:
    """Revoke a token by id; ``RecordNotFoundError`` if there is none."""
    row = session.get(ApiToken, token_id)
    if row is None:
        raise RecordNotFoundError("api token", token_id)
    row.revoked_at = row.revoked_at or at or utcnow()
    session.flush()
    return row


def list_tokens(session: Session, *, offset: int = 0, limit: int = 100) -> list[ApiToken]:
    """Tokens (active and revoked) in creation order."""
    check_page(offset, limit)
    return list(session.scalars(select(ApiToken).order_by(ApiToken.id).offset(offset)
                                .limit(limit)))


def count_tokens(session: Session) -> int:
    """How many tokens exist (active and revoked)."""
    return session.scalar(select(func.count()).select_from(ApiToken)) or 0
