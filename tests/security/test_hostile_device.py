"""One provisioned device turned hostile, against the real Mosquitto (the product's
configuration: dynamic-security accounts, persistence) and the real coordinator: it cannot take
another client's session, steal others' LLM requests, squat an update id, outlive its
revocation or take the merge, and a broker crash keeps what the broker acknowledged.

Issue 11, items 1-5 and 8 (one test each; each fails on the code before the fix).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud import registry
from cloud.broker_admin import BrokerAdmin
from cloud.coordinator import open_round
from cloud.coordinator_mqtt import COORDINATOR_CLIENT_ID
from cloud.db import crud, migrate
from cloud.db.models import DeviceStatus, UpdateStatus
from cloud.db.session import sqlite_url
from cloud.rounds import RoundConfig
from cloud.validation import task_id_for
from edge.state import update_id_for
from shared import topics
from shared.mqtt import ConnectRefused, Inbox, SubscribeError
from tests.brokers import BrokerUnavailable, MosquittoBroker
from tests.cloud.roundkit import device_update
from tests.cloud.test_coordinator_mqtt import Cloud, Device, wait_for

pytestmark = pytest.mark.integration
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e")
LLM_SHARE = f"$share/llm/{topics.ALL_LLM_REQUESTS}"


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    try:
        instance = MosquittoBroker(devices=DEVICES, services=("cloud",)).start()
    except BrokerUnavailable as err:
        pytest.fail(str(err))
    yield instance
    instance.close()


@pytest.fixture
def cloud(broker: MosquittoBroker, tmp_path: Path) -> Iterator[Cloud]:
    url = sqlite_url(tmp_path / "cloud.db")
    migrate.upgrade(url)
    instance = Cloud(broker, url, tmp_path)
    with instance.sessions() as session:
        for device_id in DEVICES:
            crud.create_device(session, device_id=device_id, profile="sim-cpu")
        session.commit()
    instance.start()
    yield instance
    if instance.service is not None and instance.client is not None:
        instance.service.stop()
        instance.client.close()
    instance.engine.dispose()


def _round(cloud: Cloud, *device_ids: str, **config: object) -> tuple[int, dict[str, Device]]:
    devices = {d: Device(cloud.broker, d) for d in device_ids}
    wait_for(lambda: cloud.query(lambda s: all(
        crud.require_device(s, device_id=d).online for d in device_ids)))
    round_id = cloud.query(lambda s: open_round(s, config=RoundConfig(
        deadline_s=300, min_participants=len(device_ids), **config), actor="test").id)
    return round_id, devices


def _status(cloud: Cloud, round_id: int, device_id: str) -> list[tuple[str, str | None]]:
    return cloud.query(lambda s: [(u.status.value, u.rejection_code) for u in crud.list_updates(
        s, round_id=round_id) if u.device_id == device_id])


def test_1_a_device_cannot_take_over_another_clients_session(cloud: Cloud) -> None:
    round_id, devices = _round(cloud, "dev-a", "dev-b")
    task = devices["dev-a"].task()
    cloud.stop()  # the coordinator is away: the broker queues dev-a's update in its session
    devices["dev-a"].send(device_update(*task, "dev-a"))  # acknowledged by the broker
    for victim in ("dev-a", COORDINATOR_CLIENT_ID):  # dev-b tries both ids, clean start
        with pytest.raises(ConnectRefused, match="Not authorized"):
            cloud.broker.connect("dev-b", client_id=victim, clean_start=True)
    assert devices["dev-a"].client.connected  # not kicked
    cloud.start()
    wait_for(lambda: _status(cloud, round_id, "dev-a") == [("accepted", None)])


def test_2_a_device_cannot_steal_llm_requests(broker: MosquittoBroker) -> None:
    """The issue's scenario: 1 hostile connection and 20 requests, 4 and 40; 0 lost."""
    worker = broker.connect("cloud", client_id="llm-worker-1")
    received = worker.subscribe(LLM_SHARE)
    honest = broker.connect("dev-a")
    sent = 0
    for hostile_ids, requests in ((("dev-b",), 20), (("dev-b", "dev-c", "dev-d", "dev-e"), 40)):
        for device_id in hostile_ids:
            hostile = broker.connect(device_id)
            for topic_filter in (LLM_SHARE, topics.ALL_LLM_REQUESTS, "#"):
                with pytest.raises(SubscribeError, match="Not authorized"):
                    hostile.subscribe(topic_filter)  # refused at SUBACK, not just filtered
        for _ in range(requests):
            honest.publish(topics.llm_requests("dev-a"), b"step", max_bytes=2**20)
        sent += requests
        assert _drain(received, sent) == sent


def _drain(inbox: Inbox, expected: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while len(inbox) < expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return len(inbox)


def test_3_an_update_id_is_owned_by_its_authenticated_sender(cloud: Cloud) -> None:
    round_id, devices = _round(cloud, "dev-a", "dev-b")
    task_a, task_b = devices["dev-a"].task(), devices["dev-b"].task()
    squatted = update_id_for("dev-a", task_id_for(round_id, "dev-a"))  # predictable
    devices["dev-b"].send(device_update(*task_b, "dev-b", update_id=squatted, scale=1e6))
    wait_for(lambda: _status(cloud, round_id, "dev-b"))
    devices["dev-a"].send(device_update(*task_a, "dev-a", update_id=squatted))
    wait_for(lambda: _status(cloud, round_id, "dev-a") == [("accepted", None)])


def test_4_revocation_takes_effect_at_the_broker_and_the_gate(cloud: Cloud) -> None:
    round_id, devices = _round(cloud, "dev-a", "dev-b")
    task = devices["dev-a"].task()
    cloud.stop()
    devices["dev-a"].send(device_update(*task, "dev-a"))  # queued before the revocation
    with cloud.sessions() as session:
        registry.revoke_device(session, device_id="dev-a")
        session.commit()
    creds = cloud.broker.credentials("cloud")
    with BrokerAdmin.connect(url=cloud.broker.url, username=creds.username,
                             password=creds.password) as admin:
        admin.remove_device("dev-a")
    wait_for(lambda: not devices["dev-a"].client.connected, timeout=5)  # kicked at once
    with pytest.raises(ConnectRefused):
        cloud.broker.connect("dev-a")
    cloud.start()
    wait_for(lambda: _status(cloud, round_id, "dev-a") == [])
    wait_for(lambda: cloud.query(lambda s: [e.details["code"] for e in crud.list_audit_events(
        s, action="update.refused")]) == ["revoked"])
    assert cloud.query(lambda s: crud.require_device(s, device_id="dev-a").status) is (
        DeviceStatus.REVOKED)


def test_5_an_acknowledged_update_survives_a_broker_kill(cloud: Cloud) -> None:
    round_id, devices = _round(cloud, "dev-a", "dev-b")
    task = devices["dev-a"].task()
    cloud.stop()
    devices["dev-a"].send(device_update(*task, "dev-a"))  # PUBACKed by the broker
    time.sleep(0.3)  # the broker saves at its next loop turn after the PUBACK (docs/security)
    cloud.broker.kill_and_start()
    cloud.start()
    wait_for(lambda: _status(cloud, round_id, "dev-a") == [("accepted", None)])


def test_8_a_device_cannot_take_the_merge(cloud: Cloud) -> None:
    round_id, devices = _round(cloud, "dev-a", "dev-b")
    training = RoundConfig().assumed_training()
    bound = training.steps * training.batch_size  # what the round asks a device to train on
    devices["dev-a"].send(device_update(*devices["dev-a"].task(), "dev-a", n_samples=2**62))
    devices["dev-b"].send(device_update(*devices["dev-b"].task(), "dev-b", n_samples=bound))
    wait_for(lambda: cloud.query(lambda s: crud.latest_adapter_version(s).round_id) == round_id)
    lineage = cloud.query(lambda s: dict((u.device_id, w) for u, w in crud.version_lineage(
        s, version_id=crud.latest_adapter_version(s).id)))
    assert lineage == {"dev-a": 0.5, "dev-b": 0.5}
    rows = cloud.query(lambda s: {u.device_id: u.n_samples for u in crud.list_updates(
        s, round_id=round_id, status=UpdateStatus.ACCEPTED)})
    assert rows == {"dev-a": bound, "dev-b": bound}
