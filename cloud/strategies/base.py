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

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


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
