"""Read-only summaries for the dashboard: rounds with their metrics, devices' contributions,
updates across rounds. Grouped queries, so a page costs a few statements however many rows."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import cast

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cloud.db.crud.filters import Q, matching
from cloud.db.crud.pages import check_page, paged
from cloud.db.models import (
    AdapterVersion,
    Metric,
    Participation,
    Round,
    Update,
    UpdateStatus,
)


@dataclass
class RoundSummary:
    """A round, the version it produced, its participations by status and its metrics."""

    round: Round
    version_id: int | None = None
    participation: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Contribution:
    """What one device has sent: updates by status, accepted samples, rounds it was in."""

    device_id: str
    updates: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    rounds: int = 0
    last_update_at: datetime | None = None


def round_summaries(session: Session, *, limit: int = 100) -> list[RoundSummary]:
    """The newest ``limit`` rounds, oldest first, each with its round-level metrics (the last
    recorded value per name), the version it produced and its participation counts."""
    check_page(0, limit)
    newest = select(Round).order_by(Round.id.desc()).limit(limit)
    summaries = {r.id: RoundSummary(r) for r in reversed(list(session.scalars(newest)))}
    ids = list(summaries)
    if not ids:
        return []
    versions = select(AdapterVersion.round_id, AdapterVersion.id).where(
        AdapterVersion.round_id.in_(ids))
    for round_id, version_id in session.execute(versions):
        summaries[cast(int, round_id)].version_id = version_id  # not NULL: filtered by id
    counts = (select(Participation.round_id, Participation.status, func.count())
              .where(Participation.round_id.in_(ids))
              .group_by(Participation.round_id, Participation.status))
    for round_id, status, n in session.execute(counts):
        summaries[round_id].participation[status.value] = n
    metrics = (select(Metric.round_id, Metric.name, Metric.value)
               .where(Metric.round_id.in_(ids), Metric.device_id.is_(None)).order_by(Metric.id))
    for round_id, name, value in session.execute(metrics):
        summaries[cast(int, round_id)].metrics[name] = value
    return list(summaries.values())


def device_contributions(session: Session) -> dict[str, Contribution]:
    """Every device that has sent an update or been selected, by device id."""
    found: dict[str, Contribution] = defaultdict(lambda: Contribution(""))
    grouped = (select(Update.device_id, Update.status, func.count(), func.sum(Update.n_samples),
                      func.max(Update.received_at))
               .group_by(Update.device_id, Update.status))
    for device_id, status, n, samples, last in session.execute(grouped):
        entry = found[device_id]
        entry.updates[status.value] = n
        if status is UpdateStatus.ACCEPTED:
            entry.samples = int(samples or 0)
        if last is not None and (entry.last_update_at is None or last > entry.last_update_at):
            entry.last_update_at = last
    rounds = (select(Participation.device_id, func.count(func.distinct(Participation.round_id)))
              .group_by(Participation.device_id))
    for device_id, n in session.execute(rounds):
        found[device_id].rounds = n
    for device_id, entry in found.items():
        entry.device_id = device_id
    return dict(found)


def list_updates_by(session: Session, *, status: UpdateStatus | None = None,
                    device_id: str | None = None, offset: int = 0,
                    limit: int = 100) -> list[Update]:
    """Updates of every round, newest first, optionally with one status and/or device."""
    query = paged(select(Update).order_by(Update.id.desc()), offset, limit)
    return list(session.scalars(_updates_where(query, status, device_id)))


def count_updates_by(session: Session, *, status: UpdateStatus | None = None,
                     device_id: str | None = None) -> int:
    """How many updates ``list_updates_by`` would page through."""
    query = select(func.count()).select_from(Update)
    return session.scalar(_updates_where(query, status, device_id)) or 0


def _updates_where(query: Q, status: UpdateStatus | None, device_id: str | None) -> Q:
    return matching(query, (Update.status, status), (Update.device_id, device_id))
