"""Round configuration and participant sampling (pure logic)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloud.db.models import Device, DeviceStatus
from cloud.rounds import (
    NotEnoughDevicesError,
    RoundConfig,
    capable,
    eligible_devices,
    sample_participants,
)
from shared.messages import TaskHParams

POOL = [f"dev-{i:02d}" for i in range(20)]


def _device(device_id: str, *, online: bool = True, status: DeviceStatus = DeviceStatus.ACTIVE,
            **capabilities: object) -> Device:
    return Device(id=device_id, profile="sim-cpu", status=status, online=online,
                  capabilities=capabilities)


def test_sample_size_follows_fraction_and_bounds() -> None:
    assert len(sample_participants(POOL, RoundConfig(fraction=0.25), 0)) == 5
    assert len(sample_participants(POOL, RoundConfig(fraction=0.01, min_participants=3), 0)) == 3
    assert len(sample_participants(POOL, RoundConfig(max_participants=4), 0)) == 4
    assert sample_participants(POOL, RoundConfig(), 0) == sorted(POOL)


def test_sampling_is_seeded() -> None:
    config = RoundConfig(fraction=0.3)
    assert sample_participants(POOL, config, 7) == sample_participants(POOL[::-1], config, 7)
    assert sample_participants(POOL, config, 7) != sample_participants(POOL, config, 8)


def test_too_few_devices_is_an_error_saying_how_many() -> None:
    with pytest.raises(NotEnoughDevicesError, match=r"2 eligible devices.*at least 3"):
        sample_participants(POOL[:2], RoundConfig(min_participants=3), 0)


def test_only_active_online_capable_devices_are_eligible() -> None:
    devices = [_device("a", memory_mb=1024, gpu=True), _device("b", online=False),
               _device("c", status=DeviceStatus.REVOKED), _device("d", memory_mb=128, gpu=True),
               _device("e", memory_mb=2048, gpu=False)]
    config = RoundConfig(required_capabilities={"memory_mb": 512, "gpu": True})
    assert eligible_devices(devices, config) == ["a"]
    assert eligible_devices(devices, RoundConfig()) == ["a", "d", "e"]
    assert not capable(_device("x"), {"gpu": True})


def test_quorum_is_k_of_n_with_a_minimum() -> None:
    assert RoundConfig().quorum_for(4) == (4, 1)
    assert RoundConfig(quorum_fraction=0.5, min_updates=1).quorum_for(5) == (3, 1)
    assert RoundConfig(quorum_fraction=0.1, min_updates=2, min_participants=2).quorum_for(3) == (
        2, 2)


def test_task_hparams_follow_the_strategy() -> None:
    assert RoundConfig(strategy="fedavg").task_hparams().fisher_samples == 0
    prox = RoundConfig(strategy="fedprox", strategy_options={"mu": 0.1}).task_hparams()
    assert prox.prox_mu == 0.1 and prox.fisher_samples == 0
    # The default (fednano) merges by FedAvg; told to, it Fisher-merges long rounds.
    assert RoundConfig().task_hparams().fisher_samples == 0
    long = RoundConfig(strategy_options={"fisher_from_steps": 100},
                       hparams=TaskHParams(steps=100, fisher_samples=32)).task_hparams()
    assert long.fisher_samples == 32


def test_a_task_sets_only_what_the_round_chose() -> None:
    # Nothing set by the operator: the strategy's values only; each device keeps its own steps,
    # batch, lr (its profile) and the cloud assumes the product defaults for its bounds.
    assert RoundConfig().task_hparams().set_values() == {
        "prox_mu": 0.0, "train_a": True, "fisher_samples": 0}
    assert RoundConfig().sample_bound == 8 * 16
    assert RoundConfig(hparams=TaskHParams(steps=4, batch_size=4)).sample_bound == 16
    # A strategy that picks its merge by the steps pins the steps it picked for.
    picking = RoundConfig(strategy_options={"fisher_from_steps": 100})
    assert picking.task_hparams().steps == 8 and picking.make_strategy().name == "fednano"


def test_a_stored_round_that_spelled_out_every_field_keeps_its_strategy() -> None:
    old = {"steps": 8, "batch_size": 16, "lr": 0.002, "prox_mu": 0.0, "fisher_samples": 32,
           "fisher_labels": "empirical", "fisher_point": "local", "train_a": True}
    stored = RoundConfig.model_validate({"strategy": "fedprox", "strategy_options": {"mu": 0.1},
                                         "hparams": old})
    task = stored.task_hparams()
    assert (task.prox_mu, task.fisher_samples, task.steps, task.batch_size) == (0.1, 0, 8, 16)
    assert RoundConfig.model_validate(stored.model_dump(mode="json")) == stored


def test_a_fisher_merge_refuses_a_round_without_fisher_samples() -> None:
    with pytest.raises(ValidationError, match="fisher_samples must be at least 1"):
        RoundConfig(strategy="fisher-norm", hparams=TaskHParams(fisher_samples=0))


@pytest.mark.parametrize(("fields", "field"), [
    ({"strategy": "fedsgd"}, "unknown strategy"),
    ({"strategy_options": {"nope": 1}}, "bad arguments"),
    ({"fraction": 0}, "fraction"),
    ({"min_participants": 3, "max_participants": 2}, "max_participants"),
    ({"min_updates": 2}, "min_updates"),
    ({"late_policy": "keep"}, "late_policy"),
    ({"typo": 1}, "typo"),
])
def test_bad_configs_name_the_problem(fields: dict, field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        RoundConfig(**fields)
