"""FedNano's default merge: Fisher merging where it approximates the right thing, FedAvg elsewhere.

Fisher merging (Matena & Raffel 2022) is a Laplace approximation around each device's *local
optimum*: it weights a device's delta by how sharply that device's loss curves at the end of its
training. That holds in the one-shot, long-local-training regime it was designed for, and not
after a few local steps, where each device's Fisher measures a point still far from its optimum
and the element-wise weights mix the devices' low-rank factors. The paired comparison on the real
base (``docs/results.md``) measured exactly that split; this strategy follows it:

- a round whose devices train at least ``fisher_from_steps`` local steps is merged with the
  Fisher (``FisherMerge`` with the defaults below, devices send their Fisher);
- a shorter round is merged by FedAvg, and its devices spend nothing on a Fisher.

The threshold default is the shortest local training at which the comparison measured the Fisher
merge ahead of FedAvg; below it the measured or untested regimes keep FedAvg.
"""

from __future__ import annotations

from typing import Any, ClassVar

from cloud.strategies.base import Strategy
from cloud.strategies.fedavg import FedAvg
from cloud.strategies.fisher import FisherMerge


class FedNano(FisherMerge):
    """Fisher merge for rounds of ``fisher_from_steps`` local steps or more, FedAvg below."""

    name: ClassVar[str] = "fednano"
    default_normalize: ClassVar[str | None] = None
    default_floor: ClassVar[float] = 0.0
    default_fallback: ClassVar[float] = 0.0

    def __init__(self, *, fisher_from_steps: int = 100, **options: Any) -> None:
        super().__init__(**options)
        if (isinstance(fisher_from_steps, bool) or not isinstance(fisher_from_steps, int)
                or fisher_from_steps < 1):
            raise ValueError(f"fisher_from_steps must be an integer >= 1, "
                             f"got {fisher_from_steps!r}")
        self.fisher_from_steps = fisher_from_steps

    def config(self) -> dict[str, object]:
        return {**super().config(), "fisher_from_steps": self.fisher_from_steps}

    def for_round(self, local_steps: int) -> Strategy:
        if local_steps >= self.fisher_from_steps:
            return self
        return FedAvg(min_updates=self.min_updates, ffa=self.ffa, server_lr=self.server_lr,
                      server_momentum=self.server_momentum)
