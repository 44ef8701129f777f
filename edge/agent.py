"""The edge agent: one process per device, serving the cloud's round tasks over MQTT.

Lifecycle::

    connect (device credentials, persistent session, last will = retained "offline" presence)
    -> retained "online" presence (profile, bundle, capabilities) -> subscribe tasks (QoS 1)
    -> resend a pending update, resume an interrupted task (durable state, edge.state)
    -> for each TrainTask: check -> train -> encode -> commit -> publish (QoS 1) -> PUBACK
    -> SIGTERM / SIGINT: stop training (the task stays on disk), "offline" presence, disconnect

Threads: paho's network thread only records and enqueues (``shared.mqtt``). The **control
loop** (the thread that calls ``run``) routes task messages to the worker, notes cancels at
once (training checks them before every LLM call), and re-publishes the online presence after
every reconnect. The **worker thread** owns the model, the LLM backend and the state folder: it
trains one round at a time (``edge.device_round``) and delivers its update.

Delivery is at-least-once with one ``update_id`` per task (``edge.state.update_id_for``): the
encoded update is committed to disk before it is published and removed only after the
broker's PUBACK, so a crash or reboot resends the very same bytes. An update over
min(task limit, profile limit) is refused on the device and reported in the presence's
``last_error``; nothing is published.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from types import FrameType
from typing import Literal

from edge.config import DeviceConfig
from edge.device_round import (
    DeviceModel,
    RoundInterrupted,
    TaskRefused,
    check_task,
    execute_task,
    load_global,
)
from edge.remote_llm import RemoteLLMError, RemoteLLMStopped
from edge.state import DeviceState, GlobalAdapter, PendingUpdate, update_id_for
from shared import topics
from shared.backend import LLMBackend
from shared.bundle import EncoderError
from shared.data.base import VQASample
from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CancelTask,
    DeviceError,
    MessageError,
    MessageTooLarge,
    Presence,
    Refusal,
    TrainTask,
    envelope_kind,
    to_json,
    unpack,
)
from shared.mqtt import (
    NOT_AUTHORIZED,
    AckTimeout,
    ClientOptions,
    ConnectError,
    ConnectRefused,
    Inbox,
    MqttClient,
    NotConnectedError,
    PublishError,
    Received,
    Will,
)
from shared.training import resolve_training

log = logging.getLogger(__name__)

# The agent's connection and its stop flag (set at shutdown) -> the LLM.
BackendFactory = Callable[[MqttClient, threading.Event], LLMBackend]
# Failures worth another try later (LLM worker down or slow, link lost, RemoteLLMTimeout);
# the worker's error replies (RemoteLLMError) refuse the task instead.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, ConnectionError)
CODECS = ("fp32", "fp16", "bf16", "int8", "topk")
PresenceState = Literal["online", "offline"]


def agent_version() -> str:
    """The installed fednano version, reported in the presence."""
    try:
        return version("fednano")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class AgentSettings:
    """Timing of the agent (defaults suit a device; tests shorten them)."""

    connect_timeout_s: float = 10.0
    keepalive_s: int = 30
    reconnect_min_s: int = 1
    reconnect_max_s: int = 60
    retry_min_s: float = 5.0  # a round that failed for a transient reason is tried again
    retry_max_s: float = 120.0
    ack_timeout_s: float = 10.0  # presence PUBACK (updates wait as long as it takes)
    poll_s: float = 0.2
    max_packet_bytes: int = DEFAULT_MAX_MESSAGE_BYTES  # the broker's max_packet_size


@dataclass(frozen=True)
class _TaskWork:
    payload: bytes
    task: TrainTask
    parts: dict[str, bytes]


@dataclass(frozen=True)
class _CancelWork:
    cancel: CancelTask


_Work = _TaskWork | _CancelWork


def _decode_task_message(payload: bytes) -> _Work | Refusal:
    """A TrainTask, CancelTask or Refusal envelope from the tasks topic; ``MessageError``
    otherwise."""
    kind = envelope_kind(payload)
    if kind == Refusal.kind:
        return unpack(payload, Refusal)[0]
    if kind == CancelTask.kind:
        return _CancelWork(unpack(payload, CancelTask)[0])
    if kind == TrainTask.kind:
        task, parts = unpack(payload, TrainTask)
        return _TaskWork(payload, task, parts)
    raise MessageError(f"unexpected message kind {kind!r} on the tasks topic")


class EdgeAgent:
    """One device: its config, model, local samples and a way to reach the cloud LLM."""

    def __init__(
        self, config: DeviceConfig, model: DeviceModel, samples: Sequence[VQASample],
        backend_factory: BackendFactory, *, password: str | None = None,
        settings: AgentSettings | None = None,
    ) -> None:
        self.config = config
        self.device_id = config.device_id
        self.model = model
        self.samples = list(samples)
        self.settings = settings or AgentSettings()
        self.state = DeviceState(config.state_dir)  # StateCorrupt here fails the boot
        self._backend_factory = backend_factory
        self._stopping = threading.Event()
        self._work: queue.Queue[_Work] = queue.Queue()
        self._lock = threading.Lock()  # guards the fields below the control loop shares
        self._cancelled_rounds: set[int] = set()
        self._last_error: DeviceError | None = None
        known = self.state.load_global()
        self._global_version = None if known is None else known.version
        self._current: tuple[TrainTask, dict[str, bytes]] | None = None
        self._retry_at = 0.0
        self._retry_delay = self.settings.retry_min_s
        self.client = self._make_client(password)

    def _make_client(self, password: str | None) -> MqttClient:
        s = self.settings
        options = ClientOptions(
            client_id=self.device_id, username=self.config.username,
            password=password if password is not None else self.config.read_password(),
            will=Will(topics.status(self.device_id), to_json(self.presence("offline"))),
            clean_start=False, keepalive_s=s.keepalive_s, reconnect_min_s=s.reconnect_min_s,
            reconnect_max_s=s.reconnect_max_s)
        return MqttClient(self.config.broker_address, options)

    # ------------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        """Serve tasks until ``stop()``; then go offline cleanly. Re-raises a worker failure."""
        self.state.acquire()
        try:
            self._serve()
        finally:
            self.state.release()

    def _serve(self) -> None:
        tasks = self.client.subscribe(topics.tasks(self.device_id), qos=1)  # before CONNACK
        if not self._connect():
            return
        try:
            self._announce()
            backend = self._backend_factory(self.client, self._stopping)
            with ThreadPoolExecutor(1, thread_name_prefix=f"edge-{self.device_id}") as pool:
                worker = pool.submit(self._work_loop, backend)
                try:
                    self._control_loop(tasks, worker)
                finally:
                    self._stopping.set()  # also when the worker died: wind everything down
            worker.result()  # raises what killed the worker
        finally:
            self._go_offline()

    def start(self) -> threading.Thread:
        """``run()`` in a background thread (tests, embedding); ``stop()`` and join it."""
        thread = threading.Thread(target=self.run, name=f"edge-agent-{self.device_id}",
                                  daemon=True)
        thread.start()
        return thread

    def stop(self, reason: str = "stop requested") -> None:
        """Ask the agent to shut down: training stops at its next step, its task stays saved."""
        if not self._stopping.is_set():
            log.info("%s: shutting down (%s)", self.device_id, reason)
        self._stopping.set()

    def _connect(self) -> bool:
        """Connect, retrying with backoff while the broker is unreachable; False if stopped.

        A refusal the same credentials would get again (bad password, not authorized: a
        revoked device) is not retried: ``ConnectRefused`` is raised.
        """
        delay = float(self.settings.reconnect_min_s)
        while not self._stopping.is_set():
            try:
                self.client.connect(self.settings.connect_timeout_s)
                log.info("%s: connected to %s", self.device_id, self.client.address.url)
                return True
            except ConnectRefused as err:
                if err.permanent:
                    log.error("%s: %s; not retrying", self.device_id, err)
                    self.client.close()
                    raise
                log.warning("%s: %s; retrying in %.0f s", self.device_id, err, delay)
            except ConnectError as err:
                log.warning("%s: %s; retrying in %.0f s", self.device_id, err, delay)
            self._stopping.wait(delay)
            delay = min(delay * 2, self.settings.reconnect_max_s)
        return False

    def _announce(self) -> None:
        """The first presence after connecting. A broker that took the connection but refuses
        the device's own messages ("not authorized": an X.509 device whose certificate names no
        active device, i.e. a revoked one) is a refusal a retry would get again:
        ``ConnectRefused``."""
        try:
            self._publish_presence()
        except PublishError as err:
            raise self._refused(err) from err

    def _refused(self, err: PublishError) -> Exception:
        """What a refused publish of the device's own message means: "not authorized" on its
        own topics is the broker no longer accepting the device (revoked) -- ``ConnectRefused``,
        which stops the agent (exit 4) instead of retrying for ever; anything else as it is."""
        if err.reason_code != NOT_AUTHORIZED:
            return err
        return ConnectRefused(f"broker {self.client.address.url} accepted the connection but "
                              f"refuses this device's messages ({err}): the device is not (or "
                              "no longer) authorized", NOT_AUTHORIZED)

    def _go_offline(self) -> None:
        if self.client.connected:
            try:
                self._publish_presence("offline")
            except PublishError as err:  # refused (revoked): nothing more to tell the broker
                log.warning("%s: offline presence refused: %s", self.device_id, err)
        else:  # no broker to tell: its last will (if it saw the link die) says "offline"
            log.warning("%s: broker unreachable at shutdown; no offline presence sent",
                        self.device_id)
        self.client.close()
        log.info("%s: offline", self.device_id)

    # --------------------------------------------------------------------- control loop

    def _control_loop(self, inbox: Inbox, worker: Future[None]) -> None:
        """Route task messages and re-announce presence after reconnects, until stopped."""
        was_connected = True
        while not self._stopping.is_set() and not worker.done():
            received = inbox.get(timeout=self.settings.poll_s)
            if received is not None:
                self._route(received)
            connected = self.client.connected
            if connected and not was_connected:
                log.info("%s: reconnected; announcing presence again", self.device_id)
                self._announce()  # a revocation closes the link: this is where it shows
            was_connected = connected

    def _route(self, received: Received) -> None:
        """Decode a message from the tasks topic and hand it to the worker."""
        try:
            work = _decode_task_message(received.payload)
        except MessageError as err:
            self._report(DeviceError(code="rejected", message=f"unreadable task message: {err}"))
            return
        if isinstance(work, Refusal):  # logged only: reporting it could loop (presence)
            log.warning("%s: the cloud refused this device's %s %s (%s): %s", self.device_id,
                        work.of, work.update_id or "", work.code, work.reason)
            return
        if isinstance(work, _CancelWork):
            with self._lock:
                self._cancelled_rounds.add(work.cancel.round_id)  # seen by a running round
        self._work.put(work)

    # ---------------------------------------------------------------------- worker loop

    def _work_loop(self, backend: LLMBackend) -> None:
        """The worker thread: resume what the last run left, then take tasks as they come."""
        self._resume()
        while not self._stopping.is_set():
            due = self._current is not None and time.monotonic() >= self._retry_at
            try:
                item = self._work.get(timeout=0 if due else self.settings.poll_s)
            except queue.Empty:
                item = None
            if isinstance(item, _CancelWork):
                self._on_cancel(item.cancel)
            elif isinstance(item, _TaskWork):
                self._on_task(item)
            elif due:
                self._attempt(backend)

    def _resume(self) -> None:
        """After a (re)boot: resend the pending update, then pick the saved task up again."""
        pending = self.state.load_pending()
        if pending is not None:
            log.info("%s: resending update %s (round %d) left by the last run", self.device_id,
                     pending.update_id, pending.message.round_id)
            self._deliver(pending)
        loaded = self.state.load_task()
        if loaded is None or self._stopping.is_set():
            return
        if self.state.is_done(loaded[0].task_id):
            self.state.clear_task()
            return
        log.info("%s: resuming task %s (round %d) left by the last run", self.device_id,
                 loaded[0].task_id, loaded[0].round_id)
        self._current = loaded

    def _on_task(self, work: _TaskWork) -> None:
        """Accept a TrainTask: check it, keep it and its global adapter on disk."""
        task = work.task
        if self._is_stale(task):
            log.info("%s: ignoring task %s (round %d): already handled", self.device_id,
                     task.task_id, task.round_id)
            return
        try:
            check_task(task, self.model, self.config.profile, n_samples=len(self.samples))
            global_state = load_global(task, work.parts, self.model.edge)
        except TaskRefused as err:
            self._refuse(task, err)
            return
        if self._current is not None:
            replaced = self._current[0]
            log.warning("%s: task %s (round %d) replaces task %s (round %d)", self.device_id,
                        task.task_id, task.round_id, replaced.task_id, replaced.round_id)
            self.state.mark_done(replaced.task_id)
        self.state.save_task(work.payload)
        self.state.save_global(GlobalAdapter(task.global_version, task.base_version,
                                             global_state))
        with self._lock:
            self._global_version = task.global_version
        self._current = (task, work.parts)
        self._retry_at, self._retry_delay = 0.0, self.settings.retry_min_s

    def _is_stale(self, task: TrainTask) -> bool:
        with self._lock:
            cancelled = task.round_id in self._cancelled_rounds
        current = self._current[0] if self._current is not None else None
        return (cancelled or self.state.is_done(task.task_id)
                or self.state.is_cancelled(task.round_id)
                or (current is not None and (current.task_id == task.task_id
                                             or current.round_id > task.round_id)))

    def _on_cancel(self, cancel: CancelTask) -> None:
        self.state.mark_cancelled(cancel.round_id)
        if self._current is not None and self._current[0].round_id == cancel.round_id:
            self._drop_current()
        log.info("%s: round %d cancelled by the cloud: %s", self.device_id, cancel.round_id,
                 cancel.reason)

    # ---------------------------------------------------------------------------- round

    def _attempt(self, backend: LLMBackend) -> None:
        """Train the current task and deliver its update (one round, top to bottom)."""
        assert self._current is not None
        task, parts = self._current
        steps = resolve_training(self.config.profile.training, task.hparams).steps
        log.info("%s: round %d: training (task %s, %d samples, %d steps)", self.device_id,
                 task.round_id, task.task_id, len(self.samples), steps,
                 extra={"round_id": task.round_id, "task_id": task.task_id})
        try:
            encoded = execute_task(
                task, parts, self.model, backend, self.samples,
                profile=self.config.profile, residual=self.state.load_residual(),
                update_id=update_id_for(self.device_id, task.task_id),
                should_stop=lambda: self._stop_reason(task))
        except TaskRefused as err:
            self._refuse(task, err)
            return
        except RoundInterrupted as err:
            self._interrupted(task, err.reason)
            return
        except RemoteLLMStopped:  # shut down while waiting for the LLM: as between two calls
            self._interrupted(task, "shutdown")
            return
        except TRANSIENT_ERRORS as err:
            self._retry_later(task, err)
            return
        # The LLM worker refused the requests, or the encoder graph failed on a local image:
        # not worth a retry; refuse the task and go on.
        except (RemoteLLMError, EncoderError) as err:
            self._refuse(task, TaskRefused("failed", f"task {task.task_id}: {err}"))
            return
        pending = self.state.save_pending(encoded.payload, encoded.residual)  # commit
        log.info("%s: round %d: update %s committed (%d bytes), publishing", self.device_id,
                 task.round_id, pending.update_id, len(pending.payload),
                 extra={"round_id": task.round_id, "update_id": pending.update_id})
        self._deliver(pending)

    def _stop_reason(self, task: TrainTask) -> str | None:
        """Checked before every LLM call of a round."""
        if self._stopping.is_set():
            return "shutdown"
        with self._lock:
            if task.round_id in self._cancelled_rounds:
                return "cancelled"
        return "expired" if time.time() >= task.deadline_at else None

    def _interrupted(self, task: TrainTask, reason: str) -> None:
        if reason == "shutdown":
            log.info("%s: round %d interrupted by the shutdown; it restarts at the next start",
                     self.device_id, task.round_id)
        elif reason == "cancelled":
            self.state.mark_cancelled(task.round_id)
            self._drop_current()
            log.info("%s: round %d cancelled while training", self.device_id, task.round_id)
        else:
            self._refuse(task, TaskRefused("expired", f"task {task.task_id}: the deadline "
                                           "passed while training"))

    def _refuse(self, task: TrainTask, err: TaskRefused) -> None:
        log.error("%s: round %d: task %s refused (%s): %s", self.device_id, task.round_id,
                  task.task_id, err.code, err.message)
        self.state.mark_done(task.task_id)
        if self._current is not None and self._current[0].task_id == task.task_id:
            self._drop_current()
        self._report(DeviceError(code=err.code, message=err.message, task_id=task.task_id,
                                 round_id=task.round_id))

    def _retry_later(self, task: TrainTask, err: BaseException) -> None:
        log.warning("%s: round %d failed (%s: %s); trying again in %.0f s", self.device_id,
                    task.round_id, type(err).__name__, err, self._retry_delay)
        self._report(DeviceError(code="failed", message=f"{type(err).__name__}: {err}",
                                 task_id=task.task_id, round_id=task.round_id))
        self._retry_at = time.monotonic() + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.settings.retry_max_s)

    def _drop_current(self) -> None:
        if self._current is not None:
            self.state.mark_done(self._current[0].task_id)
        self.state.clear_task()
        self._current = None

    # ------------------------------------------------------------------------- delivery

    def _deliver(self, pending: PendingUpdate) -> None:
        """Publish a committed update until the broker acknowledges it (or the agent stops)."""
        delay = float(self.settings.reconnect_min_s)
        while not self._stopping.is_set():
            try:
                if not self._publish_update(pending.payload):
                    return  # stopping: the update stays on disk for the next start
            except MessageTooLarge as err:
                self._drop_pending(pending, err)
                return
            except PublishError as err:
                if err.reason_code == NOT_AUTHORIZED:  # revoked: the update stays on disk
                    raise self._refused(err) from err
                log.error("%s: update %s refused by the broker: %s; retrying in %.0f s",
                          self.device_id, pending.update_id, err, delay)
                self._stopping.wait(delay)
                delay = min(delay * 2, self.settings.reconnect_max_s)
                continue
            self.state.finish_pending(pending)
            if self._current is not None and self._current[0].task_id == pending.message.task_id:
                self._current = None
            log.info("%s: round %d: update %s delivered", self.device_id,
                     pending.message.round_id, pending.update_id,
                     extra={"round_id": pending.message.round_id,
                            "update_id": pending.update_id})
            return

    def _publish_update(self, payload: bytes) -> bool:
        """One QoS 1 publish, then wait for its PUBACK across reconnects (paho resends it)."""
        # Not publish_checked: one message, awaited for as long as it takes. Published again
        # after each timeout, a long outage would queue many copies of it in paho.
        mid = self.client.publish_nowait(topics.updates(self.device_id), payload,
                                          max_bytes=self.settings.max_packet_bytes)
        while not self._stopping.is_set():
            reason = self.client.wait_ack(mid, self.settings.poll_s)
            if reason is not None and reason.is_failure:
                raise PublishError(f"broker refused the update: {reason}", reason.value)
            if reason is not None:
                return True
        return False

    def _drop_pending(self, pending: PendingUpdate, err: MessageTooLarge) -> None:
        """An update the broker can never take: forget it (its residual too) and say so."""
        task_id, round_id = pending.message.task_id, pending.message.round_id
        self.state.mark_done(task_id)
        if self._current is not None and self._current[0].task_id == task_id:
            self._drop_current()
        self.state.drop_pending()
        log.error("%s: round %d: update %s dropped: %s", self.device_id, round_id,
                  pending.update_id, err)
        self._report(DeviceError(code="too_large", message=str(err), task_id=task_id,
                                 round_id=round_id))

    # ------------------------------------------------------------------------- presence

    def presence(self, state: PresenceState = "online") -> Presence:
        """The device's presence as the cloud sees it on ``devices/{id}/status``."""
        with self._lock:
            global_version, last_error = self._global_version, self._last_error
        capabilities = {
            "samples": len(self.samples), "providers": self.model.providers,
            "base_version": self.model.base_version, "codecs": list(CODECS),
            "max_update_bytes": self.config.profile.max_update_bytes,
            "global_version": global_version,
        }
        return Presence(device_id=self.device_id, state=state,
                        profile=self.config.profile.name,
                        bundle_version=self.model.bundle_version,
                        agent_version=agent_version(), capabilities=capabilities,
                        last_error=last_error)

    def _report(self, error: DeviceError) -> None:
        """Make ``error`` the presence's ``last_error`` and publish it."""
        with self._lock:
            self._last_error = error
        self._publish_presence()

    def _publish_presence(self, state: PresenceState = "online") -> None:
        payload = to_json(self.presence(state))
        try:
            self.client.publish(topics.status(self.device_id), payload, retain=True,
                                max_bytes=self.settings.max_packet_bytes,
                                timeout=self.settings.ack_timeout_s)
        except (AckTimeout, NotConnectedError) as err:
            # paho keeps it queued; and every reconnect announces the presence again anyway
            log.warning("%s: %s presence not acknowledged yet: %s", self.device_id, state, err)


def stop_on_signals(agent: EdgeAgent) -> None:
    """SIGTERM and SIGINT stop ``agent`` cleanly (call from the main thread)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        agent.stop(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
