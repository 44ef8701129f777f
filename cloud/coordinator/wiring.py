"""What the parts of the coordinator share: the wiring (database, blobs, broker, clock), the
constants they agree on, and where their refusals are answered.

Every part of the coordinator derives from ``Wiring``; ``Coordinator`` derives from every part.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from cloud.aggregation import Aggregator
from cloud.blobs import BlobIntegrityError, BlobStore
from cloud.coordinator.plans import RoundPlans
from cloud.db.models import AdapterVersion, ParticipationStatus, Round, utcnow
from shared import topics
from shared.adapters import AdapterState
from shared.messages import DEFAULT_MAX_MESSAGE_BYTES, MessageTooLarge, Refusal, pack
from shared.mqtt import MqttError

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
COORDINATOR_ACTOR = "system:coordinator"
OUTSTANDING = (ParticipationStatus.SELECTED, ParticipationStatus.NOTIFIED)
# Failures of the database, the blob folder or the broker: retried later, nothing is lost.
# Anything else raised while advancing a round is a fault of that round (bad data, a bug):
# the round fails with the error as its reason and the other rounds go on.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OperationalError, InterfaceError, PoolTimeoutError, OSError, BlobIntegrityError,
    MqttError, MessageTooLarge)


class Publisher(Protocol):
    """Where the coordinator's messages go (MQTT QoS 1 in production)."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                wait: bool = True) -> None:
        """Publish ``payload`` on ``topic``; raise if the broker did not take it. ``wait``
        False: hand it to the client (QoS 1: delivered after a reconnect too) and go on."""


class Wiring:
    """What every part of the coordinator works with. Each part (``RoundLifecycle``,
    ``UpdateIngest``, ``PresenceTracker``) is a base class of ``Coordinator`` over this one set
    of attributes, so a replaced piece (a test's failing blob store) reaches all of them."""

    def __init__(self, sessions: sessionmaker[Session], *, blobs: BlobStore,
                 publisher: Publisher, aggregator: Aggregator, base_version: str,
                 clock: Clock = utcnow, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 actor: str = COORDINATOR_ACTOR) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.publisher = publisher
        self.aggregator = aggregator
        self.base_version = base_version  # the frozen base's manifest version
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.actor = actor
        self.plans = RoundPlans()  # each unfinished round's config and strategy
        self._states: dict[int, AdapterState] = {}  # global adapter states by version id

    def _answer(self, device_id: str, refusal: Refusal) -> None:
        """Publish ``refusal`` on the device's tasks topic, best effort once the refusal is
        recorded: a broker that does not take the answer leaves the record, which operators
        see, as the answer."""
        try:
            self.publisher.publish(topics.tasks(device_id), pack(refusal))
        except (MqttError, MessageTooLarge) as err:
            log.warning("could not answer %s's refused %s: %s", device_id, refusal.of, err)


def base_of(round_: Round) -> AdapterVersion:
    """The global version ``round_`` trains from (every round is opened on one)."""
    if round_.base_version is None:
        raise RuntimeError(f"round {round_.id} has no base version")
    return round_.base_version
