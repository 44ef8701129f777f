"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the adapter deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from cloud.strategies.base import Strategy
from shared.adapters import AdapterState
from shared.merge import sample_weights, weighted_average
from shared.update import AdapterUpdate


class FedAvg(Strategy):
    """``Δ = Σ_k λ_k Δ_k`` with ``λ_k = n_k / N``; Fishers, if sent, are ignored."""

    name: ClassVar[str] = "fedavg"

    def merge_delta(self, global_state: AdapterState,
                    updates: Sequence[AdapterUpdate]) -> AdapterState:
        weights = sample_weights([u.n_samples for u in updates])
        return weighted_average([u.delta for u in updates], weights)
