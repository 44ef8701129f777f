"""Each unfinished round's plan: its typed config and its merge strategy, built once."""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from cloud.db.models import Round
from cloud.rounds import RoundConfig
from cloud.strategies import Strategy
from shared.training import TaskHParams


@dataclass(frozen=True)
class RoundPlan:
    """What a round runs with, typed: its config, the strategy that merges it and the training
    parameters every task carries, built together from the round's row."""

    config: RoundConfig
    strategy: Strategy
    task_hparams: TaskHParams
    source: dict[str, Any]  # the row's config they were built from

    @classmethod
    def of(cls, round_: Round) -> RoundPlan:
        """Validate the round's config and build its strategy (the costly part)."""
        config = RoundConfig.of(round_)
        return cls(config, config.make_strategy(), config.task_hparams(),
                   copy.deepcopy(round_.config))


class RoundPlans:
    """Each unfinished round's ``RoundPlan``, built once per round rather than for every
    update and every task (validating a config builds strategies), and built again only if
    the row's config changed (it does once: the base version is recorded as the round starts
    collecting). A finished round's plan is dropped. Not locked: the coordinator service
    handles messages and ticks rounds on its one thread (``cloud.coordinator_mqtt``)."""

    def __init__(self) -> None:
        self._plans: dict[int, RoundPlan] = {}

    def of(self, round_: Round) -> RoundPlan:
        """The plan of ``round_`` as its row stands."""
        plan = self._plans.get(round_.id)
        if plan is None or plan.source != round_.config:
            plan = self._plans[round_.id] = RoundPlan.of(round_)
        return plan

    def forget(self, round_id: int) -> None:
        """Drop a finished round's plan."""
        self._plans.pop(round_id, None)

    def keep(self, round_ids: Collection[int]) -> None:
        """Drop every plan but those of ``round_ids`` (the unfinished rounds)."""
        self._plans = {i: plan for i, plan in self._plans.items() if i in round_ids}

    def __len__(self) -> int:
        return len(self._plans)
