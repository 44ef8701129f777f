from __future__ import annotations

import pytest
import torch

from edge.trainer import TrainConfig, compute_delta, estimate_fisher, local_steps, run_round
from shared.backend import CountingBackend
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.prompts import PromptTemplate

ANSWERS = ["red", "blue", "green"]


@pytest.fixture
def samples() -> list[VQASample]:
    return [
        VQASample(f"img/{i}", "what colour is the shape?", ANSWERS[i % 3], "color")
        for i in range(24)
    ]


@pytest.fixture
def batcher(word_tokenizer) -> VQABatcher:
    gen = torch.Generator().manual_seed(3)
    table = {f"img/{i}": torch.randn(4, 32, generator=gen) for i in range(24)}
    # Make the colour visible in the image tokens so there is something to learn.
    for i in range(24):
        table[f"img/{i}"][:, i % 3] += 3.0
    return VQABatcher(
        word_tokenizer, PromptTemplate(), lambda keys: torch.stack([table[k] for k in keys]), 4
    )


def test_local_training_lowers_the_loss(tiny_llm, tiny_edge, batcher, samples) -> None:
    _, backend = tiny_llm
    start = tiny_edge.adapters.adapter_state_dict()
    cfg = TrainConfig(steps=40, batch_size=8, lr=1e-1, fisher_samples=0)
    losses = local_steps(
        tiny_edge, backend, batcher, samples, start, cfg, torch.Generator().manual_seed(0)
    )
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses


def test_run_round_returns_delta_and_fisher(tiny_llm, tiny_edge, batcher, samples) -> None:
    _, backend = tiny_llm
    start = tiny_edge.adapters.adapter_state_dict()
    res = run_round(
        tiny_edge,
        backend,
        batcher,
        samples,
        start,
        TrainConfig(steps=3, batch_size=4, fisher_samples=8),
        client_id="c",
        seed=1,
    )
    end = tiny_edge.adapters.adapter_state_dict()
    assert res.update.n_samples == 24 and len(res.losses) == 3
    for key, delta in res.update.delta.items():
        assert torch.allclose(start[key] + delta, end[key])
    assert res.update.fisher is not None
    assert all((f >= 0).all() for f in res.update.fisher.values())


def test_fisher_equals_brute_force_per_sample_gradients(
    tiny_llm, tiny_edge, batcher, samples
) -> None:
    model, backend = tiny_llm
    torch.nn.init.normal_(tiny_edge.adapters.image.lora_B.weight, std=0.1)
    torch.nn.init.normal_(tiny_edge.adapters.text.lora_B.weight, std=0.1)
    subset = [*samples[:5], VQASample("img/5", "what colour is the shape?", "dark red", "color")]
    fisher = estimate_fisher(tiny_edge, backend, batcher, subset, batch_size=4)
    params = dict(tiny_edge.adapters.named_parameters())
    expected = {k: torch.zeros_like(p) for k, p in params.items()}
    for s in subset:  # one sample at a time, straight through the full model
        visual, batch = batcher.batch([s])
        embeds = tiny_edge(visual, batch)
        logits = model(inputs_embeds=embeds, attention_mask=batch.attention_mask).logits
        nll = torch.nn.functional.cross_entropy(
            logits[0, :-1], batch.labels[0, 1:], ignore_index=-100, reduction="sum"
        )
        grads = torch.autograd.grad(nll, list(params.values()))
        for k, g in zip(params, grads, strict=True):
            expected[k] += g.square() / len(subset)
    for k in expected:
        assert torch.allclose(fisher[k], expected[k], rtol=1e-3, atol=1e-9), k


def test_proximal_term_pulls_towards_global(tiny_llm, tiny_edge, batcher, samples) -> None:
    _, backend = tiny_llm
    start = tiny_edge.adapters.adapter_state_dict()

    def drift(mu: float) -> float:
        cfg = TrainConfig(steps=15, batch_size=8, lr=2e-2, prox_mu=mu, fisher_samples=0)
        res = run_round(tiny_edge, backend, batcher, samples, start, cfg, client_id="c", seed=0)
        return sum(float(d.norm()) for d in res.update.delta.values())

    assert drift(50.0) < drift(0.0)


def test_delta_rejects_mismatched_keys() -> None:
    with pytest.raises(ValueError, match="keys differ"):
        compute_delta({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


def test_non_finite_llm_gradients_stop_training(tiny_edge, batcher, samples) -> None:
    class Broken:
        def loss_and_input_grads(self, embeds, mask, labels):  # type: ignore[no-untyped-def]
            from shared.backend import StepResult

            return StepResult(
                1.0, torch.ones(embeds.shape[0]), torch.full_like(embeds, float("nan"))
            )

    cfg = TrainConfig(steps=1, batch_size=2, fisher_samples=0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        run_round(
            tiny_edge,
            Broken(),
            batcher,
            samples,
            tiny_edge.adapters.adapter_state_dict(),
            cfg,
            client_id="c",
            seed=0,
        )


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lrr"):
        TrainConfig(lrr=1.0)  # type: ignore[call-arg]


def test_ffa_trains_only_b_and_sends_zero_a(tiny_llm, tiny_edge, batcher, samples) -> None:
    _, backend = tiny_llm
    start = tiny_edge.adapters.adapter_state_dict()
    cfg = TrainConfig(steps=4, batch_size=8, lr=5e-2, fisher_samples=8, train_a=False)
    res = run_round(tiny_edge, backend, batcher, samples, start, cfg, client_id="c", seed=2)
    fisher = res.update.fisher
    assert fisher is not None
    for key, delta in res.update.delta.items():
        if "lora_A" in key:
            assert torch.equal(delta, torch.zeros_like(delta)), key
            assert torch.equal(fisher[key], torch.zeros_like(fisher[key])), key
        else:
            assert delta.abs().max() > 0, key
            assert fisher[key].sum() > 0, key


def test_sampled_label_fisher_draws_labels_from_the_model(
    tiny_llm, tiny_edge, batcher, samples
) -> None:
    _, backend = tiny_llm
    torch.nn.init.normal_(tiny_edge.adapters.image.lora_B.weight, std=0.1)
    draw = torch.Generator().manual_seed(0)
    sampled = estimate_fisher(tiny_edge, backend, batcher, samples[:8], batch_size=4,
                              labels="sampled", generator=draw)
    again = estimate_fisher(tiny_edge, backend, batcher, samples[:8], batch_size=4,
                            labels="sampled", generator=torch.Generator().manual_seed(0))
    empirical = estimate_fisher(tiny_edge, backend, batcher, samples[:8], batch_size=4)
    for key in sampled:
        assert torch.isfinite(sampled[key]).all() and (sampled[key] >= 0).all()
        torch.testing.assert_close(sampled[key], again[key])  # same draws, same Fisher
    # An untrained tiny model almost never predicts the true answer: different labels.
    assert any(not torch.allclose(sampled[k], empirical[k]) for k in sampled)


def test_global_point_fisher_is_taken_before_training(
    tiny_llm, tiny_edge, batcher, samples
) -> None:
    _, backend = tiny_llm
    torch.nn.init.normal_(tiny_edge.adapters.text.lora_B.weight, std=0.1)
    start = tiny_edge.adapters.adapter_state_dict()
    cfg = TrainConfig(steps=3, batch_size=8, lr=5e-2, fisher_samples=24, fisher_point="global")
    res = run_round(tiny_edge, backend, batcher, samples, start, cfg, client_id="c", seed=3)
    tiny_edge.adapters.load_adapter_state_dict(start)
    at_start = estimate_fisher(tiny_edge, backend, batcher, samples, batch_size=32)
    assert res.update.fisher is not None
    for key, value in at_start.items():  # all 24 samples: no subsampling, same point
        torch.testing.assert_close(res.update.fisher[key], value)


def test_micro_batches_take_the_whole_batch_step(tiny_llm, tiny_edge, batcher) -> None:
    # Rows of different lengths and uneven parts (3 + 3 + 2): each part is trimmed to its own
    # longest row and weighted by its rows, and the step is the whole batch's.
    _, backend = tiny_llm
    torch.nn.init.normal_(tiny_edge.adapters.text.lora_B.weight, std=0.05)
    varied = [VQASample(f"img/{i}", "what colour is the shape?" + " really" * (i % 4),
                        ANSWERS[i % 3], "color") for i in range(24)]
    start = tiny_edge.adapters.adapter_state_dict()
    results = []
    for micro in (None, 3):
        cfg = TrainConfig(steps=3, batch_size=8, lr=5e-2, fisher_samples=0,
                          micro_batch_size=micro)
        counting = CountingBackend(backend)
        tiny_edge.adapters.load_adapter_state_dict(start)
        losses = local_steps(tiny_edge, counting, batcher, varied, start, cfg,
                             torch.Generator().manual_seed(0))
        results.append((losses, tiny_edge.adapters.adapter_state_dict(), counting.training.steps))
    (whole, whole_state, whole_calls), (parts, parts_state, parts_calls) = results
    assert (whole_calls, parts_calls) == (3, 9)
    assert parts == pytest.approx(whole, rel=1e-5)
    for key in whole_state:
        torch.testing.assert_close(parts_state[key], whole_state[key], rtol=1e-4, atol=1e-6)
