"""Updates (exactly-once by update id), adapter versions with lineage, and metrics."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.db.crud.errors import RecordNotFoundError, UpdateConflictError
from cloud.db.crud.filters import matching
from cloud.db.crud.pages import paged
from cloud.db.models import (
    SHA256_HEX_LENGTH,
    UPDATE_ID_MAX_LENGTH,
    AdapterVersion,
    Metric,
    Update,
    UpdateStatus,
    VersionUpdate,
    utcnow,
)

_HEX = frozenset("0123456789abcdef")
MERGEABLE = frozenset({UpdateStatus.ACCEPTED, UpdateStatus.BUFFERED})


@dataclass(frozen=True)
class UpdateRecord:
    """What the validation gate decided about one received update."""

    update_id: str
    round_id: int
    device_id: str
    base_version: int
    n_samples: int
    status: UpdateStatus
    blob_sha256: str | None = None
    blob_size: int | None = None
    blob_path: str | None = None
    rejection_code: str | None = None
    rejection_reason: str | None = None
    metrics: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not 1 <= len(self.update_id) <= UPDATE_ID_MAX_LENGTH:
            raise ValueError(f"update_id must be 1-{UPDATE_ID_MAX_LENGTH} characters, "
                             f"got {self.update_id!r}")
        if self.n_samples < 0:
            raise ValueError(f"n_samples must be >= 0, got {self.n_samples!r}")
        if self.blob_size is not None and self.blob_size < 0:
            raise ValueError(f"blob_size must be >= 0, got {self.blob_size!r}")
        if self.blob_sha256 is not None:
            check_sha256(self.blob_sha256)
        rejected = self.status is UpdateStatus.REJECTED
        if rejected != bool(self.rejection_reason):
            raise ValueError("a rejection_reason is required for rejected updates and only for "
                             f"them: status={self.status.value!r}, got {self.rejection_reason!r}")
        if not rejected and self.blob_sha256 is None:
            raise ValueError(f"a {self.status.value} update needs its blob_sha256")


def check_sha256(digest: str) -> str:
    """``digest`` if it is a lowercase hex SHA-256, else ``ValueError``."""
    if len(digest) != SHA256_HEX_LENGTH or not set(digest) <= _HEX:
        raise ValueError(f"expected a lowercase hex sha256, got {digest!r}")
    return digest


def record_update(session: Session, *, record: UpdateRecord) -> tuple[Update, bool]:
    """Store an update exactly once: ``(row, True)`` when new, ``(stored row, False)`` when
    its sender already used this ``update_id`` (a re-delivery). ``UpdateConflictError`` if the
    stored row has the same sender and id but a different round or blob."""
    existing = get_update(session, device_id=record.device_id, update_id=record.update_id)
    if existing is not None:
        return _same_update(existing, record), False
    row = _update_row(record)
    try:
        with session.begin_nested():  # a concurrent ingester may insert the same id
            session.add(row)
    except IntegrityError:
        existing = get_update(session, device_id=record.device_id, update_id=record.update_id)
        if existing is None:
            raise  # some other constraint: a real error
        return _same_update(existing, record), False
    return row, True


def add_update(session: Session, *, record: UpdateRecord) -> Update:
    """Add a new update row, written at the session's next flush, for a caller that already
    knows (sender, ``update_id``) is new (``stored_update_keys``); a concurrent insert of the
    same id then fails the flush with ``IntegrityError``. ``record_update`` checks itself."""
    row = _update_row(record)
    session.add(row)
    return row


def stored_update_keys(session: Session, *,
                       keys: Collection[tuple[str, str]]) -> set[tuple[str, str]]:
    """Which of these (sender, ``update_id``) pairs already have a row (one query)."""
    if not keys:
        return set()
    query = select(Update.device_id, Update.update_id).where(
        Update.device_id.in_({device_id for device_id, _ in keys}),
        Update.update_id.in_({update_id for _, update_id in keys}))
    return {(row.device_id, row.update_id) for row in session.execute(query)} & set(keys)


def senders_with_updates(session: Session, *, round_id: int, device_ids: Collection[str],
                         statuses: Collection[UpdateStatus] = MERGEABLE) -> set[str]:
    """Which of ``device_ids`` have an update with one of ``statuses`` in the round."""
    query = select(Update.device_id).where(
        Update.round_id == round_id, Update.device_id.in_(device_ids),
        Update.status.in_(statuses)).distinct()
    return set(session.scalars(query))


def _update_row(record: UpdateRecord) -> Update:
    return Update(
        update_id=record.update_id, round_id=record.round_id, device_id=record.device_id,
        base_version=record.base_version, n_samples=record.n_samples, status=record.status,
        rejection_code=record.rejection_code, rejection_reason=record.rejection_reason,
        blob_sha256=record.blob_sha256, blob_size=record.blob_size, blob_path=record.blob_path,
        metrics=dict(record.metrics or {}), received_at=utcnow())


def _same_update(existing: Update, record: UpdateRecord) -> Update:
    stored = (existing.device_id, existing.round_id, existing.blob_sha256)
    sent = (record.device_id, record.round_id, record.blob_sha256)
    if stored != sent:
        raise UpdateConflictError(f"update {record.update_id!r} was stored as (device, round, "
                                  f"sha256)={stored}, now sent as {sent}")
    return existing


def get_update(session: Session, *, device_id: str, update_id: str) -> Update | None:
    """The update ``device_id`` sent under this (device-chosen) id, or None. An update's
    identity is its authenticated sender and its id: another device's id is another update."""
    return session.scalar(select(Update).where(Update.device_id == device_id,
                                               Update.update_id == update_id))


def list_updates(session: Session, *, round_id: int,
                 status: UpdateStatus | None = None) -> list[Update]:
    """A round's updates in arrival order."""
    query = select(Update).where(Update.round_id == round_id).order_by(Update.id)
    return list(session.scalars(matching(query, (Update.status, status))))


def all_updates(session: Session, *, status: UpdateStatus | None = None) -> list[Update]:
    """Every round's updates (with ``status``, if given) in arrival order: unpaged, for
    reports."""
    return list(session.scalars(matching(select(Update).order_by(Update.id),
                                         (Update.status, status))))


def count_updates(session: Session, *, round_id: int,
                  status: UpdateStatus | None = None) -> int:
    """How many updates a round has (with ``status``, if given): the quorum check."""
    query = select(func.count()).select_from(Update).where(Update.round_id == round_id)
    return session.scalar(matching(query, (Update.status, status))) or 0


def create_adapter_version(session: Session, *, blob_sha256: str, blob_size: int,
                           blob_path: str, parent_id: int | None = None,
                           round_id: int | None = None, strategy: str | None = None,
                           lineage: Mapping[int, float | None] | None = None) -> AdapterVersion:
    """Store a global adapter version; ``lineage`` maps each merged update's row id to its
    weight. Only accepted (or buffered: late but valid) updates may go into a version."""
    check_sha256(blob_sha256)
    lineage = dict(lineage or {})
    _check_mergeable(session, lineage)
    version = AdapterVersion(parent_id=parent_id, round_id=round_id, strategy=strategy,
                             blob_sha256=blob_sha256, blob_size=blob_size, blob_path=blob_path,
                             created_at=utcnow())
    version.lineage = [VersionUpdate(update_pk=pk, weight=w) for pk, w in sorted(lineage.items())]
    session.add(version)
    session.flush()
    return version


def _check_mergeable(session: Session, lineage: Mapping[int, float | None]) -> None:
    if not lineage:
        return
    rows = session.execute(select(Update.id, Update.status).where(Update.id.in_(lineage)))
    status = {pk: state for pk, state in rows}
    missing = sorted(set(lineage) - set(status))
    if missing:
        raise RecordNotFoundError("update", missing)
    unusable = sorted(pk for pk, s in status.items() if s not in MERGEABLE)
    if unusable:
        raise ValueError(f"only accepted or buffered updates can be merged, got updates "
                         f"{unusable}")


def unmerged_buffered_updates(session: Session, *, min_base_version: int) -> list[Update]:
    """Buffered (late, valid) updates no version merged yet, trained from ``min_base_version``
    or newer, oldest first."""
    merged = select(VersionUpdate.update_pk).where(VersionUpdate.update_pk == Update.id)
    query = (select(Update).where(Update.status == UpdateStatus.BUFFERED,
                                  Update.base_version >= min_base_version, ~merged.exists())
             .order_by(Update.id))
    return list(session.scalars(query))


def get_adapter_version(session: Session, *, version_id: int) -> AdapterVersion | None:
    """The adapter version with this id, or None."""
    return session.get(AdapterVersion, version_id)


def list_adapter_versions(session: Session, *, offset: int = 0,
                          limit: int = 100) -> list[AdapterVersion]:
    """Adapter versions, newest first."""
    return list(session.scalars(paged(select(AdapterVersion).order_by(AdapterVersion.id.desc()),
                                      offset, limit)))


def round_version(session: Session, *, round_id: int) -> AdapterVersion | None:
    """The version a round's merge produced, or None (not merged yet, or failed)."""
    return session.scalar(select(AdapterVersion).where(AdapterVersion.round_id == round_id))


def count_adapter_versions(session: Session) -> int:
    """How many adapter versions exist."""
    return session.scalar(select(func.count()).select_from(AdapterVersion)) or 0


def latest_adapter_version(session: Session) -> AdapterVersion | None:
    """The newest adapter version (the current global one), or None before the first."""
    return session.scalar(select(AdapterVersion).order_by(AdapterVersion.id.desc()).limit(1))


def version_lineage(session: Session, *, version_id: int) -> list[tuple[Update, float | None]]:
    """The updates merged into a version, with their weights, by update row id."""
    query = (select(Update, VersionUpdate.weight)
             .join(VersionUpdate, VersionUpdate.update_pk == Update.id)
             .where(VersionUpdate.version_id == version_id).order_by(Update.id))
    return [(update, weight) for update, weight in session.execute(query)]


def record_metric(session: Session, *, name: str, value: float, round_id: int | None = None,
                  version_id: int | None = None, device_id: str | None = None) -> Metric:
    """Record a named value about a round, a version and/or a device."""
    if not name:
        raise ValueError(f"metric name must not be empty, got {name!r}")
    metric = Metric(name=name, value=float(value), round_id=round_id, version_id=version_id,
                    device_id=device_id, recorded_at=utcnow())
    session.add(metric)
    session.flush()
    return metric


def record_device_metrics(session: Session, *, name: str, round_id: int,
                          values: Mapping[str, float]) -> None:
    """Record one named value per device of a round, ``values`` by device id (one flush)."""
    if not name:
        raise ValueError(f"metric name must not be empty, got {name!r}")
    now = utcnow()
    session.add_all([Metric(name=name, value=float(value), round_id=round_id,
                            device_id=device_id, recorded_at=now)
                     for device_id, value in values.items()])
    session.flush()


def list_metrics(session: Session, *, round_id: int | None = None, version_id: int | None = None,
                 name: str | None = None) -> list[Metric]:
    """Metrics matching every given filter, in recording order."""
    query = matching(select(Metric).order_by(Metric.id), (Metric.round_id, round_id),
                     (Metric.version_id, version_id), (Metric.name, name))
    return list(session.scalars(query))
