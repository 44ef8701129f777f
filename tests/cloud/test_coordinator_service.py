"""``CoordinatorService`` without a broker: consecutive updates are handed over as one batch
(at most ``max_batch``); a batch storage could not take is kept whole, unacknowledged, and
handled again; a message is acknowledged only once handled; a message whose handling fails
otherwise is refused (code ``internal``, recorded and answered) and acknowledged so it cannot
block the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from cloud.blobs import BlobIntegrityError
from cloud.coordinator import IngestResult
from cloud.coordinator_mqtt import CoordinatorService
from shared import topics
from shared.mqtt import Received
from tests.cloud.roundkit import Acks

DATABASE_DOWN = OperationalError("INSERT ...", {}, ConnectionError("server closed"))


@dataclass
class FlakyCoordinator:
    """Fails ``failures`` times with ``error`` (storage down), then records what it handles."""

    failures: int
    error: Exception = DATABASE_DOWN
    handled: list[bytes] = field(default_factory=list)
    batches: list[list[bytes]] = field(default_factory=list)  # as handed over
    ticks: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)

    def handle_updates(self, updates: list[tuple[str, bytes]]) -> list[IngestResult]:
        """One transaction: every update stored, or none (whatever raised rolled back)."""
        self.batches.append([payload for _, payload in updates])
        for _, payload in updates:
            if payload == b"poison":
                raise KeyError("a bug in the handling")
            if self.failures and payload != b"fine":
                self.failures -= 1
                raise self.error
        self.handled += [payload for _, payload in updates]
        return [IngestResult("accepted", "u") for _ in updates]

    def handle_presence(self, device_id: str, payload: bytes) -> bool:
        self.handled.append(payload)
        return True

    def tick(self) -> None:
        self.ticks += 1

    def record_dropped(self, topic: str, error: str) -> None:
        self.dropped.append((topic, error))

    def refuse_failed(self, device_id: str, error: str) -> IngestResult:
        self.refused.append((device_id, error))
        return IngestResult("rejected", None, "internal", error)


@pytest.mark.parametrize("error", [
    DATABASE_DOWN, PoolTimeoutError("QueuePool limit reached"),
    InterfaceError("SELECT ...", {}, ConnectionError("connection closed")),
    OSError(28, "No space left on device"), BlobIntegrityError("global blob damaged")],
    ids=["database-down", "pool-exhausted", "connection-closed", "disk-full", "blob-damaged"])
def test_a_message_is_kept_while_storage_is_unavailable(error: Exception) -> None:
    coordinator, client = FlakyCoordinator(failures=2, error=error), Acks()
    service = CoordinatorService(coordinator, client, tick_interval_s=0.01)  # type: ignore[arg-type]
    for payload in (b"first", b"second"):
        client.inbox.put(Received(topics.updates("dev-a"), payload, 1, False))
    assert service.step(0.01) == 0 and coordinator.ticks == 0  # down: kept, no tick
    assert service.step(0.01) == 0
    assert client.acked == []  # the broker still holds both
    assert service.step(0.01) == 2  # back: in arrival order
    assert coordinator.handled == [b"first", b"second"] and coordinator.ticks == 1
    assert client.acked == [b"first", b"second"]


def test_a_message_that_fails_otherwise_is_refused_acknowledged_and_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    coordinator, client = FlakyCoordinator(failures=0), Acks()
    service = CoordinatorService(coordinator, client, tick_interval_s=0.01)  # type: ignore[arg-type]
    for payload in (b"poison", b"next"):
        client.inbox.put(Received(topics.updates("dev-a"), payload, 1, False))
    assert service.step(0.01) == 2
    assert coordinator.handled == [b"next"] and client.acked == [b"poison", b"next"]
    assert f"handling the message on {topics.updates('dev-a')} failed" in caplog.text
    assert "KeyError" in caplog.text
    assert coordinator.refused == [("dev-a", "KeyError: 'a bug in the handling'")]
    assert coordinator.dropped == []


def test_consecutive_updates_are_handed_over_together_up_to_max_batch() -> None:
    coordinator, client = FlakyCoordinator(failures=0), Acks()
    service = CoordinatorService(coordinator, client,  # type: ignore[arg-type]
                                 tick_interval_s=0.01, max_batch=4)
    for payload in (b"u1", b"u2", b"p1", b"u3", b"u4", b"u5", b"u6"):
        topic = topics.status("dev-a") if payload.startswith(b"p") else topics.updates("dev-a")
        client.inbox.put(Received(topic, payload, 1, False))
    assert service.step(0.01) == 7
    # Batches of at most 4 messages; a presence message splits a run of updates.
    assert coordinator.batches == [[b"u1", b"u2"], [b"u3"], [b"u4", b"u5", b"u6"]]
    assert client.acked == coordinator.handled == [b"u1", b"u2", b"p1", b"u3", b"u4", b"u5",
                                                   b"u6"]


def test_a_batch_storage_could_not_take_is_kept_whole() -> None:
    coordinator, client = FlakyCoordinator(failures=1), Acks()
    service = CoordinatorService(coordinator, client,  # type: ignore[arg-type]
                                 tick_interval_s=0.01, max_batch=10)
    for payload in (b"fine", b"fails", b"third"):  # storage fails at the second
        client.inbox.put(Received(topics.updates("dev-a"), payload, 1, False))
    assert service.step(0.01) == 0
    assert client.acked == [] and coordinator.handled == []
    assert service.step(0.01) == 3
    assert coordinator.batches == [[b"fine", b"fails", b"third"]] * 2
    assert client.acked == [b"fine", b"fails", b"third"]


@pytest.mark.parametrize("options", [{"max_batch": 0}, {"batch_wait_s": -1.0}])
def test_batch_options_are_checked(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        CoordinatorService(FlakyCoordinator(failures=0), Acks(),  # type: ignore[arg-type]
                           **options)  # type: ignore[arg-type]
