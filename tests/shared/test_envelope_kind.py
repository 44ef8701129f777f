"""shared.messages.envelope_kind and Presence.last_error."""

from __future__ import annotations

import pytest

from shared.messages import (
    CancelTask,
    DeviceError,
    MalformedMessage,
    Presence,
    envelope_kind,
    from_json,
    pack,
    to_json,
)


def test_envelope_kind_reads_the_header_only() -> None:
    assert envelope_kind(pack(CancelTask(round_id=3, reason="operator"))) == "task.cancel"


@pytest.mark.parametrize("payload", [b"", b"FNM1\x02\x00\x00\x00{}", b"XXXX\x00\x00\x00\x00",
                                     b"FNM1\x02\x00\x00\x00[]"])
def test_envelope_kind_refuses_malformed_bytes(payload: bytes) -> None:
    with pytest.raises(MalformedMessage):
        envelope_kind(payload)


def test_presence_carries_the_last_device_error() -> None:
    error = DeviceError(code="too_large", message="update of 9 bytes exceeds", task_id="t-1234567",
                        round_id=2)
    presence = Presence(device_id="dev-a", state="online", last_error=error)
    assert from_json(to_json(presence), Presence).last_error == error
    assert from_json(to_json(Presence(device_id="dev-a", state="offline")),
                     Presence).last_error is None
