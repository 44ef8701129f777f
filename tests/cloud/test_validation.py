"""The validation gate, one test per rejection code (pure logic: no database, no broker)."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import struct
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from cloud.db.enums import RoundState, UpdateStatus
from cloud.validation import (
    Accepted,
    Rejection,
    RejectionCode,
    RoundContext,
    task_id_for,
    validate_update,
)
from shared import codec
from shared.adapters import AdapterState
from shared.messages import UpdateMessage
from tests.cloud.roundkit import global_state

NOW = datetime(2030, 1, 1, tzinfo=timezone.utc)
GLOBAL = global_state()
FP32 = codec.Scheme(kind="fp32")
CONTEXT = RoundContext(round_id=3, state=RoundState.COLLECTING, participant=True,
                       submitted=False, global_version=5, base_version="base-1",
                       deadline_at=NOW + timedelta(seconds=60), max_delta_norm=10.0)


def _message(**fields: object) -> UpdateMessage:
    values: dict[str, object] = {"update_id": "upd-00000001", "task_id": task_id_for(3, "dev-a"),
                                 "round_id": 3, "global_version": 5, "base_version": "base-1",
                                 "n_samples": 12}
    return UpdateMessage(**{**values, **fields})  # type: ignore[arg-type]


def _state(fill: float, dtype: torch.dtype = torch.float32) -> AdapterState:
    return {k: torch.full_like(v, fill, dtype=dtype) for k, v in GLOBAL.items()}


def _parts(delta: AdapterState | None = None, fisher: AdapterState | None = None) -> dict:
    return {"delta": codec.encode(delta or _state(0.01), FP32),
            "fisher": codec.encode(fisher or _state(1.0), FP32)}


def _validate(message: UpdateMessage | None = None, parts: dict | None = None, *,
              device_id: str = "dev-a", context: RoundContext | None = CONTEXT,
              payload_bytes: int = 1000, now: datetime = NOW):  # type: ignore[no-untyped-def]
    return validate_update(message or _message(), _parts() if parts is None else parts,
                           device_id=device_id, context=context, global_state=GLOBAL,
                           payload_bytes=payload_bytes, now=now)


def test_a_good_update_is_accepted_with_its_tensors() -> None:
    verdict = _validate()
    assert isinstance(verdict, Accepted) and verdict.status is UpdateStatus.ACCEPTED
    update = verdict.update
    assert update.client_id == "dev-a" and update.n_samples == 12 and update.base_version == 5
    assert set(update.delta) == set(GLOBAL) and update.fisher is not None


def _corrupt(frame: bytes) -> bytes:
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])


def _shape_parts() -> dict:
    wrong = {k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in GLOBAL.items()}
    return {"delta": codec.encode(wrong, FP32), "fisher": codec.encode(_state(1.0), FP32)}


def _missing_key_parts() -> dict:
    partial = dict(list(_state(0.01).items())[:-1])
    return {"delta": codec.encode(partial, FP32), "fisher": codec.encode(_state(1.0), FP32)}


CASES: dict[RejectionCode, Callable[[], object]] = {
    RejectionCode.UNKNOWN_ROUND: lambda: _validate(context=None),
    RejectionCode.TOO_LARGE: lambda: _validate(payload_bytes=CONTEXT.max_update_bytes + 1),
    RejectionCode.NOT_PARTICIPANT: lambda: _validate(
        context=dataclasses.replace(CONTEXT, participant=False)),
    RejectionCode.DUPLICATE: lambda: _validate(
        context=dataclasses.replace(CONTEXT, submitted=True)),
    RejectionCode.TASK_MISMATCH: lambda: _validate(_message(task_id="task-someone-else")),
    RejectionCode.BASE_MISMATCH: lambda: _validate(_message(base_version="base-0")),
    RejectionCode.STALE: lambda: _validate(_message(global_version=4)),
    RejectionCode.NOT_COLLECTING: lambda: _validate(
        context=dataclasses.replace(CONTEXT, state=RoundState.OPEN)),
    RejectionCode.LATE: lambda: _validate(now=NOW + timedelta(seconds=61)),
    RejectionCode.MISSING_PART: lambda: _validate(parts={"delta": _parts()["delta"]}),
    RejectionCode.UNEXPECTED_PART: lambda: _validate(parts={**_parts(), "extra": b""}),
    RejectionCode.CODEC: lambda: _validate(parts={**_parts(),
                                                  "delta": _corrupt(_parts()["delta"])}),
    RejectionCode.SHAPE: lambda: _validate(parts=_shape_parts()),
    RejectionCode.DTYPE: lambda: _validate(parts=_parts(delta=_state(0.01, torch.float16))),
    RejectionCode.NON_FINITE: lambda: _validate(parts={**_parts(), "delta": _nan_frame()}),
    RejectionCode.NORM_BOUND: lambda: _validate(parts=_parts(delta=_state(3.0))),
    RejectionCode.FISHER_NEGATIVE: lambda: _validate(parts=_parts(fisher=_state(-1.0))),
}


def _nan_state() -> AdapterState:
    state = _state(0.01)
    next(iter(state.values()))[0, 0] = float("nan")
    return state


def _nan_frame() -> bytes:
    """A well-formed fp32 frame (valid checksum) whose first value is NaN: what a hostile or
    broken device could send; the codec itself refuses to encode NaN."""
    frame = bytearray(codec.encode(_state(0.01), FP32))
    header_len = struct.unpack_from("<I", frame, 6)[0]
    start = 50 + header_len
    frame[start:start + 4] = struct.pack("<f", float("nan"))
    frame[18:50] = hashlib.sha256(bytes(frame[:18]) + bytes(frame[50:])).digest()
    return bytes(frame)


def test_every_rejection_code_has_a_test() -> None:
    # the coordinator assigns these three: the envelope (unpack), the sender's status, and a
    # failure while handling an update (tests/security, tests/cloud/test_coordinator_service.py)
    assert set(CASES) == set(RejectionCode) - {RejectionCode.MALFORMED, RejectionCode.REVOKED,
                                               RejectionCode.INTERNAL}


@pytest.mark.parametrize("code", list(CASES), ids=lambda c: c.value)
def test_each_rejection_code(code: RejectionCode) -> None:
    verdict = CASES[code]()
    assert isinstance(verdict, Rejection), verdict
    assert verdict.code is code, verdict.reason
    assert verdict.reason


def test_missing_keys_are_a_shape_rejection_naming_the_key() -> None:
    verdict = _validate(parts=_missing_key_parts())
    assert isinstance(verdict, Rejection) and verdict.code is RejectionCode.SHAPE
    assert list(GLOBAL)[-1] in verdict.reason


def test_the_nan_frame_is_well_formed() -> None:
    with pytest.raises(codec.NonFiniteValues):
        codec.encode(_nan_state(), FP32)  # hence the hand-made frame
    with pytest.raises(codec.NonFiniteValues, match="NaN"):
        codec.decode(_nan_frame())


def test_late_updates_are_buffered_when_the_round_says_so() -> None:
    context = dataclasses.replace(CONTEXT, late_policy="buffer")
    verdict = _validate(context=context, now=NOW + timedelta(seconds=61))
    assert isinstance(verdict, Accepted) and verdict.status is UpdateStatus.BUFFERED
    closed = dataclasses.replace(context, state=RoundState.CLOSED)
    assert isinstance(_validate(context=closed), Accepted)


def test_fisher_is_optional_for_strategies_that_do_not_use_it() -> None:
    context = dataclasses.replace(CONTEXT, requires_fisher=False)
    verdict = _validate(context=context, parts={"delta": _parts()["delta"]})
    assert isinstance(verdict, Accepted) and verdict.update.fisher is None


def test_no_norm_bound_when_unset() -> None:
    context = dataclasses.replace(CONTEXT, max_delta_norm=None)
    assert isinstance(_validate(context=context, parts=_parts(delta=_state(3.0))), Accepted)


def test_the_gate_is_pure_logic_without_the_orm() -> None:
    """The gate and the statuses it names import no database layer (the enums live apart from
    the SQLAlchemy models so pure logic can use them)."""
    root = Path(__file__).resolve().parents[2]
    for path in (root / "cloud" / "validation.py", root / "cloud" / "db" / "enums.py"):
        tree = ast.parse(path.read_text())
        modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                   for alias in node.names}
        modules |= {node.module or "" for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom)}
        assert not {m for m in modules if m.split(".")[0] == "sqlalchemy"
                    or m == "cloud.db.models"}, path
