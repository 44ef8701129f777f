"""Fisher merging (Matena & Raffel 2022) in delta space, the family FedNano is named after.

``Δ = Σ_k λ_k F̃_k Δ_k / (Σ_k λ_k F̃_k + ε)`` elementwise, λ_k = n_k / N, where F̃_k is device
k's diagonal Fisher after the variant's per-device normalisation and floor (``shared.merge``).
Each registered variant is a subclass in its own module that sets its defaults; this base is
not registered itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from cloud.strategies.base import DeltaMerge, Strategy, non_negative
from shared.adapters import AdapterState
from shared.merge import NORMALIZATIONS, FisherAccumulator, sample_weights
from shared.update import AdapterUpdate


class FisherMerge(Strategy):
    """Fisher-weighted merge of the deltas; subclasses pick the defaults of the knobs.

    ``eps`` is relative to the mean combined Fisher; ``normalize`` ("mean", "max", "l2" or None)
    rescales each device's Fisher by its own norm before merging; ``floor`` raises each device's
    Fisher to at least that fraction of its own mean; ``fallback`` merges by FedAvg where the
    combined Fisher is below that fraction of its mean.
    """

    requires_fisher: ClassVar[bool] = True
    memory_flat: ClassVar[bool] = True
    default_normalize: ClassVar[str | None] = None
    default_floor: ClassVar[float] = 0.0
    default_fallback: ClassVar[float] = 0.0

    def __init__(self, *, eps: float = 1e-8, normalize: Any = "default",
                 floor: float | None = None, fallback: float | None = None,
                 **common: Any) -> None:
        super().__init__(**common)
        normalize = self.default_normalize if normalize == "default" else normalize
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
        self.eps = non_negative("eps", eps)
        self.normalize: str | None = normalize
        self.floor = non_negative("floor", self.default_floor if floor is None else floor)
        self.fallback = non_negative(
            "fallback", self.default_fallback if fallback is None else fallback)

    def config(self) -> dict[str, object]:
        return {**super().config(), "eps": self.eps, "normalize": self.normalize,
                "floor": self.floor, "fallback": self.fallback}

    def merge_delta(self, global_state: AdapterState,
                    updates: Sequence[AdapterUpdate]) -> AdapterState:
        weights = sample_weights([u.n_samples for u in updates])
        merger = FisherAccumulator(global_state, normalize=self.normalize, floor=self.floor)
        for update, weight in zip(updates, weights, strict=True):
            assert update.fisher is not None  # aggregate checked requires_fisher
            merger.add(update.delta, update.fisher, weight, name=f"client {update.client_id!r}")
        return merger.merged_delta(eps=self.eps, fallback=self.fallback)

    def delta_merge(self, global_state: AdapterState, n_samples: Sequence[int]) -> DeltaMerge:
        return _FisherSums(self, global_state, n_samples)


class _FisherSums(DeltaMerge):
    """``merge_delta``'s loop one update at a time: the accumulator keeps ``Σ λ F̃ Δ``, ``Σ λ F̃``
    and ``Σ λ Δ``; each device's normalisation and floor come from its own Fisher."""

    shardable: ClassVar[bool] = True

    def __init__(self, strategy: FisherMerge, global_state: AdapterState,
                 n_samples: Sequence[int]) -> None:
        self.strategy = strategy
        self.weights = sample_weights(n_samples)
        self.merger = FisherAccumulator(global_state, normalize=strategy.normalize,
                                        floor=strategy.floor)

    def add(self, update: AdapterUpdate, index: int) -> None:
        assert update.fisher is not None  # RoundMerge checked requires_fisher
        self.merger.add(update.delta, update.fisher, self.weights[index],
                        name=f"client {update.client_id!r}")

    def sums(self) -> dict[str, object]:
        return self.merger.sums()

    def join(self, sums: dict[str, object]) -> None:
        self.merger.absorb(sums)

    def merged_delta(self) -> AdapterState:
        return self.merger.merged_delta(eps=self.strategy.eps, fallback=self.strategy.fallback)

