"""Rounds (a persisted state machine) and participations: keyword-only CRUD, no commits here."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.db.crud.errors import InvalidTransitionError, RecordNotFoundError
from cloud.db.crud.filters import matching
from cloud.db.crud.pages import paged
from cloud.db.models import (
    ROUND_TRANSITIONS,
    TERMINAL_ROUND_STATES,
    Participation,
    ParticipationStatus,
    Round,
    RoundState,
    utcnow,
)

_FINISHED = frozenset({ParticipationStatus.SUBMITTED, ParticipationStatus.REJECTED,
                       ParticipationStatus.DROPPED})


def create_round(session: Session, *, strategy: str, quorum: int, min_updates: int,
                 config: Mapping[str, Any] | None = None, base_version_id: int | None = None,
                 deadline_at: datetime | None = None) -> Round:
    """Persist a new round in state ``open``: aggregate at ``quorum`` updates, or at the
    deadline with at least ``min_updates``."""
    if quorum < 1:
        raise ValueError(f"quorum must be >= 1, got {quorum!r}")
    if not 1 <= min_updates <= quorum:
        raise ValueError(f"min_updates must be between 1 and quorum ({quorum}), "
                         f"got {min_updates!r}")
    if not strategy:
        raise ValueError(f"strategy must be named, got {strategy!r}")
    round_ = Round(strategy=strategy, quorum=quorum, min_updates=min_updates,
                   config=dict(config or {}), base_version_id=base_version_id,
                   deadline_at=deadline_at, state=RoundState.OPEN, created_at=utcnow())
    session.add(round_)
    session.flush()
    return round_


def get_round(session: Session, *, round_id: int, for_update: bool = False) -> Round | None:
    """The round, or None; ``for_update`` locks its row (PostgreSQL) and reloads it from the
    database."""
    return session.get(Round, round_id, with_for_update=for_update or None,
                       populate_existing=for_update)


def require_round(session: Session, *, round_id: int, for_update: bool = False) -> Round:
    """The round (``get_round``); ``RecordNotFoundError`` if there is none."""
    round_ = get_round(session, round_id=round_id, for_update=for_update)
    if round_ is None:
        raise RecordNotFoundError("round", round_id)
    return round_


def list_rounds(session: Session, *, offset: int = 0, limit: int = 100,
                state: RoundState | None = None) -> list[Round]:
    """Rounds, newest first."""
    query = paged(select(Round).order_by(Round.id.desc()), offset, limit)
    return list(session.scalars(matching(query, (Round.state, state))))


def all_rounds(session: Session, *, state: RoundState | None = None) -> list[Round]:
    """Every round (in ``state``, if given), oldest first: unpaged, for reports."""
    return list(session.scalars(matching(select(Round).order_by(Round.id), (Round.state, state))))


def count_rounds(session: Session, *, state: RoundState | None = None) -> int:
    """How many rounds there are (in ``state``, if given)."""
    return session.scalar(matching(select(func.count()).select_from(Round),
                                   (Round.state, state))) or 0


def count_rounds_by_state(session: Session) -> dict[RoundState, int]:
    """How many rounds are in each state (states without rounds left out)."""
    query = select(Round.state, func.count()).group_by(Round.state)
    return {state: n for state, n in session.execute(query)}


def unfinished_rounds(session: Session) -> list[Round]:
    """Rounds not closed or failed, oldest first: what a restarted coordinator resumes."""
    query = select(Round).where(Round.state.not_in(TERMINAL_ROUND_STATES)).order_by(Round.id)
    return list(session.scalars(query))


def finished_rounds_with(session: Session, *,
                         statuses: Collection[ParticipationStatus]) -> list[int]:
    """Ids of closed or failed rounds that still have participations in ``statuses`` (e.g.
    tasks still out after an operator stopped the round)."""
    query = (select(Participation.round_id).join(Round)
             .where(Round.state.in_(TERMINAL_ROUND_STATES),
                    Participation.status.in_(statuses)).distinct())
    return list(session.scalars(query))


def transition_round(session: Session, *, round_id: int, to: RoundState,
                     reason: str | None = None, at: datetime | None = None) -> Round:
    """Move a round to state ``to`` under a row lock; ``InvalidTransitionError`` if not allowed.

    ``reason`` is required for ``failed`` and refused otherwise. Entering ``collecting`` sets
    ``started_at``; entering ``closed`` or ``failed`` sets ``closed_at``.
    """
    if (to is RoundState.FAILED) != bool(reason):
        raise ValueError(f"a reason is required for 'failed' and only for it: to={to.value!r}, "
                         f"got reason {reason!r}")
    round_ = require_round(session, round_id=round_id, for_update=True)
    if to not in ROUND_TRANSITIONS[round_.state]:
        raise InvalidTransitionError(f"round {round_id} cannot go from {round_.state.value!r} "
                                     f"to {to.value!r}")
    now = at or utcnow()
    round_.state = to
    round_.failure_reason = reason
    if to is RoundState.COLLECTING:
        round_.started_at = now
    if to in TERMINAL_ROUND_STATES:
        round_.closed_at = now
    session.flush()
    return round_


def add_participation(session: Session, *, round_id: int, device_id: str) -> Participation:
    """Record that ``device_id`` was selected for ``round_id`` (unique per round and device)."""
    participation = Participation(round_id=round_id, device_id=device_id,
                                  status=ParticipationStatus.SELECTED, selected_at=utcnow())
    session.add(participation)
    session.flush()
    return participation


def set_participation_status(session: Session, *, round_id: int, device_id: str,
                             status: ParticipationStatus,
                             at: datetime | None = None) -> Participation:
    """Update a participation's status and the matching timestamp."""
    participation = participations_of(session, round_id=round_id,
                                      device_ids=(device_id,)).get(device_id)
    if participation is None:
        raise RecordNotFoundError("participation", (round_id, device_id))
    mark_participation(participation, status=status, at=at)
    session.flush()
    return participation


def mark_participation(participation: Participation, *, status: ParticipationStatus,
                       at: datetime | None = None) -> None:
    """Set a loaded participation's status and the matching timestamp; written at the
    session's next flush (a batch of updates changes many and flushes once)."""
    now = at or utcnow()
    participation.status = status
    if status is ParticipationStatus.NOTIFIED:
        participation.notified_at = now
    if status in _FINISHED:
        participation.finished_at = now


def participations_of(session: Session, *, round_id: int,
                      device_ids: Collection[str]) -> dict[str, Participation]:
    """The participations of ``device_ids`` in the round (one query), by device id."""
    query = select(Participation).where(Participation.round_id == round_id,
                                        Participation.device_id.in_(device_ids))
    return {p.device_id: p for p in session.scalars(query)}


def list_participations(session: Session, *, round_id: int,
                        status: ParticipationStatus | None = None) -> list[Participation]:
    """A round's participations, by device id."""
    query = (select(Participation).where(Participation.round_id == round_id)
             .order_by(Participation.device_id))
    return list(session.scalars(matching(query, (Participation.status, status))))


def all_participations(session: Session) -> list[Participation]:
    """Every round's participations, by row id: unpaged, for reports."""
    return list(session.scalars(select(Participation).order_by(Participation.id)))


def participant_ids(session: Session, *, round_id: int,
                    statuses: Collection[ParticipationStatus],
                    limit: int | None = None) -> list[str]:
    """Device ids of the round's participants in ``statuses``, in selection order (ids only:
    the coordinator asks at every tick, and the roster may be a thousand devices)."""
    query = (select(Participation.device_id)
             .where(Participation.round_id == round_id, Participation.status.in_(statuses))
             .order_by(Participation.id).limit(limit))
    return list(session.scalars(query))
