"""A simulated device's local data: its own shard of a shipped task, computed deterministically.

A fleet of agent processes shares one spec except ``index``; each process partitions the whole
task with the same seed (``shared.data.partition``) and keeps shard ``index`` of ``of``, so no
coordination is needed and no two devices hold the same question. On the command line::

    fednano-edge run --config device.yaml --data "easyvqa:index=3,of=10,alpha=0.5,seed=0"

Fields (all but ``index`` and ``of`` optional): ``alpha`` (Dirichlet concentration; ``inf`` is
IID), ``by`` (``question`` or ``image-class``), ``seed``, ``min_samples`` (per shard),
``max_samples`` (subsample the shard: quick runs).
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from shared.data.base import VQASample, VQATask
from shared.data.partition import PartitionBy, partition_samples

DatasetName = Literal["easyvqa", "easyvqa+digits"]


class DataSpec(BaseModel):
    """Which shard of which task this device trains on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: DatasetName = "easyvqa"
    index: int = Field(ge=0, description="this device's shard, 0-based")
    of: int = Field(ge=1, description="how many shards (devices) the task is split into")
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration; inf: IID")
    by: PartitionBy = "question"
    seed: int = 0
    min_samples: int = Field(32, ge=1)
    max_samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _index_in_range(self) -> DataSpec:
        if self.index >= self.of:
            raise ValueError(f"index must be below of={self.of}, got {self.index}")
        return self

    @classmethod
    def parse(cls, text: str) -> DataSpec:
        """``"easyvqa:index=3,of=10,alpha=0.5"`` -> a spec; ``ValueError`` naming the problem."""
        dataset, _, rest = text.partition(":")
        fields: dict[str, object] = {"dataset": dataset.strip()}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"data spec items are key=value, got {item!r} in {text!r}")
            fields[key.strip()] = value.strip()
        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"])) or "spec"
            raise ValueError(f"data spec {text!r}: {where}: {first['msg']}") from None

    def label(self) -> str:
        """Short description for logs, e.g. ``easyvqa[3/10, alpha=0.5, by=question]``."""
        return f"{self.dataset}[{self.index}/{self.of}, alpha={self.alpha:g}, by={self.by}]"


def load_task(name: DatasetName) -> VQATask:
    """The shipped task behind ``name`` (easy-VQA minus the base's alignment images)."""
    from shared.data.easyvqa import load_easy_vqa

    if name == "easyvqa":
        return load_easy_vqa()
    from shared.data.digits import combine_tasks, load_digits_vqa

    return combine_tasks(load_easy_vqa(), load_digits_vqa(), name=name)


def shard(task: VQATask, spec: DataSpec) -> list[VQASample]:
    """Shard ``spec.index`` of the task's train split (the same on every process)."""
    parts = partition_samples(task.train, spec.of, spec.alpha, by=spec.by,
                              min_samples=spec.min_samples, seed=spec.seed)
    samples = parts[spec.index]
    if spec.max_samples is None or len(samples) <= spec.max_samples:
        return samples
    rng = random.Random(spec.seed * 7919 + spec.index)
    keep = sorted(rng.sample(range(len(samples)), spec.max_samples))
    return [samples[i] for i in keep]


def load_local_data(spec: DataSpec) -> tuple[VQATask, list[VQASample]]:
    """The task (for its image loader) and this device's samples."""
    task = load_task(spec.dataset)
    return task, shard(task, spec)
