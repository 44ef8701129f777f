"""Device-side training of the NanoAdapters by split learning through the cloud LLM.

A round reads top to bottom: load the global adapters -> local steps (AdamW, optional FedProx
term) -> Δθ -> diagonal Fisher -> an ``AdapterUpdate``. Each LLM call goes through an
``LLMBackend``, so the same code trains against an in-process LLM or a remote one. The round's
parameters are a ``shared.training.TrainConfig`` (``resolve_training`` says whose values).

Fisher estimator: the diagonal Fisher ``F = 1/M Σ_i (∇θ log p(y_i | x_i))²`` over
``M = min(fisher_samples, n_local)`` local samples. ``fisher_labels="empirical"`` uses the true
answers (``log p(y | x)`` summed over the answer tokens); ``"sampled"`` draws each ``y_i`` from the
model's own next-token distribution at the first answer position (the "true" Fisher of Kunstner
et al. 2019: one extra forward-only LLM call per batch). ``fisher_point`` says where: at the
device's trained model (``"local"``, the paper's choice) or at the global model it received
(``"global"``, before local training, the same point for every device). Per-sample gradients cost
one LLM call per batch: samples do not interact inside the LLM, so row i of the returned input
gradient is sample i's own gradient (scaled by 1/B and by 1/#answer tokens, which we undo).

``train_a=False`` is FFA-LoRA (Sun et al. 2024): every device keeps each adapter's A at the
shared global value and trains only B, so the adapter B·A is linear in what the server merges
and A's delta and Fisher are exactly zero (they compress to almost nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from shared.adapters import AdapterState
from shared.backend import LLMBackend
from shared.batches import VQABatcher
from shared.data.base import VQASample
from shared.nanoedge import NanoEdge
from shared.prompts import IGNORE_INDEX, EncodedBatch
from shared.training import TrainConfig
from shared.update import AdapterUpdate


@dataclass
class RoundResult:
    update: AdapterUpdate
    losses: list[float] = field(default_factory=list)


def run_round(
    edge: NanoEdge, backend: LLMBackend, batcher: VQABatcher, samples: Sequence[VQASample],
    global_state: AdapterState, config: TrainConfig, *, client_id: str, seed: int,
    base_version: int = 0,
) -> RoundResult:
    """One device round: θ_global -> local steps -> (Δθ, Fisher)."""
    edge.adapters.load_adapter_state_dict(global_state)
    generator = torch.Generator().manual_seed(seed)
    fisher = None
    if config.fisher_samples > 0 and config.fisher_point == "global":
        fisher = round_fisher(edge, backend, batcher, samples, config, generator)
    losses = local_steps(edge, backend, batcher, samples, global_state, config, generator)
    delta = compute_delta(edge.adapters.adapter_state_dict(), global_state)
    if config.fisher_samples > 0 and config.fisher_point == "local":
        fisher = round_fisher(edge, backend, batcher, samples, config, generator)
    metrics = {"loss_first": losses[0], "loss_last": losses[-1], "steps": float(len(losses))}
    update = AdapterUpdate(client_id, delta, len(samples), fisher, base_version, metrics)
    return RoundResult(update, losses)


def round_fisher(
    edge: NanoEdge, backend: LLMBackend, batcher: VQABatcher, samples: Sequence[VQASample],
    config: TrainConfig, generator: torch.Generator,
) -> AdapterState:
    """The round's Fisher on ``fisher_samples`` of the device's samples, as configured."""
    fisher_set = _subsample(samples, config.fisher_samples, generator)
    return estimate_fisher(
        edge, backend, batcher, fisher_set, config.fisher_batch_size, train_a=config.train_a,
        labels=config.fisher_labels, generator=generator,
    )


def local_steps(
    edge: NanoEdge, backend: LLMBackend, batcher: VQABatcher, samples: Sequence[VQASample],
    global_state: AdapterState, config: TrainConfig, generator: torch.Generator,
) -> list[float]:
    """``config.steps`` optimizer steps on random local batches; returns the loss per step."""
    named = _named_parameters(edge, train_a=config.train_a)
    params = list(named.values())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    anchors = [global_state[k] for k in named] if config.prox_mu else []
    batches = batcher.shuffled(samples, config.batch_size, generator)
    edge.train()
    losses = []
    for _ in range(config.steps):
        visual, batch = next(batches)
        losses.append(train_step(edge, backend, optimizer, visual, batch,
                                 micro_batch_size=config.micro_batch_size))
        if config.prox_mu:
            _add_proximal_grad(params, anchors, config.prox_mu)
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
    edge.eval()
    return losses


def train_step(
    edge: NanoEdge, backend: LLMBackend, optimizer: torch.optim.Optimizer,
    visual: torch.Tensor, batch: EncodedBatch, *, micro_batch_size: int | None = None,
) -> float:
    """Adapters forward, LLM loss and input grads from the backend, backward into the adapters.

    Leaves the gradients in the adapters; the caller adds regularisers and steps. With
    ``micro_batch_size`` below the batch's rows, the batch goes through in parts and each
    part's gradient is weighted by its share of the rows: the backend's loss is a mean over
    rows, so the sum is the whole batch's gradient (up to rounding) at a part's memory.
    """
    optimizer.zero_grad(set_to_none=True)
    rows = batch.size
    size = min(micro_batch_size or rows, rows)
    loss = 0.0
    for start in range(0, rows, size):
        part = _rows(batch, start, start + size)
        embeds = edge(visual[start : start + size], part)  # (b, L, d)
        result = backend.loss_and_input_grads(embeds.detach(), part.attention_mask, part.labels)
        if not torch.isfinite(result.input_grads).all():
            raise FloatingPointError(
                f"LLM returned non-finite input gradients (loss {result.loss})")
        share = part.size / rows
        embeds.backward(result.input_grads * share if share < 1 else result.input_grads)
        loss += result.loss * share
    return loss


def _rows(batch: EncodedBatch, start: int, stop: int) -> EncodedBatch:
    """Rows ``start:stop`` of a right-padded batch, trimmed to their own longest row."""
    if start == 0 and stop >= batch.size:
        return batch
    width = int(batch.attention_mask[start:stop].sum(dim=1).max())
    return EncodedBatch(*(t[start:stop, :width] for t in (
        batch.input_ids, batch.image_mask, batch.attention_mask, batch.labels)))


def _add_proximal_grad(
    params: list[torch.nn.Parameter], anchors: list[torch.Tensor], mu: float
) -> None:
    # d/dθ of mu/2 * ||θ - θ_g||² is mu * (θ - θ_g).
    with torch.no_grad():
        for param, anchor in zip(params, anchors, strict=True):
            if param.grad is not None:
                param.grad.add_(param - anchor, alpha=mu)


def compute_delta(local: AdapterState, global_state: AdapterState) -> AdapterState:
    """Δθ = θ_local − θ_global, key by key."""
    if set(local) != set(global_state):
        raise ValueError(f"keys differ: {sorted(local)} vs {sorted(global_state)}")
    return {k: local[k] - global_state[k] for k in local}


def estimate_fisher(
    edge: NanoEdge, backend: LLMBackend, batcher: VQABatcher,
    samples: Sequence[VQASample], batch_size: int = 32, *, train_a: bool = True,
    labels: str = "empirical", generator: torch.Generator | None = None,
) -> AdapterState:
    """Diagonal Fisher of the adapter parameters (see the module docstring).

    Parameters that do not train (A with ``train_a=False``) get an all-zero Fisher.
    """
    if not samples:
        raise ValueError("cannot estimate a Fisher from zero samples")
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    everything = _named_parameters(edge)
    named = _named_parameters(edge, train_a=train_a)
    names, params = list(named), list(named.values())
    fisher = [torch.zeros_like(p) for p in params]
    edge.eval()  # no dropout: the Fisher of the model as it will be merged
    for start in range(0, len(samples), batch_size):
        visual, batch = batcher.batch(samples[start : start + batch_size])
        if labels == "sampled":
            batch = _sampled_labels(edge, backend, batcher, samples[start : start + batch_size],
                                    visual, batch, generator)
        for grads in _per_sample_grads(edge, backend, visual, batch, params):
            for acc, g in zip(fisher, grads, strict=True):
                acc.add_(g.square())
    estimated = {name: acc / len(samples) for name, acc in zip(names, fisher, strict=True)}
    return {key: estimated.get(key, torch.zeros_like(p)) for key, p in everything.items()}


@torch.no_grad()
def _sampled_labels(
    edge: NanoEdge, backend: LLMBackend, batcher: VQABatcher, samples: Sequence[VQASample],
    visual: torch.Tensor, batch: EncodedBatch, generator: torch.Generator | None,
) -> EncodedBatch:
    """``batch`` with one label per row: a token drawn from the model at the first answer slot.

    The logits that predict the first answer token see only the prompt before it, so the
    answered batch's layout gives ``log p(y | prompt)`` for the drawn y with its labels rewritten.
    """
    _, open_batch = batcher.batch(samples, with_answers=False)
    logprobs = backend.score(edge(visual, open_batch), open_batch.attention_mask)  # (B, vocab)
    drawn = torch.multinomial(logprobs.float().exp(), 1, generator=generator).squeeze(1)  # (B,)
    answer = batch.labels != IGNORE_INDEX  # (B, L)
    first = answer.int().argmax(dim=1)  # (B,) first answer position per row
    labels = torch.full_like(batch.labels, IGNORE_INDEX)
    labels[torch.arange(batch.size), first] = drawn
    return dataclasses.replace(batch, labels=labels)


def _per_sample_grads(
    edge: NanoEdge, backend: LLMBackend, visual: torch.Tensor, batch: EncodedBatch,
    params: list[torch.nn.Parameter],
) -> list[tuple[torch.Tensor, ...]]:
    embeds = edge(visual, batch)  # (B, L, d)
    result = backend.loss_and_input_grads(embeds.detach(), batch.attention_mask, batch.labels)
    if not torch.isfinite(result.input_grads).all():
        raise FloatingPointError("LLM returned non-finite input gradients for the Fisher pass")
    # Undo the mean over samples (×B) and over each sample's answer tokens (×count_i).
    counts = (batch.labels[:, 1:] != IGNORE_INDEX).sum(dim=1).to(embeds.dtype)  # (B,)
    scale = (batch.size * counts).view(-1, 1, 1)
    per_sample = result.input_grads * scale  # (B, L, d): ∇_{e_i} of -log p(y_i | x_i)
    out = []
    for i in range(batch.size):
        grads = torch.autograd.grad(
            embeds[i], params, grad_outputs=per_sample[i], retain_graph=i < batch.size - 1
        )
        out.append(grads)
    return out


def _named_parameters(edge: NanoEdge, train_a: bool = True) -> dict[str, torch.nn.Parameter]:
    """Adapter parameters keyed by their protocol key (``ADAPTER_KEYS`` order); without A's
    when ``train_a`` is False (chosen by module: each adapter's ``lora_A``)."""
    frozen = set() if train_a else {
        id(adapter.lora_A.weight) for adapter in (edge.adapters.image, edge.adapters.text)}
    named = dict(edge.adapters.named_parameters())
    return {key: named[key] for key in edge.adapters.adapter_state_dict()
            if id(named[key]) not in frozen}


def _subsample(
    samples: Sequence[VQASample], n: int, generator: torch.Generator
) -> list[VQASample]:
    if n >= len(samples):
        return list(samples)
    picks = torch.randperm(len(samples), generator=generator)[:n].tolist()
    return [samples[i] for i in picks]
