"""Devices trained side by side with batched LLM calls give the sequential loop's result."""

from __future__ import annotations

import pytest
import torch

from edge.trainer import TrainConfig, run_round
from fednano.lockstep import LockstepLLM, run_rounds_lockstep
from shared.backend import CountingBackend
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.prompts import PromptTemplate

ANSWERS = ["red", "blue", "green"]


@pytest.fixture
def batcher(word_tokenizer) -> VQABatcher:
    gen = torch.Generator().manual_seed(3)
    table = {f"img/{i}": torch.randn(4, 32, generator=gen) for i in range(30)}
    return VQABatcher(
        word_tokenizer, PromptTemplate(), lambda keys: torch.stack([table[k] for k in keys]), 4
    )


def device_data(k: int) -> list[VQASample]:
    # Different sizes and question lengths per device: uneven batches and padding.
    question = "what colour is the shape?" + " really" * k
    return [VQASample(f"img/{i}", question, ANSWERS[(i + k) % 3], "color")
            for i in range(6 + 4 * k)]


@pytest.mark.parametrize("labels", ["empirical", "sampled"])
def test_lockstep_matches_sequential(tiny_llm, tiny_edge, batcher, labels: str) -> None:
    _, backend = tiny_llm
    torch.nn.init.normal_(tiny_edge.adapters.text.lora_B.weight, std=0.05)
    start = tiny_edge.adapters.adapter_state_dict()
    cfg = TrainConfig(steps=3, batch_size=4, lr=5e-2, fisher_samples=10, fisher_batch_size=4,
                      fisher_labels=labels)  # type: ignore[arg-type]

    def device(k: int):  # type: ignore[no-untyped-def]
        return lambda edge, llm: run_round(edge, llm, batcher, device_data(k), start, cfg,
                                           client_id=f"d{k}", seed=10 + k)

    alone = [device(k)(tiny_edge, CountingBackend(backend)) for k in range(3)]
    together, stats = run_rounds_lockstep(tiny_edge, backend, [device(k) for k in range(3)])
    assert stats.batches < stats.calls  # calls were really batched
    for a, b in zip(alone, together, strict=True):
        assert a.update.client_id == b.update.client_id
        assert a.losses == pytest.approx(b.losses, rel=1e-4, abs=1e-5)
        for key in a.update.delta:
            torch.testing.assert_close(a.update.delta[key], b.update.delta[key],
                                       rtol=1e-3, atol=1e-6)
            assert a.update.fisher is not None and b.update.fisher is not None
            # The Fisher squares per-sample gradients, so their batched-vs-alone rounding
            # (rtol 1e-3 above) doubles; sampled labels were seen at 2.3e-3 on a CI machine.
            torch.testing.assert_close(a.update.fisher[key], b.update.fisher[key],
                                       rtol=5e-3, atol=1e-8)


def test_a_device_error_reaches_the_caller_and_frees_the_others(
    tiny_llm, tiny_edge, batcher
) -> None:
    _, backend = tiny_llm
    start = tiny_edge.adapters.adapter_state_dict()
    cfg = TrainConfig(steps=2, batch_size=4, fisher_samples=0)

    def good(edge, llm):  # type: ignore[no-untyped-def]
        return run_round(edge, llm, batcher, device_data(0), start, cfg, client_id="ok", seed=1)

    def broken(edge, llm):  # type: ignore[no-untyped-def]
        raise RuntimeError("device 1 fell over")

    with pytest.raises(RuntimeError, match="device 1 fell over"):
        run_rounds_lockstep(tiny_edge, backend, [good, broken, good])


def test_lockstep_needs_a_party() -> None:
    with pytest.raises(ValueError, match="at least one party"):
        LockstepLLM(None, 0)  # type: ignore[arg-type]
