"""Local-training parameters: one model, and the one rule that says whose value a device uses.

``TrainConfig`` holds every parameter of a device round, with the product's defaults. A firmware
profile holds the device's own ``TrainConfig`` (``training:`` in ``firmware_configs/*.yaml``). A
round's task carries ``TaskHParams``: only the values set for that round, every other field
``None`` ("not set": the device's own value applies) and left out of the message.

Whose value a device trains with, highest first (``resolve_training``):

1. the strategy's: what the round's merge is defined by (``StrategyNeeds``): no Fisher when it
   reads none, FedProx's ``prox_mu``, FFA-LoRA's ``train_a=False``, ``fisher-global``'s Fisher
   point and labels. The operator chooses these through the round's strategy and its options;
   a value in the round's ``hparams`` does not undo them (a stored round that spelled out
   ``prox_mu: 0.0`` stays a FedProx round);
2. the operator's: what the round's configuration sets (``RoundConfig.hparams``). Its
   ``fisher_samples`` is how many samples a Fisher is taken on *when* the merge reads one;
3. the device's profile (``training:`` in ``firmware_configs/*.yaml``);
4. the product default (the field defaults below).

A profile's ``batch_size`` is also the most rows the device puts through one step: a larger
batch set for the round is trained in micro-batches of the profile's batch with the gradients
accumulated, the same step within the device's memory.

Nothing here imports torch: the cloud, the CLI and profile validation use it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from shared import training_defaults as defaults

# The bounds of each parameter, written once: a profile, a simulation and a task from the
# cloud are held to the same ones.
Steps = Annotated[int, Field(ge=1, le=100_000)]
BatchSize = Annotated[int, Field(ge=1, le=4096)]
LearningRate = Annotated[float, Field(gt=0, le=1.0)]
ProxMu = Annotated[float, Field(ge=0)]  # FedProx: adds mu/2 * ||θ - θ_global||² to the loss
FisherSamples = Annotated[int, Field(ge=0, le=100_000)]  # 0: no Fisher
FisherLabels = Literal["empirical", "sampled"]
FisherPoint = Literal["local", "global"]


class TrainConfig(BaseModel):
    """Every local-training parameter of a device round, with the product defaults (the
    measured setting: ``shared.training_defaults``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: Steps = defaults.STEPS
    batch_size: BatchSize = defaults.BATCH_SIZE
    lr: LearningRate = defaults.LR
    weight_decay: float = Field(0.0, ge=0)
    prox_mu: ProxMu = 0.0
    grad_clip: float = Field(1.0, gt=0)
    fisher_samples: FisherSamples = defaults.FISHER_SAMPLES
    fisher_batch_size: BatchSize = 32
    fisher_labels: FisherLabels = "empirical"
    fisher_point: FisherPoint = "local"
    train_a: bool = True  # False: FFA-LoRA, only B trains
    # Rows per LLM call and backward (the device's memory cap); a larger batch is trained in
    # micro-batches whose gradients add up to the whole batch's, so the step is the same.
    micro_batch_size: BatchSize | None = None


class TaskHParams(BaseModel):
    """The training parameters a round sets (fields of ``TrainConfig``); ``None``: not set.

    Travels in every ``TrainTask``: parsed strictly (unknown keys, out-of-range values and
    NaN are refused), serialised without its unset fields, so a task from a cloud that sent
    every field and a device that expects only some read each other.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    steps: Steps | None = None
    batch_size: BatchSize | None = None
    lr: LearningRate | None = None
    prox_mu: ProxMu | None = None
    fisher_samples: FisherSamples | None = None
    # How the device estimates its Fisher and which factors it trains (set by the strategy).
    fisher_labels: FisherLabels | None = None
    fisher_point: FisherPoint | None = None
    train_a: bool | None = None  # False: FFA-LoRA (only B trains)

    @model_serializer(mode="wrap")
    def _set_fields_only(self, handler: SerializerFunctionWrapHandler):
        # No return annotation: the JSON schema stays the fields' own.
        return {name: value for name, value in handler(self).items() if value is not None}

    def set_values(self) -> dict[str, Any]:
        """The fields that are set, by name."""
        return {name: value for name, value in self if value is not None}


@dataclass(frozen=True)
class StrategyNeeds:
    """What a round's merge asks of every device: whether it reads a Fisher, and the values
    it sets (``Strategy.training_needs()`` on the cloud)."""

    fisher: bool
    hparams: TaskHParams = field(default_factory=TaskHParams)


def round_hparams(operator: TaskHParams, needs: StrategyNeeds) -> TaskHParams:
    """What a round's task carries: the strategy's values over the operator's, and
    ``fisher_samples=0`` when the merge reads no Fisher.

    ``ValueError`` when the merge reads a Fisher and the operator asked for none.
    """
    if needs.fisher and operator.fisher_samples == 0:
        raise ValueError("this round's merge reads a Fisher from every device: fisher_samples "
                         "must be at least 1 (or unset), got 0")
    values = {**operator.set_values(), **needs.hparams.set_values()}
    if not needs.fisher:
        values["fisher_samples"] = 0
    return TaskHParams.model_validate(values)


def resolve_training(profile: TrainConfig = TrainConfig(), task: TaskHParams = TaskHParams(),
                     needs: StrategyNeeds | None = None) -> TrainConfig:
    """The parameters a device trains a round with: strategy (``needs``) > operator
    (``task``) > ``profile`` > product default, a batch above the profile's trained in
    micro-batches of it.

    The device passes the task it received (the cloud already folded the strategy's needs
    into it: ``round_hparams``); the simulation passes its strategy's needs and no task; the
    cloud passes no profile, for what it assumes of a device that keeps its own values.
    """
    if needs is not None:
        task = round_hparams(task, needs)
    merged = {**profile.model_dump(), **task.set_values()}
    cap = min(profile.batch_size, profile.micro_batch_size or profile.batch_size)
    if merged["batch_size"] > cap:
        merged["micro_batch_size"] = cap
    return TrainConfig.model_validate(merged)

