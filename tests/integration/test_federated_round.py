"""One real federated round: the loss falls and accuracy beats the base."""

from __future__ import annotations

import pytest

from edge.trainer import TrainConfig
from fednano.simulate import SimConfig, Simulation
from shared.data.easyvqa import load_easy_vqa

pytestmark = pytest.mark.integration


def test_one_fednano_round_learns_on_real_weights(real_base) -> None:  # type: ignore[no-untyped-def]
    config = SimConfig(
        strategy="fednano",
        strategy_options={"fisher_from_steps": 40},  # this one-shot round merges by the Fisher
        clients=2,
        alpha=1.0,
        rounds=1,
        seed=0,
        train=TrainConfig(steps=40, batch_size=16, fisher_samples=32),
        max_client_samples=400,
        eval_questions=200,
        round_eval_questions=0,
        client_holdout=20,
    )
    report = Simulation(real_base, load_easy_vqa(), config).run()
    (record,) = report.rounds
    assert record.loss_last < 0.6 * record.loss_first, record
    assert report.final["accuracy"] > report.zero_shot["accuracy"] + 0.1, (
        report.final,
        report.zero_shot,
    )
    assert record.param_bytes_up == 2 * record.param_bytes_down  # Δθ + Fisher up, θ down
    assert record.activation_bytes_up > record.param_bytes_up  # split training dominates traffic
