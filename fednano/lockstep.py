"""Devices of a simulated round trained side by side, their LLM calls batched into one.

Every device of a round calls the same frozen LLM. ``run_rounds_lockstep`` runs each device's
unchanged ``edge.trainer.run_round`` in its own thread with its own adapters (the frozen
connector and embedder are shared), and ``LockstepLLM`` holds each LLM call until every device
still training has made one, then runs them as one batch (``shared.llm_batching``: rows of
different devices side by side, each device's gradient rows routed back to it, rescaled as if
it had run alone). On a GPU, K devices then cost about one device's LLM time.

The result is the sequential loop's up to float rounding: the batch is assembled in device order
whatever order the threads arrive in, so a run is repeatable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from edge.trainer import RoundResult
from shared.backend import LLMBackend, StepResult
from shared.llm_batching import pad_batch, split_score, split_step
from shared.nanoedge import NanoEdge


@dataclass
class _Call:
    party: int
    op: str  # "step" | "score"
    embeds: torch.Tensor  # (B, L, d)
    mask: torch.Tensor  # (B, L)
    labels: torch.Tensor | None
    result: StepResult | torch.Tensor | None = None
    error: BaseException | None = None
    done: bool = False

    @property
    def rows(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def length(self) -> int:
        return int(self.embeds.shape[1])


@dataclass
class _Stats:
    calls: int = 0  # device calls answered
    batches: int = 0  # LLM calls made
    rows: list[int] = field(default_factory=list)


class LockstepLLM:
    """Gathers the calls of ``parties`` devices into one LLM call per op while they train.

    Devices call from their own threads and wait; ``serve`` (the caller's thread) runs each
    batch, so every large LLM allocation happens in one thread (several threads allocating and
    freeing big tensors fragment glibc's per-thread heaps and bloat the process by gigabytes).
    """

    def __init__(self, inner: LLMBackend, parties: int) -> None:
        if parties < 1:
            raise ValueError(f"need at least one party, got {parties!r}")
        self.inner = inner
        self.active = parties
        self.pending: list[_Call] = []
        self.cond = threading.Condition()
        self.stats = _Stats()

    def party(self, index: int) -> _Party:
        """The ``LLMBackend`` device ``index`` trains through."""
        return _Party(self, index)

    def leave(self) -> None:
        """A device is done: the others no longer wait for its calls."""
        with self.cond:
            self.active -= 1
            self.cond.notify_all()

    def call(self, call: _Call) -> StepResult | torch.Tensor:
        """A device's call: queued, answered by ``serve`` once every device has called."""
        with self.cond:
            self.pending.append(call)
            self.cond.notify_all()
            while not call.done:
                self.cond.wait()
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def serve(self) -> None:
        """Run batches until every device has left (in the thread that owns the LLM)."""
        while True:
            with self.cond:
                while self.active > 0 and (not self.pending
                                           or len(self.pending) < self.active):
                    self.cond.wait()
                if not self.pending:
                    return  # every device left
                batch = sorted(self.pending, key=lambda c: c.party)
                self.pending = []
            for op in ("step", "score"):
                group = [c for c in batch if c.op == op]
                if group:
                    self._run(op, group)
            with self.cond:
                for call in batch:
                    call.done = True
                self.cond.notify_all()

    def _run(self, op: str, group: list[_Call]) -> None:
        try:
            embeds, mask, labels = pad_batch(group)
            if op == "step":
                assert labels is not None
                results: Sequence[StepResult | torch.Tensor] = split_step(
                    self.inner.loss_and_input_grads(embeds, mask, labels), group)
            else:
                results = split_score(self.inner.score(embeds, mask), group)
            for call, result in zip(group, results, strict=True):
                call.result = result
        except Exception as err:  # noqa: BLE001 - handed to every waiting device, re-raised there
            for call in group:
                call.error = err
        self.stats.calls += len(group)
        self.stats.batches += 1
        self.stats.rows.append(sum(c.rows for c in group))


class _Party:
    """One device's view of a ``LockstepLLM``: an ``LLMBackend``."""

    def __init__(self, hub: LockstepLLM, index: int) -> None:
        self.hub = hub
        self.index = index

    def loss_and_input_grads(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> StepResult:
        result = self.hub.call(_Call(self.index, "step", inputs_embeds, attention_mask, labels))
        assert isinstance(result, StepResult)
        return result

    def score(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        result = self.hub.call(_Call(self.index, "score", inputs_embeds, attention_mask, None))
        assert isinstance(result, torch.Tensor)
        return result


DeviceRound = Callable[[NanoEdge, LLMBackend], RoundResult]


def run_rounds_lockstep(
    template: NanoEdge, backend: LLMBackend, rounds: Sequence[DeviceRound],
) -> tuple[list[RoundResult], _Stats]:
    """Run each ``rounds[k](edge_k, llm_k)`` in its own thread, LLM calls batched.

    ``edge_k`` shares ``template``'s frozen connector, embedder and encoder and has adapters of
    its own. The first device error is re-raised once every thread has stopped.
    """
    hub = LockstepLLM(backend, len(rounds))
    results: list[RoundResult | None] = [None] * len(rounds)
    errors: list[BaseException] = []

    # Built here, in order: a new adapter draws its random init from torch's global generator.
    edges = [NanoEdge(template.connector, template.embedder, template.adapters.config,
                      encoder=template.encoder) for _ in rounds]

    def work(k: int) -> None:
        try:
            results[k] = rounds[k](edges[k], hub.party(k))
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
        finally:
            hub.leave()

    threads = [threading.Thread(target=work, args=(k,), name=f"device-{k}")
               for k in range(len(rounds))]
    for thread in threads:
        thread.start()
    hub.serve()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [r for r in results if r is not None], hub.stats
