"""The edge agent against a real Mosquitto (per-device accounts and rights), tiny models.

The test plays the cloud (``agent_support.Cloud``): it publishes tasks and reads updates and
presence as the coordinator would.
"""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from edge.agent import EdgeAgent
from edge.boot import LLMSettings, RemoteLLMFactory
from edge.config import DeviceConfig
from edge.state import PENDING_FILE, TASK_FILE, DeviceState, update_id_for
from shared import codec, topics
from shared.bundle import EncoderError
from shared.messages import CancelTask, TaskHParams, pack
from shared.mqtt import PublishError, SubscribeError
from tests.edge.agent_support import (
    FAST,
    GatedBackend,
    connect_cloud,
    make_agent,
    make_config,
    make_config_fields,
    make_model,
    make_samples,
    make_task,
    remote_llm,
    retained_presence,
    wait_until,
)
from tests.llm_helpers import BASE_VERSION as WORKER_BASE
from tests.llm_helpers import start_worker, stop_worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def model(tiny_edge, word_tokenizer):  # type: ignore[no-untyped-def]
    return make_model(tiny_edge, word_tokenizer)


@pytest.fixture
def backend(tiny_llm) -> GatedBackend:  # type: ignore[no-untyped-def]
    return GatedBackend(tiny_llm[1])


def _run(agent: EdgeAgent) -> threading.Thread:
    thread = agent.start()
    wait_until(lambda: agent.client.connected)
    return thread


def _stop(agent: EdgeAgent, thread: threading.Thread) -> None:
    agent.stop()
    thread.join(30)
    assert not thread.is_alive(), "the agent did not shut down"


def _hold_a_round(broker, tmp_path, model, backend, **task_fields):  # type: ignore[no-untyped-def]
    """dev-a running, sent a task, and held at the task's first LLM step (``backend.gate``):
    ``(cloud, agent, thread, task, payload)``."""
    cloud = connect_cloud(broker)
    agent = make_agent(broker, "dev-a", tmp_path, model, backend)
    thread = _run(agent)
    backend.gate.clear()
    task, payload = make_task(model, **task_fields)
    cloud.send("dev-a", payload)
    assert backend.called.wait(15)
    return cloud, agent, thread, task, payload


def test_presence_online_retained_last_will_and_reannounce(broker, tmp_path, model, backend):  # type: ignore[no-untyped-def]
    cloud = connect_cloud(broker)
    agent = make_agent(broker, "dev-a", tmp_path, model, backend)
    thread = _run(agent)
    online = cloud.presence(lambda p: p.state == "online")
    assert (online.device_id, online.profile, online.bundle_version) == (
        "dev-a", "sim-cpu", "0" * 16)
    assert online.capabilities["samples"] == 12
    assert online.capabilities["base_version"] == "tiny"
    assert retained_presence(broker, "dev-a").state == "online"

    agent.client.paho.socket().close()  # the link dies without a DISCONNECT
    offline = cloud.presence(lambda p: True)
    assert offline.state == "offline" and offline.device_id == "dev-a"  # the last will
    assert cloud.presence(lambda p: True).state == "online"  # re-announced after reconnecting
    assert retained_presence(broker, "dev-a").state == "online"

    _stop(agent, thread)
    assert cloud.presence(lambda p: True).state == "offline"  # said by the agent itself
    assert retained_presence(broker, "dev-a").state == "offline"


def test_task_train_upload_through_the_llm_worker(  # type: ignore[no-untyped-def]
        broker, tmp_path, tiny_llm, tiny_edge, word_tokenizer):
    worker = start_worker(broker, tiny_llm[1])  # the LLM over MQTT, as in production
    model = make_model(tiny_edge, word_tokenizer, base_version=WORKER_BASE)
    cloud = connect_cloud(broker)
    start = model.edge.adapters.adapter_state_dict()
    agent = make_agent(broker, "dev-a", tmp_path, model, remote_llm("dev-a", WORKER_BASE))
    thread = _run(agent)
    task, payload = make_task(model, base_version=WORKER_BASE)
    cloud.send("dev-a", payload)
    message, parts = cloud.next_update()
    assert worker.stats.requests >= 3 + 1  # 3 steps + the Fisher batch
    assert message.update_id == update_id_for("dev-a", task.task_id)
    assert (message.task_id, message.round_id, message.global_version) == ("task-0001", 1, 1)
    assert message.base_version == WORKER_BASE and message.n_samples == 12
    assert {"loss_first", "loss_last", "steps", "llm_bytes_up"} <= set(message.metrics)
    assert message.metrics["steps"] == 3.0
    shapes = {k: tuple(v.shape) for k, v in start.items()}
    delta = codec.decode(parts["delta"], expected=shapes)
    fisher = codec.decode(parts["fisher"], expected=shapes)
    assert any(d.abs().sum() > 0 for d in delta.values())
    assert all(bool((f >= 0).all()) for f in fisher.values())
    state = DeviceState(tmp_path)
    # finish_pending marks the task done, then drops the task and the pending files
    wait_until(lambda: state.is_done(task.task_id) and state.load_pending() is None)
    assert state.load_task() is None
    glob = state.load_global()
    assert glob is not None and glob.version == 1

    cloud.send("dev-a", payload)  # a redelivered task is not trained twice
    assert cloud.updates.get(timeout=1.0) is None
    _stop(agent, thread)
    stop_worker(worker)


def test_update_published_across_a_broker_restart_arrives(  # type: ignore[no-untyped-def]
        broker, tmp_path, model, backend):
    cloud, agent, thread, task, _ = _hold_a_round(broker, tmp_path, model, backend)
    broker.restart()  # sessions and retained messages persist
    backend.gate.set()  # the update is published while the agent is still reconnecting
    message, _ = cloud.next_update()
    assert message.update_id == update_id_for("dev-a", task.task_id)
    assert cloud.presence(lambda p: p.state == "online").device_id == "dev-a"  # re-announced

    _stop(agent, thread)  # and a task sent while the device is away waits in its session
    _, payload2 = make_task(model, "task-0002", round_id=2)
    cloud.send("dev-a", payload2)
    broker.restart()
    again = make_agent(broker, "dev-a", tmp_path, model, backend)
    thread = _run(again)
    message, _ = cloud.next_update()
    while message.task_id == "task-0001":  # QoS 1 is at-least-once: a redelivery may come first
        message, _ = cloud.next_update()
    assert message.task_id == "task-0002" and message.update_id == update_id_for("dev-a",
                                                                                 "task-0002")
    _stop(again, thread)


def test_reboot_mid_round_restarts_the_saved_task(  # type: ignore[no-untyped-def]
        broker, tmp_path, model, backend):
    cloud, agent, thread, task, _ = _hold_a_round(broker, tmp_path, model, backend)
    agent.stop()  # SIGTERM mid-round: the task stays on disk
    backend.gate.set()
    thread.join(30)
    assert (tmp_path / "agent" / TASK_FILE).exists()
    assert cloud.updates.get(timeout=0.5) is None

    again = make_agent(broker, "dev-a", tmp_path, model, backend)  # the reboot
    thread = _run(again)
    message, _ = cloud.next_update()  # without the cloud sending anything again
    assert message.update_id == update_id_for("dev-a", task.task_id)
    _stop(again, thread)


def test_reboot_with_a_pending_update_resends_it_byte_for_byte(  # type: ignore[no-untyped-def]
        broker, tmp_path, model, backend):
    cloud, agent, thread, task, _ = _hold_a_round(broker, tmp_path, model, backend)
    broker.stop()  # no broker: the committed update cannot be acknowledged
    backend.gate.set()
    pending_file = tmp_path / "agent" / PENDING_FILE
    wait_until(pending_file.exists)
    _stop(agent, thread)
    pending = DeviceState(tmp_path).load_pending()
    assert pending is not None and pending.update_id == update_id_for("dev-a", task.task_id)

    broker.start()
    again = make_agent(broker, "dev-a", tmp_path, model, backend)
    thread = _run(again)
    received = cloud.updates.get(timeout=30)
    assert received is not None and received.payload == pending.payload
    wait_until(lambda: not pending_file.exists())
    _stop(again, thread)


def test_oversized_update_is_refused_on_the_device(  # type: ignore[no-untyped-def]
        broker, tmp_path, model, backend):
    cloud = connect_cloud(broker)
    agent = make_agent(broker, "dev-a", tmp_path, model, backend)
    thread = _run(agent)
    task, payload = make_task(model, max_update_bytes=1024)  # fp32 delta + Fisher: ~4.5 kB
    cloud.send("dev-a", payload)
    refused = cloud.presence(lambda p: p.last_error is not None)
    assert refused.state == "online"
    error = refused.last_error
    assert error is not None and (error.code, error.task_id, error.round_id) == (
        "too_large", "task-0001", 1)
    assert "exceeds the limit of 1,024 bytes" in error.message
    assert cloud.updates.get(timeout=0.5) is None  # nothing reached the broker
    state = DeviceState(tmp_path)
    assert state.is_done(task.task_id) and state.load_pending() is None

    _, payload2 = make_task(model, "task-0002", round_id=2)  # the agent lives on
    cloud.send("dev-a", payload2)
    assert cloud.next_update()[0].task_id == "task-0002"
    _stop(agent, thread)


def test_refusals_reach_the_presence(broker, tmp_path, model, backend):  # type: ignore[no-untyped-def]
    cloud = connect_cloud(broker)
    agent = make_agent(broker, "dev-a", tmp_path, model, backend)
    thread = _run(agent)
    _, wrong_base = make_task(model, base_version="another-base")
    cloud.send("dev-a", wrong_base)
    got = cloud.presence(lambda p: p.last_error is not None).last_error
    assert got is not None and got.code == "base_mismatch"
    cloud.send("dev-a", b"not an envelope")
    got = cloud.presence(lambda p: p.last_error is not None and p.last_error.code == "rejected"
                         ).last_error
    assert got is not None and "unreadable task message" in got.message
    _stop(agent, thread)


def test_cancel_stops_the_round(broker, tmp_path, model, backend):  # type: ignore[no-untyped-def]
    cloud, agent, thread, _, payload = _hold_a_round(
        broker, tmp_path, model, backend,
        hparams=TaskHParams(steps=50, batch_size=4, fisher_samples=4))
    cloud.send("dev-a", pack(CancelTask(round_id=1, reason="operator stop")))
    wait_until(lambda: 1 in agent._cancelled_rounds)
    backend.gate.set()
    state = DeviceState(tmp_path)
    wait_until(lambda: state.load_task() is None)
    assert backend.calls < 50 and state.is_cancelled(1)
    cloud.send("dev-a", payload)  # a late redelivery of the cancelled round's task
    assert cloud.updates.get(timeout=1.0) is None
    _stop(agent, thread)


def test_device_cannot_use_another_devices_topics(broker):  # type: ignore[no-untyped-def]
    cloud = connect_cloud(broker)
    intruder = broker.connect("dev-a")
    for topic in (topics.updates("dev-b"), topics.status("dev-b"), topics.tasks("dev-b")):
        with pytest.raises(PublishError, match=r"(?i)not authorized"):
            intruder.publish(topic, b"forged", max_bytes=2**20, timeout=5)
    assert cloud.updates.get(timeout=0.5) is None and cloud.statuses.get(timeout=0.1) is None
    try:
        spy = intruder.subscribe(topics.tasks("dev-b"), timeout=5)
    except SubscribeError:
        return  # refused at SUBACK: as good as never delivering
    cloud.send("dev-b", b"a task for dev-b only")
    assert spy.get(timeout=1.0) is None
    intruder.publish(topics.updates("dev-a"), b"own topic", max_bytes=2**20, timeout=5)
    got = cloud.updates.get(timeout=5)
    assert got is not None and got.topic == topics.updates("dev-a")


def test_corrupt_state_fails_the_boot_naming_the_file(broker, tmp_path, model, backend):  # type: ignore[no-untyped-def]
    from edge.state import StateCorrupt

    folder = tmp_path / "agent"
    folder.mkdir()
    (folder / "global.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(StateCorrupt, match=r"global\.safetensors"):
        make_agent(broker, "dev-a", tmp_path, model, backend)


def test_two_devices_train_side_by_side(broker, tmp_path, tiny_llm, word_tokenizer):  # type: ignore[no-untyped-def]
    from shared.adapters import AdapterConfig
    from shared.connector import PoolingConnector
    from shared.nanoedge import NanoEdge

    cloud = connect_cloud(broker)
    agents = []
    for device in ("dev-a", "dev-b"):
        embedder = torch.nn.Embedding.from_pretrained(
            tiny_llm[0].get_input_embeddings().weight.clone())
        edge = NanoEdge(PoolingConnector(12, 32, grid=2), embedder, AdapterConfig(rank=4, alpha=8))
        device_model = make_model(edge, word_tokenizer)
        agent = make_agent(broker, device, tmp_path / device, device_model, tiny_llm[1])
        agents.append((agent, _run(agent), device_model))
    for (_, _, device_model), device in zip(agents, ("dev-a", "dev-b"), strict=True):
        cloud.send(device, make_task(device_model)[1])
    senders = {topics.device_of(cloud.updates.get(timeout=30).topic) for _ in range(2)}  # type: ignore[union-attr]
    assert senders == {"dev-a", "dev-b"}
    for agent, thread, _ in agents:
        _stop(agent, thread)


class _Flaky:
    """A backend whose first call fails with ``error``, then works."""

    def __init__(self, inner, error: BaseException) -> None:  # type: ignore[no-untyped-def]
        self.inner, self.error, self.failed = inner, error, False

    def loss_and_input_grads(self, embeds, mask, labels):  # type: ignore[no-untyped-def]
        if not self.failed:
            self.failed = True
            raise self.error
        return self.inner.loss_and_input_grads(embeds, mask, labels)

    def score(self, embeds, mask):  # type: ignore[no-untyped-def]
        return self.inner.score(embeds, mask)


def test_transient_llm_failure_is_retried(broker, tmp_path, model, tiny_llm):  # type: ignore[no-untyped-def]
    cloud = connect_cloud(broker)
    agent = make_agent(broker, "dev-a", tmp_path, model,
                       _Flaky(tiny_llm[1], TimeoutError("LLM worker did not answer")))
    thread = _run(agent)
    task, payload = make_task(model)
    cloud.send("dev-a", payload)
    failed = cloud.presence(lambda p: p.last_error is not None).last_error
    assert failed is not None and failed.code == "failed" and "did not answer" in failed.message
    message, _ = cloud.next_update()  # the retry, a moment later
    assert message.update_id == update_id_for("dev-a", task.task_id)
    _stop(agent, thread)


def test_an_encoder_failure_refuses_the_task_and_the_agent_stays_up(  # type: ignore[no-untyped-def]
        broker, tmp_path, model, tiny_llm):
    cloud = connect_cloud(broker)
    agent = make_agent(broker, "dev-a", tmp_path, model,
                       _Flaky(tiny_llm[1], EncoderError("OpenVINO inference failed: bad input")))
    thread = _run(agent)
    cloud.send("dev-a", make_task(model)[1])
    failed = cloud.presence(lambda p: p.last_error is not None).last_error
    assert failed is not None and failed.code == "failed" and "bad input" in failed.message
    assert thread.is_alive() and retained_presence(broker, "dev-a").state == "online"
    _stop(agent, thread)


def test_an_unexpected_error_goes_offline_and_raises(broker, tmp_path, model, tiny_llm):  # type: ignore[no-untyped-def]
    cloud = connect_cloud(broker)
    agent = make_agent(broker, "dev-a", tmp_path, model,
                       _Flaky(tiny_llm[1], RuntimeError("a bug")))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            agent.run()
        except RuntimeError as err:
            errors.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    cloud.presence(lambda p: p.state == "online")
    cloud.send("dev-a", make_task(model)[1])
    thread.join(30)
    assert not thread.is_alive() and [str(e) for e in errors] == ["a bug"]
    assert retained_presence(broker, "dev-a").state == "offline"  # said before raising
    assert (tmp_path / "agent" / TASK_FILE).exists()  # the next start tries the round again


def test_a_shutdown_while_waiting_for_the_llm_keeps_the_task(  # type: ignore[no-untyped-def]
        broker, tmp_path, model):
    """No LLM worker answers and a call may wait 4 x 60 s: the shutdown abandons the wait at
    once and the task stays on disk for the next start, as a shutdown between two calls."""
    cloud = connect_cloud(broker)
    requests = cloud.client.subscribe(topics.llm_requests("dev-a"))
    patient = RemoteLLMFactory("dev-a", WORKER_BASE, LLMSettings(timeout_s=60, retries=3))
    agent = make_agent(broker, "dev-a", tmp_path, model, patient)
    thread = _run(agent)
    _, payload = make_task(model)
    cloud.send("dev-a", payload)
    assert requests.get(timeout=15) is not None  # the device is waiting for an answer
    started = time.monotonic()
    _stop(agent, thread)
    assert time.monotonic() - started < 15
    assert (tmp_path / "agent" / TASK_FILE).exists()


def test_a_refused_password_stops_the_agent_at_once(broker, tmp_path, model, backend):  # type: ignore[no-untyped-def]
    from shared.mqtt import ConnectRefused

    config = make_config(broker, "dev-a", tmp_path)
    agent = EdgeAgent(config, model, make_samples(), lambda client, stop: backend,
                      password="not-its-password", settings=FAST)
    started = time.monotonic()
    with pytest.raises(ConnectRefused) as caught:
        agent.run()  # returns (raises) instead of retrying every reconnect_max_s forever
    assert caught.value.permanent
    assert time.monotonic() - started < 5


def test_a_broker_that_is_down_is_reported_at_once_and_retried(tmp_path, model, backend,  # type: ignore[no-untyped-def]
                                                               caplog):
    from tests.brokers import free_port

    config = DeviceConfig.model_validate({
        **make_config_fields(tmp_path), "broker": {"url": f"mqtt://127.0.0.1:{free_port()}"}})
    agent = EdgeAgent(config, model, make_samples(), lambda client, stop: backend,
                      password="x", settings=FAST)
    with caplog.at_level(logging.WARNING, logger="edge.agent"):
        thread = agent.start()
        wait_until(lambda: any("Connection refused" in r.getMessage() for r in caplog.records),
                   timeout=2)  # not after the 5 s CONNACK timeout
        wait_until(lambda: sum("Connection refused" in r.getMessage()
                               for r in caplog.records) >= 2, timeout=5)  # and retried
        agent.stop()
        thread.join(10)
    assert not thread.is_alive()
