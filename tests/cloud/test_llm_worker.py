"""The LLM worker: batching maths on a tiny LLM, then the real worker behind a real Mosquitto."""

from __future__ import annotations

import threading

import pytest
import torch

from cloud.llm_worker import Job, run_score, run_step
from edge.remote_llm import RemoteLLM, RemoteLLMError
from shared import activations, topics
from shared.messages import LLMRequest, LLMResponse, pack, pack_tensors, unpack
from shared.mqtt import request_properties
from tests.llm_helpers import (
    BASE_VERSION,
    assert_same,
    start_worker,
    step_inputs,
    stop_worker,
)

RTOL = 1e-5  # losses: float32 rounding (see assert_same for tensors)


def _job(op: str, embeds: torch.Tensor, mask: torch.Tensor,
         labels: torch.Tensor | None) -> Job:
    return Job(f"req-{embeds.shape[0]}-{embeds.shape[1]}", op, "unused", None, embeds, mask,
               labels)


def _shapes() -> list[tuple[int, int]]:
    return [(1, 7), (3, 12), (2, 5), (4, 9)]  # (B, L) per request: different B and L


# --- batching maths -----------------------------------------------------------------------------


def test_batched_step_equals_each_request_alone(tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    inputs = [step_inputs(b, n, seed=i) for i, (b, n) in enumerate(_shapes())]
    batched = run_step(llm, [_job("step", *x) for x in inputs])
    for (embeds, mask, labels), got in zip(inputs, batched, strict=True):
        alone = llm.loss_and_input_grads(embeds, mask, labels)
        assert got.input_grads.shape == embeds.shape
        assert_same(got.sample_losses, alone.sample_losses)
        assert got.loss == pytest.approx(alone.loss, rel=RTOL)
        assert_same(got.input_grads, alone.input_grads)
        assert got.input_grads.abs().sum() > 0


def test_batched_score_equals_each_request_alone(tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    inputs = [step_inputs(b, n, seed=i) for i, (b, n) in enumerate(_shapes())]
    batched = run_score(llm, [_job("score", e, m, None) for e, m, _ in inputs])
    for (embeds, mask, _), got in zip(inputs, batched, strict=True):
        assert_same(got, llm.score(embeds, mask))


def test_a_single_request_is_bit_identical(tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    embeds, mask, labels = step_inputs(3, 8)
    (got,) = run_step(llm, [_job("step", embeds, mask, labels)])
    alone = llm.loss_and_input_grads(embeds, mask, labels)
    assert torch.equal(got.input_grads, alone.input_grads) and got.loss == alone.loss


# --- through the broker -------------------------------------------------------------------------


def _remote(broker, device: str, **kwargs) -> RemoteLLM:  # type: ignore[no-untyped-def]
    # Exact fp32 unless a test says otherwise: these tests are about the transport, and exact
    # tensors make bit-equality with the in-process LLM the check (the compressed encodings,
    # the product's default among them, have tests of their own).
    kwargs.setdefault("encoding", "fp32")
    kwargs.setdefault("timeout_s", 5.0)
    return RemoteLLM(broker.connect(device), device_id=device, base_version=BASE_VERSION,
                     **kwargs)


def test_step_and_score_through_the_worker_equal_in_process(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    worker = start_worker(llm_broker, llm)
    remote = _remote(llm_broker, "dev-a")
    embeds, mask, labels = step_inputs(3, 10)
    got, want = remote.loss_and_input_grads(embeds, mask, labels), llm.loss_and_input_grads(
        embeds, mask, labels)
    assert got.loss == want.loss  # alone in its batch: bit-identical
    assert torch.equal(got.sample_losses, want.sample_losses)
    assert torch.equal(got.input_grads, want.input_grads)
    assert torch.equal(remote.score(embeds, mask), llm.score(embeds, mask))
    stats = worker.stats
    assert (stats.requests, stats.rows, stats.batches, stats.errors) == (2, 6, 2, 0)
    stop_worker(worker)


def test_concurrent_devices_are_batched_and_each_gets_its_own(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    worker = start_worker(llm_broker, llm, max_wait_ms=500, max_batch_rows=64)
    devices = ["dev-a", "dev-b", "dev-c", "dev-d"]
    remotes = {d: _remote(llm_broker, d) for d in devices}
    inputs = {d: step_inputs(b, n, seed=i) for i, (d, (b, n)) in
              enumerate(zip(devices, _shapes(), strict=True))}
    results: dict[str, object] = {}
    barrier = threading.Barrier(len(devices))

    def call(device: str) -> None:
        barrier.wait()
        results[device] = remotes[device].loss_and_input_grads(*inputs[device])

    threads = [threading.Thread(target=call, args=(d,)) for d in devices]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for device in devices:
        got, want = results[device], llm.loss_and_input_grads(*inputs[device])
        assert_same(got.input_grads, want.input_grads)  # type: ignore[attr-defined]
        assert_same(got.sample_losses, want.sample_losses)  # type: ignore[attr-defined]
        assert got.loss == pytest.approx(want.loss, rel=RTOL)  # type: ignore[attr-defined]
    stats = worker.stats
    assert stats.requests == 4 and stats.errors == 0
    assert stats.max_batch_requests >= 3 and stats.batches <= 2  # requests shared a forward
    stop_worker(worker)


def test_rows_limit_splits_batches(llm_broker, tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    worker = start_worker(llm_broker, llm, max_wait_ms=300, max_batch_rows=4)
    remotes = [_remote(llm_broker, d) for d in ("dev-a", "dev-b", "dev-c")]
    inputs = [step_inputs(3, 6, seed=i) for i in range(3)]
    threads = [threading.Thread(target=r.loss_and_input_grads, args=x)
               for r, x in zip(remotes, inputs, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    stats = worker.stats
    assert (stats.requests, stats.rows, stats.batches) == (3, 9, 3)  # 3 + 3 > 4 rows
    stop_worker(worker)


# --- bad requests -------------------------------------------------------------------------------


def _raw_request(broker, device: str, payload: bytes,  # type: ignore[no-untyped-def]
                 request_id: str = "raw-request-1", response_topic: str | None = None
                 ) -> LLMResponse:
    """Publish ``payload`` as a request of ``device`` and return the worker's answer."""
    client = broker.connect(device)  # its client id is bound to its device id
    inbox = client.subscribe(topics.llm_responses(device))
    props = request_properties(response_topic or topics.llm_responses(device),
                               request_id.encode())
    client.publish(topics.llm_requests(device), payload, max_bytes=2**23, properties=props)
    got = inbox.get(timeout=20)
    assert got is not None, "the worker did not answer"
    assert got.correlation_data == request_id.encode()
    response, parts = unpack(got.payload, LLMResponse)
    assert parts == {}
    client.close()
    return response


def _envelope(embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None,
              base: str = BASE_VERSION, request_id: str = "raw-request-1") -> bytes:
    tensors = {"inputs_embeds": embeds, "attention_mask": mask}
    if labels is not None:
        tensors["labels"] = labels
    request = LLMRequest(request_id=request_id, op="step" if labels is not None else "score",
                         base_version=base)
    return pack(request, {"tensors": pack_tensors(tensors)})


def test_bad_requests_get_error_replies_and_the_worker_goes_on(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    worker = start_worker(llm_broker, llm, max_message_bytes=256 * 1024)
    remote = _remote(llm_broker, "dev-a", max_message_bytes=2**23)
    embeds, mask, labels = step_inputs(2, 6)
    nan = embeds.clone()
    nan[0, 1, 2] = float("nan")
    cases = [  # (inputs, code, words the message must contain)
        ((nan, mask, labels), "bad_request", "NaN"),
        ((embeds[..., :16], mask, labels), "bad_request", "(B, L, 32)"),
        (step_inputs(1, 600), "bad_request", "600 tokens exceeds the limit of 512"),
        (step_inputs(30, 512), "too_large", "exceeds the limit of 262,144"),
        ((embeds, mask, torch.full_like(labels, -100)), "bad_request", "answer token"),
    ]
    for inputs, code, words in cases:
        with pytest.raises(RemoteLLMError) as info:
            remote.loss_and_input_grads(*inputs)
        assert (info.value.code, words in info.value.message) == (code, True), info.value
    wrong_base = RemoteLLM(remote.client, device_id="dev-a", base_version="other-base")
    with pytest.raises(RemoteLLMError, match="serves base 'test-base-0001'") as info:
        wrong_base.score(embeds, mask)
    assert info.value.code == "base_mismatch"
    garbage = _raw_request(llm_broker, "dev-b", b"not an envelope at all")
    assert garbage.error is not None and garbage.error.code == "bad_request"
    assert "does not start with" in garbage.error.message
    assert garbage.request_id == "raw-request-1"  # taken from the correlation data
    # Says int8 but sends fp32 parts; then a frame whose declared shape exceeds the budget.
    mislabelled = pack(LLMRequest(request_id="raw-request-2", op="step",
                                  base_version=BASE_VERSION, encoding="int8+zstd"),
                       {"tensors": pack_tensors({"inputs_embeds": embeds,
                                                 "attention_mask": mask, "labels": labels})})
    answer = _raw_request(llm_broker, "dev-b", mislabelled, "raw-request-2")
    assert answer.error is not None and "unexpected ['inputs_embeds']" in answer.error.message
    huge = torch.zeros(64, 512, 32)  # compresses to almost nothing, decodes to 4 MiB
    bomb = pack(LLMRequest(request_id="raw-request-3", op="score", base_version=BASE_VERSION,
                           encoding="int8+zstd"),
                activations.pack({"inputs_embeds": huge},
                                 {"attention_mask": torch.ones(64, 512, dtype=torch.long)},
                                 "int8+zstd"))
    answer = _raw_request(llm_broker, "dev-b", bomb, "raw-request-3")
    assert answer.error is not None and "decoded tensors need" in answer.error.message
    result = remote.loss_and_input_grads(embeds, mask, labels)  # still serving
    assert_same(result.input_grads, llm.loss_and_input_grads(embeds, mask, labels).input_grads)
    stats = worker.stats
    assert stats.errors == 9 and stats.error_codes["bad_request"] == 7
    assert stats.error_codes["too_large"] == 1 and stats.error_codes["base_mismatch"] == 1
    stop_worker(worker)


def test_response_topic_must_be_the_devices_own(  # type: ignore[no-untyped-def]
        llm_broker, tiny_llm) -> None:
    _, llm = tiny_llm
    worker = start_worker(llm_broker, llm)
    victim = llm_broker.connect("dev-b")
    spy = victim.subscribe(topics.llm_responses("dev-b"))
    payload = _envelope(*step_inputs(1, 4))
    response = _raw_request(llm_broker, "dev-a", payload,
                            response_topic=topics.llm_responses("dev-b"))
    assert response.error is not None and "the device's own" in response.error.message
    assert spy.get(timeout=0.5) is None
    stop_worker(worker)


def test_two_workers_share_the_requests(llm_broker, tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    workers = [start_worker(llm_broker, llm, worker_id=w) for w in ("w1", "w2")]
    remotes = [_remote(llm_broker, d) for d in ("dev-a", "dev-b")]
    embeds, mask, labels = step_inputs(2, 6)
    want = llm.loss_and_input_grads(embeds, mask, labels)
    for i in range(12):
        got = remotes[i % 2].loss_and_input_grads(embeds, mask, labels)
        assert torch.equal(got.input_grads, want.input_grads)
    served = [w.stats.requests for w in workers]
    assert sum(served) == 12 and min(served) > 0, served
    for worker in workers:
        stop_worker(worker)
