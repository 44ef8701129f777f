from __future__ import annotations

import pytest
import torch

from shared.prompts import PromptTemplate, collate


def _batch(tok, answers=("red", "big blue")):  # type: ignore[no-untyped-def]
    return collate(tok, PromptTemplate(), ["what colour?", "which one is it?"], list(answers), 2)


def test_loss_matches_hf_per_sample_and_grads_are_exact(
    tiny_llm, tiny_edge, word_tokenizer
) -> None:
    model, backend = tiny_llm
    batch = _batch(word_tokenizer)
    embeds = tiny_edge(torch.randn(2, 2, 32), batch).detach()
    result = backend.loss_and_input_grads(embeds, batch.attention_mask, batch.labels)
    for i in range(2):
        hf = model(
            inputs_embeds=embeds[i : i + 1],
            attention_mask=batch.attention_mask[i : i + 1],
            labels=batch.labels[i : i + 1],
        )
        assert result.sample_losses[i].item() == pytest.approx(hf.loss.item(), rel=1e-5)
    # Gradient of the mean of per-sample losses, by autograd through the whole model.
    x = embeds.clone().requires_grad_(True)
    total = (
        sum(
            model(
                inputs_embeds=x[i : i + 1],
                attention_mask=batch.attention_mask[i : i + 1],
                labels=batch.labels[i : i + 1],
            ).loss
            for i in range(2)
        )
        / 2
    )
    total.backward()
    # float32 round-off between two summation orders (grads here reach ~4; seen 4e-6 apart)
    torch.testing.assert_close(result.input_grads, x.grad, rtol=1e-5, atol=1e-5)
    assert result.loss == pytest.approx(total.item(), rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # the LLM stays frozen


def test_score_is_log_softmax_at_last_real_token(tiny_llm, tiny_edge, word_tokenizer) -> None:
    model, backend = tiny_llm
    batch = collate(word_tokenizer, PromptTemplate(), ["a?", "a much longer question?"], None, 2)
    embeds = tiny_edge(torch.randn(2, 2, 32), batch).detach()
    scores = backend.score(embeds, batch.attention_mask)
    last = int(batch.attention_mask[0].sum()) - 1
    ref = model(inputs_embeds=embeds[:1, : last + 1]).logits[0, -1].log_softmax(-1)
    assert torch.allclose(scores[0], ref, atol=1e-5)


def test_bad_requests_raise_clear_errors(tiny_llm, tiny_edge, word_tokenizer) -> None:
    _, backend = tiny_llm
    batch = _batch(word_tokenizer)
    embeds = tiny_edge(torch.randn(2, 2, 32), batch).detach()
    nan = embeds.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        backend.loss_and_input_grads(nan, batch.attention_mask, batch.labels)
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        backend.loss_and_input_grads(embeds[..., :16], batch.attention_mask, batch.labels)
    with pytest.raises(ValueError, match="labels must be"):
        backend.loss_and_input_grads(embeds, batch.attention_mask, batch.labels[:, :-1])
    with pytest.raises(ValueError, match="answer token"):
        backend.loss_and_input_grads(
            embeds, batch.attention_mask, torch.full_like(batch.labels, -100)
        )
    backend.max_tokens = 4
    with pytest.raises(ValueError, match="exceeds the limit"):
        backend.score(embeds, batch.attention_mask)


def test_malformed_masks_and_labels_are_refused(tiny_llm, tiny_edge, word_tokenizer) -> None:
    _, backend = tiny_llm
    batch = _batch(word_tokenizer)
    embeds = tiny_edge(torch.randn(2, 2, 32), batch).detach()
    mask, labels = batch.attention_mask, batch.labels
    left_padded = mask.flip(dims=[1])
    with pytest.raises(ValueError, match="right-padded"):
        backend.score(embeds, left_padded)
    with pytest.raises(ValueError, match="only 0 and 1"):
        backend.score(embeds, mask * 2)
    too_big = labels.clone()
    too_big[labels != -100] = 10_000
    with pytest.raises(ValueError, match=r"token ids in \[0, 256\)"):
        backend.loss_and_input_grads(embeds, mask, too_big)
    at_pad = labels.clone()
    at_pad[0, -1] = 5  # row 0 is the shorter one: its last position is padding
    with pytest.raises(ValueError, match="padded positions"):
        backend.loss_and_input_grads(embeds, mask, at_pad)
    with pytest.raises(ValueError, match="integer token ids"):
        backend.loss_and_input_grads(embeds, mask, labels.float())
    with pytest.raises(ValueError, match="floating point"):
        backend.score(embeds.long(), mask)
