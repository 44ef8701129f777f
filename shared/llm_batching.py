"""Batching maths for the frozen LLM: several callers' rows in one forward/backward.

Requests from different devices are right-padded to a common length (attention mask 0, labels
``IGNORE_INDEX``) and concatenated. Rows do not interact inside the LLM and right padding leaves
the real tokens' causal context unchanged, so each request's rows come out as they would alone,
except for the gradient's ``1/B`` factor: the batch scales each row by ``1/B_total``, a request
alone by ``1/B_request``, hence the ``B_total / B_request`` rescale in ``split_step``.
Used by the cloud's LLM worker (dynamic batching of MQTT requests) and by the in-process
simulation (devices training side by side).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Protocol

import torch

from shared.backend import StepResult
from shared.prompts import IGNORE_INDEX


class Rows(Protocol):
    """One caller's request: (B, L, d) embeddings, (B, L) mask, (B, L) labels or None."""

    embeds: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor | None

    @property
    def rows(self) -> int: ...

    @property
    def length(self) -> int: ...


def pad_batch(jobs: Sequence[Rows]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Concatenate the jobs' rows, right-padded to the longest: (B, L, d), (B, L), (B, L)."""
    length = max(job.length for job in jobs)
    embeds = torch.cat([_pad(job.embeds, length, 0.0) for job in jobs])  # (B, L, d)
    mask = torch.cat([_pad(job.mask, length, 0) for job in jobs])  # (B, L)
    labels = [job.labels for job in jobs]
    if any(label is None for label in labels):
        return embeds, mask, None
    padded = [_pad(label, length, IGNORE_INDEX) for label in labels if label is not None]
    return embeds, mask, torch.cat(padded)  # (B, L)


def _pad(tensor: torch.Tensor, length: int, value: float) -> torch.Tensor:
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    shape = (tensor.shape[0], missing, *tensor.shape[2:])
    return torch.cat([tensor, tensor.new_full(shape, value)], dim=1)


def split_step(result: StepResult, jobs: Sequence[Rows]) -> list[StepResult]:
    """Each job's share of a batched step, as if it had been run alone."""
    total = sum(job.rows for job in jobs)
    out, start = [], 0
    for job in jobs:
        losses = result.sample_losses[start:start + job.rows]  # (B_r,)
        grads = result.input_grads[start:start + job.rows, :job.length]  # (B_r, L_r, d)
        if job.rows != total:
            grads = grads * (total / job.rows)  # the batch's 1/B_total -> this request's 1/B_r
        out.append(StepResult(float(losses.mean()), losses.clone(), grads.contiguous()))
        start += job.rows
    return out


def split_score(logprobs: torch.Tensor, jobs: Sequence[Rows]) -> list[torch.Tensor]:
    """Each job's rows of a batched score (B, vocab)."""
    bounds = torch.tensor([0] + [job.rows for job in jobs]).cumsum(0).tolist()
    return [logprobs[a:b].contiguous() for a, b in itertools.pairwise(bounds)]
