"""``CoordinatorService`` without a broker: a message the database could not take is kept,
unacknowledged, and handled again; a message is acknowledged only once handled; a message
whose handling fails otherwise is acknowledged and dropped so it cannot block the rest."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from sqlalchemy.exc import OperationalError

from cloud.coordinator import IngestResult
from cloud.coordinator_mqtt import CoordinatorService
from shared import topics
from shared.mqtt import Inbox, Received


@dataclass
class FlakyCoordinator:
    """Fails ``failures`` times with the database down, then records what it handles."""

    failures: int
    handled: list[bytes] = field(default_factory=list)
    ticks: int = 0

    def handle_update(self, device_id: str, payload: bytes) -> IngestResult:
        if payload == b"poison":
            raise KeyError("a bug in the handling")
        if self.failures:
            self.failures -= 1
            raise OperationalError("INSERT ...", {}, ConnectionError("server closed"))
        self.handled.append(payload)
        return IngestResult("accepted", "u")

    def tick(self) -> None:
        self.ticks += 1


class FakeClient:
    def __init__(self) -> None:
        self.inbox = Inbox()
        self.acked: list[bytes] = []

    def ack(self, received: Received) -> bool:
        self.acked.append(received.payload)
        return True


def test_a_message_is_kept_while_the_database_is_down() -> None:
    coordinator, client = FlakyCoordinator(failures=2), FakeClient()
    service = CoordinatorService(coordinator, client, tick_interval_s=0.01)  # type: ignore[arg-type]
    for payload in (b"first", b"second"):
        client.inbox.put(Received(topics.updates("dev-a"), payload, 1, False))
    assert service.step(0.01) == 0 and coordinator.ticks == 0  # down: kept, no tick
    assert service.step(0.01) == 0
    assert client.acked == []  # the broker still holds both
    assert service.step(0.01) == 2  # back: in arrival order
    assert coordinator.handled == [b"first", b"second"] and coordinator.ticks == 1
    assert client.acked == [b"first", b"second"]


def test_a_message_that_fails_otherwise_is_logged_acknowledged_and_skipped(
        caplog: pytest.LogCaptureFixture) -> None:
    coordinator, client = FlakyCoordinator(failures=0), FakeClient()
    service = CoordinatorService(coordinator, client, tick_interval_s=0.01)  # type: ignore[arg-type]
    for payload in (b"poison", b"next"):
        client.inbox.put(Received(topics.updates("dev-a"), payload, 1, False))
    assert service.step(0.01) == 2
    assert coordinator.handled == [b"next"] and client.acked == [b"poison", b"next"]
    assert f"handling the message on {topics.updates('dev-a')} failed" in caplog.text
    assert "KeyError" in caplog.text
