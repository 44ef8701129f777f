"""One training-parameters model and one precedence: strategy > operator > profile > default."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from shared.training import (
    StrategyNeeds,
    TaskHParams,
    TrainConfig,
    resolve_training,
    round_hparams,
)

PROFILE = TrainConfig(steps=20, batch_size=8, lr=1e-3, fisher_samples=16, fisher_batch_size=4)
NO_FISHER = StrategyNeeds(fisher=False, hparams=TaskHParams(prox_mu=0.0, train_a=True))
FISHER = StrategyNeeds(fisher=True, hparams=TaskHParams(prox_mu=0.0, train_a=True))


def test_the_product_defaults_are_the_measured_setting() -> None:
    # docs/results.md: 8 local steps of batch 16 at lr 2e-3, a Fisher from 32 samples.
    default = TrainConfig()
    assert (default.steps, default.batch_size, default.lr, default.fisher_samples) == (
        8, 16, 2e-3, 32)
    assert resolve_training() == default


def test_a_task_that_sets_nothing_leaves_the_profile() -> None:
    assert resolve_training(PROFILE, TaskHParams()) == PROFILE


def test_the_operator_beats_the_profile_field_by_field() -> None:
    config = resolve_training(PROFILE, TaskHParams(steps=3, lr=0.01))
    assert (config.steps, config.lr) == (3, 0.01)
    assert (config.batch_size, config.fisher_samples, config.fisher_batch_size) == (8, 16, 4)


def test_the_strategy_beats_the_operator() -> None:
    fedprox = StrategyNeeds(fisher=False, hparams=TaskHParams(prox_mu=0.1, train_a=True))
    config = resolve_training(PROFILE, TaskHParams(prox_mu=0.0, fisher_samples=32), fedprox)
    assert config.prox_mu == 0.1  # a stored prox_mu: 0.0 does not undo FedProx
    assert config.fisher_samples == 0  # the merge reads no Fisher: none is taken
    ffa = StrategyNeeds(fisher=True, hparams=TaskHParams(train_a=False))
    assert not resolve_training(PROFILE, TaskHParams(train_a=True), ffa).train_a


def test_the_fisher_count_is_the_operators_when_the_merge_reads_one() -> None:
    assert resolve_training(PROFILE, TaskHParams(fisher_samples=32), FISHER).fisher_samples == 32
    assert resolve_training(PROFILE, TaskHParams(), FISHER).fisher_samples == 16  # profile's
    assert resolve_training(PROFILE, TaskHParams(fisher_samples=32), NO_FISHER).fisher_samples \
        == 0
    with pytest.raises(ValueError, match="fisher_samples must be at least 1"):
        round_hparams(TaskHParams(fisher_samples=0), FISHER)


def test_a_round_sets_only_what_the_strategy_and_the_operator_chose() -> None:
    task = round_hparams(TaskHParams(steps=5), NO_FISHER)
    assert task.set_values() == {"steps": 5, "prox_mu": 0.0, "train_a": True,
                                 "fisher_samples": 0}


def test_a_batch_above_the_profiles_runs_in_micro_batches_of_it() -> None:
    config = resolve_training(PROFILE, TaskHParams(batch_size=32))
    assert (config.batch_size, config.micro_batch_size) == (32, 8)
    assert resolve_training(PROFILE, TaskHParams(batch_size=4)).micro_batch_size is None
    capped = PROFILE.model_copy(update={"micro_batch_size": 2})
    assert resolve_training(capped, TaskHParams(batch_size=16)).micro_batch_size == 2


PROBES: dict[str, tuple[object, ...]] = {
    "steps": (-1, 0, 1, 100_000, 100_001), "batch_size": (0, 1, 4096, 4097),
    "lr": (0.0, 1e-9, 1.0, 1.5), "prox_mu": (-0.1, 0.0, 10.0),
    "fisher_samples": (-1, 0, 100_000, 100_001),
    "fisher_labels": ("empirical", "sampled", "other"), "fisher_point": ("local", "global", "x"),
    "train_a": (True, False),
}


def test_task_fields_are_train_config_fields_with_the_same_bounds() -> None:
    assert set(TaskHParams.model_fields) == set(PROBES) <= set(TrainConfig.model_fields)
    for name, values in PROBES.items():
        assert TaskHParams.model_fields[name].default is None, name
        for value in values:
            assert _valid(TaskHParams, name, value) == _valid(TrainConfig, name, value), (
                name, value)


def _valid(model: type[TaskHParams] | type[TrainConfig], name: str, value: object) -> bool:
    try:
        model.model_validate({name: value})
    except ValidationError:
        return False
    return True


def test_the_wire_form_carries_only_set_fields() -> None:
    assert TaskHParams().model_dump(mode="json") == {}
    assert json.loads(TaskHParams(batch_size=8).model_dump_json()) == {"batch_size": 8}
    # What a cloud that spelled out every field sends still parses, field for field.
    old = {"steps": 8, "batch_size": 16, "lr": 0.002, "prox_mu": 0.0, "fisher_samples": 32,
           "fisher_labels": "empirical", "fisher_point": "local", "train_a": True}
    assert TaskHParams.model_validate(old).set_values() == old


@pytest.mark.parametrize("bad", [
    {"stpes": 3},  # typo
    {"steps": 0}, {"batch_size": 5000}, {"lr": 2.0}, {"fisher_samples": -1},
    {"steps": "8"}, {"train_a": 1}, {"lr": float("nan")},
])
def test_a_task_is_parsed_strictly(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TaskHParams.model_validate(bad)
