"""Fisher merge with each device's Fisher normalised by its own L2 norm, floored.

Normalising per device (the default of Matena & Raffel's own code) removes the device-to-device
scale of the empirical Fisher, so λ = n_k / N sets how much each device counts and the Fisher only
says *where* within its update it is confident. The floor keeps a noisy 32-sample estimate from
giving a device ~0 weight on an element, and the fallback merges by FedAvg where no device has
Fisher mass instead of shrinking the step toward the global value.
"""

from __future__ import annotations

from typing import ClassVar

from cloud.strategies.fisher import FisherMerge


class FisherNorm(FisherMerge):
    """Fisher merge with per-device L2 normalisation, a floor and a FedAvg fallback."""

    name: ClassVar[str] = "fisher-norm"
    default_normalize: ClassVar[str | None] = "l2"
    default_floor: ClassVar[float] = 0.1
    default_fallback: ClassVar[float] = 1e-3
