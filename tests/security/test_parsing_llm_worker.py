"""The real LLM worker behind a real Mosquitto, fed by a hostile device: no request ends it,
every refusal is answered with a code, an over-budget request is refused before any compute,
and a device flooding it cannot starve an honest one."""

from __future__ import annotations

import time

import pytest
import torch

from shared import topics
from shared.messages import LLMRequest, LLMResponse, pack, pack_tensors, unpack
from shared.mqtt import MqttClient, request_properties
from tests.brokers import MosquittoBroker
from tests.llm_helpers import BASE_VERSION, start_worker, step_inputs, stop_worker
from tests.security.hostile import (
    EXOTIC_DTYPES,
    deep_header,
    envelope,
    retyped_tensors,
)


class RawDevice:
    """A device publishing raw request bytes and collecting the answers by request id."""

    def __init__(self, broker: MosquittoBroker, device: str) -> None:
        self.device = device
        # the broker binds a device's client id to its identity: it connects as itself
        self.client: MqttClient = broker.connect(device, client_id=device)
        self.inbox = self.client.subscribe(topics.llm_responses(device))
        self.answers: dict[str, tuple[float, LLMResponse]] = {}

    def send(self, payload: bytes, request_id: str) -> None:
        props = request_properties(topics.llm_responses(self.device), request_id.encode())
        self.client.publish(topics.llm_requests(self.device), payload, max_bytes=2**23,
                            properties=props)

    def collect(self, count: int, timeout: float = 30.0) -> dict[str, tuple[float, LLMResponse]]:
        deadline = time.monotonic() + timeout
        while len(self.answers) < count and time.monotonic() < deadline:
            got = self.inbox.get(timeout=0.2)
            if got is not None:
                response, _ = unpack(got.payload, LLMResponse)
                assert got.correlation_data is not None
                self.answers[got.correlation_data.decode()] = (got.received_at, response)
        return self.answers


def _request(request_id: str, rows: int = 2, length: int = 6, tensors: bytes | None = None,
             dtype: torch.dtype = torch.float32) -> bytes:
    embeds, mask, labels = step_inputs(rows, length)
    part = tensors if tensors is not None else pack_tensors(
        {"inputs_embeds": embeds.to(dtype), "attention_mask": mask, "labels": labels})
    return pack(LLMRequest(request_id=request_id, op="step", base_version=BASE_VERSION),
                {"tensors": part})


def _codes(answers: dict[str, tuple[float, LLMResponse]]) -> dict[str, str | None]:
    return {rid: (r.error.code if r.error else None) for rid, (_, r) in answers.items()}


def test_hostile_requests_are_answered_with_codes_and_the_worker_lives(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    worker = start_worker(llm_broker, llm)
    hostile, honest = RawDevice(llm_broker, "dev-a"), RawDevice(llm_broker, "dev-b")
    embeds, mask, labels = step_inputs(2, 6)
    tensors = {"inputs_embeds": embeds, "attention_mask": mask, "labels": labels}
    sent = {"deep-header-1": envelope(deep_header("llm.request"))}
    for dtype in EXOTIC_DTYPES:
        for name in ("inputs_embeds", "attention_mask", "labels"):
            sent[f"dtype-{dtype}-{name}"] = _request(
                "x" * 8, tensors=retyped_tensors(tensors, dtype, name))
    sent["coerced-v-true"] = envelope({"kind": "llm.request", "v": True,
                                       "request_id": "coerced-v-true", "op": "step",
                                       "base_version": BASE_VERSION})
    for rid, payload in sent.items():
        hostile.send(payload, rid)
        time.sleep(0.01)  # under the per-device queue bound, so none is refused as busy
        hostile.collect(len(hostile.answers) + 1, timeout=10)
    codes = _codes(hostile.answers)
    assert codes == dict.fromkeys(sent, "bad_request"), codes
    honest.send(_request("honest-0001"), "honest-0001")
    (_, answer), = honest.collect(1).values()
    assert answer.ok and worker.alive
    assert worker.stats.error_codes["bad_request"] == len(sent)
    stop_worker(worker)


def test_an_over_budget_request_is_refused_before_compute(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    worker = start_worker(llm_broker, llm, max_request_tokens=64)
    device = RawDevice(llm_broker, "dev-a")
    device.send(_request("heavy-00001", rows=13, length=8), "heavy-00001")  # 104 > 64
    device.send(_request("light-00001", rows=4, length=8), "light-00001")  # 32
    answers = _codes(device.collect(2))
    assert answers == {"heavy-00001": "over_budget", "light-00001": None}
    stats = worker.stats
    assert stats.rows == 4 and stats.batches == 1  # the heavy one never reached the LLM
    stop_worker(worker)


def test_a_reply_over_the_message_limit_is_refused_before_compute(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    # bfloat16 embeddings in (42 KB request), float32 input grads (13, 40, 32) out: 66,560
    # bytes, over a 64 KiB message limit
    worker = start_worker(llm_broker, llm, max_message_bytes=64 * 1024)
    device = RawDevice(llm_broker, "dev-a")
    device.send(_request("bigreply-01", rows=13, length=40, dtype=torch.bfloat16),
                "bigreply-01")
    (_, answer), = device.collect(1).values()
    assert answer.error is not None and answer.error.code == "over_budget"
    assert "reply" in answer.error.message and worker.stats.batches == 0
    stop_worker(worker)


class _SlowSteps:
    """The tiny LLM made to take 50 ms a step, as a real one takes seconds."""

    def __init__(self, llm) -> None:  # type: ignore[no-untyped-def]
        self.llm = llm

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self.llm, name)

    def loss_and_input_grads(self, *args):  # type: ignore[no-untyped-def]
        time.sleep(0.05)
        return self.llm.loss_and_input_grads(*args)


@pytest.mark.timeout(120)
def test_a_flooding_device_cannot_starve_an_honest_one(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    # One request per batch (8 rows each, 8 rows a batch): the order of service is visible.
    worker = start_worker(llm_broker, _SlowSteps(llm), max_batch_rows=8, max_wait_ms=0)
    flood, honest = RawDevice(llm_broker, "dev-a"), RawDevice(llm_broker, "dev-b")
    heavy = _request("flood-00000", rows=8, length=60)
    for i in range(30):
        flood.send(heavy.replace(b"flood-00000", f"flood-{i:05d}".encode()), f"flood-{i:05d}")
    # The flood reaches the worker before the honest requests: wait for its "busy" answers
    # (beyond 4 queued per device), which the worker sends as each request arrives.
    assert len(flood.collect(20, timeout=60)) >= 20
    sent = []
    for i in range(3):
        sent.append(time.monotonic())
        honest.send(_request(f"honest-{i:04d}", rows=8, length=8), f"honest-{i:04d}")
        honest.collect(i + 1, timeout=60)
    flood.collect(30, timeout=60)
    assert all(honest.answers[f"honest-{i:04d}"][1].ok for i in range(3))
    # While an honest request waits, the worker finishes at most the flood request it is
    # computing and the one before it in turn, never the whole flood.
    flood_done = [t for t, r in flood.answers.values() if r.ok]
    waited = [sum(1 for t in flood_done if start < t < honest.answers[f"honest-{i:04d}"][0])
              for i, start in enumerate(sent)]
    assert all(w <= 2 for w in waited), waited
    codes = _codes(flood.answers)
    assert len(codes) == 30 and set(codes.values()) <= {None, "busy"}  # every one answered
    assert list(codes.values()).count("busy") >= 15
    assert worker.alive
    stop_worker(worker)
