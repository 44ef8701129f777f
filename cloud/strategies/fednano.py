"""FedNano's default merge (provisional while the comparison runs)."""

from __future__ import annotations

from typing import ClassVar

from cloud.strategies.fisher_norm import FisherNorm


class FedNano(FisherNorm):
    """Provisional default."""

    name: ClassVar[str] = "fednano"
