"""Codec: round trips per scheme, error feedback, malformed frames, and property-based fuzzing.

Hand-made frames are built from the layout in ``shared/codec.py``'s docstring (not from its
private helpers), so these tests also pin the wire format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import struct
from typing import Any, Literal

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shared.adapters import ADAPTER_KEYS
from shared.codec import (
    ChecksumMismatch,
    CodecError,
    ErrorFeedback,
    FrameTooLarge,
    MalformedFrame,
    NonFiniteValues,
    Scheme,
    ShapeMismatch,
    compression_report,
    decode,
    encode,
    frame_info,
    roundtrip,
    seal_frame,
    split_frame,
)

HEAD = struct.Struct("<4sHIQ")


def adapter_like(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"image.lora_A.weight": (4, 24), "image.lora_B.weight": (24, 4)}
    shapes |= {"text.lora_A.weight": (4, 24), "text.lora_B.weight": (24, 4)}
    assert set(shapes) == set(ADAPTER_KEYS)
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


def split(frame: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON header and the stored payload of a frame, per the documented layout."""
    _, _, header_len, _ = HEAD.unpack_from(frame)
    start = HEAD.size + 32
    return json.loads(frame[start : start + header_len]), frame[start + header_len :]


def build(header: dict[str, Any] | bytes, payload: bytes, version: int = 1) -> bytes:
    """A frame with a *valid* checksum around any header and payload."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    head = HEAD.pack(b"FNDC", version, len(raw), len(payload))
    return head + hashlib.sha256(head + raw + payload).digest() + raw + payload


def expected_shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


# ------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("use_zstd", [False, True])
def test_fp32_round_trip_is_exact(dtype: torch.dtype, use_zstd: bool) -> None:
    state = {k: v.to(dtype) for k, v in adapter_like().items()}
    state["scalar"] = torch.tensor(3.5, dtype=dtype)
    state["empty"] = torch.zeros(0, 5, dtype=dtype)
    out = decode(encode(state, Scheme(zstd=use_zstd)), expected=expected_shapes(state))
    assert list(out) == list(state)
    for key, value in state.items():
        assert out[key].dtype == dtype
        assert torch.equal(out[key], value)


def test_fp16_relative_error_is_bounded() -> None:
    state = {k: v.sign() * (v.abs() + 1e-3) for k, v in adapter_like().items()}  # normal range
    out = roundtrip(state, Scheme(kind="fp16"))
    for key, value in state.items():
        assert bool(((out[key] - value).abs() <= value.abs() * 2**-11).all())


def test_bf16_keeps_tiny_fisher_values_that_fp16_flushes() -> None:
    fisher = {"f": torch.tensor([1e-10, 3e-9, 5e-6, 1e-2])}
    bf16 = roundtrip(fisher, Scheme(kind="bf16"))["f"]
    assert bool(((bf16 - fisher["f"]).abs() <= fisher["f"] * 2**-8).all())
    assert roundtrip(fisher, Scheme(kind="fp16"))["f"][0] == 0  # the documented fp16 trap


@pytest.mark.parametrize("block", [1, 7, 64, "row"])
def test_int8_error_is_at_most_half_a_scale(block: int | Literal["row"]) -> None:
    state = adapter_like(scale=0.05)
    out = roundtrip(state, Scheme(kind="int8", block=block))
    for key, value in state.items():
        rows = value.reshape(value.shape[0], -1) if block == "row" else None
        peak = rows.abs().amax(dim=1, keepdim=True) if rows is not None else value.abs().max()
        err = (out[key] - value).reshape(value.shape[0], -1)
        assert bool((err.abs() <= peak / 254 * (1 + 1e-5) + 1e-12).all())


def test_int8_per_row_stores_one_scale_per_row() -> None:
    state = {"w": torch.randn(6, 10)}
    per_row = split(encode(state, Scheme(kind="int8", block="row")))[0]["tensors"][0]
    assert per_row["block"] == 10 and per_row["parts"]["scales"] == [60, 6 * 4]


def test_topk_keeps_the_k_largest() -> None:
    value = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.05, 4.0, 0.0, -0.01, 1.0])
    out = roundtrip({"w": value}, Scheme(kind="topk", k_fraction=0.3))["w"]
    assert torch.equal(out != 0, torch.isin(torch.arange(10), torch.tensor([1, 3, 6])))
    torch.testing.assert_close(out[[1, 3, 6]], torch.tensor([-5.0, 3.0, 4.0]))


def test_topk_frame_is_small_and_zstd_helps() -> None:
    state = {"image.lora_A.weight": torch.randn(8, 576), "image.lora_B.weight": torch.randn(576, 8)}
    plain, packed = encode(state, Scheme()), encode(state, Scheme(kind="topk", zstd=True))
    assert len(packed) * 30 < len(plain)  # 1% of the values, fp16 + gap-coded indices
    assert frame_info(packed)["scheme"]["zstd"] is True


def test_zstd_shrinks_a_compressible_state() -> None:
    state = {"w": torch.zeros(64, 64)}
    assert len(encode(state, Scheme(zstd=True))) < len(encode(state, Scheme())) // 10


def test_frame_info_reads_the_header() -> None:
    state = adapter_like()
    frame = encode(state, Scheme(kind="int8", block=32, zstd=True))
    info = frame_info(frame)
    assert info["label"] == "int8/b32+zstd3"
    assert info["frame_bytes"] == len(frame) and info["elements"] == 4 * 96
    assert [t["name"] for t in info["tensors"]] == list(state)
    assert info["tensors"][0] == {
        "name": "image.lora_A.weight",
        "dtype": "float32",
        "shape": [4, 24],
    }


def test_compression_report() -> None:
    schemes = [Scheme(), Scheme(kind="fp16"), Scheme(kind="int8"), Scheme(kind="topk", zstd=True)]
    rows = compression_report(adapter_like(), schemes)
    assert [r["scheme"] for r in rows] == ["fp32", "fp16", "int8/b64", "topk/k0.01+zstd3"]
    assert rows[0]["rel_error"] == 0.0 and rows[0]["ratio_vs_fp32"] < 1
    assert rows[1]["rel_error"] < 1e-3 < rows[2]["rel_error"] < 0.02 < rows[3]["rel_error"]
    assert rows[0]["bytes"] > rows[1]["bytes"] > rows[2]["bytes"] > rows[3]["bytes"]


# --------------------------------------------------------------------------- error feedback


def test_error_feedback_sent_sum_tracks_true_sum() -> None:
    gen = torch.Generator().manual_seed(3)
    drift = torch.randn(200, generator=gen) * 0.1  # a consistent direction, like real training
    scheme = Scheme(kind="topk", k_fraction=0.1)
    feedback = ErrorFeedback(scheme)
    true_sum, sent_sum, plain_sum = torch.zeros(200), torch.zeros(200), torch.zeros(200)
    errors = []
    for _ in range(60):
        delta = {"w": drift + torch.randn(200, generator=gen) * 0.05}
        sent = feedback.compress(delta)
        assert torch.equal(decode(encode(sent, scheme))["w"], sent["w"])  # re-encoding is exact
        true_sum += delta["w"]
        sent_sum += sent["w"]
        plain_sum += roundtrip(delta, scheme)["w"]
        errors.append(float((sent_sum - true_sum).norm() / true_sum.norm()))
        torch.testing.assert_close(
            true_sum - sent_sum, feedback.state_dict()["w"], atol=1e-4, rtol=0
        )
    # the residual stays bounded, so the relative error of the running sum decays like 1/T
    assert errors[-1] < 0.1 and errors[-1] < errors[19] / 2 < errors[9] / 2
    assert float((plain_sum - true_sum).norm() / true_sum.norm()) > 0.5  # without feedback


def test_error_feedback_state_survives_safetensors() -> None:
    scheme = Scheme(kind="int8", block=8)
    feedback = ErrorFeedback(scheme)
    assert feedback.state_dict() == {}
    feedback.compress(adapter_like(1))
    restored = ErrorFeedback(scheme)
    restored.load_state_dict(load_safetensors(save_safetensors(feedback.state_dict())))
    nxt = adapter_like(2)
    first, second = feedback.compress(nxt), restored.compress(nxt)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_error_feedback_rejects_changed_layout_and_bad_state() -> None:
    feedback = ErrorFeedback(Scheme(kind="topk"))
    feedback.compress({"w": torch.ones(4)})
    with pytest.raises(ValueError, match="differ"):
        feedback.compress({"v": torch.ones(4)})
    with pytest.raises(ValueError, match="shape"):
        feedback.compress({"w": torch.ones(5)})
    with pytest.raises(ValueError, match="NaN"):
        feedback.load_state_dict({"w": torch.tensor([float("nan")])})
    feedback.reset()
    assert feedback.compress({"v": torch.ones(3)})["v"].shape == (3,)


# ------------------------------------------------------------------------- encode refusals


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite(bad: float) -> None:
    with pytest.raises(NonFiniteValues):
        encode({"w": torch.tensor([1.0, bad])}, Scheme())


@pytest.mark.parametrize("kind", ["fp16", "topk"])
def test_encode_refuses_fp16_overflow(kind: Literal["fp16", "topk"]) -> None:
    with pytest.raises(NonFiniteValues, match="overflows fp16"):
        encode({"w": torch.tensor([1e5, 1.0])}, Scheme(kind=kind, k_fraction=1.0))


@pytest.mark.parametrize("kind", ["fp32", "bf16", "int8", "topk"])
def test_encode_refuses_values_beyond_float32(
    kind: Literal["fp32", "bf16", "int8", "topk"],
) -> None:
    with pytest.raises(NonFiniteValues, match="overflow"):
        encode({"w": torch.tensor([1e300, 1.0], dtype=torch.float64)}, Scheme(kind=kind))
    with pytest.raises(NonFiniteValues, match="overflow"):
        encode({"w": torch.tensor([3.4e38, 1.0])}, Scheme(kind="bf16"))


@pytest.mark.parametrize(
    "state", [{"w": torch.ones(2, dtype=torch.int64)}, {"": torch.ones(1)}, {"w": [1.0]}]
)
def test_encode_rejects_bad_states(state: dict) -> None:
    with pytest.raises(ValueError):
        encode(state, Scheme())


def test_encode_max_bytes() -> None:
    with pytest.raises(FrameTooLarge):
        encode(adapter_like(), Scheme(), max_bytes=1000)
    assert len(encode(adapter_like(), Scheme(kind="topk"), max_bytes=1000)) <= 1000


@pytest.mark.parametrize(
    "kwargs", [{"kind": "int4"}, {"block": 0}, {"k_fraction": 0.0}, {"zstd_level": 30}, {"x": 1}]
)
def test_scheme_validation(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Scheme(**kwargs)


# ------------------------------------------------------------------------- decode refusals


def frame_and_parts(scheme: Scheme | None = None) -> tuple[bytes, dict[str, Any], bytes]:
    frame = encode(adapter_like(), scheme or Scheme())
    header, payload = split(frame)
    return frame, header, payload


def test_decode_rejects_truncation_padding_magic_version() -> None:
    frame, header, payload = frame_and_parts()
    for bad in (frame[:10], frame[:-1], frame + b"\0", b"XXXX" + frame[4:], b""):
        with pytest.raises(MalformedFrame):
            decode(bad)
    with pytest.raises(MalformedFrame, match="version 2"):
        decode(build(header, payload, version=2))


def test_decode_rejects_corruption() -> None:
    frame = bytearray(frame_and_parts()[0])
    frame[-5] ^= 0x01
    with pytest.raises(ChecksumMismatch):
        decode(bytes(frame))
    assert frame_info(bytes(frame), verify=False)["frame_bytes"] == len(frame)


def test_decode_without_the_checksum_still_checks_everything_else() -> None:
    # verify=False is for bytes a digest already vouched for (a blob read back): the checksum
    # alone is skipped
    header, values = split_frame(encode(adapter_like(), Scheme(kind="fp32")))
    frame = bytearray(seal_frame(header, values))
    frame[-5] ^= 0x01  # a payload byte: the checksum no longer matches, the values still decode
    with pytest.raises(ChecksumMismatch):
        decode(bytes(frame))
    changed = decode(bytes(frame), verify=False)
    assert any(not torch.equal(a, b) for a, b in zip(changed.values(),
                                                     decode(seal_frame(header, values)).values(),
                                                     strict=True))
    nan = bytearray(seal_frame(header, struct.pack("<f", float("nan")) + values[4:]))
    nan[-5] ^= 0x01  # and a checksum that fails: the NaN is still found
    with pytest.raises(NonFiniteValues):
        decode(bytes(nan), verify=False)
    good = frame_and_parts()[0]
    assert all(torch.equal(a, b) for a, b in zip(decode(good, verify=False).values(),
                                                 decode(good).values(), strict=True))
    with pytest.raises(ShapeMismatch):
        decode(good, verify=False, expected={"other": (1,)})


def test_split_and_seal_follow_the_documented_layout() -> None:
    frame, header, payload = frame_and_parts(Scheme(kind="int8", zstd=True))
    raw_header, stored = split_frame(frame)
    assert json.loads(raw_header) == header and stored == payload
    assert seal_frame(raw_header, stored) == frame
    fp32_header, values = split_frame(encode(adapter_like(), Scheme(kind="fp32")))
    resealed = seal_frame(fp32_header, struct.pack("<f", float("nan")) + values[4:])
    with pytest.raises(NonFiniteValues):  # the checksum matches; the values are still checked
        decode(resealed)
    with pytest.raises(MalformedFrame):
        split_frame(frame[:20])


def test_a_cached_header_is_still_checked_against_its_payload() -> None:
    frame, header, payload = frame_and_parts(Scheme(kind="fp32"))
    decode(frame)  # the header is now cached
    with pytest.raises(MalformedFrame, match="payload of"):
        decode(build(header, payload[:-4]))
    with pytest.raises(NonFiniteValues, match=f"^{list(adapter_like())[-1]}: "):
        decode(build(header, payload[:-4] + struct.pack("<f", float("inf"))))


def test_decode_size_limits() -> None:
    frame = frame_and_parts()[0]
    with pytest.raises(FrameTooLarge):
        decode(frame, max_bytes=len(frame) - 1)
    assert decode(frame, max_bytes=len(frame))
    sparse = encode({"w": torch.zeros(1000, 1000)}, Scheme(kind="topk", k_fraction=1e-6))
    assert len(sparse) < 1000
    with pytest.raises(FrameTooLarge, match="decoded tensors"):
        decode(sparse, max_decoded_bytes=1_000_000)


def test_decode_checks_expected_shapes() -> None:
    frame = frame_and_parts()[0]
    good = expected_shapes(adapter_like())
    with pytest.raises(ShapeMismatch, match="expected shape"):
        decode(frame, expected={**good, "text.lora_B.weight": (4, 24)})
    with pytest.raises(ShapeMismatch, match="missing"):
        decode(frame, expected={**good, "extra": (1,)})


def test_decode_rejects_a_zip_bomb() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\0" * 50_000_000)
    header = {
        "scheme": {"kind": "fp32", "zstd": True},
        "raw_bytes": 16,
        "tensors": [{"name": "w", "dtype": "float32", "shape": [4], "parts": {"values": [0, 16]}}],
    }
    with pytest.raises(MalformedFrame, match="decompresses to"):
        decode(build(header, bomb))
    big = {
        "name": "w",
        "dtype": "float32",
        "shape": [12_500_000],
        "parts": {"values": [0, 50_000_000]},
    }
    honest = build({**header, "raw_bytes": 50_000_000, "tensors": [big]}, bomb)
    with pytest.raises(FrameTooLarge, match="raw payload"):  # checked before decompressing
        decode(honest, max_bytes=1_000_000)


def test_decode_rejects_unknown_scheme_and_inconsistent_headers() -> None:
    _, header, payload = frame_and_parts()
    tensor = header["tensors"][0]
    bad_headers = [
        {**header, "scheme": {"kind": "int4"}},
        {**header, "extra": 1},
        {**header, "raw_bytes": header["raw_bytes"] + 4},
        {**header, "tensors": [{**tensor, "shape": [4, 25]}, *header["tensors"][1:]]},
        {**header, "tensors": [{**tensor, "parts": {"values": [4, 384]}}, *header["tensors"][1:]]},
        {**header, "tensors": [{**tensor, "dtype": "int8"}, *header["tensors"][1:]]},
        {**header, "tensors": [tensor, tensor, *header["tensors"][2:]]},
        {**header, "tensors": [{**tensor, "k": 3}, *header["tensors"][1:]]},
    ]
    for bad in bad_headers:
        with pytest.raises(MalformedFrame):
            decode(build(bad, payload))
    for raw in (b"not json", b"\xff\xfe", b"[" * 10_000, b"{}", b"null"):
        with pytest.raises(MalformedFrame):
            decode(build(raw, payload))


def test_decode_rejects_non_finite_payloads() -> None:
    header = {
        "scheme": {"kind": "fp32"},
        "raw_bytes": 8,
        "tensors": [{"name": "w", "dtype": "float32", "shape": [2], "parts": {"values": [0, 8]}}],
    }
    with pytest.raises(NonFiniteValues):
        decode(build(header, struct.pack("<2f", 1.0, float("nan"))))
    int8: dict[str, Any] = {
        "scheme": {"kind": "int8"},
        "raw_bytes": 6,
        "tensors": [
            {
                "name": "w",
                "dtype": "float32",
                "shape": [2],
                "block": 2,
                "parts": {"values": [0, 2], "scales": [2, 4]},
            }
        ],
    }
    with pytest.raises(NonFiniteValues, match="scales"):
        decode(build(int8, b"\x01\x02" + struct.pack("<f", -1.0)))
    with pytest.raises(NonFiniteValues):  # a finite scale whose product overflows float16
        decode(
            build(
                {**int8, "tensors": [{**int8["tensors"][0], "dtype": "float16"}]},
                b"\x7f\x02" + struct.pack("<f", 1e4),
            )
        )


@pytest.mark.parametrize("gaps", [[3, 0], [0, 5], [9, 1]])
def test_decode_rejects_bad_topk_indices(gaps: list[int]) -> None:
    header = {
        "scheme": {"kind": "topk"},
        "raw_bytes": 12,
        "tensors": [
            {
                "name": "w",
                "dtype": "float32",
                "shape": [5],
                "k": 2,
                "parts": {"values": [0, 4], "indices": [4, 8]},
            }
        ],
    }
    payload = struct.pack("<2e", 1.0, 2.0) + struct.pack("<2I", *gaps)
    with pytest.raises(MalformedFrame, match="indices"):
        decode(build(header, payload))


def test_decode_refuses_non_bytes() -> None:
    with pytest.raises(MalformedFrame):
        decode("FNDC...")  # type: ignore[arg-type]


# ------------------------------------------------------------------------- property-based

SCHEMES = [
    Scheme(),
    Scheme(kind="fp16"),
    Scheme(kind="bf16", zstd=True),
    Scheme(kind="int8", block=5),
    Scheme(kind="int8", block="row", zstd=True),
    Scheme(kind="topk", k_fraction=0.2),
    Scheme(kind="topk", k_fraction=0.5, zstd=True),
]
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)
values = st.floats(-1e4, 1e4, allow_nan=False, allow_subnormal=False, width=32)


@st.composite
def states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(st.lists(st.text("abc.", min_size=1, max_size=6), max_size=4, unique=True))
    state = {}
    for name in names:
        shape = draw(shapes)
        flat = draw(
            st.lists(
                values,
                min_size=int(torch.Size(shape).numel()),
                max_size=int(torch.Size(shape).numel()),
            )
        )
        state[name] = torch.tensor(flat, dtype=torch.float32).reshape(shape)
    return state


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=states(), scheme=st.sampled_from(SCHEMES))
def test_round_trip_property(state: dict[str, torch.Tensor], scheme: Scheme) -> None:
    out = decode(encode(state, scheme), expected=expected_shapes(state))
    assert list(out) == list(state)
    for key, value in state.items():
        peak = float(value.abs().max()) if value.numel() else 0.0
        err = float((out[key] - value).abs().max()) if value.numel() else 0.0
        bound = {
            "fp32": 0.0,
            "fp16": peak * 2**-11 + 2**-24,
            "bf16": peak * 2**-8,
            "int8": peak / 254 * 1.0001,
            "topk": peak,
        }[scheme.kind]
        assert err <= bound + 1e-30


@settings(max_examples=150, deadline=2000)
@given(
    scheme=st.sampled_from(SCHEMES),
    flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4),
)
def test_byte_flips_always_raise_codec_errors(scheme: Scheme, flips: list) -> None:
    frame = bytearray(encode(adapter_like(), scheme))
    for position, mask in {p % len(frame): m for p, m in flips}.items():  # distinct positions
        frame[position] ^= mask
    with pytest.raises(CodecError):
        decode(bytes(frame))


@settings(max_examples=100, deadline=2000)
@given(scheme=st.sampled_from(SCHEMES), cut=st.integers(0, 10**9), extra=st.binary(max_size=8))
def test_truncation_and_padding_always_raise(scheme: Scheme, cut: int, extra: bytes) -> None:
    frame = encode(adapter_like(), scheme)
    with pytest.raises(CodecError):
        decode(frame[: cut % len(frame)])
    if extra:
        with pytest.raises(CodecError):
            decode(frame + extra)


@settings(max_examples=150, deadline=2000)
@given(data=st.binary(max_size=300))
def test_random_bytes_raise_codec_errors(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)
    with pytest.raises(CodecError):
        decode(b"FNDC\x01\x00" + data)


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=8),
)
json_values = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=st.sampled_from(SCHEMES), data=st.data())
def test_forged_headers_with_valid_checksums_only_raise_codec_errors(
    scheme: Scheme, data: st.DataObject
) -> None:
    """An attacker can recompute sha256: every header field must be validated on its own."""
    header, payload = split(encode(adapter_like(), scheme))
    index = data.draw(st.integers(0, len(header["tensors"]) - 1))
    tensor = header["tensors"][index]
    field = data.draw(st.sampled_from([*tensor, "raw_bytes", "scheme.kind", "scheme.block"]))
    value = data.draw(json_values | st.integers(-5, 10**6))
    if field == "raw_bytes":
        header["raw_bytes"] = value
    elif field.startswith("scheme."):
        header["scheme"][field[7:]] = value
    else:
        header["tensors"][index] = {**tensor, field: value}
    with contextlib.suppress(CodecError):
        decode(build(header, payload))


@settings(max_examples=150, deadline=2000)
@given(scheme=st.sampled_from([s for s in SCHEMES if not s.zstd]), data=st.data())
def test_forged_payloads_with_valid_checksums_only_raise_codec_errors(
    scheme: Scheme, data: st.DataObject
) -> None:
    """Random payload bytes (NaN patterns, bad scales, bad indices) under a genuine header."""
    header, payload = split(encode(adapter_like(), scheme))
    forged = data.draw(st.binary(min_size=len(payload), max_size=len(payload)))
    try:
        out = decode(build(header, forged))
    except CodecError:
        return
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


@pytest.mark.parametrize("spec", ["fp32", "fp16+zstd9", "bf16", "int8/b128+zstd3", "int8/brow",
                                  "topk/k0.05+zstd3"])
def test_scheme_parse_is_the_inverse_of_label(spec: str) -> None:
    scheme = Scheme.parse(spec)
    assert scheme.label() == spec and Scheme.parse(scheme.label()) == scheme


@pytest.mark.parametrize(("spec", "problem"), [
    ("int9", "kind"), ("topk/b3", "does not apply"), ("int8/bx", "whole number"),
    ("fp16+lz4", "only '\\+zstd"), ("topk/k2", "k_fraction"), ("topk/kx", "top-k fraction"),
])
def test_scheme_parse_names_the_problem(spec: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Scheme.parse(spec)
