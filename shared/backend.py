"""The interface between a device's NanoEdge and the frozen LLM in the cloud.

Tensors in, tensors out: the in-process implementation (simulation, tests) and the MQTT one
(production) both satisfy it, and the device-side trainer only ever sees this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from shared.prompts import IGNORE_INDEX


@dataclass
class StepResult:
    """What the LLM returns for one split-training step."""

    loss: float  # mean over samples of each sample's mean answer-token loss
    sample_losses: torch.Tensor  # (B,)
    input_grads: torch.Tensor  # (B, L, d): d loss / d inputs_embeds


class LLMBackend(Protocol):
    """Frozen LLM: loss and input gradients for training, next-token logits for scoring."""

    def loss_and_input_grads(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> StepResult:
        """Frozen forward + backward to ``inputs_embeds`` only. Shapes (B, L, d), (B, L), (B, L).

        The contract every backend keeps (the device's Fisher relies on it): ``loss`` is the
        mean over rows of each row's mean answer-token cross-entropy, and ``input_grads`` is its
        gradient. Attention masks are right-padded; labels are ``IGNORE_INDEX`` or a token id.

        Samples do not interact inside the LLM, so row ``i`` of ``input_grads`` is
        ``1/B * d loss_i / d embeds_i``: per-sample gradients come free with the batch.
        """
        ...

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, vocab) of the next token after each row's last real token."""
        ...


def check_step_inputs(
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor | None,
    width: int,
    max_tokens: int,
    vocab_size: int | None = None,
) -> None:
    """Validate a request before it reaches the LLM; ``ValueError`` names what is wrong."""
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != width:
        raise ValueError(f"inputs_embeds must be (B, L, {width}), got {tuple(inputs_embeds.shape)}")
    batch, length = inputs_embeds.shape[:2]
    if batch == 0 or length == 0:
        raise ValueError(f"empty batch: inputs_embeds shape {tuple(inputs_embeds.shape)}")
    if length > max_tokens:
        raise ValueError(f"sequence of {length} tokens exceeds the limit of {max_tokens}")
    if tuple(attention_mask.shape) != (batch, length):
        raise ValueError(
            f"attention_mask must be {(batch, length)}, got {tuple(attention_mask.shape)}"
        )
    if labels is not None and tuple(labels.shape) != (batch, length):
        raise ValueError(f"labels must be {(batch, length)}, got {tuple(labels.shape)}")
    if not inputs_embeds.is_floating_point():
        raise ValueError(f"inputs_embeds must be floating point, got {inputs_embeds.dtype}")
    if not torch.isfinite(inputs_embeds).all():
        raise ValueError("inputs_embeds contains NaN or Inf")
    _check_mask(attention_mask)
    if labels is not None:
        _check_labels(labels, attention_mask, vocab_size)


def _check_mask(attention_mask: torch.Tensor) -> None:
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    if not bool((attention_mask.sum(dim=1) > 0).all()):
        raise ValueError("a row of attention_mask is all zeros")
    # Right padding: once a row has a 0 it has no more 1s (scoring reads the last real token).
    if bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
        raise ValueError("attention_mask must be right-padded (ones, then zeros)")


def _check_labels(
    labels: torch.Tensor, attention_mask: torch.Tensor, vocab_size: int | None
) -> None:
    if labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be integer token ids, got {labels.dtype}")
    answer = labels != IGNORE_INDEX
    if bool((answer & (attention_mask == 0)).any()):
        raise ValueError("labels mark answer tokens at padded positions")
    ids = labels[answer]
    if bool((ids < 0).any()) or (vocab_size is not None and bool((ids >= vocab_size).any())):
        raise ValueError(f"labels must be {IGNORE_INDEX} or token ids in [0, {vocab_size})")


@dataclass
class Traffic:
    """Bytes a device exchanged with the LLM (split training) — counted from real tensors."""

    up: int = 0
    down: int = 0
    steps: int = 0
    per_step: list[tuple[int, int]] = field(default_factory=list)


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@runtime_checkable
class ReportsWireBytes(Protocol):
    """A backend that knows what its last call put on the wire: (up, down) bytes."""

    def last_exchange(self) -> tuple[int, int]: ...


class CountingBackend:
    """Wraps a backend and counts its activation traffic: the bytes on the wire when the
    backend reports them (``ReportsWireBytes``: the remote LLM, ``WireBackend``), else the raw
    tensor bytes a float32 link would carry."""

    def __init__(self, inner: LLMBackend) -> None:
        self.inner = inner
        self.training = Traffic()
        self.scoring = Traffic()

    def loss_and_input_grads(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> StepResult:
        result = self.inner.loss_and_input_grads(inputs_embeds, attention_mask, labels)
        if isinstance(self.inner, ReportsWireBytes):
            self._count(self.training, *self.inner.last_exchange())
        else:
            self._count(
                self.training,
                tensor_bytes(inputs_embeds, attention_mask, labels),
                tensor_bytes(result.input_grads, result.sample_losses),
            )
        return result

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logprobs = self.inner.score(inputs_embeds, attention_mask)
        if isinstance(self.inner, ReportsWireBytes):
            self._count(self.scoring, *self.inner.last_exchange())
        else:
            self._count(
                self.scoring, tensor_bytes(inputs_embeds, attention_mask), tensor_bytes(logprobs)
            )
        return logprobs

    @staticmethod
    def _count(traffic: Traffic, up: int, down: int) -> None:
        traffic.up += up
        traffic.down += down
        traffic.steps += 1
        traffic.per_step.append((up, down))
