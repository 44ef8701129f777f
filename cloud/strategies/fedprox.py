"""FedProx (Li et al. 2020): FedAvg on the server, a proximal term on the devices."""

from __future__ import annotations

from typing import Any, ClassVar

from cloud.strategies.base import non_negative
from cloud.strategies.fedavg import FedAvg


class FedProx(FedAvg):
    """Aggregates like FedAvg; devices add ``mu/2 · ||θ − θ_g||²`` to their local loss."""

    name: ClassVar[str] = "fedprox"

    def __init__(self, *, mu: float = 0.01, **common: Any) -> None:
        super().__init__(**common)
        self.mu = non_negative("mu", mu)

    def client_hparams(self) -> dict[str, object]:
        return {**super().client_hparams(), "prox_mu": self.mu}

    def config(self) -> dict[str, object]:
        return {**super().config(), "mu": self.mu}
