"""The paper-faithful FedNano merge: each device's raw empirical Fisher at its local model.

Kept for the ablation. Measured (docs/results.md) to lose to FedAvg under skew: the raw Fisher's
scale differs several-fold between devices for reasons unrelated to their data size (a device
whose data the model already fits gets a small Fisher), so it swamps λ = n_k / N.
"""

from __future__ import annotations

from typing import ClassVar

from cloud.strategies.fisher import FisherMerge


class FisherRaw(FisherMerge):
    """``Δ = Σ λ_k F_k Δ_k / (Σ λ_k F_k + ε)`` with each device's Fisher as it was sent."""

    name: ClassVar[str] = "fisher-raw"
