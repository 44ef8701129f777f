"""RemoteLLM: the LLMBackend a device uses, against a real Mosquitto and the real LLM worker."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from edge.remote_llm import RemoteLLM, RemoteLLMError, RemoteLLMStopped, RemoteLLMTimeout
from edge.trainer import train_step
from shared import topics
from shared.activations import WireBackend
from shared.backend import CountingBackend
from shared.messages import LLMRequest, LLMResponse, MessageTooLarge, pack, unpack
from shared.mqtt import Inbox, PublishError, SubscribeError, reply_properties
from shared.prompts import PromptTemplate, collate
from tests.llm_helpers import BASE_VERSION, start_worker, step_inputs, stop_worker


def _remote(broker, device: str = "dev-a", **kwargs) -> RemoteLLM:  # type: ignore[no-untyped-def]
    # Exact fp32 unless a test says otherwise: these tests are about the transport, and exact
    # tensors make bit-equality with the in-process LLM the check (the compressed encodings,
    # the product's default among them, have tests of their own).
    kwargs.setdefault("encoding", "fp32")
    kwargs.setdefault("timeout_s", 10.0)
    return RemoteLLM(broker.connect(device), device_id=device, base_version=BASE_VERSION,
                     **kwargs)


def test_a_train_step_through_the_broker_equals_in_process(  # type: ignore[no-untyped-def]
        broker, tiny_llm, tiny_edge, word_tokenizer) -> None:
    _, llm = tiny_llm
    worker = start_worker(broker, llm)
    remote = _remote(broker)
    batch = collate(word_tokenizer, PromptTemplate(), ["what colour?", "which one is it?"],
                    ["red", "big blue"], 2)
    visual = torch.randn(2, 2, 32)
    edges = {"local": tiny_edge, "remote": copy.deepcopy(tiny_edge)}
    for edge in edges.values():
        torch.nn.init.normal_(edge.adapters.text.lora_B.weight, std=0.1)  # non-zero grads
    edges["remote"].load_state_dict(edges["local"].state_dict())
    losses = {}
    for name, backend in (("local", llm), ("remote", remote)):
        optimizer = torch.optim.SGD(edges[name].adapters.parameters(), lr=0.1)
        losses[name] = train_step(edges[name], backend, optimizer, visual, batch)
    assert losses["remote"] == losses["local"]
    local = dict(edges["local"].adapters.named_parameters())
    for key, param in edges["remote"].adapters.named_parameters():
        assert param.grad is not None and torch.equal(param.grad, local[key].grad), key
    assert remote.stats.bytes_up > 0 and remote.stats.bytes_down > 0
    stop_worker(worker)


@pytest.mark.parametrize("encoding", ["bf16+zstd", "int8+zstd"])
def test_compressed_activations_through_the_broker_equal_the_simulated_wire(  # type: ignore[no-untyped-def]
        broker, tiny_llm, encoding) -> None:
    _, llm = tiny_llm
    worker = start_worker(broker, llm)
    remote = _remote(broker, encoding=encoding)
    embeds, mask, labels = step_inputs(3, 8)
    got = remote.loss_and_input_grads(embeds, mask, labels)
    step_bytes = remote.stats.last
    wire = WireBackend(llm, encoding)
    simulated = wire.loss_and_input_grads(embeds, mask, labels)
    assert got.loss == simulated.loss and torch.equal(got.input_grads, simulated.input_grads)
    assert torch.equal(remote.score(embeds, mask), wire.score(embeds, mask))
    plain = _remote(broker, "dev-b")
    plain.loss_and_input_grads(embeds, mask, labels)
    assert step_bytes[1] < plain.stats.last[1] * 0.75  # the gradients came compressed
    counting = CountingBackend(remote)  # a device reports what went on the wire
    counting.loss_and_input_grads(embeds, mask, labels)
    assert counting.training.per_step == [remote.stats.last]
    stop_worker(worker)


def test_score_through_the_broker(broker, tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    worker = start_worker(broker, llm)
    embeds, mask, _ = step_inputs(4, 9)
    assert torch.equal(_remote(broker).score(embeds, mask), llm.score(embeds, mask))
    stop_worker(worker)


def test_retries_reuse_the_request_id_and_skip_stale_answers(  # type: ignore[no-untyped-def]
        broker, tiny_llm) -> None:
    _, llm = tiny_llm
    cloud = broker.connect("cloud", client_id="spy")
    requests = cloud.subscribe(topics.ALL_LLM_REQUESTS)  # sees every attempt
    remote = _remote(broker, timeout_s=0.7, retries=4)
    stale = LLMResponse(request_id="stale-request-0", ok=True, loss=1.0)  # an earlier call's
    cloud.publish(topics.llm_responses("dev-a"), pack(stale), max_bytes=2**20,
                  properties=reply_properties(b"stale-request-0"))
    # No worker yet: the first attempts find no subscriber; the worker joins later.
    late = threading.Timer(1.0, lambda: workers.append(start_worker(broker, llm)))
    workers: list = []
    late.start()
    embeds, mask, labels = step_inputs(2, 5)
    result = remote.loss_and_input_grads(embeds, mask, labels)
    assert torch.equal(result.input_grads, llm.loss_and_input_grads(embeds, mask,
                                                                  labels).input_grads)
    assert remote.stats.attempts >= 2 and remote.stats.ignored >= 1
    seen = [requests.get(timeout=1) for _ in range(remote.stats.attempts)]
    ids = {unpack(m.payload, LLMRequest)[0].request_id for m in seen if m is not None}
    assert len(ids) == 1 and None not in seen
    assert {m.correlation_data for m in seen if m} == {ids.pop().encode()}
    assert {m.response_topic for m in seen if m} == {topics.llm_responses("dev-a")}
    late.join()
    stop_worker(workers[0])


def test_no_worker_is_a_typed_timeout(broker) -> None:  # type: ignore[no-untyped-def]
    remote = _remote(broker, timeout_s=0.3, retries=1)
    with pytest.raises(RemoteLLMTimeout, match="2 attempt"):
        remote.score(*step_inputs(1, 4)[:2])
    assert remote.stats.attempts == 2


def test_worker_errors_are_typed(broker, tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    worker = start_worker(broker, llm)
    embeds, mask, labels = step_inputs(2, 5)
    embeds[1, 0, 0] = float("inf")
    with pytest.raises(RemoteLLMError, match="NaN or Inf") as info:
        _remote(broker).loss_and_input_grads(embeds, mask, labels)
    assert info.value.code == "bad_request" and info.value.request_id is not None
    stop_worker(worker)


def test_oversized_request_is_refused_before_publishing(broker) -> None:  # type: ignore[no-untyped-def]
    spy = broker.connect("cloud", client_id="spy").subscribe(topics.ALL_LLM_REQUESTS)
    remote = _remote(broker, max_message_bytes=64 * 1024)
    with pytest.raises(MessageTooLarge, match="exceeds the limit of 65,536 bytes"):
        remote.loss_and_input_grads(*step_inputs(8, 128))  # 128 KiB of embeds
    assert remote.stats.attempts == 0 or remote.stats.bytes_up == 0
    assert spy.get(timeout=0.5) is None


def test_acl_keeps_devices_apart(broker, tiny_llm) -> None:  # type: ignore[no-untyped-def]
    _, llm = tiny_llm
    worker = start_worker(broker, llm)
    intruder = broker.connect("dev-a")
    with pytest.raises(SubscribeError, match="Not authorized"):  # dev-b's responses: refused
        RemoteLLM(intruder, device_id="dev-b", base_version=BASE_VERSION, timeout_s=2)
    with pytest.raises(PublishError, match=r"(?i)not authorized"):  # dev-b's requests: refused
        intruder.publish(topics.llm_requests("dev-b"), b"forged", max_bytes=2**20)
    with pytest.raises(SubscribeError, match="Not authorized"):  # refused at SUBACK
        intruder.subscribe(topics.llm_responses("dev-b"))
    spy = Inbox()  # and nothing reaches dev-a through its own subscriptions either
    intruder.subscribe(f"{topics.device_root('dev-a')}/#", inbox=spy)
    victim = _remote(broker, "dev-b")
    victim.score(*step_inputs(1, 4)[:2])
    assert spy.get(timeout=0.5) is None
    assert worker.stats.requests == 1
    stop_worker(worker)


def test_a_shutdown_abandons_the_wait_and_the_retries(broker) -> None:  # type: ignore[no-untyped-def]
    """No worker answers and each attempt would wait 30 s (x 4): the stop flag ends the call
    within a poll, so a device told to stop does not sit out its retries."""
    stop = threading.Event()
    remote = _remote(broker, timeout_s=30.0, retries=3, stop=stop)
    threading.Timer(0.5, stop.set).start()
    started = time.monotonic()
    with pytest.raises(RemoteLLMStopped, match="the device is stopping"):
        remote.score(*step_inputs(1, 4)[:2])
    assert time.monotonic() - started < 10 and remote.stats.attempts == 1
