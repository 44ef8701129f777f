"""Fault injection: each fault is a small state machine the runner polls from its main loop.

- ``kill-device``: SIGKILL a device while it trains (the last device), restart it 3 s later.
- ``slow-device``: SIGSTOP a device while it trains (the second last) until 5 s past the
  round's deadline, then SIGCONT: a device slower than the deadline.
- ``cloud-restart``: SIGKILL the cloud (API + coordinator + LLM worker) mid-round, a crash;
  start it again 2 s later.
- ``broker-restart``: stop the broker mid-round (SIGTERM: it saves its sessions and queued
  messages), start it again on the same port 2 s later.
- ``broker-kill``: the same with SIGKILL, a crash: what survives is what its persistence saved.
- ``duplicate``: with the first device's own credentials (a second connection), publish its
  accepted update twice more, then once under a new update id.
- ``corrupt``, ``truncated``, ``oversized``, ``nan``, ``stale-base``: a rogue client with a
  provisioned identity of its own publishes bad updates (``fednano.fleet.payloads``).

A fault fires in its round or the first later one where devices are training; the ones that
take a process down (``DISRUPTIVE_FAULTS``) fire one at a time. Everything a fault does is
noted with a timestamp for the report. All process starts happen on the runner's main thread
(``fednano.processes``: children die with the thread that started them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from fednano.broker import Mosquitto
from fednano.fleet.observe import DeviceLogs, RoundView, Snapshot
from fednano.fleet.options import DISRUPTIVE_FAULTS, FAULTS, ROGUE_FAULTS, Fault
from fednano.fleet.payloads import BadUpdate, redeliveries, rogue_updates
from fednano.processes import ManagedProcess
from shared import topics
from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MessageError,
    Presence,
    TrainTask,
    UpdateMessage,
    envelope_kind,
    to_json,
    unpack,
)
from shared.mqtt import BrokerAddress, ClientOptions, Inbox, MqttClient, MqttError, Will

TRAINING_BEFORE_FAULT_S = 3.0  # a fault waits until training has run this long
DOWN_S = 2.0  # how long the cloud or the broker stays down
DEVICE_DOWN_S = 3.0
STALL_PAST_DEADLINE_S = 5.0
CALM_S = 5.0  # between the end of one disruptive fault and the start of the next


@dataclass
class Note:
    """One thing a fault did, for the report."""

    at_s: float  # seconds since the run started
    fault: str
    round_id: int | None
    message: str


class Fleet(Protocol):
    """What faults need from the runner."""

    snapshot: Snapshot
    logs: DeviceLogs

    @property
    def broker(self) -> Mosquitto: ...

    def device(self, device_id: str) -> ManagedProcess: ...

    def kill_cloud(self) -> None: ...

    def start_cloud(self) -> None: ...

    def cloud_ready(self) -> bool: ...

    def note(self, fault: str, round_id: int | None, message: str) -> None: ...


class FaultAction:
    """Base: a fault scheduled from round ``first_round`` on; ``poll`` until ``done``."""

    fault: Fault

    def __init__(self, first_round: int) -> None:
        self.first_round = first_round
        self.done = False
        self.fired_round: int | None = None
        self.skipped: str | None = None

    @property
    def disruptive(self) -> bool:
        return self.fault in DISRUPTIVE_FAULTS

    @property
    def active(self) -> bool:
        """Fired and not finished (a disruptive one blocks the others meanwhile)."""
        return self.fired_round is not None and not self.done

    def poll(self, fleet: Fleet, now: float) -> None:
        raise NotImplementedError

    def give_up(self, reason: str) -> None:
        self.done, self.skipped = True, reason


def collecting_round(snapshot: Snapshot, first_round: int) -> RoundView | None:
    """The round collecting now, if it is ``first_round`` or later."""
    current = snapshot.collecting()
    return current if current is not None and current.id >= first_round else None


def training_for(fleet: Fleet, round_: RoundView, device_ids: Sequence[str],
                 now: float) -> str | None:
    """A device of ``device_ids`` that has trained ``round_`` for a while and not submitted."""
    for device_id in device_ids:
        since = fleet.logs.training_since(device_id, round_.id)
        waiting = round_.participants.get(device_id) == "notified"
        if since is not None and waiting and now - since >= TRAINING_BEFORE_FAULT_S:
            return device_id
    return None


class _ProcessFault(FaultAction):
    """Fires once devices train in a collecting round; ``_fire`` then ``_recover`` later."""

    def __init__(self, first_round: int, candidates: Sequence[str]) -> None:
        super().__init__(first_round)
        self.candidates = list(candidates)
        self.recover_at: float | None = None

    def poll(self, fleet: Fleet, now: float) -> None:
        if self.fired_round is None:
            round_ = collecting_round(fleet.snapshot, self.first_round)
            target = None if round_ is None else training_for(fleet, round_, self.candidates,
                                                              now)
            if round_ is not None and target is not None:
                self.fired_round = round_.id
                self.recover_at = self._fire(fleet, round_, target, now)
        elif self.recover_at is not None and now >= self.recover_at:
            self._recover(fleet)
            self.recover_at = None
        elif self.recover_at is None and self._recovered(fleet):
            self.done = True

    def _fire(self, fleet: Fleet, round_: RoundView, target: str, now: float) -> float:
        raise NotImplementedError

    def _recover(self, fleet: Fleet) -> None:
        raise NotImplementedError

    def _recovered(self, fleet: Fleet) -> bool:
        """Whether the recovery is complete (the next disruptive fault may fire)."""
        return True


class KillDevice(_ProcessFault):
    fault: Fault = "kill-device"

    def _fire(self, fleet: Fleet, round_: RoundView, target: str, now: float) -> float:
        self.target = target
        fleet.device(target).kill()
        fleet.note(self.fault, round_.id, f"SIGKILL {target} while it trained round "
                   f"{round_.id}; restart in {DEVICE_DOWN_S:g} s")
        return now + DEVICE_DOWN_S

    def _recover(self, fleet: Fleet) -> None:
        fleet.device(self.target).start()
        fleet.note(self.fault, self.fired_round, f"{self.target} restarted")


class SlowDevice(_ProcessFault):
    fault: Fault = "slow-device"

    def _fire(self, fleet: Fleet, round_: RoundView, target: str, now: float) -> float:
        self.target = target
        fleet.device(target).pause()
        left = 0.0
        if round_.deadline_at is not None:
            left = max(0.0, round_.deadline_at.timestamp() - time.time())
        fleet.note(self.fault, round_.id, f"SIGSTOP {target} while it trained round {round_.id}:"
                   f" stalled until {STALL_PAST_DEADLINE_S:g} s past the deadline "
                   f"({left:.0f} s away)")
        return now + left + STALL_PAST_DEADLINE_S

    def _recover(self, fleet: Fleet) -> None:
        fleet.device(self.target).resume()
        fleet.note(self.fault, self.fired_round, f"SIGCONT {self.target}")


class CloudRestart(_ProcessFault):
    fault: Fault = "cloud-restart"

    def _fire(self, fleet: Fleet, round_: RoundView, target: str, now: float) -> float:
        fleet.kill_cloud()
        fleet.note(self.fault, round_.id, f"SIGKILL the cloud (API + coordinator + LLM worker) "
                   f"while {target} trained round {round_.id}")
        return now + DOWN_S

    def _recover(self, fleet: Fleet) -> None:
        fleet.start_cloud()
        self.started = time.monotonic()
        fleet.note(self.fault, self.fired_round, "cloud started again")

    def _recovered(self, fleet: Fleet) -> bool:
        if not fleet.cloud_ready():
            return False
        fleet.note(self.fault, self.fired_round, f"cloud ready again "
                   f"{time.monotonic() - self.started:.0f} s after its start")
        return True


class BrokerRestart(_ProcessFault):
    fault: Fault = "broker-restart"
    how = "stopped (SIGTERM)"  # Mosquitto saves its sessions and queued messages first

    def _take_down(self, broker: Mosquitto) -> None:
        broker.stop()

    def _fire(self, fleet: Fleet, round_: RoundView, target: str, now: float) -> float:
        self._take_down(fleet.broker)
        fleet.note(self.fault, round_.id, f"broker {self.how} while {target} trained "
                   f"round {round_.id}")
        return now + DOWN_S

    def _recover(self, fleet: Fleet) -> None:
        fleet.broker.start()
        fleet.note(self.fault, self.fired_round, "broker started again on the same port")


class BrokerKill(BrokerRestart):
    """A broker crash: SIGKILL, so only what its persistence saved survives (sessions,
    subscriptions and queued QoS 1 messages are saved after every change)."""

    fault: Fault = "broker-kill"
    how = "killed (SIGKILL)"

    def _take_down(self, broker: Mosquitto) -> None:
        broker.kill()


# ------------------------------------------------------------------------------ MQTT faults


@dataclass
class Sent:
    """A payload a fault client published, and whether the broker acknowledged it."""

    bad: BadUpdate
    round_id: int
    device_id: str
    acked: bool


ClientFactory = Callable[[str, str, str, bool], MqttClient]  # id, username, password, will?


def mqtt_client(url: str) -> ClientFactory:
    """Clean-session clients to the fleet's broker."""
    def make(client_id: str, username: str, password: str, will: bool) -> MqttClient:
        offline = Will(topics.status(username), to_json(_presence(username, "offline")))
        options = ClientOptions(client_id=client_id, username=username, password=password,
                                clean_start=True, session_expiry_s=0,
                                will=offline if will else None)
        return MqttClient(BrokerAddress.parse(url), options)
    return make


def _presence(device_id: str, state: Literal["online", "offline"]) -> Presence:
    capabilities = {"samples": 64, "base_version": None, "codecs": ["fp32", "bf16"]}
    return Presence(device_id=device_id, state=state,
                    profile="sim-cpu", agent_version="rogue", capabilities=capabilities)


def _publish(client: MqttClient, device_id: str, bad: BadUpdate) -> bool:
    try:
        client.publish(topics.updates(device_id), bad.payload, max_bytes=DEFAULT_MAX_MESSAGE_BYTES,
                       timeout=30.0)
    except (MqttError, MessageError):
        return False
    return True


class Rogue(FaultAction):
    """A provisioned identity whose client sends only bad updates (``ROGUE_FAULTS``).

    It announces itself online, so the coordinator samples it; in its first round it sends
    every asked-for payload, in the next (``stale-base`` only) an update from the older
    global version; then it goes offline and is no longer sampled.
    """

    def __init__(self, faults: set[str], *, device_id: str, password: str,
                 factory: ClientFactory, rounds: int) -> None:
        super().__init__(1)
        self.faults = faults & ROGUE_FAULTS
        if not self.faults:
            raise ValueError(f"a rogue needs one of {sorted(ROGUE_FAULTS)}, got {faults!r}")
        self.fault = next(f for f in FAULTS if f in self.faults)  # each payload names its own
        self.device_id = device_id
        self.sent: list[Sent] = []
        # In its first round everything; in the next one (stale-base) an older-version update.
        self._attacks = 2 if "stale-base" in self.faults and rounds >= 2 else 1
        self._attacked = 0
        self._client = factory(device_id, device_id, password, True)  # its bound client id
        self._tasks: Inbox | None = None

    def connect(self) -> None:
        """Connect, subscribe to its tasks and say it is online."""
        self._tasks = self._client.subscribe(topics.tasks(self.device_id))
        self._client.connect()
        self._client.publish(topics.status(self.device_id),
                             to_json(_presence(self.device_id, "online")),
                             max_bytes=DEFAULT_MAX_MESSAGE_BYTES, retain=True)

    def poll(self, fleet: Fleet, now: float) -> None:
        received = None if self._tasks is None else self._tasks.get_nowait()
        while received is not None and not self.done:
            self._handle(fleet, received.payload)
            received = self._tasks.get_nowait() if self._tasks is not None else None

    def _handle(self, fleet: Fleet, payload: bytes) -> None:
        try:
            if envelope_kind(payload) != TrainTask.kind:
                return
            task, parts = unpack(payload, TrainTask)
        except MessageError:
            return
        if task.round_id != self.fired_round:  # a task sent again (cloud restart): once
            self._attack(fleet, task, parts)

    def _attack(self, fleet: Fleet, task: TrainTask, parts: dict[str, bytes]) -> None:
        first = self._attacked == 0
        faults = self.faults if first else {"stale-base"}
        older = task.global_version - 1 if task.global_version > 1 else None
        bad = rogue_updates(task, parts, faults, older_version=older, prefix=self.device_id)
        if not first:
            bad = [b for b in bad if b.expected == "stale"]
        if all(b.expected == "malformed" for b in bad):  # nothing would end its participation
            bad += rogue_updates(task, parts, {"stale-base"}, older_version=None,
                                 prefix=self.device_id)[:1]
        for item in bad:
            self.sent.append(Sent(item, task.round_id, self.device_id,
                                  _publish(self._client, self.device_id, item)))
        labels = ", ".join(f"{b.label} -> expect {b.expected}" for b in bad)
        fleet.note("rogue", task.round_id, f"{self.device_id} published {len(bad)} bad "
                   f"updates: {labels}")
        self.fired_round = task.round_id
        self._attacked += 1
        if self._attacked == self._attacks:
            self.close(fleet)

    def close(self, fleet: Fleet | None = None) -> None:
        """Say offline and disconnect (the coordinator stops sampling it)."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(MqttError, MessageError):  # else its last will says so
            self._client.publish(topics.status(self.device_id),
                                 to_json(_presence(self.device_id, "offline")),
                                 max_bytes=DEFAULT_MAX_MESSAGE_BYTES, retain=True)
        self._client.close()
        if fleet is not None:
            fleet.note("rogue", self.fired_round, f"{self.device_id} went offline")


class Duplicate(FaultAction):
    """Deliver a device's accepted update of round ``first_round`` (or later) again on its
    topic: twice as is, then once under a new update id. A device's client id is bound to its
    identity (a second connection of its own would take its session over), so the replay goes
    through a service account, as a network-level redelivery would arrive."""

    fault: Fault = "duplicate"

    def __init__(self, first_round: int, *, device_id: str, username: str, password: str,
                 factory: ClientFactory) -> None:
        super().__init__(first_round)
        self.device_id = device_id
        self.sent: list[Sent] = []
        self._client = factory(f"{username}-echo-{device_id}", username, password, False)
        self._updates: Inbox | None = None
        self._captured: tuple[UpdateMessage, bytes] | None = None

    def connect(self) -> None:
        self._updates = self._client.subscribe(topics.updates(self.device_id))
        self._client.connect()

    def poll(self, fleet: Fleet, now: float) -> None:
        received = None if self._updates is None else self._updates.get_nowait()
        while received is not None and self._captured is None:
            self._capture(received.payload)
            received = self._updates.get_nowait() if self._updates is not None else None
        if self._captured is None or self.done:
            return
        message, payload = self._captured
        stored = fleet.snapshot.updates.get(message.update_id)
        if stored is not None and stored.status == "accepted":  # now a second copy is a dup
            self._redeliver(fleet, message, payload)

    def _capture(self, payload: bytes) -> None:
        try:
            message, _ = unpack(payload, UpdateMessage)
        except MessageError:
            return
        if message.round_id >= self.first_round:
            self._captured = (message, payload)

    def _redeliver(self, fleet: Fleet, message: UpdateMessage, payload: bytes) -> None:
        items = redeliveries(payload, prefix=self.device_id)
        for item in items:
            self.sent.append(Sent(item, message.round_id, self.device_id,
                                  _publish(self._client, self.device_id, item)))
        self.fired_round, self.done = message.round_id, True
        fleet.note(self.fault, message.round_id, f"{self.device_id}'s accepted update "
                   f"{message.update_id} published twice more, then under a new id")
        self._client.close()

    def close(self) -> None:
        self.done = True
        self._client.close()


# ------------------------------------------------------------------------------ the plan


@dataclass
class FaultPlan:
    """The faults of a run and their notes."""

    actions: list[FaultAction] = field(default_factory=list)
    calm_since: float = 0.0  # when the last disruptive fault finished (monotonic)

    def poll(self, fleet: Fleet, now: float) -> None:
        """Advance every fault; a disruptive one only starts when no other is active and the
        last one finished ``CALM_S`` ago (the system had time to be busy again)."""
        busy = any(a.active and a.disruptive for a in self.actions)
        for action in self.actions:
            if action.done:
                continue
            waiting = action.disruptive and action.fired_round is None
            if waiting and (busy or now - self.calm_since < CALM_S):
                continue
            action.poll(fleet, now)
            if action.disruptive and action.done:
                self.calm_since = now
            busy = busy or (action.active and action.disruptive)

    def give_up_pending(self, reason: str) -> None:
        for action in self.actions:
            if not action.done and action.fired_round is None:
                action.give_up(reason)

    @property
    def sent(self) -> list[Sent]:
        return [s for a in self.actions if isinstance(a, Rogue | Duplicate) for s in a.sent]


def default_round(fault: str, rounds: int) -> int:
    """Where a fault fires by default: spread over the run so they do not pile up."""
    preferred = {"kill-device": 1, "duplicate": 1, "slow-device": 2, "cloud-restart": 2,
                 "broker-restart": 3, "broker-kill": 3}.get(fault, 1)
    return min(preferred, rounds)
