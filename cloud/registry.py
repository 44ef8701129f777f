"""Device registry: add, list, revoke, rotate secrets; the broker's accounts file. (A device's
config and kit: ``cloud.provisioning``.)

A device's MQTT secret is ``secrets.token_urlsafe(32)`` (256 random bits), returned once and
stored only as a hash in mosquitto's own ``$7$`` format (PBKDF2-SHA512, random 12-byte salt).
Storing the broker's format lets ``write_broker_files`` regenerate Mosquitto's password file
from the database at any time without ever holding a plaintext secret. The iteration count is
paid by the broker at every CONNECT; with 256-bit random secrets stretching adds no real
protection, so the default (10,000, about 14 ms here) is a moderate cost, not a security knob.

The broker's accounts and rights live in Mosquitto's dynamic-security plugin. Its file is
generated from the database (``write_broker_files``: the stored hashes are in the plugin's own
format, so no plaintext secret is needed), and changes reach a running broker at once through
the plugin's control topic (``cloud.broker_admin``): a revoked device is deleted there, which
disconnects it. Each device has its own role (publish its status, updates and LLM requests;
subscribe to its own subtree and the round broadcasts) and its client id bound to its device
id; the cloud's service accounts get the whole tree and the control topic.

Every change writes an audit event (never the secret). Functions flush; the caller commits.
"""

from __future__ import annotations

import base64
import grp
import hashlib
import hmac
import json
import secrets
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from cloud.db import crud
from cloud.db.crud import Page
from cloud.db.models import CredentialKind, Device, DeviceStatus
from cloud.pki import IssuedCertificate, Issuer
from shared import topics
from shared.files import atomic_write
from shared.identity import (
    ALL_TOPICS_FILTER,
    BROADCAST_TOPIC_FILTER,
    validate_device_id,
    validate_profile_name,
)

SECRET_BYTES = 32
MOSQUITTO_HASH_ID = "7"          # mosquitto's id for PBKDF2-SHA512
MOSQUITTO_SALT_BYTES = 12        # what mosquitto_passwd uses
MOSQUITTO_DIGEST_BYTES = 64
DEFAULT_HASH_ITERATIONS = 10_000
DYNSEC_FILE = "dynamic-security.json"
SERVICE_ROLE = "fednano-service"
ADMIN_ROLE = "fednano-broker-admin"
DEVICE_ROLE_PREFIX = "fednano-device-"
DYNSEC_CONTROL_FILTER = "$CONTROL/dynamic-security/#"
# The container healthcheck's account: it may read the broker's uptime and nothing else, with
# its client id bound, so its password is not a secret (it is in docker-compose.yml).
HEALTH_USERNAME = "fednano-health"
HEALTH_PASSWORD = "fednano-health"
HEALTH_TOPIC = "$SYS/broker/uptime"
SYSTEM_ACTOR = "system"


class DeviceRevokedError(crud.ConflictError):
    """The device is revoked: it cannot get new secrets or be revoked again."""


class UnknownProfileError(ValueError):
    """The profile is not one a device can boot with (the message lists those it can)."""


class CredentialKindError(crud.ConflictError):
    """The change does not apply to the device's kind of credential (no secret to rotate)."""


@dataclass(frozen=True)
class ServiceAccount:
    """A cloud service's own broker account (coordinator, LLM workers): full topic tree."""

    username: str
    password: str

    def __post_init__(self) -> None:
        if not self.username or any(c in self.username for c in ":\n\r"):
            raise ValueError(f"service username must be non-empty, without ':' or newlines, "
                             f"got {self.username!r}")
        if not self.password:
            raise ValueError(f"service account {self.username!r} needs a password")

    def __repr__(self) -> str:
        return f"ServiceAccount(username={self.username!r}, password='***')"


@dataclass(frozen=True)
class BrokerFiles:
    """Where ``write_broker_files`` put the broker's dynamic-security file."""

    dynsec_file: Path


# ------------------------------------------------------------------------------ secrets


def generate_secret() -> str:
    """A fresh device secret: 256 random bits, URL-safe text (43 characters)."""
    return secrets.token_urlsafe(SECRET_BYTES)


def hash_secret(secret: str, *, iterations: int = DEFAULT_HASH_ITERATIONS,
                salt: bytes | None = None) -> str:
    """``secret`` hashed in mosquitto's ``$7$iterations$salt$digest`` format."""
    if not secret:
        raise ValueError("cannot hash an empty secret")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations!r}")
    salt = secrets.token_bytes(MOSQUITTO_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, iterations,
                                 MOSQUITTO_DIGEST_BYTES)
    return "$".join(["", MOSQUITTO_HASH_ID, str(iterations), _b64(salt), _b64(digest)])


def verify_secret(secret: str, hashed: str) -> bool:
    """Whether ``secret`` matches a ``$7$`` hash (constant-time); ``ValueError`` if malformed."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != MOSQUITTO_HASH_ID or not parts[2].isdigit():
        raise ValueError(f"not a $7$ PBKDF2-SHA512 hash, got {hashed[:16]!r}...")
    salt, expected = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    actual = hashlib.pbkdf2_hmac("sha512", secret.encode("utf-8"), salt, int(parts[2]),
                                 len(expected))
    return hmac.compare_digest(actual, expected)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


# ------------------------------------------------------------------------------ registry


def add_device(session: Session, *, device_id: str, profile: str, actor: str = SYSTEM_ACTOR,
               capabilities: Mapping[str, Any] | None = None,
               reserved_ids: Collection[str] = (),
               known_profiles: Collection[str] | None = None,
               iterations: int = DEFAULT_HASH_ITERATIONS) -> tuple[Device, str]:
    """Register a device; returns it and its secret, which is shown this once and never stored.

    ``reserved_ids`` are names a device may not take (the cloud's own broker usernames);
    ``known_profiles``, when given, the profile names a device may have (``ValueError`` naming
    them otherwise). ``DuplicateRecordError`` if the id exists (revoked ids are never reused).
    """
    device = _new_device(session, device_id, profile, capabilities, reserved_ids,
                         known_profiles)
    secret = generate_secret()
    credential = crud.add_credential(session, device_id=device_id,
                                     secret_hash=hash_secret(secret, iterations=iterations))
    crud.record_audit(session, actor=actor, action="device.add", subject=_subject(device_id),
                      details={"profile": profile, "credential_id": credential.id})
    return device, secret


def add_x509_device(session: Session, *, device_id: str, profile: str, issuer: Issuer,
                    actor: str = SYSTEM_ACTOR, capabilities: Mapping[str, Any] | None = None,
                    reserved_ids: Collection[str] = (),
                    known_profiles: Collection[str] | None = None,
                    ) -> tuple[Device, IssuedCertificate]:
    """Register a device that authenticates with a certificate ``issuer`` signs now (common
    name: the device id); returns it and the certificate with its key, which is shown this once
    and never stored (only the certificate's fingerprint is). Otherwise as ``add_device``."""
    device = _new_device(session, device_id, profile, capabilities, reserved_ids,
                         known_profiles)
    issued = issuer.device_certificate(device_id)
    credential = crud.add_credential(session, device_id=device_id,
                                     certificate_sha256=issued.sha256)
    crud.record_audit(session, actor=actor, action="device.add", subject=_subject(device_id),
                      details={"profile": profile, "credential_id": credential.id,
                               "credential": "x509", "certificate_sha256": issued.sha256})
    return device, issued


def _new_device(session: Session, device_id: str, profile: str,
                capabilities: Mapping[str, Any] | None, reserved_ids: Collection[str],
                known_profiles: Collection[str] | None) -> Device:
    validate_device_id(device_id)
    validate_profile_name(profile)
    if known_profiles is not None and profile not in known_profiles:
        raise UnknownProfileError(f"unknown profile {profile!r}: a device boots only with one of "
                         f"{', '.join(sorted(known_profiles))}")
    if device_id in {*reserved_ids, HEALTH_USERNAME}:
        raise ValueError(f"device id is reserved for a cloud service account, got {device_id!r}")
    return crud.create_device(session, device_id=device_id, profile=profile,
                              capabilities=capabilities)


def get_device(session: Session, *, device_id: str) -> Device:
    """The device; ``RecordNotFoundError`` if unknown."""
    return crud.require_device(session, device_id=device_id)


def list_devices(session: Session, *, offset: int = 0, limit: int = 50,
                 status: DeviceStatus | None = None) -> Page[Device]:
    """A page of devices (provisioning order) with the total count."""
    items = crud.list_devices(session, offset=offset, limit=limit, status=status)
    return Page(items=items, total=crud.count_devices(session, status=status),
                offset=offset, limit=limit)


def revoke_device(session: Session, *, device_id: str, actor: str = SYSTEM_ACTOR,
                  reason: str | None = None) -> Device:
    """Revoke a device and its credentials; it keeps its history. The running broker learns
    it from ``cloud.broker_admin`` (the caller applies it)."""
    device = _active_device(session, device_id)
    crud.revoke_credentials(session, device_id=device_id)
    crud.mark_revoked(session, device_id=device_id)
    crud.record_audit(session, actor=actor, action="device.revoke", subject=_subject(device_id),
                      details={"reason": reason} if reason else {})
    return device


def rotate_secret(session: Session, *, device_id: str, actor: str = SYSTEM_ACTOR,
                  iterations: int = DEFAULT_HASH_ITERATIONS) -> str:
    """Replace the device's secret; returns the new one (shown once). The old one stops
    working once the running broker has the new one (``cloud.broker_admin``). An X.509 device
    has no secret: ``CredentialKindError``."""
    _active_device(session, device_id)
    current = crud.active_credential(session, device_id=device_id)
    if current is not None and current.kind is CredentialKind.X509:
        raise CredentialKindError(
            f"device {device_id!r} authenticates with an X.509 certificate, not a secret: its "
            "certificate names it for as long as it is active; revoke it and provision a new "
            "device id to replace its key")
    crud.revoke_credentials(session, device_id=device_id)
    secret = generate_secret()
    credential = crud.add_credential(session, device_id=device_id,
                                     secret_hash=hash_secret(secret, iterations=iterations))
    crud.record_audit(session, actor=actor, action="device.rotate_secret",
                      subject=_subject(device_id), details={"credential_id": credential.id})
    return secret


def authenticate_device(session: Session, *, device_id: str, secret: str) -> Device | None:
    """The device if ``secret`` is its active secret and it is not revoked; else None."""
    device = crud.get_device(session, device_id=device_id)
    if device is None or device.status is not DeviceStatus.ACTIVE:
        return None
    credential = crud.active_credential(session, device_id=device_id)
    if credential is None or credential.secret_hash is None \
            or not verify_secret(secret, credential.secret_hash):
        return None
    return device


def _active_device(session: Session, device_id: str) -> Device:
    device = crud.require_device(session, device_id=device_id)
    if device.status is DeviceStatus.REVOKED:
        raise DeviceRevokedError(f"device {device_id!r} is revoked")
    return device


def _subject(device_id: str) -> str:
    return f"device:{device_id}"


# ------------------------------------------------------------------------------ broker files


def dynsec_password(hashed: str) -> dict[str, Any]:
    """A stored ``$7$`` hash as the dynamic-security plugin's ``password``/``salt``/
    ``iterations`` fields (the same PBKDF2-SHA512 with a 64-byte digest; only the layout
    differs). ``ValueError`` if it is not a ``$7$`` hash."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != MOSQUITTO_HASH_ID or not parts[2].isdigit():
        raise ValueError(f"not a $7$ PBKDF2-SHA512 hash, got {hashed[:16]!r}...")
    return {"password": parts[4], "salt": parts[3], "iterations": int(parts[2])}


def device_role_name(device_id: str) -> str:
    """The dynamic-security role holding one device's rights."""
    return f"{DEVICE_ROLE_PREFIX}{validate_device_id(device_id)}"


def device_role(device_id: str) -> dict[str, Any]:
    """One device's rights: publish its status, updates and LLM requests; subscribe to and
    receive its own subtree and the round broadcasts; nothing else (no ``$share``, no
    wildcard above its subtree: such a SUBSCRIBE is refused with "Not authorized")."""
    own = f"{topics.device_root(device_id)}/#"
    acls = [_acl("publishClientSend", topic) for topic in (
        topics.status(device_id), topics.updates(device_id), topics.llm_requests(device_id))]
    for topic in (own, BROADCAST_TOPIC_FILTER):
        acls += [_acl("subscribePattern", topic), _acl("publishClientReceive", topic)]
    return {"rolename": device_role_name(device_id), "acls": acls}


def dynsec_document(*, services: Sequence[tuple[str, str]],
                    devices: Sequence[tuple[str, str | None]]) -> dict[str, Any]:
    """The dynamic-security plugin's configuration from (username, ``$7$`` hash) pairs (a
    device's hash is None when it authenticates with a certificate: no password logs it in).

    Everything not granted is denied (``defaultACLAccess``). A device's client is bound to
    its client id (= its device id): another client id with its credentials is refused at
    CONNECT, and no device can connect under a service's id. Services get the whole topic
    tree, the LLM workers' shared subscription and the plugin's control topic (the cloud adds,
    revokes and rotates devices live through it, see ``cloud.broker_admin``).
    """
    clashes = sorted({HEALTH_USERNAME, *(u for u, _ in services)} & {d for d, _ in devices})
    if clashes:
        raise ValueError(f"service usernames collide with device ids, got {clashes}")
    clients = [{"username": username, **dynsec_password(hashed),
                "roles": [{"rolename": SERVICE_ROLE}, {"rolename": ADMIN_ROLE}]}
               for username, hashed in services]
    clients.append({"username": HEALTH_USERNAME, "clientid": HEALTH_USERNAME,
                    **dynsec_password(hash_secret(HEALTH_PASSWORD, iterations=1_000)),
                    "roles": [{"rolename": HEALTH_USERNAME}]})
    clients += [device_client(device_id, hashed) for device_id, hashed in devices]
    health = {"rolename": HEALTH_USERNAME, "acls": [
        _acl("subscribePattern", HEALTH_TOPIC), _acl("publishClientReceive", HEALTH_TOPIC)]}
    return {
        "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False,
                             "subscribe": False, "unsubscribe": True},
        "clients": clients, "groups": [],
        "roles": [_service_role(), _admin_role(), health, *(device_role(d) for d, _ in devices)],
    }


def device_client(device_id: str, hashed: str | None) -> dict[str, Any]:
    """A device's client entry: username and client id both its device id; without a
    password for an X.509 device (the broker's certificate listener takes its identity from
    the certificate and its rights from this entry)."""
    password = {} if hashed is None else dynsec_password(hashed)
    return {"username": device_id, "clientid": device_id, **password,
            "roles": [{"rolename": device_role_name(device_id)}]}


def _service_role() -> dict[str, Any]:
    acls = [_acl(kind, ALL_TOPICS_FILTER) for kind in (
        "publishClientSend", "publishClientReceive", "subscribePattern")]
    return {"rolename": SERVICE_ROLE, "acls": [
        *acls, _acl("subscribePattern", f"$share/+/{ALL_TOPICS_FILTER}")]}


def _admin_role() -> dict[str, Any]:
    return {"rolename": ADMIN_ROLE, "acls": [_acl(kind, DYNSEC_CONTROL_FILTER) for kind in (
        "publishClientSend", "publishClientReceive", "subscribePattern")]}


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": True}


def dynsec_config(session: Session, *, services: Sequence[ServiceAccount],
                  iterations: int = DEFAULT_HASH_ITERATIONS) -> dict[str, Any]:
    """``dynsec_document`` for the services and every active device of the registry."""
    return dynsec_document(
        services=[(s.username, hash_secret(s.password, iterations=iterations))
                  for s in services],
        devices=crud.active_device_hashes(session))


def write_broker_files(session: Session, *, directory: Path, services: Sequence[ServiceAccount],
                       group: str | None = None,
                       iterations: int = DEFAULT_HASH_ITERATIONS) -> BrokerFiles:
    """Write the dynamic-security file atomically into ``directory``, from the database.

    Mode 0600, or 0640 with group ``group`` (e.g. ``"mosquitto"``). The broker reads it at
    start and rewrites it itself after every live change; write it before the broker starts
    (first boot, or to rebuild the broker's accounts from the registry), not while it runs.
    """
    gid = None if group is None else _group_id(group)
    directory.mkdir(parents=True, exist_ok=True)
    files = BrokerFiles(directory / DYNSEC_FILE)
    text = json.dumps(dynsec_config(session, services=services, iterations=iterations),
                      indent=1)
    write_atomic(files.dynsec_file, text + "\n", gid=gid)
    return files


def _group_id(group: str) -> int:
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"no such group on this machine, got {group!r}") from None


def write_atomic(path: Path, text: str, *, mode: int | None = None, gid: int | None = None) -> None:
    """Replace ``path`` with ``text`` in one rename: readers see the old or the new file.

    Mode 0600, or 0640 owned by group ``gid``; the data is fsynced before the rename.
    """
    mode = mode if mode is not None else (0o600 if gid is None else 0o640)
    atomic_write(path, text.encode("utf-8"), prefix=f".{path.name}.", mode=mode, gid=gid)
