"""How split-training activations and gradients travel between a device and the LLM worker.

A device's ``LLMRequest`` names its ``encoding``; the worker answers in the same one:

- ``fp32``: one ``tensors`` part (safetensors) with every tensor as the caller holds it. Exact.
- ``bf16+zstd``: the float tensor (``inputs_embeds`` up, ``input_grads`` down) goes in a
  ``frame`` part, a ``shared.codec`` frame in bfloat16 + zstd (3 significant digits, float32's
  range); the rest in ``tensors``, the attention mask as uint8 and labels as int32.
- ``int8+zstd``: the same, with the float tensor as int8 with one float32 scale per token
  (a block of the model's width, ``max|x| / 127``: error <= scale / 2 per element) + zstd.

The split is the bulk of what a device sends and receives (a 3 x 8 round moves ~12 MB of fp32
activations against 72 KiB of adapter parameters), so it is where compression pays. Log-
probabilities of a ``score`` reply stay float32 in every encoding: their differences decide
the answer, and scoring is evaluation, not training traffic.

Decoding is bounded like every device input: the frame's size by the message limit, its
decoded tensors by ``max_decoded_bytes`` (declared shapes are checked before any work), and
non-finite values are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import torch

from shared import codec
from shared.backend import LLMBackend, StepResult
from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    ActivationEncoding,
    MalformedMessage,
    pack_tensors,
    require_part,
    unpack_tensors,
)
from shared.protocol import (
    ATTENTION_MASK,
    FRAME_PART,
    INPUT_GRADS,
    INPUTS_EMBEDS,
    LABELS,
    LOGPROBS,
    SAMPLE_LOSSES,
    TENSORS_PART,
)

ENCODINGS: tuple[str, ...] = get_args(ActivationEncoding)
# What a device sends unless its configuration says otherwise; see docs/results.md
# ("Compressed activations") for the bytes and the paired accuracy runs behind it.
DEFAULT_ENCODING: ActivationEncoding = "bf16+zstd"

_DEFAULT_MAX_DECODED = 256 * 2**20
_IN_PROCESS = "in-process"  # the message kind errors name for WireBackend's own round trip
# Compressed encodings also narrow the small tensors: a mask of 0/1 as uint8, token ids (< 2^31)
# as int32. The worker accepts both and widens them again.
_COMPACT = {ATTENTION_MASK: torch.uint8, LABELS: torch.int32}


class ActivationCodecError(MalformedMessage):
    """A ``frame`` part that cannot be decoded (size, checksum, layout, values)."""


def scheme_for(encoding: ActivationEncoding, width: int) -> codec.Scheme | None:
    """The codec scheme of ``encoding``'s float part for rows of ``width``; None for fp32."""
    if encoding == "fp32":
        return None
    if encoding == "bf16+zstd":
        return codec.Scheme(kind="bf16", zstd=True)
    if encoding == "int8+zstd":
        return codec.Scheme(kind="int8", block=max(1, width), zstd=True)
    raise ValueError(f"unknown activation encoding {encoding!r}; one of {ENCODINGS}")


def pack(floats: Mapping[str, torch.Tensor], others: Mapping[str, torch.Tensor],
         encoding: ActivationEncoding) -> dict[str, bytes]:
    """The message parts for ``floats`` (compressed by ``encoding``) and ``others`` (exact).

    ``floats`` are (..., width) tensors whose last dimension is one row of the model (a token's
    embedding or its gradient); ``others`` are small (masks, labels, per-sample losses).
    """
    scheme = scheme_for(encoding, _width(floats))
    if scheme is None:
        return {TENSORS_PART: pack_tensors({**floats, **others})}
    compact = {name: tensor.to(_COMPACT.get(name, tensor.dtype)) for name, tensor in others.items()}
    frame = codec.encode({k: v.detach().float() for k, v in floats.items()}, scheme)
    return {TENSORS_PART: pack_tensors(compact), FRAME_PART: frame}


def unpack(parts: Mapping[str, bytes], floats: tuple[str, ...], others: tuple[str, ...],
           encoding: ActivationEncoding, *, kind: str, max_bytes: int,
           max_decoded_bytes: int = _DEFAULT_MAX_DECODED,
           expected: Mapping[str, tuple[int, ...]] | None = None) -> dict[str, torch.Tensor]:
    """The inverse of ``pack``: exactly the named tensors, or a ``MalformedMessage``.

    ``expected`` (name -> shape) checks a frame's declared shapes before it is decoded.
    """
    scheme = scheme_for(encoding, 1)
    if scheme is None:
        if FRAME_PART in parts:
            raise MalformedMessage(f"{kind} message in fp32 carries a {FRAME_PART!r} part")
        return unpack_tensors(require_part(parts, TENSORS_PART, kind), (*floats, *others))
    tensors = unpack_tensors(require_part(parts, TENSORS_PART, kind), others)
    frame = require_part(parts, FRAME_PART, kind)
    try:
        info = codec.frame_info(frame, verify=False, max_bytes=max_bytes)
        if info["scheme"]["kind"] != scheme.kind:
            raise ActivationCodecError(f"{kind} message says {encoding!r} but its frame is "
                                       f"{info['label']!r}")
        decoded = codec.decode(frame, max_bytes=max_bytes, max_decoded_bytes=max_decoded_bytes,
                               expected=expected)
    except codec.CodecError as err:
        raise ActivationCodecError(f"{kind} message: {err}") from None
    if sorted(decoded) != sorted(floats):
        raise ActivationCodecError(f"{kind} message: frame holds {sorted(decoded)[:8]}, "
                                   f"expected {sorted(floats)}")
    return {**tensors, **decoded}


# --- the messages of the two LLM operations: which tensor travels where ---------------------------


def request_parts(inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                  labels: torch.Tensor | None, encoding: ActivationEncoding) -> dict[str, bytes]:
    """An ``LLMRequest``'s parts: a ``step`` (with ``labels``) or a ``score`` (without)."""
    others = {ATTENTION_MASK: attention_mask} if labels is None else {
        ATTENTION_MASK: attention_mask, LABELS: labels}
    return pack({INPUTS_EMBEDS: inputs_embeds}, others, encoding)


def read_request(parts: Mapping[str, bytes], op: Literal["step", "score"],
                 encoding: ActivationEncoding, *, kind: str, max_bytes: int,
                 max_decoded_bytes: int = _DEFAULT_MAX_DECODED,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(inputs_embeds, attention_mask, labels)`` of a request; labels None for a score."""
    others = (ATTENTION_MASK, LABELS) if op == "step" else (ATTENTION_MASK,)
    tensors = unpack(parts, (INPUTS_EMBEDS,), others, encoding, kind=kind, max_bytes=max_bytes,
                     max_decoded_bytes=max_decoded_bytes)
    return tensors[INPUTS_EMBEDS], tensors[ATTENTION_MASK], tensors.get(LABELS)


def step_reply_parts(result: StepResult, encoding: ActivationEncoding) -> dict[str, bytes]:
    """A ``step`` answer's parts: the input gradients in ``encoding``, the losses exact."""
    return pack({INPUT_GRADS: result.input_grads}, {SAMPLE_LOSSES: result.sample_losses},
                encoding)


def score_reply_parts(logprobs: torch.Tensor) -> dict[str, bytes]:
    """A ``score`` answer's parts: log-probabilities always as float32 (module docstring)."""
    return pack({}, {LOGPROBS: logprobs}, "fp32")


def read_step_reply(parts: Mapping[str, bytes], encoding: ActivationEncoding, *, kind: str,
                    max_bytes: int, shape: tuple[int, ...] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_grads, sample_losses)`` of a step answer; ``shape``, the gradients' expected
    shape, is checked before a frame is decoded."""
    tensors = unpack(parts, (INPUT_GRADS,), (SAMPLE_LOSSES,), encoding, kind=kind,
                     max_bytes=max_bytes, expected=None if shape is None else {INPUT_GRADS: shape})
    return tensors[INPUT_GRADS], tensors[SAMPLE_LOSSES]


def read_score_reply(parts: Mapping[str, bytes], encoding: ActivationEncoding, *, kind: str,
                     max_bytes: int) -> torch.Tensor:
    """The log-probabilities (B, vocab) of a score answer."""
    return unpack(parts, (), (LOGPROBS,), encoding, kind=kind, max_bytes=max_bytes)[LOGPROBS]


def encoded_size(parts: Mapping[str, bytes]) -> int:
    """Bytes of the parts (what the message adds to its small JSON header)."""
    return sum(len(data) for data in parts.values())


def _width(floats: Mapping[str, torch.Tensor]) -> int:
    widths = {int(t.shape[-1]) if t.dim() else 1 for t in floats.values()}
    if len(widths) > 1:
        raise ValueError(f"float tensors of one message share a row width, got {sorted(widths)}")
    return widths.pop() if widths else 1


class WireBackend:
    """An ``LLMBackend`` that sends every call through ``encoding`` both ways, in process.

    The simulation's device sees what a remote worker would give it: its embeddings are
    encoded and decoded before the LLM sees them, and the gradients on their way back, through
    the same functions as ``edge.remote_llm`` and ``cloud.llm_worker``. ``last_exchange``
    holds the parts' bytes of the last call (up, down).
    """

    def __init__(self, inner: LLMBackend, encoding: ActivationEncoding = DEFAULT_ENCODING,
                 *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        scheme_for(encoding, 1)  # ValueError for an unknown encoding
        self.inner = inner
        self.encoding = encoding
        self.max_bytes = max_bytes
        self._last = (0, 0)

    def last_exchange(self) -> tuple[int, int]:
        return self._last

    def loss_and_input_grads(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                             labels: torch.Tensor) -> StepResult:
        up = request_parts(inputs_embeds, attention_mask, labels, self.encoding)
        embeds, mask, sent_labels = read_request(up, "step", self.encoding, kind=_IN_PROCESS,
                                                 max_bytes=self.max_bytes)
        assert sent_labels is not None  # a step request carries labels
        result = self.inner.loss_and_input_grads(embeds.to(inputs_embeds.dtype), mask.long(),
                                                 sent_labels.long())
        down = step_reply_parts(result, self.encoding)
        grads, losses = read_step_reply(down, self.encoding, kind=_IN_PROCESS,
                                        max_bytes=self.max_bytes)
        self._last = (encoded_size(up), encoded_size(down))
        return StepResult(result.loss, losses, grads.to(inputs_embeds.dtype))

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        up = request_parts(inputs_embeds, attention_mask, None, self.encoding)
        embeds, mask, _ = read_request(up, "score", self.encoding, kind=_IN_PROCESS,
                                       max_bytes=self.max_bytes)
        logprobs = self.inner.score(embeds.to(inputs_embeds.dtype), mask.long())
        down = score_reply_parts(logprobs)
        self._last = (encoded_size(up), encoded_size(down))
        return logprobs
