"""Held-out evaluation of a global adapter on the real base, for the aggregation service.

``base_evaluator(base, n)`` fixes ``n`` easy-VQA test questions (never seen by any device),
computes their visual tokens once (frozen encoder + connector, cached by the base's feature
store) and returns an ``Evaluator``: load the adapter into the base's NanoEdge and score every
candidate answer's first token through the in-process LLM (``shared.evaluation``).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from cloud.aggregation import Evaluation, Evaluator
from cloud.base.build import LoadedBase
from shared.adapters import AdapterState
from shared.batches import VisualLookup, VQABatcher
from shared.data.base import VQASample, VQATask
from shared.evaluation import evaluate


def visual_lookup(base: LoadedBase, task: VQATask, samples: Sequence[VQASample]) -> VisualLookup:
    """Visual tokens of the samples' images, computed once: image keys -> (N, V, d)."""
    keys = sorted({s.image_key for s in samples})
    base.features.extract(keys, task.load_image, base.pretrained.encoder, base.connector)
    with torch.no_grad():
        table = base.connector.project(base.features.get(keys))  # (N, V, d)
    index = {key: i for i, key in enumerate(keys)}

    def lookup(batch_keys: Sequence[str]) -> torch.Tensor:
        return table[[index[k] for k in batch_keys]]

    return lookup


def base_evaluator(base: LoadedBase, n_questions: int, *, seed: int = 0,
                   task: VQATask | None = None) -> Evaluator:
    """An evaluator on ``n_questions`` fixed held-out questions of ``task`` (easy-VQA)."""
    if task is None:
        from shared.data.easyvqa import load_easy_vqa

        task = load_easy_vqa()
    if not 1 <= n_questions <= len(task.test):
        raise ValueError(f"n_questions must be 1..{len(task.test)}, got {n_questions!r}")
    samples = random.Random(seed).sample(task.test, n_questions)
    batcher = VQABatcher(base.tokenizer, base.template, visual_lookup(base, task, samples),
                         base.connector.num_tokens)
    answers = task.answers

    def run(state: AdapterState) -> Evaluation:
        base.edge.adapters.load_adapter_state_dict(state)
        result = evaluate(base.edge, base.backend, batcher, samples, answers)
        return Evaluation(accuracy=result.accuracy, n=result.n, per_type=result.per_type)

    return run
