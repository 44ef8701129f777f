"""shared.protocol: the task and update encode/decode pairs and the device's error feedback."""

from __future__ import annotations

import time

import pytest
import torch

from shared import codec, protocol
from shared.adapters import AdapterConfig, AdapterState, NanoAdapters
from shared.messages import (
    MalformedMessage,
    TrainTask,
    UpdateCodec,
    UpdateMessage,
    pack,
    unpack,
)

EXACT = UpdateCodec(delta=codec.Scheme(kind="fp32"), fisher=codec.Scheme(kind="fp32"))


def adapter_state(seed: int = 0, scale: float = 1.0) -> AdapterState:
    torch.manual_seed(seed)
    state = NanoAdapters(8, AdapterConfig(rank=2, alpha=4)).adapter_state_dict()
    return {k: scale * torch.randn_like(v) for k, v in state.items()}


def shapes(state: AdapterState) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def task() -> TrainTask:
    return TrainTask(task_id="task-0001", round_id=1, global_version=1, base_version="base-1",
                     strategy="fednano", deadline_at=time.time() + 60)


def message() -> UpdateMessage:
    return UpdateMessage(update_id="upd-00000001", task_id="task-0001", round_id=1,
                         global_version=1, base_version="base-1", n_samples=4,
                         created_at=1.9e9)


def test_task_round_trip() -> None:
    state = adapter_state()
    sent = task()
    received, parts = unpack(protocol.encode_task(sent, codec.encode(state, codec.Scheme())),
                             TrainTask)
    assert received == sent and list(parts) == [protocol.GLOBAL_PART]
    decoded = protocol.decode_global(parts, expected=shapes(state))
    assert all(torch.equal(decoded[k], state[k]) for k in state)


def test_a_task_without_its_global_part_or_with_other_shapes_is_refused() -> None:
    state = adapter_state()
    with pytest.raises(MalformedMessage, match="'global' part"):
        protocol.decode_global({})
    parts = unpack(protocol.encode_task(task(), codec.encode(state, codec.Scheme())),
                   TrainTask)[1]
    with pytest.raises(codec.ShapeMismatch):
        protocol.decode_global(parts, expected={k: (1, 1) for k in state})


@pytest.mark.parametrize("with_fisher", [True, False])
def test_update_round_trip(with_fisher: bool) -> None:
    delta = adapter_state(1)
    fisher = {k: v.abs() for k, v in adapter_state(2).items()} if with_fisher else None
    payload = protocol.encode_update(message(), delta, fisher, EXACT)
    received, parts = unpack(payload, UpdateMessage)
    assert received == message()
    got_delta, got_fisher = protocol.decode_update(parts, expected=shapes(delta))
    assert all(torch.equal(got_delta[k], delta[k]) for k in delta)
    if fisher is None:
        assert got_fisher is None and list(parts) == [protocol.DELTA_PART]
    else:
        assert got_fisher is not None and all(torch.equal(got_fisher[k], fisher[k])
                                              for k in fisher)


def test_update_parts_are_checked_before_any_frame_is_decoded() -> None:
    delta = adapter_state()
    parts = protocol.update_parts(delta, delta, EXACT)
    expected = shapes(delta)
    with pytest.raises(protocol.UnexpectedPart, match="extra"):
        protocol.decode_update({**parts, "extra": b""}, expected=expected)
    with pytest.raises(protocol.MissingPart, match="no 'delta' part"):
        protocol.decode_update({protocol.FISHER_PART: parts[protocol.FISHER_PART]},
                               expected=expected)
    with pytest.raises(protocol.MissingPart, match="needs a 'fisher' part"):
        protocol.decode_update({protocol.DELTA_PART: parts[protocol.DELTA_PART]},
                               expected=expected, requires_fisher=True)


def test_a_bad_frame_keeps_its_error_class_and_names_its_part() -> None:
    delta = adapter_state()
    parts = protocol.update_parts(delta, delta, EXACT)
    flipped = parts[protocol.FISHER_PART][:-1] + bytes([parts[protocol.FISHER_PART][-1] ^ 1])
    with pytest.raises(codec.ChecksumMismatch, match=r"^fisher: frame checksum"):
        protocol.decode_update({**parts, protocol.FISHER_PART: flipped}, expected=shapes(delta))
    with pytest.raises(codec.FrameTooLarge, match=r"^delta: "):
        protocol.decode_update(parts, expected=shapes(delta), max_bytes=64)


@pytest.mark.parametrize("spec", ["fp16", "bf16", "int8/b64", "int8/brow", "topk/k0.1"])
def test_error_feedback_sends_what_the_receiver_decodes_and_keeps_the_rest(spec: str) -> None:
    scheme = codec.Scheme.parse(spec)
    delta = adapter_state(3, scale=1e-3)
    sent, residual = protocol.error_feedback(delta, scheme, {})
    decoded, _ = protocol.decode_update(protocol.update_parts(sent, None, UpdateCodec(
        delta=scheme)), expected=shapes(delta))
    for key in delta:
        assert torch.allclose(decoded[key], sent[key], rtol=0, atol=1e-9)
        assert torch.allclose(sent[key] + residual[key], delta[key], rtol=0, atol=1e-9)
    assert any(bool(v.abs().max() > 0) for v in residual.values())
    # The next round sends this round's residual along with its own delta.
    again, _ = protocol.error_feedback({k: torch.zeros_like(v) for k, v in delta.items()},
                                       scheme, residual)
    assert any(bool(v.abs().max() > 0) for v in again.values())


def test_exact_schemes_keep_a_zero_residual() -> None:
    delta = adapter_state(4)
    sent, residual = protocol.error_feedback(delta, codec.Scheme(kind="fp32"), {})
    assert all(torch.equal(sent[k], delta[k]) for k in delta)
    assert all(not v.any() for v in residual.values())


def test_a_residual_of_another_layout_is_dropped() -> None:
    delta = adapter_state(5, scale=1e-3)
    stale = {k: torch.ones(3) for k in delta}  # the adapter's shapes changed since
    sent, residual = protocol.error_feedback(delta, codec.Scheme(kind="int8"), stale)
    fresh, _ = protocol.error_feedback(delta, codec.Scheme(kind="int8"), {})
    assert all(torch.equal(sent[k], fresh[k]) for k in delta)
    assert all(tuple(residual[k].shape) == tuple(delta[k].shape) for k in delta)


def test_envelopes_built_by_hand_decode_the_same() -> None:
    # The layout is the envelope's (shared.messages.pack) with the protocol's part names.
    delta = adapter_state(6)
    by_hand = pack(message(), {protocol.DELTA_PART: codec.encode(delta, EXACT.delta)})
    assert by_hand == protocol.encode_update(message(), delta, None, EXACT)
