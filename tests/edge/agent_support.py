"""Helpers for the edge agent's broker tests: tiny device, a test-side "cloud", tasks."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from edge.agent import AgentSettings, BackendFactory, EdgeAgent
from edge.boot import LLMSettings, RemoteLLMFactory
from edge.config import DeviceConfig
from edge.device_round import DeviceModel
from edge.profiles import load_profile
from shared import codec, topics
from shared.backend import LLMBackend, StepResult
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.messages import (
    Presence,
    TaskHParams,
    TrainTask,
    UpdateMessage,
    from_json,
    pack,
    unpack,
)
from shared.mqtt import Inbox, MqttClient, Received
from shared.prompts import PromptTemplate
from tests.brokers import MosquittoBroker

ANSWERS = ["red", "blue", "green"]
BASE_VERSION = "tiny"
FAST = AgentSettings(connect_timeout_s=5, keepalive_s=5, reconnect_min_s=1, reconnect_max_s=1,
                     retry_min_s=0.2, retry_max_s=1, ack_timeout_s=2, poll_s=0.05)


def make_samples(n: int = 12) -> list[VQASample]:
    return [VQASample(f"img/{i}", "what colour is the shape?", ANSWERS[i % 3], "color")
            for i in range(n)]


def make_model(edge: Any, tokenizer: Any, n: int = 12,
               base_version: str = BASE_VERSION) -> DeviceModel:
    """A DeviceModel over ``edge`` with random visual tokens per image (width 32, 4 tokens)."""
    gen = torch.Generator().manual_seed(3)
    table = {f"img/{i}": torch.randn(4, 32, generator=gen) for i in range(n)}
    batcher = VQABatcher(tokenizer, PromptTemplate(),
                         lambda keys: torch.stack([table[k] for k in keys]), 4)
    return DeviceModel(edge, batcher, base_version=base_version, bundle_version="0" * 16,
                       providers=["torch"])


def make_config_fields(state_dir: Path, device_id: str = "dev-a",
                       **profile_updates: Any) -> dict[str, Any]:
    """A device config's fields without a broker (add ``"broker": {"url": ...}``)."""
    return {"device_id": device_id,
            "profile": load_profile("sim-cpu").model_copy(update=profile_updates),
            "credentials": {"password_env": "FEDNANO_UNUSED"},
            "bundle_url": "file:///unused/bundle.tar", "state_dir": str(state_dir)}


def make_config(broker: MosquittoBroker, device_id: str, state_dir: Path,
                **profile_updates: Any) -> DeviceConfig:
    return DeviceConfig.model_validate({
        **make_config_fields(state_dir, device_id, **profile_updates),
        "broker": {"url": broker.url}})


def make_agent(broker: MosquittoBroker, device_id: str, state_dir: Path, model: DeviceModel,
               backend: LLMBackend | BackendFactory, samples: list[VQASample] | None = None,
               **profile_updates: Any) -> EdgeAgent:
    """An agent on ``broker``; ``backend`` is an LLMBackend or a factory (e.g. RemoteLLM's)."""
    config = make_config(broker, device_id, state_dir, **profile_updates)
    factory = backend if isinstance(backend, RemoteLLMFactory) else lambda client, stop: backend
    return EdgeAgent(config, model, samples if samples is not None else make_samples(),
                     factory, password=broker.credentials(device_id).password,
                     settings=FAST)


def remote_llm(device_id: str, base_version: str) -> RemoteLLMFactory:
    """The production backend factory: RemoteLLM on the agent's connection."""
    return RemoteLLMFactory(device_id, base_version, LLMSettings(timeout_s=5, retries=1))


def make_task(model: DeviceModel, task_id: str = "task-0001", round_id: int = 1,
              **fields: Any) -> tuple[TrainTask, bytes]:
    """A TrainTask for ``model``'s adapters and its envelope (global = its current state)."""
    values: dict[str, Any] = {
        "task_id": task_id, "round_id": round_id, "global_version": round_id,
        "base_version": BASE_VERSION, "strategy": "fednano",
        "hparams": TaskHParams(steps=3, batch_size=4, fisher_samples=4),
        "deadline_at": time.time() + 600}
    task = TrainTask(**{**values, **fields})
    frame = codec.encode(model.edge.adapters.adapter_state_dict(), codec.Scheme())
    return task, pack(task, {"global": frame})


@dataclass
class Cloud:
    """The test's stand-in for the cloud: sees every update and presence, sends tasks."""

    client: MqttClient
    updates: Inbox
    statuses: Inbox

    def send(self, device_id: str, payload: bytes) -> None:
        self.client.publish(topics.tasks(device_id), payload, max_bytes=8 * 2**20)

    def next_update(self, timeout: float = 30.0) -> tuple[UpdateMessage, dict[str, bytes]]:
        received = self.updates.get(timeout=timeout)
        assert received is not None, "no update arrived"
        return unpack(received.payload, UpdateMessage)

    def presence(self, predicate: Callable[[Presence], bool],
                 timeout: float = 15.0) -> Presence:
        """The first presence (in order of arrival) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            received = self.statuses.get(timeout=max(0.0, deadline - time.monotonic()))
            if received is not None:
                presence = from_json(received.payload, Presence)
                if predicate(presence):
                    return presence
        raise AssertionError("no matching presence arrived")


def connect_cloud(broker: MosquittoBroker, client_id: str = "cloud") -> Cloud:
    client = broker.connect("cloud", client_id=client_id, reconnect_min_s=1, reconnect_max_s=1)
    updates = client.subscribe(topics.ALL_UPDATES)
    statuses = client.subscribe(topics.ALL_STATUS)
    return Cloud(client, updates, statuses)


def retained_presence(broker: MosquittoBroker, device_id: str) -> Presence:
    """What a newcomer sees on the device's status topic (the retained message)."""
    client = broker.connect("cloud", client_id=f"peek-{time.monotonic_ns()}", clean_start=True,
                            session_expiry_s=0)
    try:
        inbox = client.subscribe(topics.status(device_id))
        received: Received | None = inbox.get(timeout=5)
        assert received is not None and received.retain, "no retained presence"
        return from_json(received.payload, Presence)
    finally:
        client.close()


class GatedBackend:
    """Wraps a backend: counts calls, and can hold a call until the test releases it."""

    def __init__(self, inner: LLMBackend) -> None:
        self.inner = inner
        self.calls = 0
        self.called = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def loss_and_input_grads(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                             labels: torch.Tensor) -> StepResult:
        self.calls += 1
        self.called.set()
        assert self.gate.wait(30), "the test never opened the gate"
        return self.inner.loss_and_input_grads(inputs_embeds, attention_mask, labels)

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.inner.score(inputs_embeds, attention_mask)


def wait_until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
