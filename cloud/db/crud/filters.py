"""The filters every list and count query shares: optional equalities, an unset one matching all."""

from __future__ import annotations

from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute

Q = TypeVar("Q", bound=Select[Any])


def matching(query: Q, *filters: tuple[InstrumentedAttribute[Any], object]) -> Q:
    """``query`` restricted to ``column == value`` for each ``(column, value)`` whose value is
    given; a None value is no filter (so a list and its count take the same arguments)."""
    for column, value in filters:
        if value is not None:
            query = query.where(column == value)
    return query
