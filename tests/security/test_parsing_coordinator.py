"""The real coordinator (SQLite and PostgreSQL) behind a real Mosquitto, fed by a hostile
device: every hostile update is refused with a code, recorded and answered on the device's
tasks topic; none ends the service (no crash loop on restart either); an honest update is still
accepted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cloud.coordinator import open_round
from cloud.db import crud
from cloud.db.models import AuditEvent, UpdateStatus
from cloud.rounds import RoundConfig
from shared import topics
from shared.messages import Refusal, envelope_kind, unpack
from tests.brokers import MosquittoBroker
from tests.cloud.roundkit import device_update
from tests.cloud.test_coordinator_mqtt import DEVICES, Cloud, Device, wait_for
from tests.cloud.test_coordinator_mqtt import broker as broker
from tests.security.hostile import deep_header, envelope, rewrite_header

pytestmark = pytest.mark.integration


def _refusals(device: Device, count: int) -> list[Refusal]:
    out = []
    while len(out) < count:
        message = device.tasks.get(timeout=15)
        assert message is not None, f"{len(out)} of {count} refusals answered"
        if envelope_kind(message.payload) == Refusal.kind:
            out.append(unpack(message.payload, Refusal)[0])
    return out


def _refused_codes(cloud: Cloud) -> list[str]:
    rows = cloud.query(lambda s: s.query(AuditEvent).filter(
        AuditEvent.action == "update.refused").all())
    return sorted(r.details["code"] for r in rows)


def test_hostile_updates_are_refused_answered_and_the_coordinator_lives(
        broker: MosquittoBroker, migrated_url: str, tmp_path: Path) -> None:
    cloud = Cloud(broker, migrated_url, tmp_path)
    cloud.query(lambda s: [crud.create_device(s, device_id=d, profile="sim-cpu")
                           for d in DEVICES])
    service = cloud.start()
    devices = {d: Device(broker, d) for d in ("dev-a", "dev-b")}
    wait_for(lambda: cloud.query(lambda s: crud.require_device(s, device_id="dev-b").online))
    round_id = cloud.query(lambda s: open_round(s, config=RoundConfig(
        deadline_s=300, min_participants=2, max_participants=2, quorum_fraction=1.0),
        actor="test").id)
    tasks = {d: device.task() for d, device in devices.items()}
    good = device_update(*tasks["dev-a"], "dev-a", n_samples=10)

    def header(edit):  # type: ignore[no-untyped-def]
        return rewrite_header(good, edit)

    hostile = [
        envelope(deep_header("update", depth=50_000)),
        header(lambda h: h.replace(b'"n_samples":10', b'"n_samples":%d' % 2**64)),
        header(lambda h: h.replace(b'"round_id":%d' % round_id, b'"round_id":%d' % 2**63)),
        header(lambda h: h.replace(b'"n_samples":10', b'"n_samples":"10"')),
        header(lambda h: h.replace(b'"v":1', b'"v":true')),
        header(lambda h: h.replace(b'"loss_last":1.0', b'"loss_last":NaN')),
        header(lambda h: h.replace(b'"loss_last":1.0', b'"loss_last":1e999')),
        b"\x00" * 64,
    ]
    for payload in hostile:
        devices["dev-a"].send(payload)
    answers = _refusals(devices["dev-a"], len(hostile))
    assert {(a.of, a.code) for a in answers} == {("update", "malformed")}
    assert _refused_codes(cloud) == ["malformed"] * len(hostile)
    assert service.alive

    cloud.stop()  # a restart resumes cleanly: nothing hostile was stored
    service = cloud.start()
    devices["dev-b"].send(device_update(*tasks["dev-b"], "dev-b", n_samples=10))
    devices["dev-a"].send(good)
    wait_for(lambda: len(cloud.query(lambda s: crud.list_updates(s, round_id=round_id))) == 2)
    statuses = cloud.query(lambda s: {u.device_id: u.status
                                      for u in crud.list_updates(s, round_id=round_id)})
    assert statuses == {"dev-a": UpdateStatus.ACCEPTED, "dev-b": UpdateStatus.ACCEPTED}
    assert service.alive
    cloud.stop()
    cloud.engine.dispose()


def test_deep_presence_is_refused_answered_and_capabilities_are_replaced(
        broker: MosquittoBroker, migrated_url: str, tmp_path: Path) -> None:
    cloud = Cloud(broker, migrated_url, tmp_path)
    cloud.query(lambda s: [crud.create_device(s, device_id=d, profile="sim-cpu")
                           for d in DEVICES])
    service = cloud.start()
    device = Device(broker, "dev-a")
    wait_for(lambda: cloud.query(lambda s: crud.require_device(s, device_id="dev-a").online))
    deep = {"kind": "presence", "device_id": "dev-a", "state": "online",
            "capabilities": {"x": json.loads("[" * 900 + "]" * 900)}}
    device.client.publish(topics.status("dev-a"), json.dumps(deep).encode(), max_bytes=2**20)
    (answer,) = _refusals(device, 1)
    assert (answer.of, answer.code) == ("presence", "malformed")
    shallow = {**deep, "capabilities": {"samples": 3}}
    device.client.publish(topics.status("dev-a"), json.dumps(shallow).encode(),
                          max_bytes=2**20)
    wait_for(lambda: cloud.query(
        lambda s: crud.require_device(s, device_id="dev-a").capabilities) == {"samples": 3})
    assert service.alive
    cloud.stop()
    cloud.engine.dispose()
