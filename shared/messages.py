"""What travels on the topics of ``shared.topics``: typed messages and their byte layout.

Two shapes of payload:

- **JSON** for small, human-readable control messages (presence, the round announcement):
  ``mosquitto_sub`` shows them as they are.
- **Envelopes** for messages that carry tensors (tasks, updates, LLM requests and responses)::

      offset  size  field
      0       4     magic b"FNM1"
      4       4     header length H (uint32, little-endian)
      8       H     header: UTF-8 JSON of the message model, with ``parts`` = [[name, size], ...]
      8+H     ...   the parts' bytes, in header order, nothing after them

  Adapter tensors inside a part are ``shared.codec`` frames (their own scheme, checksum and
  limits); activations and gradients are safetensors bytes (``pack_tensors``). Neither side
  ever unpickles: everything is parsed and validated, and every problem raises a
  ``MessageError`` subclass that says what was wrong.

A receiver checks the payload's size before parsing (``unpack(..., max_bytes=...)``); a sender
checks it before publishing (``check_size``), because paho does not and a broker disconnects a
client whose packet exceeds its ``max_packet_size``.

Device bytes are hostile until parsed: the JSON's nesting depth is measured on the raw bytes
before ``json.loads`` sees them (``MAX_JSON_DEPTH``), the parser refuses ``NaN``/``Infinity``,
floats that overflow and integers of more than 19 digits, and the models are strict (no
coercion: ``"v": true`` or ``"n_samples": "100"`` are refused) with bounded integers. Tensor
parts must declare a dtype of ``TENSOR_DTYPES`` in their safetensors header, checked before any
tensor is built.
"""

from __future__ import annotations

import json
import math
import re
import struct
import time
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import torch
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from safetensors import SafetensorError
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

from shared.codec import DEFAULT_DELTA_SCHEME, DEFAULT_FISHER_SCHEME, Scheme
from shared.identity import DEVICE_ID_PATTERN
from shared.training import TaskHParams

ENVELOPE_MAGIC = b"FNM1"
_HEAD = struct.Struct("<4sI")
MAX_HEADER_BYTES = 256 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 8 * 2**20  # matches the broker's max_packet_size in our configs
PROTOCOL_VERSION: Literal[1] = 1
MAX_JSON_DEPTH = 16  # nesting of objects/arrays in any JSON a device sends (ours use <= 4)
MAX_CAPABILITIES_DEPTH = 4  # inside a presence's capabilities
MAX_CAPABILITIES_BYTES = 8 * 1024  # capabilities as compact JSON
MAX_INT_DIGITS = 19  # integers beyond int64 are refused by the parser (2^63 has 19 digits)
INT64_MAX = 2**63 - 1
MAX_METRICS = 64

DeviceId = Annotated[str, Field(pattern=DEVICE_ID_PATTERN)]
MessageId = Annotated[str, Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]
DbId = Annotated[int, Field(ge=1, le=INT64_MAX)]  # a database id (round, adapter version)
Label = Annotated[str, Field(max_length=256)]


class MessageError(ValueError):
    """A payload that cannot be accepted; the message says what was wrong."""


class MessageTooLarge(MessageError):
    """A payload over the size limit (refused before parsing or before publishing)."""


class MalformedMessage(MessageError):
    """Bytes or JSON that do not form a valid message of the expected kind."""


_STRICT = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class Message(BaseModel):
    """Base of every message: strict (unknown fields refused, no coercion, finite floats),
    versioned, with a kind tag."""

    model_config = _STRICT
    kind: ClassVar[str] = "message"
    v: Literal[1] = PROTOCOL_VERSION
    created_at: float = Field(default_factory=time.time)  # unix time, set by the sender

    @field_validator("v", mode="before")
    @classmethod
    def _exact_version(cls, value: object) -> object:
        # Literal[1] alone accepts True (True == 1), even in strict mode.
        if type(value) is not int:
            raise ValueError(f"the protocol version is an integer, got {value!r}")
        return value


# --- JSON messages ------------------------------------------------------------------------------


class DeviceError(BaseModel):
    """A task the device refused or could not finish, reported in its retained presence."""

    model_config = _STRICT
    code: Label  # "too_large", "rejected", "expired", "failed"
    message: Annotated[str, Field(max_length=4000)]
    task_id: Label | None = None
    round_id: DbId | None = None
    at: float = Field(default_factory=time.time)


class Presence(Message):
    """Retained on ``devices/{id}/status``; the last will publishes ``state="offline"``."""

    kind: ClassVar[str] = "presence"
    device_id: DeviceId
    state: Literal["online", "offline"]
    profile: Label | None = None
    bundle_version: Label | None = None
    agent_version: Label | None = None
    capabilities: dict[str, Any] = Field(default_factory=dict)  # e.g. samples, providers
    last_error: DeviceError | None = None  # the latest refused or failed task, if any

    @field_validator("capabilities")
    @classmethod
    def _bounded_capabilities(cls, value: dict[str, Any]) -> dict[str, Any]:
        check_bounded_json(value, max_depth=MAX_CAPABILITIES_DEPTH,
                           max_bytes=MAX_CAPABILITIES_BYTES, what="capabilities")
        return value


class RoundAnnouncement(Message):
    """Retained on ``rounds/current``: what round is running and which global version is live."""

    kind: ClassVar[str] = "round"
    round_id: DbId | None
    state: Label
    global_version: DbId | None = None
    deadline_at: float | None = None


# --- Envelope messages --------------------------------------------------------------------------


class UpdateCodec(BaseModel):
    """How the device must encode its update: one scheme for Δθ, one for the Fisher."""

    model_config = _STRICT
    delta: Scheme = DEFAULT_DELTA_SCHEME  # int8/b64+zstd3 (measured: docs/results.md)
    fisher: Scheme = DEFAULT_FISHER_SCHEME  # bf16+zstd3


class TrainTask(Message):
    """cloud -> ``devices/{id}/tasks``: train round ``round_id`` from version ``global_version``.

    Part ``global``: the global adapter state as a codec frame.
    """

    kind: ClassVar[str] = "task.train"
    task_id: MessageId
    round_id: DbId
    global_version: DbId
    base_version: Label  # the frozen base's manifest version the adapters belong to
    strategy: Label
    hparams: TaskHParams = TaskHParams()
    codec: UpdateCodec = UpdateCodec()
    deadline_at: float  # unix time; the cloud rejects (or buffers) what arrives later
    max_update_bytes: int = Field(4 * 2**20, ge=1024, le=INT64_MAX)
    seed: int = Field(0, ge=-INT64_MAX, le=INT64_MAX)


class CancelTask(Message):
    """cloud -> ``devices/{id}/tasks``: stop working on a round (operator stop, round failed)."""

    kind: ClassVar[str] = "task.cancel"
    round_id: DbId
    reason: Annotated[str, Field(max_length=4000)]


class Refusal(Message):
    """cloud -> ``devices/{id}/tasks``: the cloud refused something the device sent (an update
    or a presence message), with the code it recorded and a sentence for people."""

    kind: ClassVar[str] = "refusal"
    of: Literal["update", "presence"]
    update_id: MessageId | None = None
    code: Label
    reason: Annotated[str, Field(max_length=4000)]


class UpdateMessage(Message):
    """device -> ``devices/{id}/updates``. Parts ``delta`` and optional ``fisher``: codec frames.

    ``update_id`` is chosen by the device once per (task, attempt) and reused on every resend,
    so the cloud stores the update exactly once however often QoS 1 redelivers it.
    """

    kind: ClassVar[str] = "update"
    update_id: MessageId
    task_id: MessageId
    round_id: DbId
    global_version: DbId
    base_version: Label
    n_samples: int = Field(ge=1, le=INT64_MAX)
    # Finite (the model refuses NaN/Infinity): they go into the database as they are.
    metrics: dict[Label, float] = Field(default_factory=dict, max_length=MAX_METRICS)


# How activations and gradients travel (``shared.activations``): the request names it and the
# reply uses the same one. A request without the field is fp32, as before the field existed.
ActivationEncoding = Literal["fp32", "bf16+zstd", "int8+zstd"]


class LLMRequest(Message):
    """device -> ``devices/{id}/llm/requests`` (v5 response topic + correlation data = request_id).

    Parts (``shared.activations``): ``inputs_embeds`` (B, L, d) float, ``attention_mask``
    (B, L) and, for ``op="step"``, ``labels`` (B, L) int, encoded as ``encoding`` says.
    """

    kind: ClassVar[str] = "llm.request"
    request_id: MessageId
    op: Literal["step", "score"]
    base_version: Label
    encoding: ActivationEncoding = "fp32"


class LLMError(BaseModel):
    model_config = _STRICT
    code: Label  # "bad_request", "base_mismatch", "too_large", "over_budget", "busy", "internal"
    message: Annotated[str, Field(max_length=4000)]


class LLMResponse(Message):
    """LLM worker -> the request's response topic.

    On success the parts hold ``input_grads`` and ``sample_losses`` (``step``) or ``logprobs``
    (``score``) in the request's ``encoding``; on failure ``error`` says why and there are no
    parts.
    """

    kind: ClassVar[str] = "llm.response"
    request_id: MessageId
    ok: bool
    encoding: ActivationEncoding = "fp32"
    loss: float | None = None
    error: LLMError | None = None
    worker: Label | None = None

    @model_validator(mode="after")
    def _content_or_error(self) -> LLMResponse:
        if self.ok == (self.error is not None):
            raise ValueError("a response has either ok=true and no error, or ok=false and an error")
        return self


ENVELOPE_KINDS: dict[str, type[Message]] = {
    m.kind: m for m in (TrainTask, CancelTask, Refusal, UpdateMessage, LLMRequest, LLMResponse)
}
JSON_KINDS: dict[str, type[Message]] = {m.kind: m for m in (Presence, RoundAnnouncement)}
M = TypeVar("M", bound=Message)


# --- Encoding -----------------------------------------------------------------------------------


def to_json(message: Message) -> bytes:
    """A JSON message's payload (``kind`` included, so a reader can tell what it is)."""
    return json.dumps({"kind": message.kind, **message.model_dump(mode="json")},
                      separators=(",", ":")).encode()


def from_json(payload: bytes, expected: type[M], *, max_bytes: int = 64 * 1024) -> M:
    """Parse and validate a JSON message of type ``expected``."""
    check_size(payload, max_bytes, what=f"{expected.kind} message")
    return _validate(loads_bounded(payload, f"{expected.kind} message"), expected)


def pack(message: Message, parts: Mapping[str, bytes] | None = None) -> bytes:
    """An envelope: the message as the header, then the parts' bytes."""
    parts = dict(parts or {})
    header = {"kind": message.kind, **message.model_dump(mode="json"),
              "parts": [[name, len(data)] for name, data in parts.items()]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise MessageTooLarge(f"envelope header of {len(raw)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join([_HEAD.pack(ENVELOPE_MAGIC, len(raw)), raw, *parts.values()])


def unpack(payload: bytes, expected: type[M], *,
           max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[M, dict[str, bytes]]:
    """Parse an envelope into its message (validated as ``expected``) and its parts."""
    header, header_len = _read_header(payload, expected.kind, max_bytes)
    layout = header.pop("parts", [])
    parts = _split_parts(payload, _HEAD.size + header_len, layout, expected.kind)
    return _validate(header, expected), parts


def envelope_kind(payload: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> str:
    """The ``kind`` an envelope declares (e.g. ``"task.cancel"``), before it is validated:
    on a topic that carries several kinds it says which model to ``unpack`` it with."""
    header, _ = _read_header(payload, "envelope", max_bytes)
    kind = header.get("kind")
    if not isinstance(kind, str):
        raise MalformedMessage(f"envelope header has no string 'kind', got {kind!r}")
    return kind


def _read_header(payload: bytes, label: str, max_bytes: int) -> tuple[dict[str, Any], int]:
    """The envelope's JSON header and its length, after the size and prefix checks."""
    check_size(payload, max_bytes, what=f"{label} message")
    if len(payload) < _HEAD.size:
        raise MalformedMessage(f"{label} message of {len(payload)} bytes is truncated")
    magic, header_len = _HEAD.unpack_from(payload)
    if magic != ENVELOPE_MAGIC:
        raise MalformedMessage(f"{label} message does not start with {ENVELOPE_MAGIC!r}")
    if header_len > MAX_HEADER_BYTES or _HEAD.size + header_len > len(payload):
        raise MalformedMessage(f"{label} message declares a {header_len}-byte header "
                               f"but has {len(payload) - _HEAD.size} bytes after the prefix")
    header = loads_bounded(payload[_HEAD.size:_HEAD.size + header_len], f"{label} header")
    if not isinstance(header, dict):
        raise MalformedMessage(f"{label} header must be a JSON object")
    return header, header_len


# A JSON string (escapes included) or one bracket: strings are skipped in C by the regex, so
# brackets inside them do not count.
_JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def json_depth(raw: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of the objects and arrays in ``raw`` (JSON bytes), counted on the bytes
    themselves and stopping at ``limit + 1``: a deep document is refused before any parser
    recurses into it."""
    depth = deepest = 0
    for match in _JSON_TOKEN.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} overflows a float")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"integer of {len(text)} digits is out of range")
    return int(text)


def loads_bounded(raw: bytes, what: str, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` for bytes from a device: depth checked first, then parsed refusing
    NaN/Infinity, overflowing floats and integers of more than ``MAX_INT_DIGITS`` digits.
    ``MalformedMessage`` says what is wrong."""
    depth = json_depth(raw, max_depth)
    if depth > max_depth:
        raise MalformedMessage(f"{what} nests deeper than {max_depth} levels")
    if b"\\u0000" in raw:  # PostgreSQL text cannot hold NUL; no message of ours needs one
        raise MalformedMessage(f"{what} contains a NUL character")
    try:
        data = json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float,
                          parse_int=_bounded_int)
        # A lone surrogate (``"\\ud800"``) parses but cannot be encoded again (databases,
        # logs): refused here rather than where it is stored.
        json.dumps(data, ensure_ascii=False).encode()
    except (UnicodeError, ValueError, RecursionError) as err:  # JSONDecodeError too
        raise MalformedMessage(f"{what} is not valid JSON: {str(err)[:200]}") from None
    return data


def check_bounded_json(value: object, *, max_depth: int, max_bytes: int, what: str) -> None:
    """``ValueError`` unless ``value`` (parsed JSON) nests at most ``max_depth`` levels and
    takes at most ``max_bytes`` as compact JSON. Depth is walked without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth >= max_depth:
                raise ValueError(f"{what} nest deeper than {max_depth} levels")
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    size = len(json.dumps(value, separators=(",", ":")))
    if size > max_bytes:
        raise ValueError(f"{what} take {size:,} bytes as JSON, the limit is {max_bytes:,}")


def _split_parts(payload: bytes, offset: int, layout: object, kind: str) -> dict[str, bytes]:
    if not isinstance(layout, list) or not all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str)
            and isinstance(p[1], int) and not isinstance(p[1], bool) and p[1] >= 0
            for p in layout):
        raise MalformedMessage(f"{kind} header 'parts' must be a list of [name, size] pairs")
    names = [p[0] for p in layout]
    if len(set(names)) != len(names):
        raise MalformedMessage(f"{kind} header names a part twice: {names}")
    declared = sum(p[1] for p in layout)
    if offset + declared != len(payload):
        raise MalformedMessage(f"{kind} parts declare {declared} bytes but "
                               f"{len(payload) - offset} follow the header")
    parts = {}
    for name, size in layout:
        parts[name] = payload[offset:offset + size]
        offset += size
    return parts


def _validate(data: object, expected: type[M]) -> M:
    if not isinstance(data, dict):
        raise MalformedMessage(f"{expected.kind} message must be a JSON object")
    kind = data.pop("kind", None)
    if kind != expected.kind:
        raise MalformedMessage(f"expected a {expected.kind!r} message, got kind {kind!r}")
    try:
        return expected.model_validate(data)
    except ValidationError as err:
        raise MalformedMessage(f"invalid {expected.kind} message: {_short(err)}") from None


def _short(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}"
                     for e in err.errors()[:5])


def check_size(payload: bytes, max_bytes: int, *, what: str = "payload") -> None:
    """Refuse a payload over ``max_bytes`` before parsing it or before publishing it."""
    if len(payload) > max_bytes:
        raise MessageTooLarge(f"{what} of {len(payload):,} bytes exceeds the limit of "
                              f"{max_bytes:,} bytes")


def require_part(parts: Mapping[str, bytes], name: str, kind: str) -> bytes:
    if name not in parts:
        raise MalformedMessage(f"{kind} message lacks its {name!r} part (has {sorted(parts)})")
    return parts[name]


# --- Tensors (activations, gradients) -----------------------------------------------------------


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """safetensors bytes of contiguous CPU tensors (no pickle, typed header)."""
    return _st_save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})


# safetensors dtypes every tensor op used on received tensors supports on CPU (finiteness,
# comparisons, casts); U16/U32/U64 and the F8 types do not, so they are refused from the header.
TENSOR_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8",
                           "BOOL"})
_ST_HEADER = struct.Struct("<Q")


def tensor_header(data: bytes, *, max_header_bytes: int = 64 * 1024) -> dict[str, dict]:
    """The safetensors header of ``data`` (name -> dtype, shape, offsets), read and checked
    without building a tensor: bounded JSON, known dtypes only (``TENSOR_DTYPES``)."""
    if len(data) < _ST_HEADER.size:
        raise MalformedMessage(f"tensor part of {len(data)} bytes is truncated")
    (size,) = _ST_HEADER.unpack_from(data)
    if size > min(max_header_bytes, len(data) - _ST_HEADER.size):
        raise MalformedMessage(f"tensor part declares a {size}-byte header")
    header = loads_bounded(data[_ST_HEADER.size:_ST_HEADER.size + size], "tensor header",
                           max_depth=3)
    if not isinstance(header, dict):
        raise MalformedMessage("tensor header must be a JSON object")
    header.pop("__metadata__", None)
    for name, entry in header.items():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if dtype not in TENSOR_DTYPES:
            raise MalformedMessage(f"tensor {name[:64]!r}: dtype {str(dtype)[:16]!r} is not "
                                   f"one of {sorted(TENSOR_DTYPES)}")
    return header


def unpack_tensors(data: bytes, required: tuple[str, ...], *,
                   optional: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Parse safetensors bytes; exactly the ``required`` names (plus ``optional``) must be
    there, each of a dtype in ``TENSOR_DTYPES`` (checked on the header first)."""
    tensor_header(data)
    try:
        tensors = _st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise MalformedMessage(f"tensor part is not valid safetensors: {err}") from None
    missing = [n for n in required if n not in tensors]
    extra = sorted(set(tensors) - set(required) - set(optional))
    if missing or extra:
        raise MalformedMessage(f"tensor part: missing {missing}, unexpected {extra}")
    return tensors
