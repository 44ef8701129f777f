"""Bad updates a rogue client publishes, each built to reach one check of the cloud's gate.

Pure functions of a received ``TrainTask`` (and its global adapter): they return the bytes a
compromised or broken device would publish on its updates topic, and the rejection the cloud
is expected to record (``cloud.validation.RejectionCode`` values; ``malformed`` ones are
refused before they can be an ``updates`` row and are audited instead).
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shared import codec, protocol
from shared.adapters import AdapterState
from shared.messages import TrainTask, UpdateMessage, pack, unpack
from shared.protocol import DELTA_PART, FISHER_PART

PADDING_PART = "padding"  # not a part of the protocol: what makes the update too large


@dataclass(frozen=True)
class BadUpdate:
    """One payload and the verdict the cloud should reach."""

    fault: str  # the --faults name it serves
    label: str  # what it is, for the report
    expected: str  # rejection code (or "ignored" for an exact redelivery)
    payload: bytes
    update_id: str | None


def new_update_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


def global_state(task: TrainTask, parts: Mapping[str, bytes]) -> AdapterState:
    """The task's global adapter (its ``global`` part)."""
    return protocol.decode_global(parts)


def finite_update(task: TrainTask, state: AdapterState, *, update_id: str,
                  global_version: int | None = None, base_version: str | None = None,
                  extra_parts: Mapping[str, bytes] | None = None) -> bytes:
    """A well-formed update for ``task``: Δθ = 0, Fisher = 1 (optionally lying about versions)."""
    delta = {k: torch.zeros_like(v, dtype=torch.float32) for k, v in state.items()}
    fisher = {k: torch.ones_like(v, dtype=torch.float32) for k, v in state.items()}
    parts = {**protocol.update_parts(delta, fisher, task.codec), **(extra_parts or {})}
    return pack(_message(task, update_id, global_version, base_version), parts)


def _message(task: TrainTask, update_id: str, global_version: int | None,
             base_version: str | None) -> UpdateMessage:
    return UpdateMessage(update_id=update_id, task_id=task.task_id, round_id=task.round_id,
                         global_version=task.global_version if global_version is None
                         else global_version,
                         base_version=task.base_version if base_version is None
                         else base_version,
                         n_samples=64, metrics={"rogue": 1.0})


def nan_frame(state: AdapterState) -> bytes:
    """An fp32 codec frame whose first value is NaN and whose checksum is right: a device
    whose training diverged (``codec.encode`` refuses NaN, so the bytes are patched)."""
    header, payload = codec.split_frame(codec.encode(state, codec.Scheme(kind="fp32")))
    return codec.seal_frame(header, struct.pack("<f", float("nan")) + payload[4:])


def corrupted_frame(frame: bytes) -> bytes:
    """The frame with its last byte flipped: the checksum no longer matches (bit rot)."""
    return frame[:-1] + bytes([frame[-1] ^ 0xFF])


def rogue_updates(task: TrainTask, parts: Mapping[str, bytes], faults: set[str], *,
                  older_version: int | None, prefix: str = "rogue") -> list[BadUpdate]:
    """The payloads for ``faults`` in this task's round (see the module docstring).

    ``stale-base`` claims ``older_version`` (a real, older global version: ``stale``) when
    there is one, and another frozen base (``base_mismatch``) always.
    """
    state = global_state(task, parts)
    out: list[BadUpdate] = []
    if "corrupt" in faults:
        uid = new_update_id(prefix)
        good = unpack(finite_update(task, state, update_id=uid), UpdateMessage)[1]
        payload = pack(_message(task, uid, None, None),
                       {DELTA_PART: corrupted_frame(good[DELTA_PART]),
                        FISHER_PART: good[FISHER_PART]})
        out.append(BadUpdate("corrupt", "delta frame with a flipped byte", "codec", payload, uid))
    if "truncated" in faults:
        uid = new_update_id(prefix)
        whole = finite_update(task, state, update_id=uid)
        out.append(BadUpdate("truncated", "update cut in half", "malformed",
                             whole[:len(whole) // 2], uid))
    if "oversized" in faults:
        uid = new_update_id(prefix)
        padding = {PADDING_PART: bytes(task.max_update_bytes + 1)}
        out.append(BadUpdate("oversized", f"update over the round's {task.max_update_bytes:,}-"
                             "byte limit", "too_large",
                             finite_update(task, state, update_id=uid, extra_parts=padding), uid))
    if "nan" in faults:
        uid = new_update_id(prefix)
        fisher = codec.encode({k: torch.ones_like(v) for k, v in state.items()},
                              task.codec.fisher)
        payload = pack(_message(task, uid, None, None),
                       {DELTA_PART: nan_frame({k: v.float() for k, v in state.items()}),
                        FISHER_PART: fisher})
        out.append(BadUpdate("nan", "NaN in the delta", "non_finite", payload, uid))
    if "stale-base" in faults:
        out += _stale(task, state, older_version, prefix)
    return out


def _stale(task: TrainTask, state: AdapterState, older_version: int | None,
           prefix: str) -> list[BadUpdate]:
    uid = new_update_id(prefix)
    out = [BadUpdate("stale-base", "trained on another frozen base", "base_mismatch",
                     finite_update(task, state, update_id=uid, base_version="stale-base-0"),
                     uid)]
    if older_version is not None:
        uid = new_update_id(prefix)
        out.append(BadUpdate("stale-base", f"trained from global version {older_version}",
                             "stale", finite_update(task, state, update_id=uid,
                                                    global_version=older_version), uid))
    return out


def redeliveries(payload: bytes, *, prefix: str) -> list[BadUpdate]:
    """A device's accepted update delivered again: twice as is (QoS 1 redelivery: ignored)
    and once more under a new update id (a second update for the round: ``duplicate``)."""
    message, parts = unpack(payload, UpdateMessage)
    uid = new_update_id(prefix)
    second = pack(message.model_copy(update={"update_id": uid}), parts)
    same = BadUpdate("duplicate", "the accepted update redelivered", "ignored", payload,
                     message.update_id)
    return [same, same, BadUpdate("duplicate", "a second update for the round", "duplicate",
                                  second, uid)]
