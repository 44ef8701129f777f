"""Test kit for the round coordinator: tiny adapters, a movable clock, a recording publisher and
device-side update builders that speak the real wire protocol (envelopes + codec frames)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloud import registry
from cloud.aggregation import Aggregator, Evaluation, Evaluator
from cloud.blobs import BlobStore
from cloud.coordinator import Coordinator
from cloud.db.session import make_engine, make_session_factory, session_scope
from shared import codec, protocol, topics
from shared.adapters import AdapterConfig, AdapterState, NanoAdapters
from shared.messages import (
    CancelTask,
    Presence,
    RoundAnnouncement,
    TrainTask,
    UpdateCodec,
    UpdateMessage,
    envelope_kind,
    from_json,
    to_json,
    unpack,
)
from shared.mqtt import Inbox, Received

WIDTH, RANK = 8, 2
BASE_VERSION = "base-test-1"
# Exact deltas (the tests compare merged values with hand-computed ones), bf16 Fishers.
DEVICE_CODEC = UpdateCodec(delta=codec.Scheme(kind="fp32"), fisher=codec.Scheme(kind="bf16"))


def global_state(seed: int = 0) -> AdapterState:
    """A fresh rank-2, width-8 NanoAdapters state (B is zero, A random)."""
    torch.manual_seed(seed)
    return NanoAdapters(WIDTH, AdapterConfig(rank=RANK, alpha=4)).adapter_state_dict()


class FakeClock:
    """A clock the test moves by hand (timezone-aware UTC)."""

    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class RecordingPublisher:
    """Keeps every published message, in order."""

    sent: list[tuple[str, bytes, bool]] = field(default_factory=list)
    not_waited: list[str] = field(default_factory=list)  # topics published with wait=False

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                wait: bool = True) -> None:
        self.sent.append((topic, payload, retain))
        if not wait:
            self.not_waited.append(topic)

    def tasks(self, device_id: str) -> list[tuple[TrainTask, dict[str, bytes]]]:
        return [unpack(p, TrainTask) for t, p, _ in self.sent
                if t == topics.tasks(device_id) and envelope_kind(p) == TrainTask.kind]

    def cancels(self, device_id: str) -> list[CancelTask]:
        return [unpack(p, CancelTask)[0] for t, p, _ in self.sent
                if t == topics.tasks(device_id) and envelope_kind(p) == CancelTask.kind]

    def announcements(self) -> list[RoundAnnouncement]:
        return [from_json(p, RoundAnnouncement) for t, p, r in self.sent
                if t == topics.ROUND_ANNOUNCEMENT and r]


def device_update(task: TrainTask, parts: dict[str, bytes], device_id: str, *,
                  scale: float = 0.01, n_samples: int = 10, update_id: str | None = None,
                  with_fisher: bool = True, delta: AdapterState | None = None,
                  fisher: AdapterState | None = None, **fields: object) -> bytes:
    """What a device sends back for ``task``: a delta (and Fisher) over the task's global."""
    global_ = protocol.decode_global(parts)
    delta = delta if delta is not None else {k: torch.full_like(v, scale)
                                             for k, v in global_.items()}
    if with_fisher and fisher is None:
        fisher = {k: torch.ones_like(v) for k, v in global_.items()}
    message = UpdateMessage(**{
        "update_id": update_id or f"upd-{uuid.uuid4().hex[:16]}", "task_id": task.task_id,
        "round_id": task.round_id, "global_version": task.global_version,
        "base_version": task.base_version, "n_samples": n_samples,
        "metrics": {"loss_last": 1.0}, **fields})
    return protocol.encode_update(message, delta, fisher if with_fisher else None, DEVICE_CODEC)


def presence(device_id: str, state: str = "online", **capabilities: object) -> bytes:
    return to_json(Presence(device_id=device_id, state=state,  # type: ignore[arg-type]
                            capabilities=dict(capabilities)))


@dataclass
class Cloud:
    """A coordinator over a database and a blob folder, with its recording publisher."""

    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    publisher: RecordingPublisher
    coordinator: Coordinator

    def session(self):  # type: ignore[no-untyped-def]
        return session_scope(self.sessions)


def make_cloud(url: str, root: Path, clock: FakeClock,
               evaluator: Evaluator | None = None) -> Cloud:
    """A coordinator (a new object each call: what a restart gives) on ``url``."""
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    blobs = BlobStore(root / "blobs")
    publisher = RecordingPublisher()
    coordinator = Coordinator(sessions, blobs=blobs, publisher=publisher,
                              aggregator=Aggregator(blobs, evaluator=evaluator),
                              base_version=BASE_VERSION, clock=clock)
    coordinator.ensure_initial_version(global_state())
    return Cloud(engine, sessions, blobs, publisher, coordinator)


def add_devices(cloud: Cloud, *device_ids: str, online: bool = True) -> None:
    """Register devices (fast hashes) and, if ``online``, report them online."""
    with cloud.session() as session:
        for device_id in device_ids:
            registry.add_device(session, device_id=device_id, profile="sim-cpu", iterations=1000)
    if online:
        for device_id in device_ids:
            assert cloud.coordinator.handle_presence(device_id, presence(device_id))


def constant_evaluator(accuracy: float = 0.5) -> Evaluator:
    def evaluate(state: AdapterState) -> Evaluation:
        return Evaluation(accuracy=accuracy, n=10, loss=0.7)

    return evaluate


class Acks:
    """The broker's side of manual acknowledgements: what the service acknowledged, in order."""

    def __init__(self) -> None:
        self.inbox = Inbox()
        self.acked: list[bytes] = []

    def ack(self, received: Received) -> bool:
        self.acked.append(received.payload)
        return True

    def deliver(self, *updates: tuple[str, bytes]) -> None:
        for device_id, payload in updates:
            self.inbox.put(Received(topics.updates(device_id), payload, 1, False))
