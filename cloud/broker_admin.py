"""Live broker accounts: the cloud drives Mosquitto's dynamic-security plugin over its control
topic, so adding, revoking and rotating a device takes effect at once, with no file rewrite or
broker reload.

``BrokerAdmin`` sends a batch of commands to ``$CONTROL/dynamic-security/v1`` and waits for the
plugin's answers (matched by correlation data) on ``.../v1/response``. Deleting a device's
client disconnects its live connection at once and refuses its next CONNECT (an X.509
device, whose certificate the broker still accepts, is refused every publish and subscribe
instead); the plugin saves its file after every change, so a restarted broker keeps it.

``sync_registry`` brings a running broker in line with the database after a time the two could
not talk (the broker was down during a revocation): every device client the database does not
hold as active is deleted. A device that is active in the database but missing at the broker
cannot be recreated from a hash over the control topic (the plugin takes plaintext there); it
is reported, and ``fednano devices broker-files`` rebuilds the broker's file from the database
before the broker's next start. An X.509 device has no password, so it is recreated.

Typical use::

    with BrokerAdmin.connect(settings) as admin:
        admin.remove_device("dev-7")
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from cloud import registry
from cloud.db import crud
from cloud.settings import CloudSettings
from shared.mqtt import BrokerAddress, ClientOptions, Inbox, MqttClient, MqttError

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
MAX_CONTROL_BYTES = 2**20
DEFAULT_TIMEOUT_S = 10.0


class BrokerAdminError(RuntimeError):
    """The plugin refused a command, or did not answer (the message says which)."""


@dataclass(frozen=True)
class SyncReport:
    """What ``sync_registry`` changed at the broker and what it could not fix."""

    removed: tuple[str, ...]
    missing: tuple[str, ...]  # active in the database, unknown to the broker
    restored: tuple[str, ...] = ()  # X.509 devices recreated (no password needed)


class BrokerAdmin:
    """Commands to the dynamic-security plugin through a connected service ``MqttClient``."""

    def __init__(self, client: MqttClient, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.client = client
        self.timeout = timeout
        self._lock = threading.Lock()  # one batch in flight: answers are read in order
        self._responses: Inbox = client.subscribe(RESPONSE_TOPIC, timeout=timeout)

    @classmethod
    def connect(cls, *, url: str, username: str, password: str, ca_file: str | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> BrokerAdmin:
        """A new clean-session admin connection (client id ``<username>-admin-<random>``)."""
        client = MqttClient(BrokerAddress.parse(url, ca_file=ca_file), ClientOptions(
            client_id=f"{username}-admin-{uuid.uuid4().hex[:8]}", username=username,
            password=password, clean_start=True, session_expiry_s=0))
        client.connect(timeout)
        return cls(client, timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> BrokerAdmin:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- commands -------------------------------------------------------------------------

    def run(self, commands: Sequence[Mapping[str, Any]], *,
            ignore: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Send ``commands`` as one batch; their answers in order. ``BrokerAdminError`` on an
        error answer whose text does not contain one of ``ignore`` (e.g. "not found")."""
        tagged = [{**c, "correlationData": uuid.uuid4().hex} for c in commands]
        with self._lock:
            self.client.publish(CONTROL_TOPIC, json.dumps({"commands": tagged}).encode(),
                                max_bytes=MAX_CONTROL_BYTES, timeout=self.timeout)
            answers = self._collect({c["correlationData"] for c in tagged})
        ordered = [answers[c["correlationData"]] for c in tagged]
        for command, answer in zip(tagged, ordered, strict=True):
            error = answer.get("error")
            if error and not any(text in str(error) for text in ignore):
                raise BrokerAdminError(f"broker refused {command['command']} "
                                       f"({_subject(command)}): {error}")
        return ordered

    def _collect(self, pending: set[str]) -> dict[str, dict[str, Any]]:
        answers: dict[str, dict[str, Any]] = {}
        while pending - answers.keys():
            message = self._responses.get(timeout=self.timeout)
            if message is None:
                raise BrokerAdminError(f"the broker's dynamic-security plugin did not answer "
                                       f"within {self.timeout:g} s (is it loaded?)")
            for answer in json.loads(message.payload).get("responses", []):
                tag = answer.get("correlationData")
                if tag in pending:
                    answers[tag] = answer
        return answers

    def add_device(self, device_id: str, secret: str | None, *,
                   ignore: Sequence[str] = ()) -> None:
        """Create the device's role and client (bound to its client id) with ``secret``; with
        None, a client no password logs in to: an X.509 device, whose certificate names it.
        ``ignore`` as for ``run``."""
        role = registry.device_role(device_id)
        client = {"command": "createClient", "username": device_id, "clientid": device_id,
                  "roles": [{"rolename": role["rolename"]}]}
        if secret is not None:
            client["password"] = secret
        self.run([{"command": "createRole", "rolename": role["rolename"],
                   "acls": role["acls"]}, client], ignore=ignore)

    def remove_device(self, device_id: str) -> None:
        """Delete the device's client (its live connection is closed at once) and role;
        one already gone is not an error."""
        self.run([{"command": "deleteClient", "username": device_id},
                  {"command": "deleteRole", "rolename": registry.device_role_name(device_id)}],
                 ignore=("not found",))

    def set_secret(self, device_id: str, secret: str) -> None:
        """Replace the device's secret and close its live connection (it reconnects with the
        new one; the old one is refused from now on)."""
        self.run([{"command": "setClientPassword", "username": device_id, "password": secret},
                  {"command": "disableClient", "username": device_id},
                  {"command": "enableClient", "username": device_id}])

    def client_names(self) -> list[str]:
        """Every client username the plugin holds."""
        answer = self.run([{"command": "listClients", "verbose": False, "count": -1,
                            "offset": 0}])[0]
        return [str(name) for name in answer.get("data", {}).get("clients", [])]


def sync_registry(admin: BrokerAdmin, session: Session, *,
                  service_usernames: Sequence[str]) -> SyncReport:
    """Delete every device client the database does not hold as active; recreate the active
    X.509 devices the broker lacks (their client has no password); report the active password
    devices the broker lacks."""
    # The broker first, then the database: a revocation deletes the broker's client after
    # committing, so a device this pass sees active was still active when the broker was
    # listed, and restoring it cannot undo a revocation that raced the sync.
    at_broker = set(admin.client_names()) - {*service_usernames, registry.HEALTH_USERNAME}
    hashes = dict(crud.active_device_hashes(session))
    removed = sorted(at_broker - hashes.keys())
    for device_id in removed:
        admin.remove_device(device_id)
        log.warning("broker: removed %s, which is not an active device", device_id)
    absent = sorted(hashes.keys() - at_broker)
    restored = [device_id for device_id in absent if hashes[device_id] is None]
    for device_id in restored:
        admin.add_device(device_id, None, ignore=("already exists",))  # its role may remain
        log.warning("broker: recreated X.509 device %s, which it had lost", device_id)
    missing = [device_id for device_id in absent if hashes[device_id] is not None]
    if missing:
        log.error("broker: active devices unknown to the broker: %s (rebuild its file with "
                  "`fednano devices broker-files` before its next start)", missing)
    return SyncReport(tuple(removed), tuple(missing), tuple(restored))


def connect(settings: CloudSettings) -> BrokerAdmin:
    """An admin connection with the cloud's own broker account."""
    return BrokerAdmin.connect(url=settings.broker_url, username=settings.broker_username,
                               password=settings.broker_password.get_secret_value())


def apply(settings: CloudSettings, change: Callable[[BrokerAdmin], None]) -> str | None:
    """Apply ``change`` to the running broker (unless ``broker_live_admin`` is off): None when
    done (or off), else why it failed -- logged; the database change stands (the gate refuses
    a revoked device's updates anyway) and the coordinator's next start syncs the broker."""
    if not settings.broker_live_admin:
        return None
    try:
        with connect(settings) as admin:
            change(admin)
    except (MqttError, BrokerAdminError) as err:
        log.error("the broker was not updated: %s", err)
        return str(err)
    return None


def sync_at_start(settings: CloudSettings, session: Session) -> SyncReport | None:
    """``sync_registry`` on a fresh admin connection (None when off or unreachable, logged)."""
    if not settings.broker_live_admin:
        return None
    try:
        with connect(settings) as admin:
            return sync_registry(admin, session, service_usernames=[settings.broker_username])
    except (MqttError, BrokerAdminError) as err:
        log.error("could not sync the broker's accounts with the registry: %s", err)
        return None


def _subject(command: Mapping[str, Any]) -> str:
    return str(command.get("username") or command.get("rolename") or "")
