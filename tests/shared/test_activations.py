"""Activations and gradients on the wire: each encoding's round trip, sizes and refusals, and
the in-process wire the simulation trains through."""

from __future__ import annotations

import re

import pytest
import torch

from shared import activations, codec
from shared.activations import WireBackend
from shared.backend import CountingBackend, StepResult
from shared.messages import MalformedMessage
from shared.protocol import FRAME_PART, TENSORS_PART
from tests.llm_helpers import step_inputs

LIMIT = 2**24


def _roundtrip(encoding: str, embeds: torch.Tensor, mask: torch.Tensor,
               labels: torch.Tensor) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    parts = activations.pack({"inputs_embeds": embeds},
                             {"attention_mask": mask, "labels": labels}, encoding)  # type: ignore[arg-type]
    out = activations.unpack(parts, ("inputs_embeds",), ("attention_mask", "labels"),
                             encoding, kind="test", max_bytes=LIMIT)  # type: ignore[arg-type]
    return parts, out


def test_fp32_is_exact_and_one_safetensors_part() -> None:
    embeds, mask, labels = step_inputs(3, 10, width=64)
    parts, out = _roundtrip("fp32", embeds, mask, labels)
    assert set(parts) == {TENSORS_PART}
    assert torch.equal(out["inputs_embeds"], embeds) and torch.equal(out["labels"], labels)


@pytest.mark.parametrize(("encoding", "tolerance"), [("bf16+zstd", 2**-8), ("int8+zstd", 0.5)])
def test_compressed_encodings_round_trip_within_their_error(encoding: str,
                                                            tolerance: float) -> None:
    embeds, mask, labels = step_inputs(3, 10, width=64)
    embeds[1, 4] *= 1000  # one loud token must not cost the others their precision
    parts, out = _roundtrip(encoding, embeds, mask, labels)
    assert set(parts) == {TENSORS_PART, FRAME_PART}
    assert torch.equal(out["attention_mask"].long(), mask)
    assert torch.equal(out["labels"].long(), labels)
    got = out["inputs_embeds"]
    if encoding == "int8+zstd":  # per token: error <= half that token's scale
        scale = embeds.abs().amax(dim=-1, keepdim=True) / 127
        assert bool(((got - embeds).abs() <= tolerance * scale + 1e-7).all())
    else:  # bfloat16: 8 significant bits
        assert bool(((got - embeds).abs() <= tolerance * embeds.abs() + 1e-30).all())


def test_int8_is_about_four_times_smaller_than_fp32() -> None:
    embeds, mask, labels = step_inputs(16, 80, width=576)
    fp32, _ = _roundtrip("fp32", embeds, mask, labels)
    int8, _ = _roundtrip("int8+zstd", embeds, mask, labels)
    # Gaussian noise does not compress: this is int8's own 4x less its per-token scale and
    # the mask and labels (real activations compress further; docs/results.md).
    assert activations.encoded_size(fp32) / activations.encoded_size(int8) > 3.85


def test_each_message_of_an_llm_call_carries_its_tensors() -> None:
    """The request and reply helpers both sides use: a score request has no labels, a step
    reply's gradients arrive in the encoding, a score reply is float32 in any encoding."""
    embeds, mask, labels = step_inputs(2, 6, width=32)
    step = activations.request_parts(embeds, mask, labels, "bf16+zstd")
    got_embeds, got_mask, got_labels = activations.read_request(
        step, "step", "bf16+zstd", kind="test", max_bytes=LIMIT)
    assert got_labels is not None and torch.equal(got_labels.long(), labels)
    assert torch.equal(got_mask.long(), mask) and got_embeds.shape == embeds.shape
    score = activations.request_parts(embeds, mask, None, "fp32")
    assert activations.read_request(score, "score", "fp32", kind="test", max_bytes=LIMIT)[2] is None
    result = StepResult(1.0, torch.ones(2), embeds)
    reply = activations.step_reply_parts(result, "int8+zstd")
    grads, losses = activations.read_step_reply(reply, "int8+zstd", kind="test", max_bytes=LIMIT,
                                                shape=tuple(embeds.shape))
    assert grads.shape == embeds.shape and torch.equal(losses, result.sample_losses)
    logprobs = torch.randn(2, 20).log_softmax(-1)
    scored = activations.score_reply_parts(logprobs)
    assert set(scored) == {TENSORS_PART}
    assert torch.equal(activations.read_score_reply(scored, "fp32", kind="test",
                                                    max_bytes=LIMIT), logprobs)


def _step_parts(encoding: str) -> dict[str, bytes]:
    return activations.pack({"inputs_embeds": step_inputs(2, 6)[0]},
                            {"attention_mask": step_inputs(2, 6)[1]}, encoding)  # type: ignore[arg-type]


def _flipped(parts: dict[str, bytes]) -> dict[str, bytes]:
    frame = parts[FRAME_PART]
    return {**parts, FRAME_PART: frame[:-1] + bytes([frame[-1] ^ 1])}


@pytest.mark.parametrize(("parts", "encoding", "words"), [
    (lambda: _step_parts("bf16+zstd"), "int8+zstd", "frame is 'bf16+zstd3'"),
    (lambda: {TENSORS_PART: _step_parts("int8+zstd")[TENSORS_PART]}, "int8+zstd", "'frame'"),
    (lambda: {**_step_parts("fp32"), FRAME_PART: b"x"}, "fp32", "carries a 'frame' part"),
    (lambda: _flipped(_step_parts("int8+zstd")), "int8+zstd", "checksum"),
])
def test_hostile_parts_are_refused_with_a_reason(parts, encoding: str,  # type: ignore[no-untyped-def]
                                                 words: str) -> None:
    with pytest.raises(MalformedMessage, match=re.escape(words)) as info:
        activations.unpack(parts(), ("inputs_embeds",), ("attention_mask",), encoding,
                           kind="llm.request", max_bytes=LIMIT)
    assert isinstance(info.value, MalformedMessage)


def test_a_frame_declaring_more_than_the_budget_is_refused_before_decoding() -> None:
    big = torch.zeros(64, 512, 64)  # zeros: a tiny frame that would decode to 8 MiB
    parts = activations.pack({"inputs_embeds": big}, {"attention_mask": torch.ones(64, 512)},
                             "int8+zstd")
    assert len(parts[FRAME_PART]) < 200_000
    with pytest.raises(MalformedMessage, match="decoded tensors need"):
        activations.unpack(parts, ("inputs_embeds",), ("attention_mask",), "int8+zstd",
                           kind="llm.request", max_bytes=LIMIT, max_decoded_bytes=2**20)


def test_unknown_encodings_are_a_value_error() -> None:
    with pytest.raises(ValueError, match="unknown activation encoding"):
        activations.scheme_for("int4", 8)  # type: ignore[arg-type]
    assert activations.scheme_for("int8+zstd", 576) == codec.Scheme(kind="int8", block=576,
                                                                     zstd=True)


def test_wire_backend_fp32_is_the_llm_itself_and_counts_wire_bytes(tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    embeds, mask, labels = step_inputs(2, 7)
    exact = llm.loss_and_input_grads(embeds, mask, labels)
    counting = CountingBackend(WireBackend(llm, "fp32"))
    got = counting.loss_and_input_grads(embeds, mask, labels)
    assert got.loss == exact.loss and torch.equal(got.input_grads, exact.input_grads)
    up, down = counting.training.per_step[0]
    assert up > embeds.numel() * 4 and down > exact.input_grads.numel() * 4  # + headers


def test_wire_backend_int8_gradients_stay_close(tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    embeds, mask, labels = step_inputs(4, 12)
    exact = llm.loss_and_input_grads(embeds, mask, labels)
    wire = WireBackend(llm, "int8+zstd")
    got = wire.loss_and_input_grads(embeds, mask, labels)
    cosine = torch.nn.functional.cosine_similarity(got.input_grads.flatten(),
                                                   exact.input_grads.flatten(), dim=0)
    assert abs(got.loss - exact.loss) < 0.02 * abs(exact.loss) and float(cosine) > 0.99
    up, down = wire.last_exchange()
    fp32 = WireBackend(llm, "fp32")
    fp32.loss_and_input_grads(embeds, mask, labels)
    # width 32: a scale per 32 values and the frame header weigh more than at width 576
    assert up * 2 < fp32.last_exchange()[0] and down * 2 < fp32.last_exchange()[1]
