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
once its row (accepted or rejected) is committed. A coordinator that dies before that (a
crash, a kill, a database outage it did not outlive) leaves the message with the broker,
which redelivers it when the coordinator's session resumes; ingestion is exactly-once by
``update_id``, so a message handled but not yet acknowledged is only noted as a redelivery.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

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
# Failures of storage, not of the message: hold it (unacknowledged) and retry; nothing is lost.
STORAGE_ERRORS = (OperationalError, InterfaceError, PoolTimeoutError, OSError,
                  BlobIntegrityError)


def coordinator_client_options(username: str, password: str, *,
                               client_id: str = COORDINATOR_CLIENT_ID) -> ClientOptions:
    """A persistent session with manual acknowledgements: what devices send while the
    coordinator restarts is kept, and what it received but had not stored is redelivered."""
    return ClientOptions(client_id=client_id, username=username, password=password,
                         clean_start=False, manual_ack=True)


class MqttPublisher:
    """``Publisher`` over an ``MqttClient``: size-checked QoS 1 publishes that wait for PUBACK."""

    def __init__(self, client: MqttClient, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 timeout_s: float = 10.0) -> None:
        self.client = client
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        self.client.publish(topic, payload, max_bytes=self.max_bytes, retain=retain,
                            timeout=self.timeout_s)


class CoordinatorService(BackgroundService):
    """Feeds a ``Coordinator`` from the broker and ticks it every ``tick_interval_s``."""

    def __init__(self, coordinator: Coordinator, client: MqttClient, *,
                 tick_interval_s: float = 1.0) -> None:
        if tick_interval_s <= 0:
            raise ValueError(f"tick_interval_s must be > 0, got {tick_interval_s!r}")
        super().__init__("coordinator")
        self.coordinator = coordinator
        self.client = client
        self.tick_interval_s = tick_interval_s
        # The client's own inbox: a persistent session's queued messages may arrive between
        # CONNACK and SUBSCRIBE, before any route exists; they land here too.
        self.inbox: Inbox = client.inbox
        self._held: Received | None = None  # a message the database could not take yet

    def subscribe(self) -> None:
        """Updates and presence of every device, into one inbox (arrival order kept)."""
        self.client.subscribe(topics.ALL_STATUS, inbox=self.inbox)
        self.client.subscribe(topics.ALL_UPDATES, inbox=self.inbox)

    def dispatch(self, received: Received) -> None:
        """Hand one message to the coordinator by its topic."""
        try:
            device_id = topics.device_of(received.topic)
        except ValueError:
            log.warning("ignoring a message on %r: not a device topic", received.topic)
            return
        if received.topic == topics.updates(device_id):
            started = time.monotonic()
            result = self.coordinator.handle_update(device_id, received.payload)
            metrics.update_handled(result.outcome, result.code, time.monotonic() - started)
            log.info("update from %s: %s %s", device_id, result.outcome, result.code or "",
                     extra={"device_id": device_id, "update_id": result.update_id})
        elif received.topic == topics.status(device_id):
            self.coordinator.handle_presence(device_id, received.payload)
        else:
            log.warning("ignoring a message on %r", received.topic)

    def step(self, timeout: float) -> int:
        """Handle what arrives within ``timeout`` s (at least one wait), then tick once.

        A handled message is acknowledged to the broker. While storage is unavailable
        (``STORAGE_ERRORS``: the database, its connection pool, the blob folder, a damaged
        global blob) the message being handled is kept, unacknowledged, and handled first at
        the next step; the tick waits too. A message whose handling fails for any other
        reason is logged with its traceback, audited (``message.dropped``) and acknowledged:
        redelivered, it would fail again and stop every message behind it.
        """
        handled = 0
        deadline = time.monotonic() + timeout
        received, self._held = self._held or self.inbox.get(timeout=timeout), None
        while received is not None:
            try:
                self.dispatch(received)
            except STORAGE_ERRORS as err:
                self._held = received
                log.warning("storage unavailable; the message on %s is kept and retried: %s",
                            received.topic, err)
                time.sleep(max(0.0, deadline - time.monotonic()))
                return handled
            except Exception as err:  # noqa: BLE001  (recorded and answered in _failed; one
                # bad message must not stop every message behind it)
                if not self._failed(received, err):
                    self._held = received  # not even the refusal could be stored: retry
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    return handled
            self.client.ack(received)
            handled += 1
            received = self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
        self._tick()
        return handled

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
