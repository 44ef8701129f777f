"""Closed-answer VQA accuracy: score every candidate answer's first token, take the best.

Candidates of a task must have distinct first tokens under its answer template (checked by
``candidate_first_tokens``); a multi-token answer such as " teal" (" te" + "al") is trained on
all its tokens and scored by its first one, which no other candidate shares.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from shared.backend import LLMBackend
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.nanoedge import NanoEdge
from shared.prompts import candidate_first_tokens


@dataclass
class EvalResult:
    accuracy: float
    n: int
    per_type: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {"accuracy": self.accuracy, "n": self.n, "per_type": self.per_type}


@torch.no_grad()
def predict(
    edge: NanoEdge, backend: LLMBackend, batcher: VQABatcher,
    samples: Sequence[VQASample], candidates: Sequence[str], batch_size: int = 64,
    progress: str | None = None,
) -> list[str]:
    """The highest-scoring candidate answer for each sample (``progress``: a bar's label)."""
    firsts = candidate_first_tokens(batcher.tokenizer, batcher.template, candidates)
    was_training = edge.training
    edge.eval()
    predictions: list[str] = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc=progress, leave=False, disable=progress is None):
        visual, batch = batcher.batch(samples[start : start + batch_size], with_answers=False)
        logprobs = backend.score(edge(visual, batch), batch.attention_mask)  # (B, vocab)
        best = logprobs[:, firsts].argmax(dim=1)  # (B,)
        predictions.extend(candidates[i] for i in best.tolist())
    edge.train(was_training)
    return predictions


def evaluate(
    edge: NanoEdge, backend: LLMBackend, batcher: VQABatcher,
    samples: Sequence[VQASample], candidates: Sequence[str], batch_size: int = 64,
    progress: str | None = None,
) -> EvalResult:
    """Accuracy overall and per question type (``progress``: label of a progress bar)."""
    if not samples:
        raise ValueError("cannot evaluate on zero samples")
    predictions = predict(edge, backend, batcher, samples, candidates, batch_size, progress)
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, predicted in zip(samples, predictions, strict=True):
        hits[sample.question_type].append(predicted == sample.answer)
    total = sum(sum(h) for h in hits.values())
    per_type = {t: sum(h) / len(h) for t, h in sorted(hits.items())}
    return EvalResult(total / len(samples), len(samples), per_type)
