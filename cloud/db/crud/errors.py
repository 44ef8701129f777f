"""Errors the CRUD functions raise; routes map them to HTTP statuses (404 and 409)."""

from __future__ import annotations

from typing import ClassVar


class _RecordError(Exception):
    """An error about the ``kind`` row with key ``key`` (both kept for the caller)."""

    message: ClassVar[str]  # formatted with kind and key

    def __init__(self, kind: str, key: object) -> None:
        super().__init__(self.message.format(kind=kind, key=key))
        self.kind = kind
        self.key = key


class RecordNotFoundError(_RecordError, LookupError):
    """No ``kind`` row with key ``key`` (HTTP 404)."""

    message = "no {kind} {key!r}"


class ConflictError(Exception):
    """The request contradicts what is stored (HTTP 409)."""


class DuplicateRecordError(_RecordError, ConflictError):
    """A ``kind`` row with key ``key`` exists already."""

    message = "{kind} {key!r} exists already"


class InvalidTransitionError(ConflictError):
    """A round cannot move from its current state to the requested one."""


class UpdateConflictError(ConflictError):
    """An update id arrived again with different content (a client bug, or an attack)."""
