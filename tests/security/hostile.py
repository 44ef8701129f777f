"""What a hostile device sends, built byte by byte: envelopes whose headers the models would
never produce, and safetensors parts with any dtype string in their header."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable

import torch

from shared.messages import ENVELOPE_MAGIC, pack_tensors

# safetensors dtypes torch has no finite/compare kernels for on CPU (the worker died on them)
EXOTIC_DTYPES = ("U16", "U32", "U64", "F8_E4M3", "F8_E5M2")
_ITEMSIZE = {"U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def envelope(header: bytes | dict, parts: dict[str, bytes] | None = None) -> bytes:
    """An FNM1 envelope with ``header`` as given (raw bytes are used as they are)."""
    parts = parts or {}
    if isinstance(header, dict):
        header = json.dumps({**header, "parts": [[n, len(d)] for n, d in parts.items()]}
                            ).encode()
    return b"".join([struct.pack("<4sI", ENVELOPE_MAGIC, len(header)), header,
                     *parts.values()])


def deep_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_header(kind: str, depth: int = 5000) -> bytes:
    """A header whose one extra field nests ``depth`` arrays (valid JSON)."""
    return (f'{{"kind":"{kind}","x":{deep_json(depth)},"parts":[]}}').encode()


def retyped_tensors(tensors: dict[str, torch.Tensor], dtype: str, name: str) -> bytes:
    """safetensors bytes of ``tensors`` where ``name`` claims ``dtype`` (its bytes resized to
    fit), as a device could write them."""
    data = pack_tensors(tensors)
    (size,) = struct.unpack_from("<Q", data)
    header = json.loads(data[8:8 + size])
    blobs = {k: data[8 + size + v["data_offsets"][0]:8 + size + v["data_offsets"][1]]
             for k, v in header.items() if k != "__metadata__"}
    numel = 1
    for d in header[name]["shape"]:
        numel *= d
    blobs[name] = bytes(numel * _ITEMSIZE.get(dtype, 4))
    header[name]["dtype"] = dtype
    offset, out = 0, {}
    for key in [k for k in header if k != "__metadata__"]:
        out[key] = {**header[key], "data_offsets": [offset, offset + len(blobs[key])]}
        offset += len(blobs[key])
    raw = json.dumps(out).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(blobs[k] for k in out)


def rewrite_header(payload: bytes, edit: Callable[[bytes], bytes]) -> bytes:
    """``payload`` (an envelope) with its header bytes passed through ``edit``, parts kept."""
    (size,) = struct.unpack_from("<I", payload, 4)
    header = edit(payload[8:8 + size])
    return struct.pack("<4sI", ENVELOPE_MAGIC, len(header)) + header + payload[8 + size:]
