"""The validation gate: every received update is accepted, buffered or rejected with a reason.

Pure logic: ``validate_update`` gets the parsed ``UpdateMessage`` and its parts, the device id
taken from the topic (the broker's ACL vouches for it, never the payload), a ``RoundContext``
snapshot of the round and the current global adapter state, and returns either an ``Accepted``
(a decoded ``AdapterUpdate``) or a ``Rejection`` (a ``RejectionCode`` and a sentence for people).
The coordinator records both; rejected updates never reach aggregation.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import torch

from cloud.db.enums import RoundState, UpdateStatus
from shared import codec, protocol
from shared.adapters import AdapterState
from shared.messages import UpdateMessage
from shared.protocol import DELTA_PART, FISHER_PART
from shared.update import AdapterUpdate


class RejectionCode(str, enum.Enum):
    """Why an update was refused (stored in ``updates.rejection_code``)."""

    MALFORMED = "malformed"            # not an update envelope, or bad header
    TOO_LARGE = "too_large"            # over the round's max_update_bytes
    UNKNOWN_ROUND = "unknown_round"
    NOT_PARTICIPANT = "not_participant"
    DUPLICATE = "duplicate"            # a second, different update for the same round
    TASK_MISMATCH = "task_mismatch"    # task_id is not the one this device was given
    BASE_MISMATCH = "base_mismatch"    # trained on another frozen base
    STALE = "stale"                    # trained from an older (or other) global version
    NOT_COLLECTING = "not_collecting"  # the round has not started collecting
    LATE = "late"                      # after the deadline or after the round moved on
    MISSING_PART = "missing_part"      # no delta, or no Fisher where the strategy needs one
    UNEXPECTED_PART = "unexpected_part"
    CODEC = "codec"                    # a frame that does not decode (checksum, layout)
    SHAPE = "shape"                    # keys or shapes differ from the global adapter
    DTYPE = "dtype"
    NON_FINITE = "non_finite"
    NORM_BOUND = "norm_bound"          # ||Δθ||₂ over the configured bound
    FISHER_NEGATIVE = "fisher_negative"
    INTERNAL = "internal"              # handling failed unexpectedly (recorded, answered)
    REVOKED = "revoked"                # the sender is a revoked device


@dataclass(frozen=True)
class RoundContext:
    """What the gate needs to know about the round an update claims to belong to, and the
    sender's place in it (two facts, not the round's whole roster: at 1,000 participants,
    loading every participation and update per received update made ingest O(N) each)."""

    round_id: int
    state: RoundState
    participant: bool  # the sender was selected for the round
    submitted: bool  # the sender already has an accepted or buffered update in the round
    global_version: int
    base_version: str  # the frozen base's manifest version
    deadline_at: datetime | None
    late_policy: str = "reject"  # or "buffer"
    requires_fisher: bool = True
    max_update_bytes: int = 4 * 2**20
    max_delta_norm: float | None = None
    max_samples: int | None = None  # the merge weight's bound; None: as reported


@dataclass(frozen=True)
class Accepted:
    """A valid update; ``status`` is ``accepted``, or ``buffered`` when it came late."""

    update: AdapterUpdate
    status: UpdateStatus = UpdateStatus.ACCEPTED


@dataclass(frozen=True)
class Rejection:
    """A refused update: a machine-readable code and a human reason."""

    code: RejectionCode
    reason: str


Verdict = Accepted | Rejection


class _Reject(Exception):
    def __init__(self, code: RejectionCode, reason: str) -> None:
        super().__init__(reason)
        self.rejection = Rejection(code, reason)


def task_id_for(round_id: int, device_id: str) -> str:
    """The deterministic task id of a device's task in a round (resends reuse it)."""
    return f"task-{round_id}-{hashlib.sha256(device_id.encode()).hexdigest()[:20]}"


def validate_update(message: UpdateMessage, parts: Mapping[str, bytes], *, device_id: str,
                    context: RoundContext | None, global_state: AdapterState,
                    payload_bytes: int, now: datetime) -> Verdict:
    """Check an update against its round and the global adapter; see ``RejectionCode``."""
    try:
        if context is None:
            raise _Reject(RejectionCode.UNKNOWN_ROUND, f"there is no round {message.round_id}")
        late = _check_round(message, device_id, context, payload_bytes, now)
        delta, fisher = _decode_parts(parts, global_state, context)
        _check_values(delta, fisher, context)
    except _Reject as reject:
        return reject.rejection
    # The merge weight is bounded by what the cloud asked for, not by what the device reports.
    n_samples = message.n_samples if context.max_samples is None else min(
        message.n_samples, context.max_samples)
    update = AdapterUpdate(client_id=device_id, delta=delta, n_samples=n_samples,
                           fisher=fisher, base_version=message.global_version,
                           metrics=dict(message.metrics))
    return Accepted(update, UpdateStatus.BUFFERED if late else UpdateStatus.ACCEPTED)


def _check_round(message: UpdateMessage, device_id: str, context: RoundContext,
                 payload_bytes: int, now: datetime) -> bool:
    """Round-level checks; returns whether the update is late but to be buffered."""
    if payload_bytes > context.max_update_bytes:
        raise _Reject(RejectionCode.TOO_LARGE, f"update of {payload_bytes:,} bytes exceeds "
                      f"the round's limit of {context.max_update_bytes:,}")
    if not context.participant:
        raise _Reject(RejectionCode.NOT_PARTICIPANT,
                      f"device {device_id!r} was not selected for round {context.round_id}")
    if context.submitted:
        raise _Reject(RejectionCode.DUPLICATE, f"device {device_id!r} already submitted an "
                      f"update for round {context.round_id}")
    if message.task_id != task_id_for(context.round_id, device_id):
        raise _Reject(RejectionCode.TASK_MISMATCH,
                      f"task_id {message.task_id!r} is not this device's task for the round")
    if message.base_version != context.base_version:
        raise _Reject(RejectionCode.BASE_MISMATCH, f"trained on base {message.base_version!r}, "
                      f"the round uses {context.base_version!r}")
    if message.global_version != context.global_version:
        raise _Reject(RejectionCode.STALE, f"trained from global version "
                      f"{message.global_version}, the round's is {context.global_version}")
    return _check_timing(context, now)


def _check_timing(context: RoundContext, now: datetime) -> bool:
    if context.state is RoundState.OPEN:
        raise _Reject(RejectionCode.NOT_COLLECTING,
                      f"round {context.round_id} is not collecting updates yet")
    past_deadline = context.deadline_at is not None and now > context.deadline_at
    if context.state is RoundState.COLLECTING and not past_deadline:
        return False
    if context.late_policy == "buffer":
        return True
    when = "after the deadline" if past_deadline else f"with the round {context.state.value}"
    raise _Reject(RejectionCode.LATE, f"update arrived {when}")


def _decode_parts(parts: Mapping[str, bytes], global_state: AdapterState,
                  context: RoundContext) -> tuple[AdapterState, AdapterState | None]:
    """The update's Δθ and Fisher through the protocol's one decoder, failures as codes."""
    expected = {key: tuple(value.shape) for key, value in global_state.items()}
    try:
        delta, fisher = protocol.decode_update(parts, expected=expected,
                                               max_bytes=context.max_update_bytes,
                                               requires_fisher=context.requires_fisher)
    except (protocol.UnexpectedPart, protocol.MissingPart, codec.CodecError) as err:
        raise _Reject(_rejection_code(err), str(err)) from None
    _check_dtypes(delta, global_state, DELTA_PART)
    _check_dtypes(fisher or {}, global_state, FISHER_PART)
    return delta, fisher


_ERROR_CODES: tuple[tuple[type[ValueError], RejectionCode], ...] = (
    (protocol.UnexpectedPart, RejectionCode.UNEXPECTED_PART),
    (protocol.MissingPart, RejectionCode.MISSING_PART),
    (codec.FrameTooLarge, RejectionCode.TOO_LARGE),
    (codec.NonFiniteValues, RejectionCode.NON_FINITE),
    (codec.ShapeMismatch, RejectionCode.SHAPE),
    (codec.CodecError, RejectionCode.CODEC),
)


def _rejection_code(err: ValueError) -> RejectionCode:
    return next(code for kind, code in _ERROR_CODES if isinstance(err, kind))


def _check_dtypes(state: AdapterState, global_state: AdapterState, name: str) -> None:
    """Keys and shapes are the decoder's check (``expected``); the dtype is the gate's."""
    for key, ref in global_state.items():
        if key in state and state[key].dtype != ref.dtype:
            raise _Reject(RejectionCode.DTYPE, f"{name} {key}: dtype {state[key].dtype}, "
                          f"the global adapter's is {ref.dtype}")


def _check_values(delta: AdapterState, fisher: AdapterState | None,
                  context: RoundContext) -> None:
    # Each check runs once over a part's values laid end to end (a few ops per update, not a
    # few per tensor); the tensor at fault is looked for only once a check fails.
    flat_delta, flat_fisher = _flat(delta), _flat(fisher or {})
    for name, state, flat in ((DELTA_PART, delta, flat_delta),
                              (FISHER_PART, fisher or {}, flat_fisher)):
        if not bool(torch.isfinite(flat).all()):
            key = next(k for k, v in state.items() if not bool(torch.isfinite(v).all()))
            raise _Reject(RejectionCode.NON_FINITE, f"{name} {key} contains NaN or Inf")
    norm = math.sqrt(float(flat_delta.double().pow(2).sum()))
    if context.max_delta_norm is not None and norm > context.max_delta_norm:
        raise _Reject(RejectionCode.NORM_BOUND, f"||delta||_2 = {norm:.4g} exceeds the bound "
                      f"{context.max_delta_norm:g}")
    if bool((flat_fisher < 0).any()):
        key, value = next((k, v) for k, v in (fisher or {}).items() if bool((v < 0).any()))
        raise _Reject(RejectionCode.FISHER_NEGATIVE,
                      f"fisher {key} has negative values (min {float(value.min()):.3g})")


def _flat(state: AdapterState) -> torch.Tensor:
    """Every value of ``state`` in one 1-D tensor (empty for an empty state)."""
    if not state:
        return torch.zeros(0)
    return torch.cat([value.reshape(-1) for value in state.values()])
