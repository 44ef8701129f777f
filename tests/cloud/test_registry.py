"""Device registry: hashed secrets, audit trail, a broker file a real Mosquitto accepts, live
broker changes, configs the edge loads."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy.orm import Session

from cloud import registry
from cloud.broker_admin import BrokerAdmin, SyncReport, sync_registry
from cloud.db import crud
from cloud.db.models import DeviceStatus
from fednano.broker import Mosquitto

FAST = 1_000  # hash iterations for tests that do not talk to a broker
SERVICE = registry.ServiceAccount("fednano-cloud", "service-secret")


@pytest.fixture
def session(registry_session: Session) -> Session:
    return registry_session


def _add(session: Session, device_id: str, *, actor: str = "system",
         reserved_ids: frozenset[str] = frozenset()) -> str:
    _, secret = registry.add_device(session, device_id=device_id, profile="sim-cpu",
                                    actor=actor, reserved_ids=reserved_ids, iterations=FAST)
    return secret


# ------------------------------------------------------------------------------ secrets


def test_secrets_are_long_random_and_stored_hashed(session: Session) -> None:
    device, secret = registry.add_device(session, device_id="orin-0001", profile="sim-cpu",
                                         actor="operator:alice", iterations=FAST)
    session.commit()
    assert len(secret) == 43 and secret != _add(session, "orin-0002")
    stored = crud.active_credential(session, device_id="orin-0001")
    assert stored is not None and secret not in stored.secret_hash
    assert stored.secret_hash.startswith(f"$7${FAST}$")
    assert registry.verify_secret(secret, stored.secret_hash)
    assert not registry.verify_secret(secret + "x", stored.secret_hash)
    assert registry.authenticate_device(session, device_id="orin-0001", secret=secret) is device
    assert registry.authenticate_device(session, device_id="orin-0001", secret="nope") is None
    assert registry.authenticate_device(session, device_id="ghost", secret=secret) is None


def test_the_hash_is_mosquitto_passwd_s_format(tmp_path: Path) -> None:
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed")
    passwd = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "dev", "s3cret"], check=True)
    theirs = passwd.read_text().strip().split(":", 1)[1]
    assert registry.verify_secret("s3cret", theirs)
    assert not registry.verify_secret("s3cret!", theirs)
    ours = registry.hash_secret("s3cret", iterations=101, salt=bytes(12))
    assert ours.split("$")[:3] == theirs.split("$")[:3] == ["", "7", "101"]


@pytest.mark.parametrize("bad", ["plain", "$6$1$c2FsdA==$ZGln", "$7$x$c2FsdA==$ZGln"])
def test_malformed_hashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match=r"not a \$7\$ PBKDF2-SHA512 hash"):
        registry.verify_secret("s", bad)


# ------------------------------------------------------------------------------ registry


@pytest.mark.parametrize("device_id", [
    "", "a/b", "dev+1", "dev#", "$SYS", "-lead", ".hidden", "has space", "x" * 65, "é", "a\n"])
def test_device_ids_are_topic_safe(session: Session, device_id: str) -> None:
    with pytest.raises(ValueError, match="device id must be 1-64 of"):
        _add(session, device_id)
    assert crud.count_devices(session) == 0


def test_profile_names_are_checked(session: Session) -> None:
    with pytest.raises(ValueError, match="profile name must be 1-63 of"):
        registry.add_device(session, device_id="d1", profile="../etc/passwd")


def test_ids_are_unique_and_service_names_reserved(session: Session) -> None:
    _add(session, "d1")
    session.commit()
    with pytest.raises(crud.DuplicateRecordError, match="device 'd1' exists already"):
        _add(session, "d1")
    with pytest.raises(ValueError, match="reserved for a cloud service account"):
        _add(session, "fednano-cloud", reserved_ids=frozenset({"fednano-cloud"}))


def test_every_change_is_audited_without_secrets(session: Session) -> None:
    secret = _add(session, "d1", actor="operator:alice")
    new_secret = registry.rotate_secret(session, device_id="d1", actor="operator:bob",
                                        iterations=FAST)
    registry.revoke_device(session, device_id="d1", actor="operator:carol", reason="stolen")
    session.commit()
    events = crud.list_audit_events(session, subject="device:d1")
    assert [(e.actor, e.action) for e in events] == [
        ("operator:alice", "device.add"), ("operator:bob", "device.rotate_secret"),
        ("operator:carol", "device.revoke")]
    assert events[0].details["profile"] == "sim-cpu" and events[2].details == {"reason": "stolen"}
    text = repr([(e.details, e.subject) for e in events])
    assert secret not in text and new_secret not in text


def test_list_devices_paginates(session: Session) -> None:
    for i in range(5):
        _add(session, f"dev-{i}")
    registry.revoke_device(session, device_id="dev-1")
    page = registry.list_devices(session, offset=1, limit=2)
    assert ([d.id for d in page.items], page.total, page.offset, page.limit) == (
        ["dev-1", "dev-2"], 5, 1, 2)
    revoked = registry.list_devices(session, status=DeviceStatus.REVOKED)
    assert [d.id for d in revoked.items] == ["dev-1"] and revoked.total == 1
    with pytest.raises(ValueError, match="limit must be between 1 and 1000, got 5000"):
        registry.list_devices(session, limit=5000)


def test_rotation_replaces_the_secret(session: Session) -> None:
    old = _add(session, "d1")
    new = registry.rotate_secret(session, device_id="d1", iterations=FAST)
    assert registry.authenticate_device(session, device_id="d1", secret=new) is not None
    assert registry.authenticate_device(session, device_id="d1", secret=old) is None
    assert len(registry.get_device(session, device_id="d1").credentials) == 2


def test_revocation_locks_the_device_out_for_good(session: Session) -> None:
    secret = _add(session, "d1")
    device = registry.revoke_device(session, device_id="d1")
    session.commit()
    assert device.status is DeviceStatus.REVOKED and device.revoked_at is not None
    assert crud.active_credential(session, device_id="d1") is None
    assert registry.authenticate_device(session, device_id="d1", secret=secret) is None
    with pytest.raises(registry.DeviceRevokedError, match="device 'd1' is revoked"):
        registry.revoke_device(session, device_id="d1")
    with pytest.raises(registry.DeviceRevokedError):
        registry.rotate_secret(session, device_id="d1")
    with pytest.raises(crud.DuplicateRecordError):  # a revoked id is never reissued
        _add(session, "d1")
    with pytest.raises(crud.RecordNotFoundError, match="no device 'ghost'"):
        registry.revoke_device(session, device_id="ghost")


# ------------------------------------------------------------------------------ broker files


def test_dynsec_file_lists_services_and_active_devices(session: Session) -> None:
    _add(session, "b-dev")
    _add(session, "a-dev")
    _add(session, "gone")
    registry.revoke_device(session, device_id="gone")
    config = registry.dynsec_config(session, services=[SERVICE], iterations=FAST)
    clients = {c["username"]: c for c in config["clients"]}
    assert list(clients) == ["fednano-cloud", "fednano-health", "a-dev", "b-dev"]
    assert clients["a-dev"]["clientid"] == "a-dev" and "clientid" not in clients["fednano-cloud"]
    assert [r["rolename"] for r in clients["a-dev"]["roles"]] == ["fednano-device-a-dev"]
    assert config["defaultACLAccess"] == {"publishClientSend": False,
                                          "publishClientReceive": False,
                                          "subscribe": False, "unsubscribe": True}
    assert "service-secret" not in json.dumps(config)
    stored = crud.active_credential(session, device_id="a-dev")
    assert stored is not None
    fields = registry.dynsec_password(stored.secret_hash)  # the same PBKDF2, re-laid out
    assert stored.secret_hash == f"$7${fields['iterations']}${fields['salt']}${fields['password']}"
    _add(session, "fednano-cloud")
    with pytest.raises(ValueError, match=r"collide with device ids, got \['fednano-cloud'\]"):
        registry.dynsec_config(session, services=[SERVICE])


def test_a_device_role_confines_it_to_its_own_topics() -> None:
    role = registry.device_role("dev-a")
    rights = sorted((a["acltype"], a["topic"]) for a in role["acls"])
    assert all(a["allow"] for a in role["acls"])
    assert rights == [
        ("publishClientReceive", "fednano/v1/devices/dev-a/#"),
        ("publishClientReceive", "fednano/v1/rounds/#"),
        ("publishClientSend", "fednano/v1/devices/dev-a/llm/requests"),
        ("publishClientSend", "fednano/v1/devices/dev-a/status"),
        ("publishClientSend", "fednano/v1/devices/dev-a/updates"),
        ("subscribePattern", "fednano/v1/devices/dev-a/#"),
        ("subscribePattern", "fednano/v1/rounds/#")]


def test_broker_files_are_written_atomically_and_privately(session: Session,
                                                          tmp_path: Path) -> None:
    _add(session, "d1")
    files = registry.write_broker_files(session, directory=tmp_path / "broker",
                                        services=[SERVICE], iterations=FAST)
    assert stat.S_IMODE(files.dynsec_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "broker").iterdir()) == ["dynamic-security.json"]
    with pytest.raises(ValueError, match="no such group on this machine, got 'no-such-grp'"):
        registry.write_broker_files(session, directory=tmp_path / "broker", services=[SERVICE],
                                    group="no-such-grp")
    assert sorted(p.name for p in (tmp_path / "broker").iterdir()) == ["dynamic-security.json"]


def test_service_account_repr_hides_the_password() -> None:
    assert "service-secret" not in repr(SERVICE)
    with pytest.raises(ValueError, match="without ':' or newlines"):
        registry.ServiceAccount("a:b", "x")


# ------------------------------------------------------------------------------ real broker


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    """The product's private broker (fednano.broker), its file written from the registry."""
    if shutil.which("mosquitto") is None:
        if os.environ.get("CI"):
            pytest.fail("mosquitto is required in CI (apt-get install mosquitto)")
        pytest.skip("mosquitto is not installed")
    instance = Mosquitto()
    yield instance
    instance.close()


def _start(session: Session, broker: Mosquitto) -> Mosquitto:
    registry.write_broker_files(session, directory=broker.folder, services=[SERVICE],
                                iterations=FAST)
    return broker.start()


class Client:
    """A paho MQTT v5 client that records its CONNACK, SUBACKs and messages."""

    def __init__(self, port: int, username: str, password: str,
                 client_id: str | None = None) -> None:
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.connack: ReasonCode | None = None
        self.suback: list[ReasonCode] = []
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=client_id or username)
        self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda _c, _u, msg: self.messages.append(
            (msg.topic, bytes(msg.payload)))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        assert self.connected.wait(5), "no CONNACK"

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, reason: ReasonCode,
                    _p: Properties | None) -> None:
        self.connack = reason
        self.connected.set()
        if reason.is_failure:
            self.client.disconnect()  # no reconnect loop with a wrong password

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, reasons: list[ReasonCode],
                      _p: Properties | None) -> None:
        self.suback = reasons
        self.subscribed.set()

    def subscribe(self, topic: str) -> ReasonCode:
        self.subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self.subscribed.wait(5), "no SUBACK"
        return self.suback[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(5)

    def wait_for(self, topic: str, timeout: float = 5) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for got, payload in self.messages:
                if got == topic:
                    return payload
            time.sleep(0.02)
        raise AssertionError(f"nothing on {topic}; got {self.messages}")

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
def test_a_real_mosquitto_takes_the_generated_file(session: Session, broker: Mosquitto) -> None:
    secret_a, secret_b = _add(session, "dev-a"), _add(session, "dev-b")
    session.commit()
    _start(session, broker)
    clients: list[Client] = []
    try:
        for user, password, client_id in (("dev-a", secret_b, "dev-a"),  # wrong secret
                                          ("dev-a", secret_a, "dev-b"),  # another's id
                                          ("dev-a", secret_a, "fednano-coordinator")):
            clients.append(Client(broker.port, user, password, client_id))
            assert clients[-1].connack is not None and clients[-1].connack.is_failure

        cloud, dev_a, dev_b = (Client(broker.port, user, pw, client_id) for user, pw, client_id
                               in ((SERVICE.username, SERVICE.password, "cloud-1"),
                                   ("dev-a", secret_a, None), ("dev-b", secret_b, None)))
        clients += [cloud, dev_a, dev_b]
        assert not any(c.connack is None or c.connack.is_failure for c in (cloud, dev_a, dev_b))

        assert not cloud.subscribe("fednano/v1/#").is_failure
        assert not dev_b.subscribe("fednano/v1/devices/dev-b/tasks").is_failure
        for outside in ("fednano/v1/devices/dev-b/#", "fednano/v1/#", "#",
                        "$share/llm/fednano/v1/devices/+/llm/requests"):
            assert dev_a.subscribe(outside).is_failure, outside  # refused at SUBACK

        worker = Client(broker.port, SERVICE.username, SERVICE.password, "llm-worker-1")
        clients.append(worker)
        assert not worker.subscribe("$share/llm/fednano/v1/devices/+/llm/requests").is_failure

        dev_a.publish("fednano/v1/devices/dev-b/updates", b"forged")   # refused by the broker
        dev_a.publish("fednano/v1/devices/dev-a/updates", b"genuine")
        dev_a.publish("fednano/v1/devices/dev-a/llm/requests", b"step")
        assert cloud.wait_for("fednano/v1/devices/dev-a/updates") == b"genuine"
        assert ("fednano/v1/devices/dev-b/updates", b"forged") not in cloud.messages
        assert worker.wait_for("fednano/v1/devices/dev-a/llm/requests") == b"step"

        cloud.publish("fednano/v1/devices/dev-b/tasks", b"train")
        cloud.publish("fednano/v1/rounds/current", b"round 1", retain=True)
        assert dev_b.wait_for("fednano/v1/devices/dev-b/tasks") == b"train"
        assert not dev_a.subscribe("fednano/v1/rounds/current").is_failure
        assert dev_a.wait_for("fednano/v1/rounds/current") == b"round 1"  # broadcasts: readable
        time.sleep(0.2)
        assert [t for t, _ in dev_a.messages if "/dev-b/" in t] == []      # ... others' topics not
    finally:
        for client in clients:
            client.close()


@pytest.mark.integration
def test_add_revoke_and_rotate_reach_a_running_broker_at_once(
        session: Session, broker: Mosquitto) -> None:
    old_a, secret_b = _add(session, "dev-a"), _add(session, "dev-b")
    session.commit()
    _start(session, broker)
    clients: list[Client] = []
    admin = BrokerAdmin.connect(url=broker.url, username=SERVICE.username,
                                password=SERVICE.password)
    try:
        connected_a, connected_b = (Client(broker.port, "dev-a", old_a),
                                    Client(broker.port, "dev-b", secret_b))
        clients += [connected_a, connected_b]
        new_a = registry.rotate_secret(session, device_id="dev-a", iterations=FAST)
        registry.revoke_device(session, device_id="dev-b")
        _, secret_c = registry.add_device(session, device_id="dev-c", profile="sim-cpu",
                                          iterations=FAST)
        session.commit()
        admin.set_secret("dev-a", new_a)
        admin.remove_device("dev-b")
        admin.add_device("dev-c", secret_c)
        for client in (connected_a, connected_b):  # both live connections are closed
            deadline = time.monotonic() + 5
            while client.client.is_connected():
                assert time.monotonic() < deadline, "a live connection survived"
                time.sleep(0.05)
        for user, password, refused in (("dev-a", old_a, True), ("dev-b", secret_b, True),
                                        ("dev-a", new_a, False), ("dev-c", secret_c, False)):
            clients.append(Client(broker.port, user, password))
            assert clients[-1].connack is not None
            assert clients[-1].connack.is_failure is refused, (user, clients[-1].connack)
        assert sync_registry(admin, session, service_usernames=[SERVICE.username]) == (
            SyncReport(removed=(), missing=()))
        # Revoked while the broker could not be told: the next sync removes it, and kicks it.
        registry.revoke_device(session, device_id="dev-c")
        session.commit()
        assert clients[-1].client.is_connected()
        assert sync_registry(admin, session, service_usernames=[SERVICE.username]) == (
            SyncReport(removed=("dev-c",), missing=()))
        deadline = time.monotonic() + 5
        while clients[-1].client.is_connected():
            assert time.monotonic() < deadline, "the revoked device stayed connected"
            time.sleep(0.05)
    finally:
        admin.close()
        for client in clients:
            client.close()
