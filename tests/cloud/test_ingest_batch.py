"""Group commit on real SQLite and PostgreSQL: ``Coordinator.handle_updates`` stores a batch in
one transaction, exactly once by (sender, update id) inside the batch too; a refusal rolls
nothing back; a storage error stores none of it. Through ``CoordinatorService`` (the broker
replaced by an inbox and a list of acknowledgements): nothing is acknowledged before its
batch's commit, a batch that storage could not take is retried whole, and an update whose
handling raises does not take the rest of its batch down."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from cloud import rounds as rounds_module
from cloud.blobs import Blob, BlobStore
from cloud.coordinator import ingest as ingest_module
from cloud.coordinator_mqtt import CoordinatorService
from cloud.db import crud
from cloud.db.models import ParticipationStatus, UpdateStatus
from cloud.rounds import RoundConfig
from shared import topics
from shared.messages import Refusal, envelope_kind, unpack
from tests.cloud.roundkit import Acks, Cloud, FakeClock, add_devices, device_update, make_cloud

DEVICES = ("dev-a", "dev-b", "dev-c", "dev-d")


@pytest.fixture
def cloud(migrated_url: str, tmp_path: Path) -> Iterator[Cloud]:
    instance = make_cloud(migrated_url, tmp_path, FakeClock())
    add_devices(instance, *DEVICES)
    instance.coordinator.open_round(RoundConfig(deadline_s=60, max_delta_norm=1.0))
    instance.coordinator.tick()  # collecting; every device holds its task
    yield instance
    instance.engine.dispose()


def _update(cloud: Cloud, device_id: str, **kwargs: Any) -> bytes:
    return device_update(*cloud.publisher.tasks(device_id)[-1], device_id, **kwargs)


def _rows(cloud: Cloud) -> list[tuple[str, str, UpdateStatus, str | None]]:
    with cloud.session() as session:
        return [(u.device_id, u.update_id, u.status, u.rejection_code)
                for u in crud.list_updates(session, round_id=1)]


def _participations(cloud: Cloud) -> dict[str, ParticipationStatus]:
    with cloud.session() as session:
        return {p.device_id: p.status for p in crud.list_participations(session, round_id=1)}


def _refusals(cloud: Cloud, device_id: str) -> list[str]:
    return [unpack(payload, Refusal)[0].code for topic, payload, _ in cloud.publisher.sent
            if topic == topics.tasks(device_id) and envelope_kind(payload) == Refusal.kind]


def test_a_batch_is_stored_once_with_its_duplicates_and_refusals(cloud: Cloud) -> None:
    first = _update(cloud, "dev-a", update_id="upd-a-001")
    batch = [("dev-a", first),
             ("dev-a", first),  # the same update twice in one batch (a QoS 1 redelivery)
             ("dev-a", _update(cloud, "dev-a", update_id="upd-a-002")),  # a second, different one
             ("dev-b", _update(cloud, "dev-b", update_id="upd-b-001")),
             ("dev-c", _update(cloud, "dev-c", update_id="upd-c-001", scale=5.0)),  # norm bound
             ("dev-d", b"not an envelope"),
             ("nobody", _update(cloud, "dev-d", update_id="upd-x-001"))]
    results = cloud.coordinator.handle_updates(batch)

    assert [(r.outcome, r.code) for r in results] == [
        ("accepted", None), ("duplicate", None), ("rejected", "duplicate"), ("accepted", None),
        ("rejected", "norm_bound"), ("rejected", "malformed"), ("rejected", "not_participant")]
    # The refusals rolled nothing back: every row of the batch is there, in arrival order.
    assert _rows(cloud) == [("dev-a", "upd-a-001", UpdateStatus.ACCEPTED, None),
                            ("dev-a", "upd-a-002", UpdateStatus.REJECTED, "duplicate"),
                            ("dev-b", "upd-b-001", UpdateStatus.ACCEPTED, None),
                            ("dev-c", "upd-c-001", UpdateStatus.REJECTED, "norm_bound")]
    assert _participations(cloud) == {"dev-a": ParticipationStatus.SUBMITTED,
                                      "dev-b": ParticipationStatus.SUBMITTED,
                                      "dev-c": ParticipationStatus.REJECTED,
                                      "dev-d": ParticipationStatus.NOTIFIED}
    with cloud.session() as session:
        redelivered = crud.list_audit_events(session, action="update.redelivered")
        refused = crud.list_audit_events(session, action="update.refused")
        stored = [u.blob_sha256 for u in crud.list_updates(session, round_id=1,
                                                           status=UpdateStatus.ACCEPTED)]
    assert [e.details["update_id"] for e in redelivered] == ["upd-a-001"]
    assert sorted(e.details["code"] for e in refused) == ["malformed", "not_participant"]
    assert all(cloud.blobs.get(sha) for sha in stored if sha is not None)
    # Each refusal is answered on its sender's tasks topic (after the commit).
    assert (_refusals(cloud, "dev-a"), _refusals(cloud, "dev-c"), _refusals(cloud, "dev-d"),
            _refusals(cloud, "nobody")) == (["duplicate"], ["norm_bound"], ["malformed"],
                                            ["not_participant"])
    # The same batch again (the broker redelivering it after a crash before the acks):
    # nothing new is stored, the stored ones are duplicates.
    again = cloud.coordinator.handle_updates(batch[:5])
    assert [r.outcome for r in again] == ["duplicate"] * 5
    assert len(_rows(cloud)) == 4


class FullDisk(BlobStore):
    """Blobs cannot be written (the disk filled up): after the first ``room`` blobs."""

    def __init__(self, root: Path, room: int = 0) -> None:
        super().__init__(root)
        self.room = room

    def store(self, blobs: Sequence[tuple[Blob, bytes]]) -> None:
        if len(blobs) > self.room:
            raise OSError(28, "No space left on device (test)")
        super().store(blobs)


def test_a_storage_error_in_a_batch_stores_none_of_it(cloud: Cloud) -> None:
    batch = [(d, _update(cloud, d, update_id=f"upd-{d}-1")) for d in ("dev-a", "dev-b", "dev-c")]
    working = cloud.coordinator.blobs
    cloud.coordinator.blobs = FullDisk(working.root, room=2)  # two of the three fit
    with pytest.raises(OSError, match="No space left"):
        cloud.coordinator.handle_updates(batch)
    assert _rows(cloud) == []
    assert set(_participations(cloud).values()) == {ParticipationStatus.NOTIFIED}
    assert cloud.publisher.tasks("dev-a")  # (tasks only: nothing was answered)
    assert all(_refusals(cloud, d) == [] for d in DEVICES)

    cloud.coordinator.blobs = working  # room again: the retried batch is stored whole
    assert [r.outcome for r in cloud.coordinator.handle_updates(batch)] == ["accepted"] * 3
    assert [row[1] for row in _rows(cloud)] == ["upd-dev-a-1", "upd-dev-b-1", "upd-dev-c-1"]


def _service(cloud: Cloud, client: Acks) -> CoordinatorService:
    return CoordinatorService(cloud.coordinator, client,  # type: ignore[arg-type]
                              tick_interval_s=0.01, max_batch=10)


def test_nothing_is_acknowledged_before_its_batch_is_stored(cloud: Cloud) -> None:
    client = Acks()
    service = _service(cloud, client)
    updates = [(d, _update(cloud, d, update_id=f"upd-{d}-1")) for d in ("dev-a", "dev-b", "dev-c")]
    client.deliver(*updates)
    working = cloud.coordinator.blobs
    cloud.coordinator.blobs = FullDisk(working.root, room=2)

    assert service.step(0.01) == 0  # storage failed mid-batch: held, nothing acknowledged
    assert client.acked == [] and len(service._held) == 3 and _rows(cloud) == []
    cloud.coordinator.blobs = working
    assert service.step(0.01) == 3  # retried whole, then acknowledged in arrival order
    assert client.acked == [payload for _, payload in updates]
    assert [row[1] for row in _rows(cloud)] == ["upd-dev-a-1", "upd-dev-b-1", "upd-dev-c-1"]


def test_an_update_whose_handling_raises_does_not_take_its_batch_down(
        cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    validate = ingest_module.validate_update

    def buggy(message, parts, *, device_id, **kwargs):
        if device_id == "dev-b":
            raise KeyError("a bug in the gate")
        return validate(message, parts, device_id=device_id, **kwargs)

    monkeypatch.setattr(ingest_module, "validate_update", buggy)
    client = Acks()
    service = _service(cloud, client)
    updates = [(d, _update(cloud, d, update_id=f"upd-{d}-1")) for d in ("dev-a", "dev-b", "dev-c")]
    client.deliver(*updates)

    assert service.step(0.01) == 3  # the batch failed; one at a time, only dev-b's fails
    assert client.acked == [payload for _, payload in updates]
    assert _rows(cloud) == [("dev-a", "upd-dev-a-1", UpdateStatus.ACCEPTED, None),
                            ("dev-c", "upd-dev-c-1", UpdateStatus.ACCEPTED, None)]
    with cloud.session() as session:
        refused = crud.list_audit_events(session, action="update.refused")
    assert [(e.subject, e.details["code"]) for e in refused] == [("device:dev-b", "internal")]
    assert "KeyError" in refused[0].details["reason"]
    assert _refusals(cloud, "dev-b") == ["internal"]


def test_a_round_s_config_and_strategy_are_built_once_not_per_update(
        cloud: Cloud, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[str] = []
    make_strategy = rounds_module.make_strategy

    def counted(name: str, **options: Any) -> Any:
        built.append(name)
        return make_strategy(name, **options)

    monkeypatch.setattr(rounds_module, "make_strategy", counted)  # validating a config calls it
    for device_id in DEVICES[:3]:
        result = cloud.coordinator.handle_update(device_id, _update(cloud, device_id))
        assert result.outcome == "accepted"
    assert built == []  # the round's plan was built as it started collecting
    assert len(cloud.coordinator.plans) == 1
    cloud.coordinator.handle_update("dev-d", _update(cloud, "dev-d"))
    cloud.coordinator.tick()  # quorum: merged and closed, its plan dropped
    assert len(cloud.coordinator.plans) == 0


def test_a_round_s_plan_follows_its_row_and_goes_with_it() -> None:
    """A plan is reused while the row's config is the same and rebuilt when it changes (the
    coordinator records the base version as the round starts collecting): never stale."""
    from types import SimpleNamespace

    from cloud.coordinator import RoundPlans

    plans = RoundPlans()
    row = SimpleNamespace(id=7, config=RoundConfig(strategy="fedavg").model_dump(mode="json"))
    first = plans.of(row)  # type: ignore[arg-type]
    assert plans.of(row) is first  # type: ignore[arg-type]
    row.config = {**row.config, "strategy": "fednano", "base_version": "b" * 16}
    changed = plans.of(row)  # type: ignore[arg-type]
    assert changed is not first and changed.config.strategy == "fednano"
    assert changed.config.base_version == "b" * 16 and changed.strategy.name == "fednano"
    row.config["max_update_bytes"] = 2**20  # changed in place: still seen
    assert plans.of(row).config.max_update_bytes == 2**20  # type: ignore[arg-type]
    plans.keep({8})
    assert len(plans) == 0
