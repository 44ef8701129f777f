"""The round coordinator: a transport-agnostic core whose every decision lives in the database.

A round moves OPEN -> COLLECTING -> AGGREGATING -> EVALUATING -> CLOSED (or FAILED):

- ``open_round`` samples participants (active, online, capable; seeded) and persists the round;
  the API calls it too, and the coordinator's schedule calls it until a target is reached.
- ``tick`` advances every unfinished round: it publishes ``TrainTask`` envelopes to new
  participants, moves to AGGREGATING at k-of-n quorum (or at the deadline with at least the
  minimum, else FAILED), merges through the ``Aggregator``, evaluates, records metrics, closes,
  cancels outstanding tasks and refreshes the retained ``RoundAnnouncement``.
- ``handle_update`` ingests an update exactly once by (sender, ``update_id``) (a redelivery is
  acknowledged and ignored), refuses senders that are not active devices (revoked ones
  included), runs the validation gate and stores the blob and the verdict. The sender is the
  device id of the topic, which the broker bound to the authenticated client.
- ``handle_presence`` keeps ``devices.online`` / ``last_seen_at`` current.

Nothing lives only in memory: a new ``Coordinator`` on the same database resumes mid-round
(``resume`` re-sends tasks to participants that have not submitted). Time comes from an injected
clock, so tests move time instead of sleeping. Publishing goes through a ``Publisher`` (the MQTT
binding in ``cloud.coordinator_mqtt``, a recorder in tests) outside database transactions.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, Protocol

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker

from cloud import aggregation, metrics
from cloud.aggregation import AggregationError, Aggregator, Evaluation
from cloud.blobs import Blob, BlobIntegrityError, BlobStore
from cloud.db import crud
from cloud.db.crud import ConflictError, RecordNotFoundError
from cloud.db.models import (
    TERMINAL_ROUND_STATES,
    AdapterVersion,
    DeviceStatus,
    ParticipationStatus,
    Round,
    RoundState,
    UpdateStatus,
    utcnow,
)
from cloud.db.session import session_scope
from cloud.rounds import (
    RoundConfig,
    Schedule,
    eligible_devices,
    load_defaults,
    load_schedule,
    round_seed,
    sample_participants,
    save_schedule,
)
from cloud.strategies import Strategy
from cloud.validation import (
    Accepted,
    Rejection,
    RejectionCode,
    RoundContext,
    task_id_for,
    validate_update,
)
from shared import protocol, topics
from shared.adapters import AdapterState
from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CancelTask,
    MessageError,
    MessageTooLarge,
    Presence,
    Refusal,
    RoundAnnouncement,
    TrainTask,
    UpdateMessage,
    from_json,
    pack,
    to_json,
    unpack,
)
from shared.mqtt import MqttError
from shared.training import TaskHParams

log = logging.getLogger(__name__)

Clock = Callable[[], datetime]
COORDINATOR_ACTOR = "system:coordinator"
OUTSTANDING = (ParticipationStatus.SELECTED, ParticipationStatus.NOTIFIED)
# Rejections that say nothing about the participant's own task (it may still submit).
_KEEPS_PARTICIPATION = frozenset({RejectionCode.DUPLICATE, RejectionCode.LATE,
                                  RejectionCode.NOT_PARTICIPANT, RejectionCode.NOT_COLLECTING})
# Failures of the database, the blob folder or the broker: retried later, nothing is lost.
# Anything else raised while advancing a round is a fault of that round (bad data, a bug):
# the round fails with the error as its reason and the other rounds go on.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (
    OperationalError, InterfaceError, PoolTimeoutError, OSError, BlobIntegrityError,
    MqttError, MessageTooLarge)


class NoGlobalVersionError(ConflictError):
    """No adapter version exists yet: the coordinator stores the initial one at start-up."""


class Publisher(Protocol):
    """Where the coordinator's messages go (MQTT QoS 1 in production)."""

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """Publish ``payload`` on ``topic``; raise if the broker did not take it."""


@dataclass(frozen=True)
class IngestResult:
    """What happened to one received update."""

    outcome: Literal["accepted", "buffered", "rejected", "duplicate"]
    update_id: str | None = None
    code: str | None = None
    reason: str | None = None


# ------------------------------------------------------------------------------ opening / stopping


def open_round(session: Session, *, config: RoundConfig, actor: str) -> Round:
    """Persist a new OPEN round on the newest global version with sampled participants.

    ``NotEnoughDevicesError`` if too few devices qualify, ``NoGlobalVersionError`` before the
    first version exists. The coordinator publishes the tasks at its next tick.
    """
    version = crud.latest_adapter_version(session)
    if version is None:
        raise NoGlobalVersionError("no global adapter version yet: start the coordinator first")
    devices = crud.online_devices(session, status=DeviceStatus.ACTIVE)
    eligible = eligible_devices(devices, config)
    sample_participants(eligible, config, 0)  # raises early if too few qualify
    round_ = crud.create_round(session, strategy=config.strategy, quorum=1, min_updates=1,
                               config=config.model_dump(mode="json"), base_version_id=version.id)
    chosen = sample_participants(eligible, config, round_seed(config, round_.id))
    round_.quorum, round_.min_updates = config.quorum_for(len(chosen))
    for device_id in chosen:
        crud.add_participation(session, round_id=round_.id, device_id=device_id)
    crud.record_audit(session, actor=actor, action="round.open", subject=f"round:{round_.id}",
                      details={"participants": chosen, "quorum": round_.quorum,
                               "min_updates": round_.min_updates, "version": version.id})
    return round_


def stop_round(session: Session, *, round_id: int, actor: str,
               reason: str = "operator stop") -> Round:
    """Close an OPEN or COLLECTING round without a new version (``InvalidTransitionError``
    once it is aggregating or finished); the coordinator cancels the outstanding tasks."""
    round_ = crud.transition_round(session, round_id=round_id, to=RoundState.CLOSED)
    crud.record_audit(session, actor=actor, action="round.stop", subject=f"round:{round_id}",
                      details={"reason": reason})
    return round_


# ------------------------------------------------------------------------------ round plans


@dataclass(frozen=True)
class RoundPlan:
    """What a round runs with, typed: its config, the strategy that merges it and the training
    parameters every task carries, built together from the round's row."""

    config: RoundConfig
    strategy: Strategy
    task_hparams: TaskHParams
    source: dict[str, Any]  # the row's config they were built from

    @classmethod
    def of(cls, round_: Round) -> RoundPlan:
        config = RoundConfig.of(round_)
        return cls(config, config.make_strategy(), config.task_hparams(),
                   copy.deepcopy(round_.config))


class RoundPlans:
    """Each unfinished round's ``RoundPlan``, built once per round rather than for every
    update and every task (validating a config builds strategies), and built again only if
    the row's config changed (it does once: the base version is recorded as the round starts
    collecting). A finished round's plan is dropped."""

    def __init__(self) -> None:
        self._plans: dict[int, RoundPlan] = {}

    def of(self, round_: Round) -> RoundPlan:
        """The plan of ``round_`` as its row stands."""
        plan = self._plans.get(round_.id)
        if plan is None or plan.source != round_.config:
            plan = self._plans[round_.id] = RoundPlan.of(round_)
        return plan

    def forget(self, round_id: int) -> None:
        """Drop a finished round's plan."""
        self._plans.pop(round_id, None)

    def keep(self, round_ids: Collection[int]) -> None:
        """Drop every plan but those of ``round_ids`` (the unfinished rounds)."""
        self._plans = {i: plan for i, plan in self._plans.items() if i in round_ids}

    def __len__(self) -> int:
        return len(self._plans)


# ------------------------------------------------------------------------------ the coordinator


class Coordinator:
    """Drives rounds from the database; see the module docstring."""

    def __init__(self, sessions: sessionmaker[Session], *, blobs: BlobStore,
                 publisher: Publisher, aggregator: Aggregator, base_version: str,
                 clock: Clock = utcnow, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 actor: str = COORDINATOR_ACTOR) -> None:
        self.sessions = sessions
        self.blobs = blobs
        self.publisher = publisher
        self.aggregator = aggregator
        self.base_version = base_version
        self.clock = clock
        self.max_message_bytes = max_message_bytes
        self.actor = actor
        self._states: dict[int, AdapterState] = {}
        self.plans = RoundPlans()

    # --- start-up -------------------------------------------------------------------------------

    def ensure_initial_version(self, state: AdapterState) -> int:
        """Store ``state`` as version 1 unless a version exists; returns the newest id."""
        with session_scope(self.sessions) as session:
            return aggregation.ensure_initial_version(session, self.blobs, state).id

    def resume(self) -> None:
        """After a (re)start: re-send tasks to every participant of a collecting round that has
        not submitted, then bring every round up to date."""
        with session_scope(self.sessions) as session:
            collecting = [r.id for r in crud.unfinished_rounds(session)
                          if r.state is RoundState.COLLECTING]
        for round_id in collecting:
            self._notify(round_id, OUTSTANDING)
        self.tick()
        self.announce()

    def open_round(self, config: RoundConfig | None = None, *, actor: str | None = None) -> int:
        """Open a round with ``config`` (default: the stored defaults); returns its id."""
        with session_scope(self.sessions) as session:
            config = config or load_defaults(session)
            return open_round(session, config=config, actor=actor or self.actor).id

    # --- the loop -------------------------------------------------------------------------------

    def tick(self) -> None:
        """Advance every unfinished round, cancel leftovers, follow the schedule."""
        with session_scope(self.sessions) as session:
            round_ids = [r.id for r in crud.unfinished_rounds(session)]
        self.plans.keep(round_ids)  # rounds finished elsewhere (an operator's stop) go
        for round_id in round_ids:
            try:
                self._advance(round_id)
            except TRANSIENT_ERRORS:
                raise
            except Exception as err:  # noqa: BLE001  (recorded as the round's failure reason, see
                # TRANSIENT_ERRORS: one broken round must not stop the coordinator, nor
                # every restart of it)
                self._fail_broken_round(round_id, err)
        self._cancel_leftovers()
        if self._run_schedule():
            self.tick()

    def _advance(self, round_id: int) -> None:
        state = self._state_of(round_id)
        if state is RoundState.OPEN:
            state = self._begin_collecting(round_id)
        if state is RoundState.COLLECTING:
            self._notify(round_id, (ParticipationStatus.SELECTED,))
            state = self._check_collection(round_id)
        if state is RoundState.AGGREGATING:
            state = self._aggregate(round_id)
        if state is RoundState.EVALUATING:
            state = self._evaluate(round_id)
        if state in TERMINAL_ROUND_STATES:
            self.plans.forget(round_id)

    def _fail_broken_round(self, round_id: int, err: Exception) -> None:
        log.exception("round %d failed unexpectedly; marking it failed", round_id,
                      extra={"round_id": round_id})
        reason = f"internal error: {type(err).__name__}: {err}"[:1000]
        with session_scope(self.sessions) as session:
            if crud.require_round(session, round_id=round_id).state in TERMINAL_ROUND_STATES:
                return
            crud.transition_round(session, round_id=round_id, to=RoundState.FAILED,
                                  reason=reason, at=self.clock())
            self._audit_transition(session, round_id, RoundState.FAILED, reason=reason)
        self.plans.forget(round_id)

    def _state_of(self, round_id: int) -> RoundState:
        with session_scope(self.sessions) as session:
            return crud.require_round(session, round_id=round_id).state

    def _begin_collecting(self, round_id: int) -> RoundState:
        now = self.clock()
        with session_scope(self.sessions) as session:
            round_ = crud.require_round(session, round_id=round_id, for_update=True)
            config = RoundConfig.of(round_).model_copy(update={"base_version": self.base_version})
            round_.config = config.model_dump(mode="json")
            round_.deadline_at = now + timedelta(seconds=config.deadline_s)
            crud.transition_round(session, round_id=round_id, to=RoundState.COLLECTING, at=now)
            self._audit_transition(session, round_id, RoundState.COLLECTING)
        self.announce()
        return RoundState.COLLECTING

    def _notify(self, round_id: int, statuses: Sequence[ParticipationStatus]) -> None:
        """Publish the round's task to its participants in ``statuses``; mark them notified."""
        with session_scope(self.sessions) as session:
            round_ = crud.require_round(session, round_id=round_id)
            targets = crud.participant_ids(session, round_id=round_id, statuses=statuses)
            if not targets:
                return
            global_frame = self.blobs.get(_base(round_).blob_sha256)
            plan = self.plans.of(round_)
            tasks = {d: self._task(round_, plan, d, global_frame) for d in targets}
        for device_id, payload in tasks.items():
            self.publisher.publish(topics.tasks(device_id), payload)
        now = self.clock()
        with session_scope(self.sessions) as session:  # one query and one flush, not N each
            participations = {p.device_id: p for p in crud.list_participations(
                session, round_id=round_id)}
            for device_id in tasks:
                crud.mark_participation(participations[device_id],
                                        status=ParticipationStatus.NOTIFIED, at=now)
            crud.record_device_metrics(session, name="task_bytes", round_id=round_id,
                                       values={d: len(p) for d, p in tasks.items()})

    def _task(self, round_: Round, plan: RoundPlan, device_id: str,
              global_frame: bytes) -> bytes:
        config = plan.config
        if round_.deadline_at is None or round_.base_version_id is None:
            raise RuntimeError(f"round {round_.id} is collecting without a deadline or version")
        task = TrainTask(task_id=task_id_for(round_.id, device_id), round_id=round_.id,
                         global_version=round_.base_version_id,
                         base_version=config.base_version or self.base_version,
                         strategy=round_.strategy, hparams=plan.task_hparams,
                         codec=config.codec, deadline_at=round_.deadline_at.timestamp(),
                         max_update_bytes=config.max_update_bytes,
                         seed=round_seed(config, round_.id), created_at=self.clock().timestamp())
        return protocol.encode_task(task, global_frame)

    def _check_collection(self, round_id: int) -> RoundState:
        """COLLECTING -> AGGREGATING at quorum, or at the deadline (or once nobody is left to
        answer) with the minimum; FAILED below it. Outstanding tasks are dropped."""
        now = self.clock()
        with session_scope(self.sessions) as session:
            round_ = crud.require_round(session, round_id=round_id, for_update=True)
            accepted = crud.count_updates(session, round_id=round_id,
                                          status=UpdateStatus.ACCEPTED)
            waiting = bool(crud.participant_ids(session, round_id=round_id, statuses=OUTSTANDING,
                                                limit=1))
            expired = round_.deadline_at is not None and now >= round_.deadline_at
            if accepted < round_.quorum and waiting and not expired:
                return RoundState.COLLECTING
            if accepted >= round_.min_updates:
                state, reason = RoundState.AGGREGATING, None
            else:
                state, reason = RoundState.FAILED, (
                    f"{accepted} accepted updates by the deadline, the round needs "
                    f"{round_.min_updates}")
            crud.transition_round(session, round_id=round_id, to=state, reason=reason, at=now)
            self._audit_transition(session, round_id, state, accepted=accepted)
        self._drop_outstanding(round_id, "the round stopped collecting")
        self.announce()
        return state

    def _aggregate(self, round_id: int) -> RoundState:
        with session_scope(self.sessions) as session:
            round_ = crud.require_round(session, round_id=round_id, for_update=True)
            try:
                with session.begin_nested():
                    version = self.aggregator.aggregate(session, round_)
            except AggregationError as err:
                crud.transition_round(session, round_id=round_id, to=RoundState.FAILED,
                                      reason=str(err), at=self.clock())
                self._audit_transition(session, round_id, RoundState.FAILED, reason=str(err))
                state = RoundState.FAILED
            else:
                crud.transition_round(session, round_id=round_id, to=RoundState.EVALUATING)
                self._audit_transition(session, round_id, RoundState.EVALUATING,
                                       version=version.id)
                state = RoundState.EVALUATING
        self.announce()
        return state

    def _evaluate(self, round_id: int) -> RoundState:
        """Evaluate the round's version outside any transaction, then record and close."""
        with session_scope(self.sessions) as session:
            version = _round_version(session, round_id)
        evaluation: Evaluation | None = self.aggregator.evaluate(version)
        with session_scope(self.sessions) as session:
            round_ = crud.require_round(session, round_id=round_id, for_update=True)
            if round_.state is not RoundState.EVALUATING:
                return round_.state
            aggregation.record_round_metrics(session, round_, version, evaluation)
            crud.transition_round(session, round_id=round_id, to=RoundState.CLOSED,
                                  at=self.clock())
            details = {} if evaluation is None else {"accuracy": evaluation.accuracy}
            self._audit_transition(session, round_id, RoundState.CLOSED, version=version.id,
                                   **details)
        self.announce()
        return RoundState.CLOSED

    # --- cancelling and announcing --------------------------------------------------------------

    def _drop_outstanding(self, round_id: int, reason: str) -> None:
        """Mark a finished round's outstanding participants dropped and cancel their tasks."""
        with session_scope(self.sessions) as session:
            dropped = [p.device_id for p in crud.list_participations(session, round_id=round_id)
                       if p.status in OUTSTANDING]
            for device_id in dropped:
                crud.set_participation_status(session, round_id=round_id, device_id=device_id,
                                              status=ParticipationStatus.DROPPED,
                                              at=self.clock())
        cancel = pack(CancelTask(round_id=round_id, reason=reason,
                                 created_at=self.clock().timestamp()))
        for device_id in dropped:
            self.publisher.publish(topics.tasks(device_id), cancel)

    def _cancel_leftovers(self) -> None:
        """Rounds an operator stopped (or that failed elsewhere) with tasks still out."""
        with session_scope(self.sessions) as session:
            round_ids = crud.finished_rounds_with(session, statuses=OUTSTANDING)
        for round_id in round_ids:
            self._drop_outstanding(round_id, "the round was stopped")

    def announce(self) -> None:
        """Publish the retained announcement of the newest round and the current version."""
        with session_scope(self.sessions) as session:
            rounds = crud.list_rounds(session, limit=1)
            version = crud.latest_adapter_version(session)
            latest = rounds[0] if rounds else None
            message = RoundAnnouncement(
                round_id=None if latest is None else latest.id,
                state="idle" if latest is None else latest.state.value,
                global_version=None if version is None else version.id,
                deadline_at=(None if latest is None or latest.deadline_at is None
                             else latest.deadline_at.timestamp()),
                created_at=self.clock().timestamp())
        self.publisher.publish(topics.ROUND_ANNOUNCEMENT, to_json(message), retain=True)

    def _audit_transition(self, session: Session, round_id: int, state: RoundState,
                          **details: object) -> None:
        crud.record_audit(session, actor=self.actor, action="round.transition",
                          subject=f"round:{round_id}", details={"to": state.value, **details})
        metrics.round_transition(round_id, state.value)
        log.info("round %d: %s %s", round_id, state.value, details or "",
                 extra={"round_id": round_id})

    # --- the schedule ---------------------------------------------------------------------------

    def _run_schedule(self) -> bool:
        """Open the next round if the schedule is on and no round is running; True if opened."""
        with session_scope(self.sessions) as session:
            schedule = load_schedule(session)
            if not schedule.enabled or crud.unfinished_rounds(session):
                return False
            done = _schedule_done(session, schedule)
            if done is not None:
                save_schedule(session, schedule.model_copy(
                    update={"enabled": False, "stopped_reason": done}))
                crud.record_audit(session, actor=self.actor, action="schedule.done",
                                  subject="schedule", details={"reason": done})
                return False
            try:
                with session.begin_nested():
                    open_round(session, config=load_defaults(session), actor=self.actor)
            except ConflictError as err:  # too few devices online: try again next tick
                log.info("schedule: not opening a round yet: %s", err)
                return False
        return True

    # --- ingestion ------------------------------------------------------------------------------

    def handle_update(self, device_id: str, payload: bytes) -> IngestResult:
        """Ingest an update received on ``devices/{device_id}/updates`` exactly once: a batch
        of one (``handle_updates``)."""
        return self.handle_updates([(device_id, payload)])[0]

    def handle_updates(self, updates: Sequence[tuple[str, bytes]]) -> list[IngestResult]:
        """Ingest received updates, (sender, payload) each, in one transaction; results in order.

        Each is stored exactly once by (sender, ``update_id``), a second copy in the same batch
        included (a ``duplicate``). What every update needs is looked up once for the batch
        (``_IngestBatch``); the accepted updates' blobs are written and fsynced together, then
        the one commit. A refusal is recorded with its code (it rolls nothing back) and, once
        committed, answered on the sender's tasks topic. Anything raised rolls the whole batch
        back, none of it stored (blob files aside: content-addressed, stored again as a
        no-op): a storage error is for the caller to retry, anything else to handle the
        updates one at a time (``CoordinatorService``).
        """
        unpacked = [self._unpack(payload) for _, payload in updates]
        keys = {(device_id, parsed[0].update_id)
                for (device_id, _), parsed in zip(updates, unpacked, strict=True)
                if not isinstance(parsed, MessageError)}
        with session_scope(self.sessions) as session:
            batch = _IngestBatch(session, senders={device_id for device_id, _ in updates},
                                 keys=keys, plans=self.plans)
            results = [self._ingest(batch, device_id, payload, parsed)
                       for (device_id, payload), parsed in zip(updates, unpacked, strict=True)]
            self.blobs.store(batch.blobs)
        for (device_id, _), result in zip(updates, results, strict=True):
            if result.outcome == "rejected":
                self.answer_refusal(device_id, result)
        return results

    def answer_refusal(self, device_id: str, result: IngestResult) -> None:
        """Tell the device why its update was refused (``Refusal`` on its tasks topic)."""
        self._answer(device_id, Refusal(of="update", update_id=result.update_id,
                                        code=result.code or "rejected",
                                        reason=(result.reason or "")[:1000],
                                        created_at=self.clock().timestamp()))

    def _answer(self, device_id: str, refusal: Refusal) -> None:
        # Best effort once the refusal is recorded: a broker that does not take the answer
        # leaves the record, which operators see, as the answer.
        try:
            self.publisher.publish(topics.tasks(device_id), pack(refusal))
        except (MqttError, MessageTooLarge) as err:
            log.warning("could not answer %s's refused %s: %s", device_id, refusal.of, err)

    def _unpack(self, payload: bytes) -> tuple[UpdateMessage, dict[str, bytes]] | MessageError:
        try:
            return unpack(payload, UpdateMessage, max_bytes=self.max_message_bytes)
        except MessageError as err:
            return err

    def _ingest(self, batch: _IngestBatch, device_id: str, payload: bytes,
                unpacked: tuple[UpdateMessage, dict[str, bytes]] | MessageError) -> IngestResult:
        session = batch.session
        if isinstance(unpacked, MessageError):
            return self._refuse(device_id, None, RejectionCode.MALFORMED, str(unpacked), session)
        message, parts = unpacked
        status = batch.devices.get(device_id)
        if status is not DeviceStatus.ACTIVE:
            code = RejectionCode.NOT_PARTICIPANT if status is None else RejectionCode.REVOKED
            return self._refuse(device_id, message.update_id, code,
                                f"device {device_id!r} is "
                                f"{'unknown' if status is None else status.value}", session)
        if (device_id, message.update_id) in batch.stored:
            return self._redelivered(session, device_id, message)
        round_ = batch.round(message.round_id)
        if round_ is None:
            return self._refuse(device_id, message.update_id, RejectionCode.UNKNOWN_ROUND,
                                f"there is no round {message.round_id}", session)
        verdict = validate_update(
            message, parts, device_id=device_id,
            context=round_.context(device_id, default_base=self.base_version),
            global_state=self._global_state(_base(round_.row)), payload_bytes=len(payload),
            now=self.clock())
        batch.stored.add((device_id, message.update_id))
        return self._record(batch, round_, device_id, message, payload, verdict)

    def _redelivered(self, session: Session, device_id: str,
                     message: UpdateMessage) -> IngestResult:
        """A QoS 1 redelivery (same sender, same id): stored once, noted for operators."""
        crud.record_audit(session, actor=f"device:{device_id}", action="update.redelivered",
                          subject=f"device:{device_id}",
                          details={"update_id": message.update_id, "round_id": message.round_id})
        return IngestResult("duplicate", message.update_id)

    def _refuse(self, device_id: str, update_id: str | None, code: RejectionCode, reason: str,
                session: Session | None = None) -> IngestResult:
        """A refusal that cannot be an ``updates`` row (no round, device or id): audited."""
        details = {"update_id": update_id, "code": code.value, "reason": reason[:500]}
        if session is None:
            with session_scope(self.sessions) as own:
                crud.record_audit(own, actor=f"device:{device_id}", action="update.refused",
                                  subject=f"device:{device_id}", details=details)
        else:
            crud.record_audit(session, actor=f"device:{device_id}", action="update.refused",
                              subject=f"device:{device_id}", details=details)
        log.warning("update from %s refused (%s): %s", device_id, code.value, reason)
        return IngestResult("rejected", update_id, code.value, reason)

    def _global_state(self, version: AdapterVersion) -> AdapterState:
        if version.id not in self._states:
            self._states[version.id] = aggregation.load_state(self.blobs, version)
        return self._states[version.id]

    def _record(self, batch: _IngestBatch, round_: _LockedRound, device_id: str,
                message: UpdateMessage, payload: bytes,
                verdict: Accepted | Rejection) -> IngestResult:
        session = batch.session
        if isinstance(verdict, Rejection):
            crud.add_update(session, record=_update_record(
                message, device_id, UpdateStatus.REJECTED, blob_size=len(payload),
                rejection_code=verdict.code.value, rejection_reason=verdict.reason))
            if verdict.code not in _KEEPS_PARTICIPATION:
                round_.finish(device_id, ParticipationStatus.REJECTED, self.clock())
            log.info("update %s from %s rejected (%s): %s", message.update_id, device_id,
                     verdict.code.value, verdict.reason)
            return IngestResult("rejected", message.update_id, verdict.code.value, verdict.reason)
        blob = self.blobs.address(payload)
        batch.blobs.append((blob, payload))  # stored before the commit (handle_updates)
        record = _update_record(message, device_id, verdict.status, blob_sha256=blob.sha256,
                                blob_size=blob.size, blob_path=str(blob.path))
        if verdict.update.n_samples < message.n_samples:  # stored (and merged) as bounded
            record = dataclasses.replace(record, n_samples=verdict.update.n_samples)
            crud.record_audit(session, actor=f"device:{device_id}", action="update.weight_bounded",
                              subject=f"device:{device_id}",
                              details={"update_id": message.update_id,
                                       "claimed": message.n_samples,
                                       "counted": verdict.update.n_samples})
        crud.add_update(session, record=record)
        round_.submitted.add(device_id)
        if verdict.status is UpdateStatus.ACCEPTED:
            round_.finish(device_id, ParticipationStatus.SUBMITTED, self.clock())
            return IngestResult("accepted", message.update_id)
        return IngestResult("buffered", message.update_id)

    def refuse_failed(self, device_id: str, error: str) -> IngestResult:
        """An update whose handling failed unexpectedly (not for storage reasons): recorded
        as refused with code ``internal`` and answered, then acknowledged by the caller
        (redelivered, it would fail again and hold up every message behind it)."""
        result = self._refuse(device_id, None, RejectionCode.INTERNAL, error)
        self.answer_refusal(device_id, result)
        return result

    def record_dropped(self, topic: str, error: str) -> None:
        """Audit a message outside the device tree that could not be handled."""
        with session_scope(self.sessions) as session:
            crud.record_audit(session, actor=self.actor, action="message.dropped",
                              subject=topic[:128], details={"error": error[:1000]})

    # --- presence -------------------------------------------------------------------------------

    def handle_presence(self, device_id: str, payload: bytes) -> bool:
        """Record a presence message from ``devices/{device_id}/status``; False if ignored."""
        if not payload:
            return False  # a cleared retained message
        try:
            presence = from_json(payload, Presence)
        except MessageError as err:
            return self._refuse_presence(device_id, "malformed", str(err))
        if presence.device_id != device_id:
            return self._refuse_presence(device_id, "identity", f"presence on {device_id}'s "
                                         f"topic names {presence.device_id!r}")
        with session_scope(self.sessions) as session:
            device = crud.get_device(session, device_id=device_id)
            if device is None or device.status is not DeviceStatus.ACTIVE:
                return False
            crud.set_presence(session, device_id=device_id, online=presence.state == "online",
                              at=self.clock())
            if presence.capabilities:  # replaced: what the device reports now, bounded
                device.capabilities = dict(presence.capabilities)
        return True

    def _refuse_presence(self, device_id: str, code: str, reason: str) -> bool:
        """A refused presence: audited with its code and answered on the device's tasks
        topic (its retained message stays the device's to replace)."""
        with session_scope(self.sessions) as session:
            crud.record_audit(session, actor=f"device:{device_id}", action="presence.refused",
                              subject=f"device:{device_id}",
                              details={"code": code, "reason": reason[:500]})
        log.warning("presence from %s refused (%s): %s", device_id, code, reason)
        self._answer(device_id, Refusal(of="presence", code=code, reason=reason[:1000],
                                        created_at=self.clock().timestamp()))
        return False


# ------------------------------------------------------------------------------ one batch


class _LockedRound:
    """A round as one batch of updates sees it: locked, its config parsed and its strategy
    built once, and its senders' participations and earlier submissions looked up once."""

    def __init__(self, session: Session, row: Round, senders: set[str],
                 plan: RoundPlan) -> None:
        self.row = row
        self.config = plan.config
        self.requires_fisher = plan.strategy.requires_fisher
        self.participations = crud.participations_of(session, round_id=row.id,
                                                     device_ids=senders)
        self.submitted = crud.senders_with_updates(session, round_id=row.id, device_ids=senders)

    def context(self, device_id: str, *, default_base: str) -> RoundContext:
        """What the validation gate needs to know about the round and this sender."""
        row, config = self.row, self.config
        return RoundContext(
            round_id=row.id, state=row.state, participant=device_id in self.participations,
            submitted=device_id in self.submitted, global_version=_base(row).id,
            base_version=config.base_version or default_base, deadline_at=row.deadline_at,
            late_policy=config.late_policy, requires_fisher=self.requires_fisher,
            max_update_bytes=config.max_update_bytes, max_delta_norm=config.max_delta_norm,
            max_samples=config.sample_bound)

    def finish(self, device_id: str, status: ParticipationStatus, at: datetime) -> None:
        """The sender's task is done: ``submitted``, or ``rejected`` while still outstanding."""
        participation = self.participations.get(device_id)
        submitted = status is ParticipationStatus.SUBMITTED
        if participation is None:
            if submitted:  # the gate accepts participants only
                raise RecordNotFoundError("participation", (self.row.id, device_id))
            return
        if submitted or participation.status in OUTSTANDING:
            crud.mark_participation(participation, status=status, at=at)


class _IngestBatch:
    """What one transaction of updates looks up once for all of them (their senders, the
    (sender, id) pairs already stored, each round they name) and the blobs it stores."""

    def __init__(self, session: Session, *, senders: set[str], keys: set[tuple[str, str]],
                 plans: RoundPlans) -> None:
        self.session = session
        self.plans = plans
        self.senders = senders
        self.devices = crud.device_statuses(session, device_ids=senders)  # sender -> status
        self.stored = crud.stored_update_keys(session, keys=keys)  # grows as rows are added
        self.blobs: list[tuple[Blob, bytes]] = []
        self._rounds: dict[int, _LockedRound | None] = {}

    def round(self, round_id: int) -> _LockedRound | None:
        """The round, locked for the rest of the batch (None if there is none)."""
        if round_id not in self._rounds:
            row = crud.get_round(self.session, round_id=round_id, for_update=True)
            self._rounds[round_id] = (None if row is None else _LockedRound(
                self.session, row, self.senders, self.plans.of(row)))
        return self._rounds[round_id]


# ------------------------------------------------------------------------------ helpers


def _update_record(message: UpdateMessage, device_id: str, status: UpdateStatus,
                   **blob: Any) -> crud.UpdateRecord:
    return crud.UpdateRecord(update_id=message.update_id, round_id=message.round_id,
                             device_id=device_id, base_version=message.global_version,
                             n_samples=message.n_samples, status=status,
                             metrics=dict(message.metrics), **blob)


def _base(round_: Round) -> AdapterVersion:
    if round_.base_version is None:
        raise RuntimeError(f"round {round_.id} has no base version")
    return round_.base_version


def _round_version(session: Session, round_id: int) -> AdapterVersion:
    version = crud.round_version(session, round_id=round_id)
    if version is None:
        raise RuntimeError(f"round {round_id} is evaluating but has no version")
    return version


def _schedule_done(session: Session, schedule: Schedule) -> str | None:
    """Why the schedule is finished, or None if it should open another round."""
    rounds = [r for r in crud.list_rounds(session, limit=1000)
              if r.id > schedule.after_round_id]  # newest first
    closed = [r for r in rounds if r.state is RoundState.CLOSED]
    if schedule.target_rounds is not None and len(closed) >= schedule.target_rounds:
        return f"reached the target of {schedule.target_rounds} rounds"
    recent = rounds[:schedule.max_consecutive_failures]
    if len(recent) == schedule.max_consecutive_failures and all(
            r.state is RoundState.FAILED for r in recent):
        return f"{len(recent)} rounds failed in a row"
    if schedule.target_accuracy is not None and closed:
        accuracy = crud.list_metrics(session, round_id=closed[0].id, name="accuracy")
        if accuracy and accuracy[-1].value >= schedule.target_accuracy:
            return f"reached the target accuracy {schedule.target_accuracy:g}"
    return None
