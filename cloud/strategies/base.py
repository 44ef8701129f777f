"""The strategy contract: one small class per aggregation rule, no round state inside.

Modelled on Flower's server strategies: ``aggregate`` returns ``None`` when it cannot aggregate
(no updates, or fewer than ``min_updates``), the merge maths live in ``shared.merge`` as pure
functions, and the round service persists whatever a round needs to remember.

Two options apply to every strategy:

- **FFA-LoRA** (``ffa=True``, Sun et al. 2024): devices keep each adapter's A at the shared
  global value and train only B (``train_a=False`` in their task), so the merged B·A is exactly
  the weighted combination of the devices' products and A's delta is zero on the wire.
- **A server optimiser** on the merged step Δ (Reddi et al. 2021; FedAvgM, Hsu et al. 2019):
  ``step_t = server_lr · Δ_t + server_momentum · step_{t-1}``, where ``step_{t-1}`` is the
  previous global version's own step (θ_{t-1} − θ_{t-2}): heavy-ball momentum whose whole state
  is the last two versions, which the cloud already stores. ``server_lr=1, server_momentum=0``
  is plain aggregation.

A round's updates can also be merged **streaming** (``Strategy.stream``): the aggregation service
folds each update in as it decodes it and drops it, so its memory is flat in the number of
updates. Every λ_k = n_k / N is known before the first update is read (the sample counts come
with the update rows), and each strategy folds updates with the operations of its list merge
(``merge_delta``), so both give the same bits. A strategy that needs every update at once (a
median) keeps them in its ``DeltaMerge`` (``KeptUpdates``) and merges them at the end.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from shared.adapters import AdapterState
from shared.merge import apply_delta, server_step
from shared.training import StrategyNeeds, TaskHParams
from shared.update import AdapterUpdate


class Strategy(ABC):
    """Turns the global adapter state and a round's updates into the next global state."""

    name: ClassVar[str]
    requires_fisher: ClassVar[bool] = False
    memory_flat: ClassVar[bool] = False  # True where delta_merge folds into running sums

    def __init__(self, *, min_updates: int = 1, ffa: bool = False, server_lr: float = 1.0,
                 server_momentum: float = 0.0) -> None:
        if isinstance(min_updates, bool) or not isinstance(min_updates, int) or min_updates < 1:
            raise ValueError(f"min_updates must be an integer >= 1, got {min_updates!r}")
        if not isinstance(ffa, bool):
            raise ValueError(f"ffa must be true or false, got {ffa!r}")
        self.min_updates = min_updates
        self.ffa = ffa
        self.server_lr = positive("server_lr", server_lr)
        self.server_momentum = non_negative("server_momentum", server_momentum)
        if self.server_momentum >= 1:
            raise ValueError(f"server_momentum must be < 1, got {server_momentum!r}")

    def client_hparams(self) -> dict[str, object]:
        """Hyper-parameters every device gets in its round task (no proximal term by default)."""
        return {"prox_mu": 0.0, "train_a": not self.ffa}

    def training_needs(self) -> StrategyNeeds:
        """What this merge asks of every device's training: a Fisher or none, and
        ``client_hparams`` (``shared.training`` says how they rank against the operator's
        values and the device's own)."""
        return StrategyNeeds(fisher=self.requires_fisher,
                             hparams=TaskHParams.model_validate(self.client_hparams()))

    @property
    def picks_by_steps(self) -> bool:
        """True when ``for_round`` picks the merge by the local steps, so a round's task must
        say how many steps devices train (they could not keep their own)."""
        return False

    def for_round(self, local_steps: int) -> Strategy:
        """The strategy that merges a round whose devices train ``local_steps`` steps each.

        Most strategies are the same in every round and return themselves; a strategy that
        picks its merge by the training regime (``fednano``) returns the one it picked.
        """
        return self

    def config(self) -> dict[str, object]:
        """Constructor arguments: ``make_strategy(s.name, **s.config())`` rebuilds ``s``."""
        return {"min_updates": self.min_updates, "ffa": self.ffa, "server_lr": self.server_lr,
                "server_momentum": self.server_momentum}

    @property
    def uses_previous_step(self) -> bool:
        """True when ``aggregate`` needs the previous version's step (server momentum)."""
        return self.server_momentum > 0

    def aggregate(
        self, global_state: AdapterState, updates: Sequence[AdapterUpdate],
        previous_step: AdapterState | None = None,
    ) -> AdapterState | None:
        """The new global state, or ``None`` when there are fewer than ``min_updates`` updates.

        ``previous_step`` (θ_{t-1} − θ_{t-2}; None in the first round) feeds the server
        momentum. Raises ``ValueError`` (naming the client) for an update that does not fit:
        wrong keys or shapes, non-finite values, or a missing Fisher when ``requires_fisher``.
        """
        if len(updates) == 0 or len(updates) < self.min_updates:
            return None
        if self.requires_fisher:
            _require_fisher(self.name, updates)
        merged = self.merge_delta(global_state, updates)
        step = server_step(merged, previous_step, lr=self.server_lr,
                           momentum=self.server_momentum)
        return apply_delta(global_state, step)

    @abstractmethod
    def merge_delta(self, global_state: AdapterState,
                    updates: Sequence[AdapterUpdate]) -> AdapterState:
        """The merged step Δ of a non-empty list of updates (already checked by ``aggregate``)."""

    def stream(
        self, global_state: AdapterState, n_samples: Sequence[int],
        previous_step: AdapterState | None = None,
    ) -> RoundMerge | None:
        """``aggregate`` one update at a time: ``add`` each of the updates whose sample counts
        are ``n_samples`` (in that order), then ``result``; ``None`` when there are fewer than
        ``min_updates``. Same result as ``aggregate`` on the list (the same bits), in memory
        flat in the number of updates where ``memory_flat``."""
        if len(n_samples) == 0 or len(n_samples) < self.min_updates:
            return None
        return RoundMerge(self, global_state, n_samples, previous_step)

    def delta_merge(self, global_state: AdapterState, n_samples: Sequence[int]) -> DeltaMerge:
        """The streaming form of ``merge_delta`` for updates with these sample counts.

        This default keeps every update and calls ``merge_delta`` at the end: right for any
        strategy, flat in memory for none. Strategies whose merge is a sum over updates
        override it.
        """
        return KeptUpdates(self, global_state)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class DeltaMerge(ABC):
    """A strategy's merged step Δ in the making: updates are folded in one at a time.

    A merge whose state is a sum over updates can also be **sharded**: several merges made for
    the same sample counts each fold a contiguous run of the updates (in other processes), and
    one of them ``join``s the others' ``sums`` in shard order. ``shardable`` says whether it
    can; one that keeps its updates (a median) cannot.
    """

    shardable: ClassVar[bool] = False

    @abstractmethod
    def add(self, update: AdapterUpdate, index: int) -> None:
        """Fold in update number ``index`` (in the order of the sample counts the merge was
        made for: its weight is the ``index``-th)."""

    @abstractmethod
    def merged_delta(self) -> AdapterState:
        """Δ of every update added."""

    def sums(self) -> dict[str, object]:
        """The running sums, as plain values another process can send (``shardable`` only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded")

    def join(self, sums: dict[str, object]) -> None:
        """Add the ``sums`` of a shard folded elsewhere (``shardable`` only)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be sharded")


class KeptUpdates(DeltaMerge):
    """Keeps the updates and merges them at the end: for a strategy that needs them all at
    once (a coordinate-wise median cannot be taken from running sums)."""

    def __init__(self, strategy: Strategy, global_state: AdapterState) -> None:
        self.strategy = strategy
        self.global_state = global_state
        self.updates: list[AdapterUpdate] = []

    def add(self, update: AdapterUpdate, index: int) -> None:
        self.updates.append(update)

    def merged_delta(self) -> AdapterState:
        return self.strategy.merge_delta(self.global_state, self.updates)


class RoundMerge:
    """``Strategy.aggregate`` one update at a time (``Strategy.stream`` makes it): the checks
    ``aggregate`` makes on the list are made on each update as it comes, and the server step
    is applied in ``result``."""

    def __init__(self, strategy: Strategy, global_state: AdapterState,
                 n_samples: Sequence[int], previous_step: AdapterState | None,
                 start: int = 0) -> None:
        if isinstance(start, bool) or not isinstance(start, int) \
                or not 0 <= start <= len(n_samples):
            raise ValueError(f"start must be an update index in [0, {len(n_samples)}], "
                             f"got {start!r}")
        self.strategy = strategy
        self.global_state = global_state
        self.n_samples = list(n_samples)
        self.previous_step = previous_step
        self.deltas = strategy.delta_merge(global_state, self.n_samples)
        self.start = start
        self.count = start  # the index of the next update to add

    @property
    def shardable(self) -> bool:
        """Whether runs of the updates can be folded elsewhere and ``join``ed."""
        return self.deltas.shardable

    def shard(self, start: int) -> RoundMerge:
        """An empty merge for the same round that folds the updates from ``start`` on: fold a
        run of them into it (in another process), send its ``sums``, ``join`` them here."""
        if not self.shardable:
            raise ValueError(f"strategy {self.strategy.name!r} keeps its updates: "
                             "its merge cannot be sharded")
        return RoundMerge(self.strategy, self.global_state, self.n_samples, self.previous_step,
                          start=start)

    def add(self, update: AdapterUpdate) -> None:
        """Fold in the next update; ``ValueError`` (naming the client) if it does not fit: more
        updates than announced, another sample count, no Fisher where one is needed, or what
        the strategy's own merge refuses (keys, shapes, non-finite values)."""
        if self.count >= len(self.n_samples):
            raise ValueError(f"update {update.client_id!r} is one more than the "
                             f"{len(self.n_samples)} announced")
        expected = self.n_samples[self.count]
        if update.n_samples != expected:
            raise ValueError(f"update {update.client_id!r} has {update.n_samples} samples, "
                             f"announced {expected}")
        if self.strategy.requires_fisher:
            _require_fisher(self.strategy.name, [update])
        self.deltas.add(update, self.count)
        self.count += 1

    def sums(self) -> dict[str, object]:
        """What this shard folded (its running sums and how many updates), for ``join``."""
        return {"start": self.start, "added": self.count - self.start,
                "sums": self.deltas.sums()}

    def join(self, shard: dict[str, object]) -> None:
        """Add a shard's ``sums``: shards are joined in update order, each starting where the
        updates added or joined so far end."""
        start, added, sums = shard.get("start"), shard.get("added"), shard.get("sums")
        if start != self.count:
            raise ValueError(f"a shard starting at update {start!r} cannot follow "
                             f"{self.count} updates")
        if isinstance(added, bool) or not isinstance(added, int) \
                or not 0 <= added <= len(self.n_samples) - self.count \
                or not isinstance(sums, dict):
            raise ValueError(f"a shard of {added!r} updates does not fit the "
                             f"{len(self.n_samples) - self.count} left")
        self.deltas.join(sums)
        self.count += added

    def result(self) -> AdapterState:
        """The new global state, once every announced update was added."""
        if self.count != len(self.n_samples) or self.start != 0:
            raise ValueError(f"got {self.count - self.start} updates, announced "
                             f"{len(self.n_samples)}")
        merged = self.deltas.merged_delta()
        step = server_step(merged, self.previous_step, lr=self.strategy.server_lr,
                           momentum=self.strategy.server_momentum)
        return apply_delta(self.global_state, step)


def _require_fisher(name: str, updates: Sequence[AdapterUpdate]) -> None:
    missing = [u.client_id for u in updates if u.fisher is None]
    if missing:
        raise ValueError(f"strategy {name!r} needs a Fisher with every update; none from {missing}")


def non_negative(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number >= 0, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def positive(name: str, value: object) -> float:
    """``value`` as a float if it is a finite real number > 0, else ``ValueError``."""
    if non_negative(name, value) == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)  # type: ignore[arg-type]
