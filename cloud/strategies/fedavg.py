"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the adapter deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from cloud.strategies.base import DeltaMerge, Strategy
from shared.adapters import AdapterState
from shared.merge import DeltaAccumulator, normalized_weights, sample_weights, weighted_average
from shared.update import AdapterUpdate


class FedAvg(Strategy):
    """``Δ = Σ_k λ_k Δ_k`` with ``λ_k = n_k / N``; Fishers, if sent, are ignored."""

    name: ClassVar[str] = "fedavg"
    memory_flat: ClassVar[bool] = True

    def merge_delta(self, global_state: AdapterState,
                    updates: Sequence[AdapterUpdate]) -> AdapterState:
        weights = sample_weights([u.n_samples for u in updates])
        return weighted_average([u.delta for u in updates], weights)

    def delta_merge(self, global_state: AdapterState, n_samples: Sequence[int]) -> DeltaMerge:
        return _WeightedSum(global_state, n_samples)


class _WeightedSum(DeltaMerge):
    """``Σ λ_k Δ_k`` folded one update at a time, with the λ ``weighted_average`` computes
    from the same sample counts (so the same bits, unsharded)."""

    shardable: ClassVar[bool] = True

    def __init__(self, global_state: AdapterState, n_samples: Sequence[int]) -> None:
        self.weights = normalized_weights(sample_weights(n_samples), len(n_samples)).tolist()
        self.sum = DeltaAccumulator(global_state)

    def add(self, update: AdapterUpdate, index: int) -> None:
        self.sum.add(update.delta, self.weights[index], name=f"client {update.client_id!r}")

    def sums(self) -> dict[str, object]:
        return self.sum.sums()

    def join(self, sums: dict[str, object]) -> None:
        self.sum.absorb(sums)

    def merged_delta(self) -> AdapterState:
        return self.sum.merged_delta()
