"""FedMedian (Yin et al. 2018): a robust coordinate-wise median of the adapter deltas."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from cloud.strategies.base import Strategy
from shared.adapters import AdapterState
from shared.merge import coordinate_median
from shared.update import AdapterUpdate


class FedMedian(Strategy):
    """``Δ = median_k Δ_k`` per coordinate; sample counts are ignored (they can be forged).

    Tolerates fewer than half of the updates being arbitrary finite garbage, at the cost of
    statistical efficiency on honest, non-IID clients; use ``min_updates`` >= 3 for it to matter.
    Not ``memory_flat``: an exact median needs every update's value of a coordinate at once (no
    running sum gives it), so a streamed round keeps its updates until the end.
    """

    name: ClassVar[str] = "fedmedian"

    def merge_delta(self, global_state: AdapterState,
                    updates: Sequence[AdapterUpdate]) -> AdapterState:
        return coordinate_median([u.delta for u in updates])
