"""The coordinator on MQTT: subscriptions, the loop, and publishing through ``shared.mqtt``.

The coordinator keeps a persistent session (fixed client id, ``clean_start=False``), so updates
and presence messages published while it is down wait in the broker and arrive when it is back.
paho's thread only enqueues (``shared.mqtt.Inbox``); ``CoordinatorService.step`` handles the
queued messages in order and then ticks the coordinator, all on the service's own thread.
A message on a topic outside the device tree is logged and dropped; everything else is
handled (and, for updates, recorded) by the coordinator. Device bytes are parsed strictly and
with limits first (``shared.messages``), and every refusal is recorded with a code and answered
on the device's tasks topic; an update whose handling still fails unexpectedly is refused with
code ``internal`` (recorded, answered, acknowledged), so no message can stop the service.

Acknowledgements are manual: a message is PUBACKed only once it is handled -- for an update,
once its row (accepted or rejected) is committed. Updates are committed in groups (one
transaction for a run of consecutive updates, then their acknowledgements), which batches the
commits, not the guarantee. A coordinator that dies before the acknowledgements (a crash, a
kill, a database outage it did not outlive) leaves the messages with the broker, which
redelivers them when the coordinator's session resumes; ingestion is exactly-once by
(sender, ``update_id``), so a message stored but not yet acknowledged is only noted as a
redelivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from cloud import metrics
from cloud.background import BackgroundService
from cloud.blobs import BlobIntegrityError
from cloud.coordinator import TRANSIENT_ERRORS, Coordinator
from shared import topics
from shared.messages import DEFAULT_MAX_MESSAGE_BYTES, MessageTooLarge
from shared.mqtt import ClientOptions, Inbox, MqttClient, MqttError, Received

log = logging.getLogger(__name__)

COORDINATOR_CLIENT_ID = "fednano-coordinator"
# Group commit: at most this many updates in one transaction, and the broker's in-flight window
# for the coordinator (its MQTT v5 Receive Maximum), so a backlog arrives a batch at a time.
DEFAULT_MAX_BATCH = 100
DEFAULT_BATCH_WAIT_S = 0.0  # how long a batch may wait after its first message for more
# Failures of storage, not of the message: hold it (unacknowledged) and retry; nothing is lost.
STORAGE_ERRORS = (OperationalError, InterfaceError, PoolTimeoutError, OSError,
                  BlobIntegrityError)


def coordinator_client_options(username: str, password: str, *,
                               client_id: str = COORDINATOR_CLIENT_ID,
                               max_batch: int = DEFAULT_MAX_BATCH) -> ClientOptions:
    """A persistent session with manual acknowledgements: what devices send while the
    coordinator restarts is kept, and what it received but had not stored is redelivered.
    The broker may send up to ``max_batch`` unacknowledged messages at once: a full batch."""
    return ClientOptions(client_id=client_id, username=username, password=password,
                         clean_start=False, manual_ack=True, receive_maximum=max_batch)


class MqttPublisher:
    """``Publisher`` over an ``MqttClient``: size-checked QoS 1 publishes that wait for PUBACK."""

    def __init__(self, client: MqttClient, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout_s: float = 10.0) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def publish(self, topic: str, payload: bytes, *, retain: bool = False,
                wait: bool = True) -> None:
        if wait:
            self.client.publish(topic, payload, max_bytes=self.max_bytes, retain=retain,
                                timeout=self.timeout_s)
        else:
            self.client.publish_nowait(topic, payload, max_bytes=self.max_bytes, retain=retain)


class CoordinatorService(BackgroundService):
    """Feeds a ``Coordinator`` from the broker and ticks it every ``tick_interval_s``.

    Updates are stored in batches (group commit): each step takes what the inbox holds, up to
    ``max_batch`` messages, waiting at most ``batch_wait_s`` after the first for more, and
    hands runs of consecutive updates to ``Coordinator.handle_updates`` (one transaction, one
    commit); every message is acknowledged after its batch's commit, in arrival order.
    """

    def __init__(self, coordinator: Coordinator, client: MqttClient, *,
                 tick_interval_s: float = 1.0, max_batch: int = DEFAULT_MAX_BATCH,
                 batch_wait_s: float = DEFAULT_BATCH_WAIT_S) -> None:
        if tick_interval_s <= 0:
            raise ValueError(f"tick_interval_s must be > 0, got {tick_interval_s!r}")
        if max_batch < 1 or batch_wait_s < 0:
            raise ValueError(f"need max_batch >= 1 and batch_wait_s >= 0, got {max_batch!r} "
                             f"and {batch_wait_s!r}")
        super().__init__("coordinator")
        self.coordinator = coordinator
        self.client = client
        self.tick_interval_s = tick_interval_s
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_s
        # The client's own inbox: a persistent session's queued messages may arrive between
        # CONNACK and SUBSCRIBE, before any route exists; they land here too.
        self.inbox: Inbox = client.inbox
        self._held: list[Received] = []  # messages the database could not take yet

    def subscribe(self) -> None:
        """Updates and presence of every device, into one inbox (arrival order kept)."""
        self.client.subscribe(topics.ALL_STATUS, inbox=self.inbox)
        self.client.subscribe(topics.ALL_UPDATES, inbox=self.inbox)

    def dispatch(self, received: Received) -> None:
        """Hand one message to the coordinator by its topic."""
        self._dispatch([received])

    def _dispatch(self, group: list[Received]) -> None:
        """Hand a group to the coordinator: consecutive updates (``_groups``), or one message."""
        device_id = self._device_of(group[0])
        if device_id is None:
            return
        if group[0].topic == topics.updates(device_id):
            self._ingest(group)
        elif group[0].topic == topics.status(device_id):
            self.coordinator.handle_presence(device_id, group[0].payload)
        else:
            log.warning("ignoring a message on %r", group[0].topic)

    def _ingest(self, group: list[Received]) -> None:
        started = time.monotonic()
        senders = [topics.device_of(received.topic) for received in group]
        results = self.coordinator.handle_updates(
            [(device_id, r.payload) for device_id, r in zip(senders, group, strict=True)])
        share = (time.monotonic() - started) / len(group)
        metrics.updates_batch(len(group))
        for device_id, result in zip(senders, results, strict=True):
            metrics.update_handled(result.outcome, result.code, share)
            log.info("update from %s: %s %s", device_id, result.outcome, result.code or "",
                     extra={"device_id": device_id, "update_id": result.update_id})

    @staticmethod
    def _device_of(received: Received) -> str | None:
        try:
            return topics.device_of(received.topic)
        except ValueError:
            log.warning("ignoring a message on %r: not a device topic", received.topic)
            return None

    def step(self, timeout: float) -> int:
        """Handle what arrives within ``timeout`` s (at least one wait), then tick once.

        Handled messages are acknowledged to the broker, each once its batch is committed.
        While storage is unavailable (``STORAGE_ERRORS``: the database, its connection pool,
        the blob folder, a damaged global blob) the messages not yet handled are kept,
        unacknowledged, and handled first at the next step (a batch that failed is retried
        whole: nothing of it was stored); the tick waits too. A batch that fails for any
        other reason is handled again one message at a time; a message that still fails is
        logged with its traceback, refused (code ``internal``, audited as
        ``message.dropped`` off the device tree) and acknowledged: redelivered, it would fail
        again and stop every message behind it.
        """
        handled = 0
        deadline = time.monotonic() + timeout
        batch, self._held = self._held or self._drain(timeout), []
        while batch:
            done = self._handle(batch)
            handled += done
            if done < len(batch):
                self._held = batch[done:]
                time.sleep(max(0.0, deadline - time.monotonic()))
                return handled
            batch = self._drain(max(0.0, deadline - time.monotonic()))
        self._tick()
        return handled

    def _drain(self, timeout: float) -> list[Received]:
        """The next messages: one within ``timeout`` s (else none), then what the inbox holds,
        up to ``max_batch``, waiting at most ``batch_wait_s`` for more."""
        first = self.inbox.get(timeout=timeout)
        if first is None:
            return []
        batch = [first]
        until = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch:
            received = self.inbox.get(timeout=max(0.0, until - time.monotonic()))
            if received is None:
                break
            batch.append(received)
        return batch

    def _handle(self, batch: list[Received]) -> int:
        """Handle ``batch`` group by group, acknowledging each group once handled; how many
        messages, from the front, were handled (fewer than all: storage is unavailable)."""
        done = 0
        for group in _groups(batch):
            handled = self._handle_group(group)
            for received in group[:handled]:
                self.client.ack(received)
            done += handled
            if handled < len(group):
                break
        return done

    def _handle_group(self, group: list[Received]) -> int:
        """How many messages of ``group``, from the front, were handled (and may be acked)."""
        try:
            self._dispatch(group)
        except STORAGE_ERRORS as err:
            log.warning("storage unavailable; %d message(s) from %s on are kept and retried: "
                        "%s", len(group), group[0].topic, err)
            return 0
        except Exception as err:  # noqa: BLE001  (one bad message must not stop every
            # message behind it: alone, it is recorded and answered in _failed)
            if len(group) > 1:
                log.warning("handling %d updates together failed (%s: %s); handling them one "
                            "at a time", len(group), type(err).__name__, err)
                return self._one_at_a_time(group)
            return 1 if self._failed(group[0], err) else 0
        return len(group)

    def _one_at_a_time(self, group: list[Received]) -> int:
        for done, received in enumerate(group):
            if not self._handle_group([received]):
                return done
        return len(group)

    def _failed(self, received: Received, err: Exception) -> bool:
        """Record and answer a message whose handling failed unexpectedly; False if even that
        could not be stored (then it stays unacknowledged)."""
        log.exception("handling the message on %s failed; it is refused", received.topic)
        error = f"{type(err).__name__}: {err}"
        try:
            device_id = topics.device_of(received.topic)
            if received.topic == topics.updates(device_id):
                self.coordinator.refuse_failed(device_id, error)
            else:
                self.coordinator.record_dropped(received.topic, error)
        except STORAGE_ERRORS:
            log.warning("could not record the failed message on %s; it is kept",
                        received.topic, exc_info=True)
            return False
        return True

    def _tick(self, tick: Callable[[], None] | None = None) -> bool:
        """Run ``tick`` (the coordinator's by default); False if it must be retried.
        ``Coordinator.tick`` fails a round that breaks unexpectedly and re-raises only
        ``TRANSIENT_ERRORS``, which are retried at the next step."""
        try:
            (tick or self.coordinator.tick)()
        except (MqttError, MessageTooLarge) as err:
            # Tasks not yet published stay "selected" and go out at the next tick.
            log.warning("coordinator tick could not publish (will retry): %s", err)
            return False
        except TRANSIENT_ERRORS as err:  # rounds live in the database: nothing is lost
            log.warning("coordinator tick: storage unavailable (will retry): %s", err)
            return False
        return True

    def run(self) -> None:
        """Subscribe, resume from the database (retried while storage or broker are down),
        then loop until ``stop``."""
        self.subscribe()
        while not self.stopping and not self._tick(self.coordinator.resume):
            self._stop_event.wait(self.tick_interval_s)
        while not self.stopping:
            self.step(self.tick_interval_s)


def _groups(batch: list[Received]) -> Iterator[list[Received]]:
    """``batch`` in order as runs of consecutive update messages, every other message alone."""
    run: list[Received] = []
    for received in batch:
        if _is_update(received):
            run.append(received)
            continue
        if run:
            yield run
            run = []
        yield [received]
    if run:
        yield run


def _is_update(received: Received) -> bool:
    try:
        return received.topic == topics.updates(topics.device_of(received.topic))
    except ValueError:
        return False
