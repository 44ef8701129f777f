"""Self-describing compressed frames for adapter deltas and Fishers. Never pickle.

A frame carries its scheme, every tensor's name, dtype and shape, the encoding parameters, the
byte layout of its payload and a sha256 checksum, so the receiver needs nothing but the bytes.
Tensors travel as raw little-endian numpy buffers. Layout (integers little-endian)::

    offset  size  field
    0       4     magic b"FNDC"
    4       2     format version (uint16), currently 1
    6       4     header length H (uint32)
    10      8     payload length P (uint64): bytes as stored, i.e. after zstd if the scheme says so
    18      32    sha256 of bytes [0, 18) + header + payload
    50      H     header: UTF-8 JSON ``FrameHeader`` (scheme, raw payload size, tensors + parts)
    50+H    P     payload

Schemes (``Scheme.kind``):
- ``fp32``: exact for float32 (and float16/bfloat16) tensors.
- ``fp16``: half the bytes; values beyond ±65504 are refused and magnitudes below ~6e-5 lose
  relative precision (flush to 0 below ~6e-8) — do not send small Fishers this way.
- ``bf16``: half the bytes with float32's range (3 significant digits): the safe 16-bit choice
  for Fisher values of 1e-10..1e-2.
- ``int8``: symmetric int8 with one float32 scale (``max|x| / 127``) per block of ``block``
  flattened elements, or per row (``block="row"``); error ≤ scale / 2 per element.
- ``topk``: the ``ceil(k_fraction · n)`` largest-magnitude entries of each tensor as fp16 values
  plus ascending indices gap-coded as uint32; pair it with ``ErrorFeedback`` on the device.
Any scheme can add zstd on top (``zstd=True``); decompression is bounded by the size the header
declares, which is itself bounded by ``max_bytes`` (no zip bombs).
"""

from __future__ import annotations

import functools
import hashlib
import io
import math
import struct
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Literal

import numpy as np
import torch
import zstandard
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.adapters import AdapterState

MAGIC = b"FNDC"
FORMAT_VERSION = 1
DEFAULT_MAX_BYTES = 64 * 2**20  # frame, and raw payload after decompression
DEFAULT_MAX_DECODED_BYTES = 256 * 2**20  # dense tensors a frame may expand to (top-k!)
MAX_HEADER_BYTES = 2**20
MAX_TENSORS = 4096
_UNLIMITED = 2**62  # for frames this process just encoded itself
_HEAD = struct.Struct("<4sHIQ")  # magic, version, header length, payload length
_PREFIX_SIZE = _HEAD.size + 32  # + sha256 digest
_FP16_MAX = 65504.0
DtypeName = Literal["float32", "float16", "bfloat16", "float64"]
_DTYPES: dict[DtypeName, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_PARTS = {
    "fp32": ("values",),
    "fp16": ("values",),
    "bf16": ("values",),
    "int8": ("values", "scales"),
    "topk": ("values", "indices"),
}


class CodecError(ValueError):
    """Any frame that cannot be encoded or decoded; subclasses say why."""


class FrameTooLarge(CodecError):
    """The frame, its decompressed payload or its decoded tensors exceed the allowed size."""


class ChecksumMismatch(CodecError):
    """The sha256 in the frame does not match its bytes (corruption in transit)."""


class MalformedFrame(CodecError):
    """Truncated, bad magic, unknown version or scheme, or an inconsistent header/payload."""


class NonFiniteValues(CodecError):
    """NaN or Inf in a tensor, or values the scheme's number format cannot represent."""


class ShapeMismatch(CodecError):
    """The frame's tensor names or shapes differ from what the receiver expects."""


class Scheme(BaseModel):
    """How tensors are packed: number format, int8 blocks, top-k fraction, optional zstd."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    kind: Literal["fp32", "fp16", "bf16", "int8", "topk"] = "fp32"
    block: Annotated[int, Field(ge=1, le=2**24)] | Literal["row"] = 64
    k_fraction: float = Field(default=0.01, gt=0.0, le=1.0)
    zstd: bool = False
    zstd_level: int = Field(default=3, ge=1, le=22)

    def label(self) -> str:
        """Short name for logs and reports, e.g. ``int8/b64+zstd3``."""
        detail = {"int8": f"/b{self.block}", "topk": f"/k{self.k_fraction:g}"}.get(self.kind, "")
        return self.kind + detail + (f"+zstd{self.zstd_level}" if self.zstd else "")

    @classmethod
    def parse(cls, spec: str) -> Scheme:
        """The inverse of ``label``: ``int8``, ``int8/b128``, ``int8/brow``, ``topk/k0.05+zstd``,
        ``fp16+zstd9``... ``ValueError`` names what is wrong."""
        body, plus, zstd = spec.strip().partition("+")
        kind, _, detail = body.partition("/")
        fields: dict[str, object] = {"kind": kind}
        if plus:
            if not zstd.startswith("zstd"):
                raise ValueError(f"scheme {spec!r}: only '+zstd[LEVEL]' may follow, got {zstd!r}")
            fields["zstd"] = True
            if zstd[4:]:
                fields["zstd_level"] = _int(zstd[4:], spec)
        if detail.startswith("b") and kind == "int8":
            fields["block"] = "row" if detail == "brow" else _int(detail[1:], spec)
        elif detail.startswith("k") and kind == "topk":
            try:
                fields["k_fraction"] = float(detail[1:])
            except ValueError:
                raise ValueError(f"scheme {spec!r}: bad top-k fraction {detail[1:]!r}") from None
        elif detail:
            raise ValueError(f"scheme {spec!r}: {detail!r} does not apply to {kind!r} "
                             "(int8 takes /bN or /brow, topk takes /kFRACTION)")
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            raise ValueError(f"scheme {spec!r}: {_short(err)}") from None


# What a round asks devices to upload unless configured otherwise (``UpdateCodec``): in
# docs/results.md ("Compressed uploads") int8 blocks of 64 + zstd for Δθ changed no accuracy
# cell by more than 0.01 and cut the upload 3-3.7x; the Fisher went as bf16 + zstd in those runs.
DEFAULT_DELTA_SCHEME = Scheme(kind="int8", block=64, zstd=True)
DEFAULT_FISHER_SCHEME = Scheme(kind="bf16", zstd=True)


def _int(text: str, spec: str) -> int:
    if not text.isdigit():
        raise ValueError(f"scheme {spec!r}: expected a whole number, got {text!r}")
    return int(text)


class TensorEntry(BaseModel):
    """One tensor in a frame: name, original dtype, shape, encoding params, payload parts."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    name: str = Field(min_length=1, max_length=256)
    dtype: DtypeName
    shape: tuple[int, ...] = Field(max_length=8)
    block: int | None = None  # int8: elements per scale (a row's length for per-row)
    k: int | None = None  # topk: number of entries kept
    parts: dict[str, tuple[int, int]]  # part name -> (offset, length) in the raw payload


class FrameHeader(BaseModel):
    """The JSON header: scheme, raw (decompressed) payload size and the tensors in order."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    scheme: Scheme
    raw_bytes: int = Field(ge=0)
    tensors: list[TensorEntry] = Field(max_length=MAX_TENSORS)


# ---------------------------------------------------------------------------------- encoding


def encode(state: AdapterState, scheme: Scheme, *, max_bytes: int | None = None) -> bytes:
    """Pack ``state`` into one frame; ``FrameTooLarge`` if it exceeds ``max_bytes``.

    Refuses non-finite values and values the scheme cannot represent (``NonFiniteValues``).
    """
    entries, chunks, offset = [], [], 0
    for name, tensor in _checked_items(state):
        flat = tensor.detach().to("cpu", torch.float32).reshape(-1)  # (n,)
        if not bool(torch.isfinite(flat).all()):
            raise NonFiniteValues(f"{name}: values overflow float32 (float64 beyond ~3.4e38)")
        params, parts = _ENCODERS[scheme.kind](flat, tuple(tensor.shape), scheme)
        layout = {}
        for part, data in parts:
            layout[part] = (offset, len(data))
            offset += len(data)
            chunks.append(data)
        entries.append(
            TensorEntry(
                name=name,
                dtype=_dtype_name(tensor),
                shape=tuple(tensor.shape),
                parts=layout,
                **params,
            )
        )
    raw = b"".join(chunks)
    header = FrameHeader(scheme=scheme, raw_bytes=len(raw), tensors=entries)
    payload = _compress(raw, scheme)
    frame = _assemble(header.model_dump_json().encode(), payload)
    if max_bytes is not None and len(frame) > max_bytes:
        raise FrameTooLarge(f"frame of {len(frame)} bytes exceeds max_bytes={max_bytes}")
    return frame


def _checked_items(state: AdapterState) -> Iterable[tuple[str, torch.Tensor]]:
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a dict of tensors, got {type(state).__name__}")
    for name, tensor in state.items():
        if not isinstance(name, str) or not 1 <= len(name) <= 256:
            raise ValueError(f"tensor names must be strings of 1..256 chars, got {name!r}")
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in _DTYPES.values():
            raise ValueError(f"{name}: expected a float tensor, got {tensor!r:.80}")
        if not bool(torch.isfinite(tensor).all()):
            raise NonFiniteValues(f"{name}: refusing to encode NaN or Inf")
        yield name, tensor


def _dtype_name(tensor: torch.Tensor) -> DtypeName:
    return next(name for name, dtype in _DTYPES.items() if dtype == tensor.dtype)


Parts = list[tuple[str, bytes]]
Encoder = Callable[[torch.Tensor, tuple[int, ...], Scheme], tuple[dict[str, int], Parts]]


def _encode_fp32(flat: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> tuple[dict, Parts]:
    return {}, [("values", flat.numpy().astype("<f4").tobytes())]


def _encode_fp16(flat: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> tuple[dict, Parts]:
    return {}, [("values", _fp16_bytes(flat))]


def _encode_bf16(flat: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> tuple[dict, Parts]:
    bf16 = flat.to(torch.bfloat16)  # values within 0.4% of float32's max round to inf
    if not bool(torch.isfinite(bf16).all()):
        raise NonFiniteValues("values overflow bfloat16 (|x| > ~3.39e38)")
    bits = bf16.view(torch.int16)  # (n,) raw bfloat16 bit patterns
    return {}, [("values", bits.numpy().astype("<i2").tobytes())]


def _encode_int8(flat: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> tuple[dict, Parts]:
    block = _int8_block(flat.numel(), shape, scheme.block)
    blocks = -(-flat.numel() // block)
    padded = torch.zeros(blocks * block, dtype=torch.float64)
    padded[: flat.numel()] = flat.double()
    grid = padded.view(blocks, block)  # (blocks, block)
    scales = (grid.abs().amax(dim=1) / 127).float()  # (blocks,) as sent
    safe = torch.where(scales > 0, scales.double(), torch.ones_like(scales, dtype=torch.float64))
    q = torch.round(grid / safe[:, None]).clamp_(-127, 127).to(torch.int8).reshape(-1)
    values = q[: flat.numel()].numpy().astype("i1").tobytes()
    return {"block": block}, [
        ("values", values),
        ("scales", scales.numpy().astype("<f4").tobytes()),
    ]


def _encode_topk(flat: torch.Tensor, shape: tuple[int, ...], scheme: Scheme) -> tuple[dict, Parts]:
    if flat.numel() >= 2**32:
        raise ValueError(f"top-k indices are uint32: tensor of {flat.numel()} elements is too big")
    k = _topk_count(flat.numel(), scheme.k_fraction)
    indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values  # (k,) ascending
    gaps = torch.diff(indices, prepend=torch.zeros(1, dtype=indices.dtype))  # (k,) first = idx 0
    parts = [
        ("values", _fp16_bytes(flat[indices])),
        ("indices", gaps.numpy().astype("<u4").tobytes()),
    ]
    return {"k": k}, parts


_ENCODERS: dict[str, Encoder] = {
    "fp32": _encode_fp32,
    "fp16": _encode_fp16,
    "bf16": _encode_bf16,
    "int8": _encode_int8,
    "topk": _encode_topk,
}


def _fp16_bytes(values: torch.Tensor) -> bytes:
    peak = float(values.abs().max()) if values.numel() else 0.0
    if peak > _FP16_MAX:
        raise NonFiniteValues(f"|value| {peak:g} overflows fp16 (max {_FP16_MAX:g}); use bf16/int8")
    return values.numpy().astype("<f2").tobytes()


def _int8_block(numel: int, shape: tuple[int, ...], block: int | str) -> int:
    """Elements per scale: a row's length for ``"row"``, capped at the tensor's size."""
    if block == "row":
        block = math.prod(shape[1:]) if len(shape) >= 2 else numel
    return max(1, min(int(block), numel))


def _topk_count(numel: int, fraction: float) -> int:
    return min(numel, max(1, math.ceil(fraction * numel))) if numel else 0


def _compress(raw: bytes, scheme: Scheme) -> bytes:
    if not scheme.zstd:
        return raw
    return zstandard.ZstdCompressor(level=scheme.zstd_level, write_content_size=True).compress(raw)


def _assemble(header: bytes, payload: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(header), len(payload))
    digest = hashlib.sha256(head + header + payload).digest()
    return head + digest + header + payload


# ---------------------------------------------------------------------------------- decoding


def decode(
    frame: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    expected: Mapping[str, tuple[int, ...]] | None = None,
    verify: bool = True,
) -> AdapterState:
    """Unpack a frame into ``{name: tensor}`` (original dtypes), checking everything first.

    Raises a ``CodecError`` subclass: ``FrameTooLarge`` (frame or decompressed payload over
    ``max_bytes``, dense tensors over ``max_decoded_bytes``), ``ChecksumMismatch``,
    ``MalformedFrame``, ``NonFiniteValues``, or ``ShapeMismatch`` against ``expected``.
    ``verify=False`` skips only the checksum, for bytes already checked by a digest that
    covers them (a content-addressed blob read back); every other check still runs.
    """
    header, payload = _open(frame, max_bytes, verify=verify)
    if expected is not None:
        _check_expected(header, expected)
    _check_decoded_size(header, max_decoded_bytes)
    raw = _decompress(payload, header, max_bytes)
    flat = _DECODERS[header.scheme.kind](header, raw)  # (Σ numel,) every tensor, in order
    if not np.isfinite(flat).all():  # once per frame, not once per tensor
        raise NonFiniteValues(f"{_first_non_finite(header, flat)}: decoded values contain "
                              "NaN or Inf")
    return dict(_split(header, torch.from_numpy(flat)))


def frame_info(frame: bytes, *, verify: bool = True, max_bytes: int = DEFAULT_MAX_BYTES) -> dict:
    """Sizes, scheme and tensor list of a frame, without decoding its payload (for logs)."""
    header, payload = _open(frame, max_bytes, verify=verify)
    return {
        "format_version": FORMAT_VERSION,
        "scheme": header.scheme.model_dump(),
        "label": header.scheme.label(),
        "frame_bytes": len(frame),
        "payload_bytes": len(payload),
        "raw_payload_bytes": header.raw_bytes,
        "elements": sum(math.prod(e.shape) for e in header.tensors),
        "tensors": [
            {"name": e.name, "dtype": e.dtype, "shape": list(e.shape)} for e in header.tensors
        ],
    }


def split_frame(frame: bytes) -> tuple[bytes, bytes]:
    """A frame's JSON header and stored payload as bytes, prefix checked, nothing decoded."""
    data = bytes(frame)
    header_len, _, _ = _read_prefix(data)
    return data[_PREFIX_SIZE : _PREFIX_SIZE + header_len], data[_PREFIX_SIZE + header_len :]


def seal_frame(header: bytes, payload: bytes) -> bytes:
    """A frame around ``header`` and ``payload`` as given, with a checksum that matches: with
    ``split_frame``, how fault injection builds a well-formed frame carrying values ``encode``
    refuses (NaN, for one). ``decode`` still checks everything else."""
    return _assemble(bytes(header), bytes(payload))


def _open(frame: bytes, max_bytes: int, verify: bool) -> tuple[FrameHeader, bytes]:
    """Check sizes, magic, version, lengths and checksum; parse and validate the header."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise MalformedFrame(f"a frame is bytes, got {type(frame).__name__}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive int, got {max_bytes!r}")
    data = bytes(frame)
    if len(data) > max_bytes:
        raise FrameTooLarge(f"frame of {len(data)} bytes exceeds max_bytes={max_bytes}")
    header_len, payload_len, digest = _read_prefix(data)
    start = _PREFIX_SIZE
    header, payload = data[start : start + header_len], data[start + header_len :]
    if verify and _digest(data) != digest:
        raise ChecksumMismatch("frame checksum does not match its contents")
    parsed = _parse_header(header)
    if not parsed.scheme.zstd and payload_len != parsed.raw_bytes:
        raise MalformedFrame(f"payload of {payload_len} bytes, header declares "
                             f"{parsed.raw_bytes}")
    return parsed, payload


def _digest(data: bytes) -> bytes:
    """sha256 of the prefix's first fields, the header and the payload, without copying them."""
    view = memoryview(data)
    digest = hashlib.sha256(view[: _HEAD.size])
    digest.update(view[_PREFIX_SIZE:])
    return digest.digest()


def _read_prefix(data: bytes) -> tuple[int, int, bytes]:
    if len(data) < _PREFIX_SIZE:
        raise MalformedFrame(f"truncated frame: {len(data)} bytes, the prefix is {_PREFIX_SIZE}")
    magic, version, header_len, payload_len = _HEAD.unpack_from(data)
    digest = data[_HEAD.size : _PREFIX_SIZE]
    if magic != MAGIC:
        raise MalformedFrame(f"bad magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise MalformedFrame(
            f"unsupported frame format version {version}, this is {FORMAT_VERSION}"
        )
    if header_len > MAX_HEADER_BYTES:
        raise MalformedFrame(f"header of {header_len} bytes exceeds {MAX_HEADER_BYTES}")
    if len(data) != _PREFIX_SIZE + header_len + payload_len:
        raise MalformedFrame(
            f"frame is {len(data)} bytes but its prefix declares "
            f"{_PREFIX_SIZE} + {header_len} + {payload_len} (truncated or padded)"
        )
    return header_len, payload_len, digest


def _parse_header(header: bytes) -> FrameHeader:
    """The validated header, its parts checked to tile the raw payload. Headers of up to
    ``_CACHED_HEADER_BYTES`` are cached: every update of a round carries the same header (same
    scheme, names and shapes; zstd changes only the payload) and a ``FrameHeader`` is frozen."""
    if len(header) <= _CACHED_HEADER_BYTES:
        return _parse_header_cached(bytes(header))
    return _parse_header_once(header)


_CACHED_HEADER_BYTES = 16 * 1024  # an adapter's 4 tensors take ~1 KiB; at most 4 MiB cached


@functools.lru_cache(maxsize=256)
def _parse_header_cached(header: bytes) -> FrameHeader:
    return _parse_header_once(header)  # failures raise, and are not cached


def _parse_header_once(header: bytes) -> FrameHeader:
    try:
        parsed = FrameHeader.model_validate_json(header)
    except ValidationError as err:  # also unknown schemes, bad JSON, too-deep nesting
        raise MalformedFrame(f"invalid frame header: {_short(err)}") from None
    _check_layout(parsed)
    return parsed


def _short(err: ValidationError) -> str:
    first = err.errors()[0]
    return f"{'.'.join(map(str, first['loc']))}: {first['msg']}"


def _check_layout(header: FrameHeader) -> None:
    """Parts must tile the raw payload in order, each exactly as long as its tensor needs."""
    offset, names = 0, set()
    for entry in header.tensors:
        if entry.name in names:
            raise MalformedFrame(f"duplicate tensor name {entry.name!r}")
        names.add(entry.name)
        for part, length in _expected_parts(entry, header.scheme.kind).items():
            if entry.parts.get(part) != (offset, length):
                raise MalformedFrame(
                    f"{entry.name}.{part}: expected ({offset}, {length}), "
                    f"got {entry.parts.get(part)}"
                )
            offset += length
    if offset != header.raw_bytes:
        raise MalformedFrame(f"parts cover {offset} bytes, header declares {header.raw_bytes}")


def _expected_parts(entry: TensorEntry, kind: str) -> dict[str, int]:
    """Byte length of each part of ``entry`` under ``kind``; ``MalformedFrame`` if impossible."""
    if any(d < 0 for d in entry.shape) or set(entry.parts) != set(_PARTS[kind]):
        raise MalformedFrame(
            f"{entry.name}: bad shape {entry.shape} or parts {sorted(entry.parts)}"
        )
    numel = math.prod(entry.shape)
    if (entry.block is not None) != (kind == "int8") or (entry.k is not None) != (kind == "topk"):
        raise MalformedFrame(f"{entry.name}: block/k do not fit scheme {kind!r}")
    if kind == "int8":
        block = entry.block or 0
        if not 1 <= block <= max(numel, 1):
            raise MalformedFrame(f"{entry.name}: int8 block {block} outside [1, {max(numel, 1)}]")
        return {"values": numel, "scales": 4 * -(-numel // block)}
    if kind == "topk":
        k = entry.k if entry.k is not None else -1
        if not 0 <= k <= numel:
            raise MalformedFrame(f"{entry.name}: top-k count {k} outside [0, {numel}]")
        return {"values": 2 * k, "indices": 4 * k}
    return {"values": numel * (4 if kind == "fp32" else 2)}


def _check_expected(header: FrameHeader, expected: Mapping[str, tuple[int, ...]]) -> None:
    shapes = {e.name: e.shape for e in header.tensors}
    if set(shapes) != set(expected):
        missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        raise ShapeMismatch(f"frame tensors differ: missing {missing}, unexpected {extra}")
    for name, shape in expected.items():
        if tuple(shape) != shapes[name]:
            raise ShapeMismatch(f"{name}: expected shape {tuple(shape)}, got {shapes[name]}")


def _check_decoded_size(header: FrameHeader, max_decoded_bytes: int) -> None:
    total = sum(math.prod(e.shape) * _DTYPES[e.dtype].itemsize for e in header.tensors)
    if total > max_decoded_bytes:
        raise FrameTooLarge(f"decoded tensors need {total} bytes, max {max_decoded_bytes}")


def _decompress(payload: bytes, header: FrameHeader, max_bytes: int) -> bytes:
    """The raw payload; zstd output is read with a hard cap at the declared size (+1 byte)."""
    if header.raw_bytes > max_bytes:
        raise FrameTooLarge(
            f"raw payload of {header.raw_bytes} bytes exceeds max_bytes={max_bytes}"
        )
    if not header.scheme.zstd:
        return payload
    reader = _zstd_decompressor().stream_reader(io.BytesIO(payload), read_across_frames=True)
    try:
        with reader:
            raw = reader.read(header.raw_bytes + 1)
    except zstandard.ZstdError as err:
        raise MalformedFrame(f"zstd payload does not decompress: {err}") from None
    if len(raw) != header.raw_bytes:
        raise MalformedFrame(
            f"zstd payload decompresses to {len(raw)}+ bytes, header declares {header.raw_bytes}"
        )
    return raw


_zstd = threading.local()


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (one may serve many frames in turn, not two threads)."""
    decompressor = getattr(_zstd, "decompressor", None)
    if decompressor is None:
        decompressor = _zstd.decompressor = zstandard.ZstdDecompressor()
    return decompressor


def _part(raw: bytes, entry: TensorEntry, part: str, dtype: str) -> np.ndarray:
    """A read-only numpy view of one part of the raw payload (little-endian ``dtype``)."""
    offset, length = entry.parts[part]
    return np.frombuffer(raw, dtype, length // np.dtype(dtype).itemsize, offset)


def _numel(header: FrameHeader) -> int:
    return sum(math.prod(entry.shape) for entry in header.tensors)


# Each decoder returns every tensor of the frame as one float32 array, in header order (numpy:
# on arrays of this size its calls cost a fraction of torch's). For the dense schemes the parts
# tile the raw payload (``_check_layout``), so decoding is one conversion.
Decoder = Callable[[FrameHeader, bytes], np.ndarray]


def _decode_fp32(header: FrameHeader, raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, "<f4").astype(np.float32)


def _decode_fp16(header: FrameHeader, raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, "<f2").astype(np.float32)


def _decode_bf16(header: FrameHeader, raw: bytes) -> np.ndarray:
    bits = np.frombuffer(raw, "<u2").astype(np.uint32)  # bfloat16 = float32's upper 16 bits
    return (bits << 16).view(np.float32)


def _decode_int8(header: FrameHeader, raw: bytes) -> np.ndarray:
    flat = np.empty(_numel(header), dtype=np.float32)
    offset = 0
    for entry in header.tensors:
        q = _part(raw, entry, "values", "|i1")  # (n,)
        scales = _part(raw, entry, "scales", "<f4")  # (blocks,)
        if scales.size and not scales.min() >= 0:  # NaN fails ">=" too
            raise NonFiniteValues(f"{entry.name}: int8 scales must be finite and >= 0")
        n = q.size
        np.multiply(q, np.repeat(scales, entry.block or 1)[:n], out=flat[offset : offset + n])
        offset += n
    return flat  # an overflow (a finite scale times 127 beyond float32) is caught after


def _decode_topk(header: FrameHeader, raw: bytes) -> np.ndarray:
    flat = np.zeros(_numel(header), dtype=np.float32)
    offset = 0
    for entry in header.tensors:
        values = _part(raw, entry, "values", "<f2")  # (k,)
        indices = np.cumsum(_part(raw, entry, "indices", "<u4"), dtype=np.int64)  # ascending
        numel = math.prod(entry.shape)
        if indices.size and (bool((np.diff(indices) <= 0).any()) or indices[-1] >= numel):
            raise MalformedFrame(f"{entry.name}: top-k indices must increase and stay below "
                                 f"{numel}")
        flat[offset + indices] = values
        offset += numel
    return flat


_DECODERS: dict[str, Decoder] = {
    "fp32": _decode_fp32,
    "fp16": _decode_fp16,
    "bf16": _decode_bf16,
    "int8": _decode_int8,
    "topk": _decode_topk,
}


def _split(header: FrameHeader, flat: torch.Tensor) -> Iterable[tuple[str, torch.Tensor]]:
    """(name, tensor) per entry: views of ``flat`` reshaped, in the original dtype."""
    offset = 0
    for entry in header.tensors:
        numel = math.prod(entry.shape)
        tensor = flat[offset : offset + numel].view(entry.shape)
        offset += numel
        if entry.dtype != "float32":
            tensor = tensor.to(_DTYPES[entry.dtype])
            if not bool(torch.isfinite(tensor).all()):  # e.g. beyond float16's range
                raise NonFiniteValues(f"{entry.name}: decoded values contain NaN or Inf")
        yield entry.name, tensor


def _first_non_finite(header: FrameHeader, flat: np.ndarray) -> str:
    """The name of the first tensor with a NaN or Inf in ``flat`` (for the error message)."""
    offset = 0
    for entry in header.tensors:
        numel = math.prod(entry.shape)
        if not np.isfinite(flat[offset : offset + numel]).all():
            return entry.name
        offset += numel
    return "frame"


# ------------------------------------------------------------------- device-side error feedback


class ErrorFeedback:
    """Residual memory for a lossy scheme, kept on the DEVICE (error-feedback SGD).

    ``compress(delta)`` adds last round's residual to ``delta``, returns exactly what the cloud
    will decode from ``encode(sent, scheme)``, and keeps ``corrected − sent`` for next time, so
    the sum of what was sent tracks the sum of the true deltas. Persist it with
    ``state_dict()`` (plain float32 tensors, safetensors-friendly) and ``load_state_dict``.
    """

    def __init__(self, scheme: Scheme) -> None:
        self.scheme = scheme.model_copy(update={"zstd": False})  # zstd is lossless: skip it here
        self._residual: AdapterState = {}

    def compress(self, delta: AdapterState) -> AdapterState:
        """The state to send this round (encode it with the same scheme); updates the residual."""
        self._check_matches(delta)
        corrected = {k: v.detach().float() + self._residual.get(k, 0.0) for k, v in delta.items()}
        sent = roundtrip(corrected, self.scheme)
        self._residual = {k: corrected[k] - sent[k].float() for k in corrected}
        return sent

    def _check_matches(self, delta: AdapterState) -> None:
        if self._residual and set(self._residual) != set(delta):
            raise ValueError(f"delta keys {sorted(delta)} differ from {sorted(self._residual)}")
        for key, residual in self._residual.items():
            if tuple(delta[key].shape) != tuple(residual.shape):
                shapes = (tuple(delta[key].shape), tuple(residual.shape))
                raise ValueError(
                    f"{key}: delta shape {shapes[0]} differs from residual {shapes[1]}"
                )

    def reset(self) -> None:
        """Forget the residual (e.g. after the adapter layout changed)."""
        self._residual = {}

    def state_dict(self) -> AdapterState:
        """The residual as plain float32 tensors keyed like the delta (empty before round 1)."""
        return {k: v.clone() for k, v in self._residual.items()}

    def load_state_dict(self, state: AdapterState) -> None:
        """Restore a residual saved by ``state_dict``; it must be finite float tensors."""
        for key, value in dict(state).items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise ValueError(f"residual {key!r}: expected a float tensor, got {value!r:.80}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"residual {key!r}: contains NaN or Inf")
        self._residual = {k: v.detach().float().clone() for k, v in state.items()}


def roundtrip(state: AdapterState, scheme: Scheme) -> AdapterState:
    """``decode(encode(state, scheme))``: what a receiver gets (trusted local bytes, no caps)."""
    frame = encode(state, scheme)
    return decode(frame, max_bytes=_UNLIMITED, max_decoded_bytes=_UNLIMITED)


def compression_report(state: AdapterState, schemes: Iterable[Scheme]) -> list[dict]:
    """Frame bytes, ratio to raw fp32 and reconstruction error of ``state`` per scheme."""
    original = torch.cat(
        [v.detach().double().reshape(-1) for v in state.values()]
        or [torch.zeros(0, dtype=torch.float64)]
    )
    norm = float(original.norm())
    rows = []
    for scheme in schemes:
        frame = encode(state, scheme)
        decoded = decode(frame, max_bytes=_UNLIMITED, max_decoded_bytes=_UNLIMITED)
        error = torch.cat(
            [(decoded[k].double() - v.double()).reshape(-1) for k, v in state.items()]
            or [torch.zeros(0, dtype=torch.float64)]
        )
        rows.append(
            {
                "scheme": scheme.label(),
                "bytes": len(frame),
                "ratio_vs_fp32": 4 * original.numel() / len(frame),
                "rel_error": float(error.norm()) / norm if norm > 0 else 0.0,
                "max_abs_error": float(error.abs().max()) if error.numel() else 0.0,
            }
        )
    return rows
