"""The round state machine: open, collect until quorum or deadline, aggregate, evaluate, close.

A round moves OPEN -> COLLECTING -> AGGREGATING -> EVALUATING -> CLOSED (or FAILED).
``open_round`` samples participants (active, online, capable; seeded) and persists the round;
the API calls it too, and the schedule calls it until a target is reached. ``RoundLifecycle.tick``
advances every unfinished round: it publishes ``TrainTask`` envelopes to new participants, moves
to AGGREGATING at k-of-n quorum (or at the deadline with at least the minimum, else FAILED),
merges through the ``Aggregator``, evaluates, records metrics, closes, cancels outstanding tasks
and refreshes the retained ``RoundAnnouncement``. Every step reads and writes the database, so a
restarted coordinator resumes mid-round (``resume`` re-sends tasks not yet answered).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy.orm import Session

from cloud import aggregation, metrics
from cloud.aggregation import AggregationError, Evaluation
from cloud.coordinator.plans import RoundPlan
from cloud.coordinator.wiring import OUTSTANDING, TRANSIENT_ERRORS, Wiring, base_of
from cloud.db import crud
from cloud.db.crud import ConflictError
from cloud.db.models import (
    TERMINAL_ROUND_STATES,
    AdapterVersion,
    DeviceStatus,
    ParticipationStatus,
    Round,
    RoundState,
    UpdateStatus,
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
from cloud.validation import task_id_for
from shared import protocol, topics
from shared.adapters import AdapterState
from shared.messages import CancelTask, RoundAnnouncement, TrainTask, pack, to_json

log = logging.getLogger(__name__)


class NoGlobalVersionError(ConflictError):
    """No adapter version exists yet: the coordinator stores the initial one at start-up."""


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


# ------------------------------------------------------------------------------ the state machine


class RoundLifecycle(Wiring):
    """Drives every round from the database through its states; see the module docstring."""

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
            global_frame = self.blobs.get(base_of(round_).blob_sha256)
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
        # Not waited for: the announcement is derived from the database and republished at every
        # transition, and a broker busy saving its database (after a 1,000-update burst) held
        # the tick, and with it the coordinator's ingest, 10 s per transition (docs/fleet.md).
        self.publisher.publish(topics.ROUND_ANNOUNCEMENT, to_json(message), retain=True,
                               wait=False)

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


# ------------------------------------------------------------------------------ helpers


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
