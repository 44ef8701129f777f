"""Strict, bounded parsing of what devices send (``shared.messages``): every hostile input is a
``MalformedMessage`` naming the problem, never a ``RecursionError``, a coerced value or NaN."""

from __future__ import annotations

import json

import pytest
import torch

from shared.messages import (
    LLMRequest,
    MalformedMessage,
    Presence,
    UpdateMessage,
    from_json,
    unpack,
    unpack_tensors,
)
from tests.security.hostile import EXOTIC_DTYPES, deep_header, deep_json, envelope, retyped_tensors

UPDATE = {"kind": "update", "update_id": "upd-00000001", "task_id": "task-1-abc",
          "round_id": 1, "global_version": 1, "base_version": "b", "n_samples": 10,
          "metrics": {"loss": 0.5}}


def _update(**fields: object) -> bytes:
    return envelope({**UPDATE, **fields})


def test_a_good_update_header_parses() -> None:
    message, parts = unpack(_update(), UpdateMessage)
    assert message.n_samples == 10 and parts == {}


@pytest.mark.parametrize("kind, model", [("update", UpdateMessage), ("llm.request", LLMRequest)])
def test_deep_nesting_is_refused_before_parsing(kind: str, model: type) -> None:
    with pytest.raises(MalformedMessage, match="nests deeper"):
        unpack(envelope(deep_header(kind, depth=100_000)), model)


@pytest.mark.parametrize("fields", [
    {"v": True}, {"n_samples": "100"}, {"n_samples": 10.0}, {"round_id": "1"},
    {"round_id": True}, {"global_version": 2**63}, {"round_id": 2**63},
    {"n_samples": 2**64}, {"n_samples": 10**30}, {"metrics": {"loss": "0.5"}},
], ids=lambda f: json.dumps(f)[:40])
def test_coercion_and_out_of_range_integers_are_refused(fields: dict) -> None:
    with pytest.raises(MalformedMessage):
        unpack(_update(**fields), UpdateMessage)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_metrics_are_refused(literal: bytes) -> None:
    raw = json.dumps({**UPDATE, "parts": []}).encode().replace(b"0.5", literal)
    with pytest.raises(MalformedMessage):
        unpack(envelope(raw), UpdateMessage)


@pytest.mark.parametrize("text", ['"\\ud800"', '"a\\u0000b"'])
def test_strings_no_database_can_store_are_refused(text: str) -> None:
    raw = json.dumps({**UPDATE, "parts": []}).replace('"b"', text).encode()
    with pytest.raises(MalformedMessage):
        unpack(envelope(raw), UpdateMessage)


@pytest.mark.parametrize("dtype", EXOTIC_DTYPES)
def test_tensor_dtypes_outside_the_whitelist_are_refused_from_the_header(dtype: str) -> None:
    tensors = {"inputs_embeds": torch.zeros(1, 2, 4), "attention_mask": torch.ones(1, 2)}
    data = retyped_tensors(tensors, dtype, "attention_mask")
    with pytest.raises(MalformedMessage, match="dtype"):
        unpack_tensors(data, ("inputs_embeds", "attention_mask"))


def _presence(capabilities: object) -> bytes:
    return json.dumps({"kind": "presence", "device_id": "dev-a", "state": "online",
                       "capabilities": capabilities}).encode()


def test_presence_capabilities_are_bounded() -> None:
    assert from_json(_presence({"samples": 10, "codecs": ["fp32"]}), Presence)
    with pytest.raises(MalformedMessage, match="nests deeper"):
        from_json(_presence({"x": json.loads(deep_json(900))}), Presence)  # the raw check
    with pytest.raises(MalformedMessage, match="capabilities nest"):
        from_json(_presence({"a": {"b": {"c": {"d": {}}}}}), Presence)
    with pytest.raises(MalformedMessage, match="bytes as JSON"):
        from_json(_presence({f"k{i}": "x" * 100 for i in range(100)}), Presence)
