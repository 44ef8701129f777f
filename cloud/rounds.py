"""Round configuration, participant sampling and the run schedule (pure logic + settings I/O).

A ``RoundConfig`` is what an operator sets as the defaults (``PUT /api/v1/rounds/defaults``) or
per round; it is stored in the round's ``config`` column, so a restarted coordinator runs the
round exactly as it was started. The ``Schedule`` says whether the coordinator opens rounds on
its own and until when (a number of rounds, an accuracy, or an operator stop).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy.orm import Session

from cloud.db import crud
from cloud.db.crud import ConflictError
from cloud.db.models import Device, DeviceStatus, Round
from cloud.strategies import Strategy, make_strategy
from shared.messages import UpdateCodec
from shared.training import TaskHParams, TrainConfig, resolve_training, round_hparams

DEFAULTS_KEY = "round_defaults"
SCHEDULE_KEY = "schedule"


class NotEnoughDevicesError(ConflictError):
    """Fewer eligible (active, online, capable) devices than the round needs."""


class RoundConfig(BaseModel):
    """How a round runs: strategy, sampling, quorum, deadline, what devices train, the gate."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = "fednano"
    strategy_options: dict[str, Any] = Field(default_factory=dict)
    fraction: float = Field(1.0, gt=0, le=1, description="share of eligible devices sampled")
    min_participants: int = Field(1, ge=1, description="fewer eligible devices: no round")
    max_participants: int | None = Field(None, ge=1)
    quorum_fraction: float = Field(
        1.0, gt=0, le=1, description="aggregate as soon as this share of participants submitted")
    min_updates: int = Field(1, ge=1, description="at the deadline, aggregate with at least this")
    deadline_s: float = Field(600.0, gt=0, le=7 * 86400)
    late_policy: Literal["reject", "buffer"] = Field(
        "reject", description="late updates: reject them, or buffer them for a later merge")
    stale_weight: float = Field(
        0.5, gt=0, le=1, description="a buffered update merged s versions after the one it "
                                     "trained from counts n·stale_weight^s samples")
    max_staleness: int = Field(
        2, ge=0, le=100, description="buffered updates more versions old are not merged")
    required_capabilities: dict[str, Any] = Field(
        default_factory=dict,
        description="a device qualifies if each value matches (numbers: at least this much)")
    hparams: TaskHParams = Field(
        default_factory=TaskHParams,
        description="training parameters set for every device of the round; a device keeps "
                    "its own value (its profile, else the product default) for the rest")
    codec: UpdateCodec = UpdateCodec()
    max_update_bytes: int = Field(4 * 2**20, ge=1024, le=64 * 2**20)
    max_delta_norm: float | None = Field(100.0, gt=0, description="L2 bound on Δθ (all keys)")
    max_update_samples: int | None = Field(
        None, ge=1, description="the most samples one update counts for in the merge weights; "
                                "default: the task's steps × batch size (what the device was "
                                "asked to train on, not what it reports)")
    clip_to_median_norm: float | None = Field(
        None, gt=0, description="robust option against poisoning: scale each Δθ down to at "
                                "most this many times the round's median ||Δθ||₂ before "
                                "merging (e.g. 2.0); none: off")
    seed: int = 0
    base_version: str | None = Field(
        None, description="the frozen base's version; set by the coordinator when tasks go out")

    @model_validator(mode="after")
    def _consistent(self) -> RoundConfig:
        self.task_hparams()  # ValueError: unknown strategy, bad option, no Fisher for a merge
        if self.max_participants is not None and self.max_participants < self.min_participants:
            raise ValueError(f"max_participants ({self.max_participants}) is below "
                             f"min_participants ({self.min_participants})")
        if self.min_updates > self.min_participants:
            raise ValueError(f"min_updates ({self.min_updates}) exceeds min_participants "
                             f"({self.min_participants}): a round could never aggregate")
        return self

    @classmethod
    def of(cls, round_: Round) -> RoundConfig:
        """The config ``round_`` runs with, validated from its row (a round's config changes
        once, when the coordinator records the base version as it starts collecting)."""
        return cls.model_validate(round_.config)

    def assumed_training(self) -> TrainConfig:
        """What a device that keeps the product defaults trains with in this round: the cloud
        picks the merge for these steps and bounds merge weights by these steps × batch."""
        return resolve_training(task=self.hparams)

    @property
    def sample_bound(self) -> int:
        """The most samples one update counts for (``max_update_samples`` or steps × batch)."""
        if self.max_update_samples is not None:
            return self.max_update_samples
        training = self.assumed_training()
        return training.steps * training.batch_size

    def make_strategy(self) -> Strategy:
        """The strategy that merges this round (the configured one, for its local steps)."""
        steps = self.assumed_training().steps
        return make_strategy(self.strategy, **self.strategy_options).for_round(steps)

    def quorum_for(self, participants: int) -> tuple[int, int]:
        """``(k, minimum)`` for ``participants`` sampled devices: 1 <= minimum <= k <= n."""
        if participants < 1:
            raise ValueError(f"a round needs at least one participant, got {participants!r}")
        k = min(participants, max(self.min_updates, math.ceil(self.quorum_fraction
                                                              * participants)))
        return k, min(self.min_updates, k)

    def task_hparams(self) -> TaskHParams:
        """What every device's task sets (``shared.training.round_hparams``): the strategy's
        values (FedProx mu, no Fisher work when the merge reads none) over the operator's,
        and the steps when the strategy picks its merge by them."""
        configured = make_strategy(self.strategy, **self.strategy_options)
        hparams = round_hparams(self.hparams, self.make_strategy().training_needs())
        if configured.picks_by_steps:
            hparams = hparams.model_copy(update={"steps": self.assumed_training().steps})
        return hparams


class Schedule(BaseModel):
    """Whether the coordinator opens rounds by itself, and when it stops."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    target_rounds: int | None = Field(None, ge=1, description="closed rounds, then stop")
    target_accuracy: float | None = Field(None, gt=0, le=1)
    max_consecutive_failures: int = Field(3, ge=1)
    after_round_id: int = Field(0, ge=0, description="rounds after this id count")
    stopped_reason: str | None = None


def capable(device: Device, required: Mapping[str, Any]) -> bool:
    """Whether ``device`` has every required capability (numbers: at least the value)."""
    for key, want in required.items():
        have = device.capabilities.get(key)
        numeric = isinstance(want, (int, float)) and not isinstance(want, bool)
        if numeric and isinstance(have, (int, float)) and not isinstance(have, bool):
            if have < want:
                return False
        elif have != want:
            return False
    return True


def eligible_devices(devices: Sequence[Device], config: RoundConfig) -> list[str]:
    """Ids of the devices that are active, online and capable, sorted."""
    return sorted(d.id for d in devices if d.status is DeviceStatus.ACTIVE and d.online
                  and capable(d, config.required_capabilities))


def sample_participants(eligible: Sequence[str], config: RoundConfig, seed: int) -> list[str]:
    """A seeded sample of ``ceil(fraction · n)`` eligible ids, clamped to [min, max], sorted.

    ``NotEnoughDevicesError`` if fewer than ``min_participants`` are eligible.
    """
    pool = sorted(set(eligible))
    if len(pool) < config.min_participants:
        raise NotEnoughDevicesError(f"{len(pool)} eligible devices (active, online, capable), "
                                    f"the round needs at least {config.min_participants}")
    count = max(config.min_participants, math.ceil(config.fraction * len(pool)))
    count = min(count, config.max_participants or count, len(pool))
    return sorted(random.Random(seed).sample(pool, count))


def round_seed(config: RoundConfig, round_id: int) -> int:
    """The sampling seed of a round: reproducible from the config seed and the round id."""
    return config.seed * 1_000_003 + round_id


# ------------------------------------------------------------------------------ stored settings


def load_defaults(session: Session) -> RoundConfig:
    """The operator's round defaults (built-in defaults if none were set)."""
    stored = crud.get_setting(session, key=DEFAULTS_KEY)
    return RoundConfig.model_validate(stored or {})


def save_defaults(session: Session, config: RoundConfig) -> None:
    """Store ``config`` as the round defaults."""
    crud.put_setting(session, key=DEFAULTS_KEY, value=config.model_dump(mode="json"))


def load_schedule(session: Session) -> Schedule:
    """The stored schedule (disabled if none was set)."""
    return Schedule.model_validate(crud.get_setting(session, key=SCHEDULE_KEY) or {})


def save_schedule(session: Session, schedule: Schedule) -> None:
    """Store the schedule."""
    crud.put_setting(session, key=SCHEDULE_KEY, value=schedule.model_dump(mode="json"))
