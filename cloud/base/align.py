"""Connector alignment (LLaVA stage 1): train only the projector through the frozen LLM.

The projector is trained on image–caption pairs kept out of every device's data, exactly the way
a device trains its adapters: NanoEdge builds ``inputs_embeds``, the backend returns the loss and
the gradient w.r.t. those embeddings, and ``embeds.backward(grad)`` reaches the projector.

Two generic prompt kinds, mixed per sample (``instruction_fraction``):

- caption:      ``Image: <v> Caption: A red circle.``
- instruction:  ``Image: <v> Question: Describe the image. Answer: A red circle.`` with a few
  generic phrasings (``INSTRUCTIONS``), in the VQA template's format but never one of a task's
  question families, so the LLM learns to talk about the image after "Answer:" without being
  taught any device's questions.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from shared.adapters import AdapterConfig
from shared.backend import LLMBackend
from shared.connector import PoolingConnector
from shared.nanoedge import NanoEdge
from shared.prompts import PromptTemplate, TextTokenizer, collate

log = logging.getLogger(__name__)

VQA_TEMPLATE = PromptTemplate(
    prefix="Image:", middle=" Question: {question} Answer:", answer=" {answer}"
)
# The whole middle comes from the sample, so captions and instructions share one batch.
ALIGN_TEMPLATE = PromptTemplate(prefix="Image:", middle="{question}", answer=" {answer}")
CAPTION_MIDDLE = " Caption:"
INSTRUCTIONS = (
    "Describe the image.",
    "What is in the picture?",
    "What do you see?",
    "Give a short description of the image.",
    "What does this picture show?",
)


@dataclass(frozen=True)
class AlignConfig:
    """Hyper-parameters of the projector alignment."""

    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    instruction_fraction: float = 0.5  # share of samples prompted with a generic instruction

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps!r}, {self.batch_size!r}"
            )
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if not 0.0 <= self.instruction_fraction <= 1.0:
            raise ValueError(
                f"instruction_fraction must be in [0, 1], got {self.instruction_fraction!r}"
            )


def alignment_middles(count: int, fraction: float, generator: torch.Generator) -> list[str]:
    """``count`` prompt middles: a generic instruction with probability ``fraction``, else the
    caption cue."""
    use_instruction = torch.rand(count, generator=generator) < fraction
    picks = torch.randint(len(INSTRUCTIONS), (count,), generator=generator)
    return [
        VQA_TEMPLATE.middle.format(question=INSTRUCTIONS[int(p)]) if flag else CAPTION_MIDDLE
        for flag, p in zip(use_instruction.tolist(), picks.tolist(), strict=True)
    ]


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Index batches over seeded permutations of ``range(n)`` (a new permutation per epoch)."""
    order = torch.empty(0, dtype=torch.long)
    for _ in range(steps):
        while order.numel() < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def align_connector(
    connector: PoolingConnector,
    embedder: nn.Embedding,
    backend: LLMBackend,
    tokenizer: TextTokenizer,
    features: torch.Tensor,
    captions: Sequence[str],
    config: AlignConfig = AlignConfig(),
    *,
    progress: bool = True,
) -> list[float]:
    """Train ``connector.projector`` on pooled ``features`` (N, V, C) and their ``captions``.

    Everything else (encoder, embedder, LLM) stays frozen; the projector is frozen again at the
    end. Returns the loss of every step.
    """
    if features.dim() != 3 or features.shape[0] != len(captions) or not captions:
        raise ValueError(
            f"features must be (N, V, C) with N = {len(captions)} captions, "
            f"got {tuple(features.shape)}"
        )
    edge = NanoEdge(connector, embedder, AdapterConfig())
    edge.adapters.requires_grad_(False)  # fresh adapters are the identity; they do not train
    connector.projector.requires_grad_(True)
    optimizer = torch.optim.AdamW(connector.projector.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    losses: list[float] = []
    try:
        batches = _batches(len(captions), config.batch_size, config.steps, generator)
        with tqdm(batches, total=config.steps, desc="align connector", disable=not progress) as bar:
            for idx in bar:
                middles = alignment_middles(len(idx), config.instruction_fraction, generator)
                answers = [captions[int(i)] for i in idx]
                pooled = features[idx]  # (B, V, C)
                losses.append(_step(edge, backend, tokenizer, pooled, middles, answers, optimizer))
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if len(losses) % 20 == 0:  # also in logs, where a progress bar is not redrawn
                    log.info("align connector: step %d/%d, loss %.3f", len(losses),
                             config.steps, losses[-1])
    finally:
        connector.projector.requires_grad_(False)
    log.info("alignment: loss %.3f -> %.3f over %d steps", losses[0], losses[-1], len(losses))
    return losses


def _step(
    edge: NanoEdge,
    backend: LLMBackend,
    tokenizer: TextTokenizer,
    pooled: torch.Tensor,
    middles: list[str],
    answers: list[str],
    optimizer: torch.optim.Optimizer,
) -> float:
    connector = edge.connector
    assert isinstance(connector, PoolingConnector)
    batch = collate(tokenizer, ALIGN_TEMPLATE, middles, answers, connector.num_tokens)
    visual = connector.project(pooled)  # (B, V, d), grad flows to the projector
    embeds = edge(visual, batch)  # (B, L, d)
    result = backend.loss_and_input_grads(embeds.detach(), batch.attention_mask, batch.labels)
    optimizer.zero_grad(set_to_none=True)
    embeds.backward(result.input_grads)
    optimizer.step()
    return result.loss
