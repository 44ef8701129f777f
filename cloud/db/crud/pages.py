"""Pagination: validated ``offset``/``limit`` and a page of results with the total count."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cloud.db.crud.filters import Q

MAX_PAGE_SIZE = 1000
T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """``items`` from ``offset`` on (at most ``limit``) out of ``total`` matching rows."""

    items: Sequence[T]
    total: int
    offset: int
    limit: int


def check_page(offset: int, limit: int) -> None:
    """``ValueError`` unless ``0 <= offset`` and ``1 <= limit <= MAX_PAGE_SIZE``."""
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset!r}")
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit!r}")


def paged(query: Q, offset: int, limit: int) -> Q:
    """``query`` cut to one checked page (``check_page``)."""
    check_page(offset, limit)
    return query.offset(offset).limit(limit)
