"""The cloud's state: SQLAlchemy 2 models for devices, rounds, updates and adapter versions.

Everything the cloud must not forget across a restart lives in these tables, so a restarted
coordinator resumes mid-round from the database alone:

- ``devices`` and their ``credentials`` (hashed MQTT secrets, one active per device);
- ``rounds`` (a persisted state machine, see ``ROUND_TRANSITIONS``) and ``participations``
  (round x device);
- ``updates`` (one row per received update, (sender, ``update_id``) unique for exactly-once
  ingestion, rejected ones kept with their reason), ``adapter_versions`` and the ``version_updates``
  lineage (which updates went into a version);
- ``metrics`` and ``audit_events``;
- ``api_tokens`` (operators' bearer tokens, stored as SHA-256 digests) and ``settings``
  (small JSON documents the API and the coordinator share, e.g. the round defaults).

The status enums (``cloud.db.enums``) are stored as strings with a CHECK constraint
(``native_enum=False``): PostgreSQL would otherwise keep enum types behind after a downgrade,
and SQLite has none. Times are timezone-aware UTC on both databases (``UTCDateTime``).
Changing a model needs a new Alembic revision (``cloud/db/migrations/versions``); a test fails
when the models and the migrations disagree.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# The statuses live in ``cloud.db.enums`` (importable without the ORM) and are re-exported here.
from cloud.db.enums import ROUND_TRANSITIONS as ROUND_TRANSITIONS
from cloud.db.enums import TERMINAL_ROUND_STATES as TERMINAL_ROUND_STATES
from cloud.db.enums import CredentialKind as CredentialKind
from cloud.db.enums import DeviceStatus as DeviceStatus
from cloud.db.enums import ParticipationStatus as ParticipationStatus
from cloud.db.enums import RoundState as RoundState
from cloud.db.enums import UpdateStatus as UpdateStatus
from shared.identity import DEVICE_ID_MAX_LENGTH, PROFILE_NAME_MAX_LENGTH

# Constraint names are deterministic, so migrations can name what they drop (SQLite batch mode
# needs names for everything it recreates).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}
SHA256_HEX_LENGTH = 64
UPDATE_ID_MAX_LENGTH = 64


def utcnow() -> datetime:
    """The current time, timezone-aware UTC (the only kind these tables store)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every database; naive datetimes are refused.

    PostgreSQL stores ``timestamptz``; SQLite has no time zones, so UTC is stored without an
    offset and put back on read.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetimes are ambiguous: give a timezone, got {value!r}")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else (
            value.astimezone(timezone.utc))


def _enum(kind: type[enum.Enum], name: str) -> Enum:
    """A string column restricted to ``kind``'s values by a CHECK constraint named ``name``."""
    return Enum(kind, name=name, native_enum=False, create_constraint=True,
                length=max(len(m.value) for m in kind) + 8,  # room for a longer value later
                values_callable=lambda members: [m.value for m in members],
                validate_strings=True)


class Base(DeclarativeBase):
    """Declarative base with a naming convention for every constraint and index."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime(),
                                                     dict[str, Any]: JSON()}


class Device(Base):
    """A provisioned edge device; its id is also its MQTT username and topic level."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(DEVICE_ID_MAX_LENGTH), primary_key=True)
    profile: Mapped[str] = mapped_column(String(PROFILE_NAME_MAX_LENGTH))
    status: Mapped[DeviceStatus] = mapped_column(
        _enum(DeviceStatus, "device_status"), default=DeviceStatus.ACTIVE, index=True)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    capabilities: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    credentials: Mapped[list[Credential]] = relationship(
        back_populates="device", cascade="all, delete-orphan", passive_deletes=True,
        order_by="Credential.id")

    __table_args__ = (
        CheckConstraint("(status = 'revoked') = (revoked_at IS NOT NULL)", name="revoked_at"),
    )


class Credential(Base):
    """How a device proves who it is to the broker.

    ``kind`` ``password``: its MQTT secret, hashed (``$7$`` PBKDF2-SHA512, mosquitto's own
    format) in ``secret_hash``. ``x509``: a certificate the cloud's CA signed with the device id
    as its common name; ``certificate_sha256`` is its fingerprint, no secret is stored.
    At most one credential per device is active (``revoked_at IS NULL``); rotating a secret
    revokes the old row and adds a new one, so the history stays.
    """

    __tablename__ = "credentials"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    kind: Mapped[CredentialKind] = mapped_column(
        _enum(CredentialKind, "credential_kind"), default=CredentialKind.PASSWORD,
        server_default=CredentialKind.PASSWORD.value)
    secret_hash: Mapped[str | None] = mapped_column(String(255))
    certificate_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]

    device: Mapped[Device] = relationship(back_populates="credentials")

    __table_args__ = (
        CheckConstraint("(kind = 'password') = (secret_hash IS NOT NULL) AND "
                        "(kind = 'x509') = (certificate_sha256 IS NOT NULL)",
                        name="credential_fields"),
        Index("uq_credentials_active_device", "device_id", unique=True,
              sqlite_where=text("revoked_at IS NULL"), postgresql_where=text("revoked_at IS NULL")),
        Index("ix_credentials_device_id", "device_id"),
    )


class Round(Base):
    """One federated round: its configuration, quorum, deadline and state."""

    __tablename__ = "rounds"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    state: Mapped[RoundState] = mapped_column(
        _enum(RoundState, "round_state"), default=RoundState.OPEN, index=True)
    strategy: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    base_version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", use_alter=True))
    quorum: Mapped[int] = mapped_column(Integer)          # aggregate as soon as k updates arrived
    min_updates: Mapped[int] = mapped_column(Integer)     # at the deadline, aggregate if >= this
    deadline_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]                   # entered COLLECTING
    closed_at: Mapped[datetime | None]                    # entered CLOSED or FAILED
    failure_reason: Mapped[str | None] = mapped_column(Text)

    base_version: Mapped[AdapterVersion | None] = relationship(foreign_keys=[base_version_id])
    participations: Mapped[list[Participation]] = relationship(
        back_populates="round", cascade="all, delete-orphan", passive_deletes=True)

    __table_args__ = (
        CheckConstraint("min_updates >= 1 AND min_updates <= quorum", name="quorum"),
        CheckConstraint("(state = 'failed') = (failure_reason IS NOT NULL)",
                        name="failure_reason"),
        CheckConstraint("(state IN ('closed', 'failed')) = (closed_at IS NOT NULL)",
                        name="closed_at"),
    )


class Participation(Base):
    """A device's part in a round (at most one row per round and device)."""

    __tablename__ = "participations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    status: Mapped[ParticipationStatus] = mapped_column(
        _enum(ParticipationStatus, "participation_status"), default=ParticipationStatus.SELECTED)
    selected_at: Mapped[datetime] = mapped_column(default=utcnow)
    notified_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]                  # submitted, rejected or dropped

    round: Mapped[Round] = relationship(back_populates="participations")

    __table_args__ = (UniqueConstraint("round_id", "device_id"),)


class Update(Base):
    """One received update (Δθ + Fisher), accepted or rejected; the blob lives on disk.

    An update is identified by (``device_id``, ``update_id``): the sender the broker
    authenticated (taken from the topic) and the id it chose. The pair is unique, so a
    re-delivered update (MQTT QoS 1 is at-least-once) is stored once, and a device that reuses
    another device's update id only ever collides with itself. ``base_version`` is what the
    device *claims* it trained from, kept as sent (no foreign key) so an unknown version can be
    rejected and recorded.
    """

    __tablename__ = "updates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    update_id: Mapped[str] = mapped_column(String(UPDATE_ID_MAX_LENGTH))
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id"), index=True)
    base_version: Mapped[int] = mapped_column(Integer)
    n_samples: Mapped[int] = mapped_column(Integer)
    status: Mapped[UpdateStatus] = mapped_column(_enum(UpdateStatus, "update_status"))
    rejection_code: Mapped[str | None] = mapped_column(String(64))  # e.g. "late", "non_finite"
    rejection_reason: Mapped[str | None] = mapped_column(Text)      # for people
    blob_sha256: Mapped[str | None] = mapped_column(String(SHA256_HEX_LENGTH))
    blob_size: Mapped[int | None] = mapped_column(BigInteger)
    blob_path: Mapped[str | None] = mapped_column(String(1024))
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        UniqueConstraint("device_id", "update_id"),
        Index("ix_updates_round_id_status", "round_id", "status"),
        CheckConstraint("n_samples >= 0", name="n_samples"),
        CheckConstraint("blob_size IS NULL OR blob_size >= 0", name="blob_size"),
        CheckConstraint("(status = 'rejected') = (rejection_reason IS NOT NULL)",
                        name="rejection_reason"),
        CheckConstraint("status = 'rejected' OR blob_sha256 IS NOT NULL", name="blob"),
    )


class AdapterVersion(Base):
    """A global adapter version: the initial one (no round) or a round's merge result."""

    __tablename__ = "adapter_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id"), unique=True)
    strategy: Mapped[str | None] = mapped_column(String(64))  # None for an initial version
    blob_sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH))
    blob_size: Mapped[int] = mapped_column(BigInteger)
    blob_path: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    parent: Mapped[AdapterVersion | None] = relationship(remote_side=[id])
    lineage: Mapped[list[VersionUpdate]] = relationship(
        back_populates="version", cascade="all, delete-orphan", passive_deletes=True)

    __table_args__ = (
        CheckConstraint("parent_id IS NULL OR parent_id < id", name="parent_before_child"),
        CheckConstraint("blob_size >= 0", name="blob_size"),
    )


class VersionUpdate(Base):
    """Lineage: update ``update_pk`` went into version ``version_id`` with weight ``weight``."""

    __tablename__ = "version_updates"

    version_id: Mapped[int] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="CASCADE"), primary_key=True)
    update_pk: Mapped[int] = mapped_column(ForeignKey("updates.id"), primary_key=True,
                                           index=True)
    weight: Mapped[float | None] = mapped_column(Float)  # e.g. λ_k = n_k / N

    version: Mapped[AdapterVersion] = relationship(back_populates="lineage")
    update: Mapped[Update] = relationship()


class Metric(Base):
    """A named number about a round, a version and/or a device (accuracy, loss, bytes up, ...)."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    round_id: Mapped[int | None] = mapped_column(ForeignKey("rounds.id", ondelete="CASCADE"))
    version_id: Mapped[int | None] = mapped_column(
        ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)
    device_id: Mapped[str | None] = mapped_column(ForeignKey("devices.id"))
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("ix_metrics_round_id_name", "round_id", "name"),
        Index("ix_metrics_device_id_name", "device_id", "name"),
    )


class AuditEvent(Base):
    """Who did what to what, when: every registry change and operator action."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(128))      # "operator:alice", "system", ...
    action: Mapped[str] = mapped_column(String(64))      # "device.add", "round.transition", ...
    subject: Mapped[str] = mapped_column(String(128), index=True)  # "device:orin-0042", ...
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiToken(Base):
    """An operator's API bearer token, stored as the SHA-256 of the token (never the token).

    Tokens are 256 random bits, so a plain digest suffices (no stretching): lookup is by digest
    and the comparison is constant-time. ``name`` is who holds it (audit actor
    ``operator:<name>``); ``prefix`` is the token's first characters, to tell tokens apart.
    """

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    prefix: Mapped[str] = mapped_column(String(16))
    token_sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class Setting(Base):
    """A named JSON document shared by the cloud's processes (round defaults, schedule)."""

    __tablename__ = "settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
