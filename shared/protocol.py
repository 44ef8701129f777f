"""The wire protocol's parts: what an envelope carries besides its typed header, named once.

``shared.messages`` types the headers and lays out an envelope's bytes; this module names the
parts and tensors inside them and holds the encode/decode pair of each, so the device, the
cloud, the simulation, the fleet's rogue devices and the benchmarks build and read the same
bytes through the same functions::

    message        direction         part       content
    TrainTask      cloud -> device   global     the global adapter (``shared.codec`` frame)
    UpdateMessage  device -> cloud   delta      Δθ as sent, after error feedback (codec frame)
                                     fisher     the diagonal Fisher (codec frame; optional)
    LLMRequest     device -> LLM     tensors    safetensors: inputs_embeds, attention_mask
                                                (+ labels for a step)
                                     frame      compressed encodings: inputs_embeds as a codec
                                                frame, the rest in tensors (shared.activations)
    LLMResponse    LLM -> device     tensors    input_grads, sample_losses (step) or logprobs
                                     frame      compressed encodings: input_grads

Pairs: ``encode_task`` / ``decode_global`` for the task, ``encode_update`` (or
``update_parts``) / ``decode_update`` for the update. A device's Δθ goes through
``error_feedback`` before it is encoded, whatever the scheme; the in-process simulation calls
the same function, so simulated uploads are what a device ships.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from shared import codec
from shared.adapters import AdapterState
from shared.messages import (
    MalformedMessage,
    TrainTask,
    UpdateCodec,
    UpdateMessage,
    pack,
    require_part,
)

Shapes = Mapping[str, tuple[int, ...]]

# --- part names --------------------------------------------------------------------------------
GLOBAL_PART: Final = "global"  # TrainTask
DELTA_PART: Final = "delta"  # UpdateMessage
FISHER_PART: Final = "fisher"  # UpdateMessage, optional
TENSORS_PART: Final = "tensors"  # LLMRequest, LLMResponse
FRAME_PART: Final = "frame"  # LLMRequest, LLMResponse in a compressed activation encoding
UPDATE_PARTS: Final = (DELTA_PART, FISHER_PART)

# --- tensor names inside an LLM step's ``tensors`` part (safetensors) --------------------------
INPUTS_EMBEDS: Final = "inputs_embeds"  # (B, L, d) float
ATTENTION_MASK: Final = "attention_mask"  # (B, L)
LABELS: Final = "labels"  # (B, L) int64, step only
INPUT_GRADS: Final = "input_grads"  # (B, L, d): d loss / d inputs_embeds
SAMPLE_LOSSES: Final = "sample_losses"  # (B,)
LOGPROBS: Final = "logprobs"  # (B, vocab)
SCORE_REQUEST: Final = (INPUTS_EMBEDS, ATTENTION_MASK)
STEP_REQUEST: Final = (*SCORE_REQUEST, LABELS)
STEP_REPLY: Final = (INPUT_GRADS, SAMPLE_LOSSES)
SCORE_REPLY: Final = (LOGPROBS,)


class MissingPart(MalformedMessage):
    """An envelope without a part its kind (or its round) requires."""


class UnexpectedPart(MalformedMessage):
    """An envelope with a part its kind does not carry."""


# --- the task: cloud -> device -----------------------------------------------------------------


def encode_task(task: TrainTask, global_frame: bytes) -> bytes:
    """A task envelope: ``task`` and the global adapter's codec frame as part ``global``."""
    return pack(task, {GLOBAL_PART: global_frame})


def decode_global(parts: Mapping[str, bytes], *, expected: Shapes | None = None,
                  max_bytes: int = codec.DEFAULT_MAX_BYTES) -> AdapterState:
    """The global adapter a task carries, checked against ``expected`` shapes when given.

    ``MalformedMessage`` without a ``global`` part; a ``codec.CodecError`` for a bad frame.
    """
    frame = require_part(parts, GLOBAL_PART, TrainTask.kind)
    return codec.decode(frame, max_bytes=max_bytes, expected=expected)


# --- the update: device -> cloud ---------------------------------------------------------------


def error_feedback(delta: AdapterState, scheme: codec.Scheme,
                   residual: AdapterState) -> tuple[AdapterState, AdapterState]:
    """What a device sends for ``delta`` under ``scheme``, and the residual it keeps.

    Last round's ``residual`` is added to ``delta`` and what the scheme loses this round is
    kept for the next (``codec.ErrorFeedback``), for every scheme: an exact one keeps zeros.
    A residual whose keys or shapes differ from ``delta``'s (the adapter layout changed) is
    dropped and error feedback starts afresh.
    """
    feedback = codec.ErrorFeedback(scheme)
    if _fits(residual, delta):
        feedback.load_state_dict(residual)
    sent = feedback.compress(delta)
    return sent, feedback.state_dict()


def _fits(residual: AdapterState, delta: AdapterState) -> bool:
    return bool(residual) and set(residual) == set(delta) and all(
        tuple(residual[k].shape) == tuple(delta[k].shape) for k in delta)


def update_parts(delta: AdapterState, fisher: AdapterState | None,
                 schemes: UpdateCodec) -> dict[str, bytes]:
    """An update's parts: ``delta`` (and ``fisher`` when there is one) as codec frames."""
    parts = {DELTA_PART: codec.encode(delta, schemes.delta)}
    if fisher is not None:
        parts[FISHER_PART] = codec.encode(fisher, schemes.fisher)
    return parts


def encode_update(message: UpdateMessage, delta: AdapterState, fisher: AdapterState | None,
                  schemes: UpdateCodec) -> bytes:
    """An update envelope: ``message`` and the frames of ``update_parts``."""
    return pack(message, update_parts(delta, fisher, schemes))


def decode_update(parts: Mapping[str, bytes], *, expected: Shapes,
                  max_bytes: int = codec.DEFAULT_MAX_BYTES, requires_fisher: bool = False,
                  verify: bool = True) -> tuple[AdapterState, AdapterState | None]:
    """Δθ and the Fisher (None if not sent) of an update's parts, shapes checked.

    ``UnexpectedPart`` or ``MissingPart`` (no ``delta``; no ``fisher`` where
    ``requires_fisher``), else the ``codec.CodecError`` of the first bad frame, its message
    prefixed with the part's name. ``verify=False``: the frames' checksums are not checked
    (``codec.decode``), for parts whose bytes a digest already vouched for.
    """
    unexpected = sorted(set(parts) - set(UPDATE_PARTS))
    if unexpected:
        raise UnexpectedPart(f"unexpected parts {unexpected}")
    if DELTA_PART not in parts:
        raise MissingPart(f"the update has no {DELTA_PART!r} part")
    if requires_fisher and FISHER_PART not in parts:
        raise MissingPart(f"the round's strategy needs a {FISHER_PART!r} part")
    delta = _decode_part(parts, DELTA_PART, expected, max_bytes, verify)
    fisher = None
    if FISHER_PART in parts:
        fisher = _decode_part(parts, FISHER_PART, expected, max_bytes, verify)
    return delta, fisher


def _decode_part(parts: Mapping[str, bytes], name: str, expected: Shapes,
                 max_bytes: int, verify: bool) -> AdapterState:
    try:
        return codec.decode(parts[name], max_bytes=max_bytes, expected=expected, verify=verify)
    except codec.CodecError as err:  # same class (the gate maps it to a code), part named
        raise type(err)(f"{name}: {err}") from None
