"""A full round through a real Mosquitto (per-device accounts and rights) on SQLite and
PostgreSQL: devices speak the wire protocol, bad updates are rejected with recorded reasons,
a redelivery is ignored, and the coordinator is restarted mid-round."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch

from cloud.aggregation import Aggregator
from cloud.blobs import Blob, BlobStore
from cloud.coordinator import Coordinator, open_round
from cloud.coordinator_mqtt import (
    COORDINATOR_CLIENT_ID,
    CoordinatorService,
    MqttPublisher,
    coordinator_client_options,
)
from cloud.db import crud
from cloud.db.models import RoundState, UpdateStatus
from cloud.db.session import make_engine, make_session_factory, session_scope
from cloud.rounds import RoundConfig
from shared import codec, topics
from shared.messages import RoundAnnouncement, TrainTask, envelope_kind, from_json, unpack
from shared.mqtt import MqttClient
from tests.brokers import BrokerUnavailable, MosquittoBroker
from tests.cloud.roundkit import (
    BASE_VERSION,
    FakeClock,
    constant_evaluator,
    device_update,
    global_state,
    presence,
)

pytestmark = pytest.mark.integration
DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d", "dev-e")


def wait_for(predicate: Callable[[], object], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(0.05)


@pytest.fixture
def broker() -> Iterator[MosquittoBroker]:
    try:
        instance = MosquittoBroker(devices=DEVICES, services=("cloud",)).start()
    except BrokerUnavailable as err:
        pytest.fail(str(err))
    yield instance
    instance.close()


class Device:
    """A minimal device: presence, its task inbox, and updates on its own topic."""

    def __init__(self, broker: MosquittoBroker, device_id: str) -> None:
        self.id = device_id
        self.client = broker.connect(device_id)
        self.tasks = self.client.subscribe(topics.tasks(device_id))
        self.received: list[tuple[TrainTask, dict[str, bytes]]] = []
        self.client.publish(topics.status(device_id), presence(device_id), max_bytes=2**20,
                            retain=True)

    def task(self, timeout: float = 15.0) -> tuple[TrainTask, dict[str, bytes]]:
        message = self.tasks.get(timeout=timeout)
        assert message is not None, f"{self.id} got no task"
        assert envelope_kind(message.payload) == TrainTask.kind
        self.received.append(unpack(message.payload, TrainTask))
        return self.received[-1]

    def send(self, payload: bytes) -> None:
        self.client.publish(topics.updates(self.id), payload, max_bytes=8 * 2**20)


class Cloud:
    """Coordinator + its MQTT service over one database; ``restart`` builds them anew."""

    def __init__(self, broker: MosquittoBroker, url: str, root: Path) -> None:
        self.broker, self.url, self.root = broker, url, root
        self.engine = make_engine(url)
        self.sessions = make_session_factory(engine=self.engine)
        self.clock = FakeClock()
        self.service: CoordinatorService | None = None
        self.client: MqttClient | None = None

    def start(self, blob_store: type[BlobStore] = BlobStore, *, max_batch: int = 100,
              batch_wait_s: float = 0.0, dies_before_acks: bool = False) -> CoordinatorService:
        """``dies_before_acks``: the service never acknowledges (as if the process died right
        after each commit); ``stop`` then leaves every message it took with the broker."""
        creds = self.broker.credentials("cloud")
        self.client = MqttClient(self.broker.address, coordinator_client_options(
            creds.username, creds.password, client_id=COORDINATOR_CLIENT_ID,
            max_batch=max_batch))
        if dies_before_acks:
            self.client.ack = lambda received: True  # type: ignore[method-assign]
        self.client.connect(10)
        blobs = blob_store(self.root / "blobs")
        coordinator = Coordinator(
            self.sessions, blobs=blobs, publisher=MqttPublisher(self.client),
            aggregator=Aggregator(blobs, evaluator=constant_evaluator(0.7)),
            base_version=BASE_VERSION, clock=self.clock)
        coordinator.ensure_initial_version(global_state())
        self.service = CoordinatorService(coordinator, self.client, tick_interval_s=0.05,
                                          max_batch=max_batch,
                                          batch_wait_s=batch_wait_s).start()
        return self.service

    def stop(self) -> None:
        assert self.service is not None and self.client is not None
        self.service.stop()
        self.client.close()

    def query(self, fn: Callable):  # type: ignore[no-untyped-def, type-arg]
        with session_scope(self.sessions) as session:
            return fn(session)


def _online(cloud: Cloud) -> bool:
    return cloud.query(lambda s: all(crud.require_device(s, device_id=d).online
                                     for d in DEVICES))


def _register(cloud: Cloud) -> None:
    with session_scope(cloud.sessions) as session:
        for device_id in DEVICES:
            crud.create_device(session, device_id=device_id, profile="sim-cpu")


def _open_round(cloud: Cloud, broker: MosquittoBroker,
                config: RoundConfig) -> tuple[dict[str, Device], int]:
    """The devices connected and seen online, then a round opened (as the API opens one)."""
    devices = {d: Device(broker, d) for d in DEVICES}
    wait_for(lambda: _online(cloud))
    return devices, cloud.query(lambda s: open_round(s, config=config, actor="test").id)


def test_a_round_through_the_broker_with_bad_updates_and_a_restart(
        broker: MosquittoBroker, migrated_url: str, tmp_path: Path) -> None:
    cloud = Cloud(broker, migrated_url, tmp_path)
    _register(cloud)
    cloud.start()
    devices, round_id = _open_round(cloud, broker, RoundConfig(deadline_s=300, max_delta_norm=5.0))
    tasks = {d: device.task() for d, device in devices.items()}
    assert {t.round_id for t, _ in tasks.values()} == {round_id}

    good_a = device_update(*tasks["dev-a"], "dev-a", scale=0.02, n_samples=30)
    devices["dev-a"].send(good_a)
    devices["dev-a"].send(good_a)  # a redelivery: acknowledged, ignored
    devices["dev-c"].send(device_update(*tasks["dev-c"], "dev-c", scale=50.0))  # norm bound
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:])
             for k, v in codec.decode(tasks["dev-d"][1]["global"]).items()}
    devices["dev-d"].send(device_update(*tasks["dev-d"], "dev-d", delta=wrong))
    devices["dev-e"].send(device_update(*tasks["dev-e"], "dev-e", global_version=99))
    wait_for(lambda: len(cloud.query(lambda s: crud.list_updates(s, round_id=round_id))) == 4)
    assert cloud.query(lambda s: crud.require_round(s, round_id=round_id).state) is (
        RoundState.COLLECTING)

    cloud.stop()  # the coordinator goes down mid-round ...
    devices["dev-b"].send(device_update(*tasks["dev-b"], "dev-b", scale=0.04, n_samples=10))
    cloud.start()  # ... and comes back: tasks re-sent, dev-b's queued update arrives
    assert devices["dev-b"].task()[0].task_id == tasks["dev-b"][0].task_id
    wait_for(lambda: cloud.query(lambda s: crud.require_round(s, round_id=round_id).state)
             is RoundState.CLOSED)
    cloud.stop()

    rows = cloud.query(lambda s: {u.device_id: (u.status, u.rejection_code)
                                  for u in crud.list_updates(s, round_id=round_id)})
    assert rows == {"dev-a": (UpdateStatus.ACCEPTED, None), "dev-b": (UpdateStatus.ACCEPTED, None),
                    "dev-c": (UpdateStatus.REJECTED, "norm_bound"),
                    "dev-d": (UpdateStatus.REJECTED, "shape"),
                    "dev-e": (UpdateStatus.REJECTED, "stale")}
    lineage = cloud.query(lambda s: sorted(
        (u.device_id, w) for u, w in crud.version_lineage(
            s, version_id=crud.latest_adapter_version(s).id)))
    assert lineage == [("dev-a", 0.75), ("dev-b", 0.25)]
    metrics = cloud.query(lambda s: {m.name: m.value for m in crud.list_metrics(
        s, round_id=round_id) if m.device_id is None})
    assert metrics["updates_rejected"] == 3 and metrics["accuracy"] == 0.7
    announced = devices["dev-a"].client.subscribe(topics.ROUND_ANNOUNCEMENT).get(timeout=10)
    assert announced is not None and announced.retain
    announcement = from_json(announced.payload, RoundAnnouncement)
    assert (announcement.round_id, announcement.state, announcement.global_version) == (
        round_id, "closed", 2)
    cloud.engine.dispose()


class FullDisk(BlobStore):
    def store(self, blobs: Sequence[tuple[Blob, bytes]]) -> None:
        raise OSError(28, "No space left on device (test)")


def test_an_update_received_but_not_stored_survives_the_coordinator_stopping(
        broker: MosquittoBroker, migrated_url: str, tmp_path: Path) -> None:
    """Acknowledged only once stored: the broker keeps what the coordinator held when it went
    down and redelivers it to the next one (before manual acks, paho acknowledged on receipt
    and the update was lost)."""
    cloud = Cloud(broker, migrated_url, tmp_path)
    _register(cloud)
    cloud.start()  # the initial version is stored while the disk has room
    cloud.stop()
    service = cloud.start(blob_store=FullDisk)
    devices, round_id = _open_round(cloud, broker, RoundConfig(deadline_s=300))
    task = devices["dev-a"].task()
    devices["dev-a"].send(device_update(*task, "dev-a"))  # PUBACKed by the broker
    wait_for(lambda: service._held)  # received, cannot be stored
    cloud.stop()
    assert cloud.query(lambda s: crud.list_updates(s, round_id=round_id)) == []

    cloud.start()
    wait_for(lambda: [u.status for u in cloud.query(
        lambda s: crud.list_updates(s, round_id=round_id))] == [UpdateStatus.ACCEPTED])
    cloud.stop()
    cloud.engine.dispose()


def test_a_batch_committed_but_not_acknowledged_is_redelivered_and_stored_once(
        broker: MosquittoBroker, migrated_url: str, tmp_path: Path) -> None:
    """The coordinator dies between a batch's commit and its acknowledgements: the broker
    still holds the batch and hands it to the next coordinator, which only notes the copies
    (group commit batches the commits, not the guarantees)."""
    cloud = Cloud(broker, migrated_url, tmp_path)
    _register(cloud)
    cloud.start()
    devices, round_id = _open_round(cloud, broker, RoundConfig(deadline_s=300))
    tasks = {d: device.task() for d, device in devices.items()}
    cloud.stop()  # the three updates wait in the broker, then arrive together
    senders = ("dev-a", "dev-b", "dev-c")
    for device_id in senders:
        devices[device_id].send(device_update(*tasks[device_id], device_id))

    def stored() -> list[tuple[str, UpdateStatus]]:
        return cloud.query(lambda s: sorted((u.device_id, u.status)
                                            for u in crud.list_updates(s, round_id=round_id)))

    def redelivered() -> int:
        return int(cloud.query(lambda s: crud.count_audit_events(
            s, action="update.redelivered")))

    cloud.start(max_batch=len(senders), batch_wait_s=5.0, dies_before_acks=True)
    wait_for(lambda: len(stored()) == len(senders))  # one batch, committed, not acknowledged
    cloud.stop()
    assert redelivered() == 0
    cloud.start()  # the next coordinator gets the batch again
    wait_for(lambda: redelivered() == len(senders))
    cloud.stop()
    assert stored() == [(d, UpdateStatus.ACCEPTED) for d in senders]
    cloud.engine.dispose()
