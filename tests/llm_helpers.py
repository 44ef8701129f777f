"""Helpers for the LLM worker and RemoteLLM tests: random step inputs, workers on a broker."""

from __future__ import annotations

import torch

from cloud.llm_backend import InProcessLLM
from cloud.llm_worker import LLMWorker, WorkerConfig, worker_client_options
from shared.mqtt import MqttClient
from shared.prompts import IGNORE_INDEX
from tests.brokers import MosquittoBroker

BASE_VERSION = "test-base-0001"


def step_inputs(batch: int, length: int, *, width: int = 32, vocab: int = 256,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random right-padded inputs: embeds (B, L, d), mask (B, L), labels (B, L).

    Row lengths vary (the first row is full length); each row's last 1-3 real tokens are
    answer tokens, the rest ``IGNORE_INDEX``.
    """
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn(batch, length, width, generator=gen)
    real = torch.randint(max(2, length // 2), length + 1, (batch,), generator=gen)
    real[0] = length
    mask = (torch.arange(length)[None, :] < real[:, None]).long()  # (B, L)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for row, n in enumerate(real.tolist()):
        answer = int(torch.randint(1, min(3, n - 1) + 1, (1,), generator=gen))
        labels[row, n - answer:n] = torch.randint(0, vocab, (answer,), generator=gen)
    return embeds, mask, labels


def start_worker(broker: MosquittoBroker, llm: InProcessLLM, *, worker_id: str = "w1",
                 service: str = "cloud", **config: object) -> LLMWorker:
    """A started LLM worker on ``broker`` with the service account ``service``."""
    creds = broker.credentials(service)
    client = MqttClient(broker.address,
                        worker_client_options(worker_id, creds.username, creds.password))
    worker = LLMWorker(llm, client, WorkerConfig(base_version=BASE_VERSION,  # type: ignore[arg-type]
                                                 worker_id=worker_id, **config))
    client.connect()
    return worker.start()


def stop_worker(worker: LLMWorker) -> None:
    worker.stop()
    worker.client.close()


def assert_same(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Equal up to float32 rounding: every entry within ``rel`` of the tensor's scale.

    A request batched with others runs in different shapes with a padded attention mask and
    a ``B_total / B_request`` rescale, so its results differ from a solo run by a few ulps of
    the largest values (measured: <= 2e-6 relative), never by a real amount.
    """
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = float(want.abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=rel, atol=rel * max(scale, 1e-12))
