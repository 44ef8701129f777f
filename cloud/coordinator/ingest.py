"""Ingesting updates: the validation gate, then each update stored exactly once with its verdict.

``UpdateIngest.handle_updates`` takes a batch of (sender, payload) in one transaction: each
update is stored once by (sender, ``update_id``) (a redelivery is acknowledged and ignored),
senders that are not active devices (revoked ones included) are refused, the validation gate
(``cloud.validation``) decides, and the accepted blobs are written before the one commit. The
sender is the device id of the topic, which the broker bound to the authenticated client.
Every refusal is recorded and answered on the sender's tasks topic.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.orm import Session

from cloud import aggregation
from cloud.blobs import Blob
from cloud.coordinator.plans import RoundPlan, RoundPlans
from cloud.coordinator.wiring import OUTSTANDING, Wiring, base_of
from cloud.db import crud
from cloud.db.crud import RecordNotFoundError
from cloud.db.models import (
    AdapterVersion,
    DeviceStatus,
    ParticipationStatus,
    Round,
    UpdateStatus,
)
from cloud.db.session import session_scope
from cloud.validation import (
    Accepted,
    Rejection,
    RejectionCode,
    RoundContext,
    validate_update,
)
from shared.adapters import AdapterState
from shared.messages import MessageError, Refusal, UpdateMessage, unpack

log = logging.getLogger(__name__)

# Rejections that say nothing about the participant's own task (it may still submit).
_KEEPS_PARTICIPATION = frozenset({RejectionCode.DUPLICATE, RejectionCode.LATE,
                                  RejectionCode.NOT_PARTICIPANT, RejectionCode.NOT_COLLECTING})


@dataclass(frozen=True)
class IngestResult:
    """What happened to one received update."""

    outcome: Literal["accepted", "buffered", "rejected", "duplicate"]
    update_id: str | None = None
    code: str | None = None
    reason: str | None = None


class UpdateIngest(Wiring):
    """Receives updates on ``devices/{id}/updates``; see the module docstring."""

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
            global_state=self._global_state(base_of(round_.row)), payload_bytes=len(payload),
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


# ------------------------------------------------------------------------------ one batch


class _LockedRound:
    """A round as one batch of updates sees it: locked, with its plan (config and strategy,
    built once per round), and its senders' participations and earlier submissions looked up
    once."""

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
            submitted=device_id in self.submitted, global_version=base_of(row).id,
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


def _update_record(message: UpdateMessage, device_id: str, status: UpdateStatus,
                   **blob: Any) -> crud.UpdateRecord:
    return crud.UpdateRecord(update_id=message.update_id, round_id=message.round_id,
                             device_id=device_id, base_version=message.global_version,
                             n_samples=message.n_samples, status=status,
                             metrics=dict(message.metrics), **blob)
