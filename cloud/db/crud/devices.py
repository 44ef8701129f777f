"""Devices and their credentials: keyword-only CRUD on a caller's session (no commits here)."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.db.crud.errors import DuplicateRecordError, RecordNotFoundError
from cloud.db.crud.filters import matching
from cloud.db.crud.pages import paged
from cloud.db.models import Credential, CredentialKind, Device, DeviceStatus, utcnow


def create_device(session: Session, *, device_id: str, profile: str,
                  capabilities: Mapping[str, Any] | None = None) -> Device:
    """Add an active device; ``DuplicateRecordError`` if the id is taken (even if revoked)."""
    if session.get(Device, device_id) is not None:
        raise DuplicateRecordError("device", device_id)
    device = Device(id=device_id, profile=profile, status=DeviceStatus.ACTIVE,
                    online=False, capabilities=dict(capabilities or {}), created_at=utcnow())
    try:
        with session.begin_nested():  # another process may add the same id meanwhile
            session.add(device)
    except IntegrityError as err:
        raise DuplicateRecordError("device", device_id) from err
    return device


def get_device(session: Session, *, device_id: str) -> Device | None:
    """The device with this id, or None."""
    return session.get(Device, device_id)


def require_device(session: Session, *, device_id: str) -> Device:
    """The device with this id; ``RecordNotFoundError`` if there is none."""
    device = session.get(Device, device_id)
    if device is None:
        raise RecordNotFoundError("device", device_id)
    return device


def list_devices(session: Session, *, offset: int = 0, limit: int = 100,
                 status: DeviceStatus | None = None) -> list[Device]:
    """Devices in provisioning order (then id), ``limit`` of them from ``offset``."""
    query = paged(select(Device).order_by(Device.created_at, Device.id), offset, limit)
    return list(session.scalars(matching(query, (Device.status, status))))


def count_devices(session: Session, *, status: DeviceStatus | None = None,
                  online: bool | None = None) -> int:
    """How many devices (with ``status``, and online or not, if given) there are."""
    query = matching(select(func.count()).select_from(Device), (Device.status, status),
                     (Device.online, online))
    return session.scalar(query) or 0


def count_devices_by_status(session: Session) -> dict[DeviceStatus, int]:
    """How many devices have each status (statuses without devices left out)."""
    query = select(Device.status, func.count()).group_by(Device.status)
    return {status: n for status, n in session.execute(query)}


def online_devices(session: Session, *, status: DeviceStatus | None = None) -> list[Device]:
    """Devices whose presence is online (with ``status``, if given), by id."""
    query = select(Device).where(Device.online.is_(True)).order_by(Device.id)
    return list(session.scalars(matching(query, (Device.status, status))))


def device_statuses(session: Session, *, device_ids: Collection[str]) -> dict[str, DeviceStatus]:
    """The status of each of ``device_ids`` that is a device (one query), by id."""
    query = select(Device.id, Device.status).where(Device.id.in_(device_ids))
    return {row.id: row.status for row in session.execute(query)}


def set_presence(session: Session, *, device_id: str, online: bool,
                 at: datetime | None = None) -> Device:
    """Record a presence message: online/offline, last seen ``at`` (default now)."""
    device = require_device(session, device_id=device_id)
    device.online = online
    device.last_seen_at = at or utcnow()
    session.flush()
    return device


def mark_revoked(session: Session, *, device_id: str, at: datetime | None = None) -> Device:
    """Set the device's status to revoked (offline); its credentials are revoked separately."""
    device = require_device(session, device_id=device_id)
    device.status = DeviceStatus.REVOKED
    device.revoked_at = at or utcnow()
    device.online = False
    session.flush()
    return device


def add_credential(session: Session, *, device_id: str, secret_hash: str | None = None,
                   certificate_sha256: str | None = None) -> Credential:
    """Store the device's active credential (revoke the old one first): a hashed secret, or
    the fingerprint of an X.509 certificate (exactly one of them)."""
    if (secret_hash is None) == (certificate_sha256 is None):
        raise ValueError("a credential is a secret hash or a certificate fingerprint")
    kind = CredentialKind.PASSWORD if secret_hash is not None else CredentialKind.X509
    credential = Credential(device_id=device_id, kind=kind, secret_hash=secret_hash,
                            certificate_sha256=certificate_sha256, created_at=utcnow())
    session.add(credential)
    session.flush()
    return credential


def active_credential(session: Session, *, device_id: str) -> Credential | None:
    """The device's unrevoked credential, if any."""
    return session.scalar(select(Credential).where(
        Credential.device_id == device_id, Credential.revoked_at.is_(None)))


def revoke_credentials(session: Session, *, device_id: str, at: datetime | None = None) -> int:
    """Revoke every active credential of the device; returns how many were active."""
    result = session.execute(
        update(Credential)
        .where(Credential.device_id == device_id, Credential.revoked_at.is_(None))
        .values(revoked_at=at or utcnow())
        .execution_options(synchronize_session="fetch"))
    return int(getattr(result, "rowcount", 0) or 0)


def active_device_hashes(session: Session) -> list[tuple[str, str | None]]:
    """``(device id, secret hash)`` of every active device with an active credential, by id;
    the hash is None for a device that authenticates with an X.509 certificate."""
    query = (select(Device.id, Credential.secret_hash)
             .join(Credential, Credential.device_id == Device.id)
             .where(Device.status == DeviceStatus.ACTIVE, Credential.revoked_at.is_(None))
             .order_by(Device.id))
    return [(device_id, secret_hash) for device_id, secret_hash in session.execute(query)]
