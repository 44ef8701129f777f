"""``fednano simulate`` and ``fednano fleet simulate`` speak one vocabulary: the options they
share have the same names, help (meaning) and defaults, and the old names still work."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from fednano.cli import app
from shared.training import TrainConfig

SHARED = ("devices", "alpha", "rounds", "steps", "batch_size", "lr", "fisher_samples",
          "max_samples", "round_eval_questions", "seed")
runner = CliRunner()


def _params(*path: str) -> dict[str, Any]:
    command: Any = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {p.name: p for p in command.params if p.name}


def test_both_commands_share_names_meanings_and_defaults() -> None:
    sim, fleet = _params("simulate"), _params("fleet", "simulate")
    for name in SHARED:
        a, b = sim[name], fleet[name]
        assert a.opts == b.opts == [f"--{name.replace('_', '-')}"], name
        assert a.default == b.default, name
        assert a.help == b.help and a.help, name  # one meaning
        assert not a.hidden and not b.hidden, name
    assert fleet["strategy"].default == "fednano"  # simulate: unset means fednano


def test_the_defaults_are_the_products_training_defaults() -> None:
    sim = _params("simulate")
    default = TrainConfig()
    assert (sim["steps"].default, sim["batch_size"].default, sim["lr"].default,
            sim["fisher_samples"].default) == (default.steps, default.batch_size, default.lr,
                                               default.fisher_samples)
    assert (sim["devices"].default, sim["rounds"].default) == (5, 3)


def test_the_fleet_options_model_has_the_same_defaults() -> None:
    from fednano.fleet.options import FleetOptions

    fleet = FleetOptions()
    cli = _params("fleet", "simulate")
    for name in ("devices", "alpha", "rounds", "steps", "batch_size", "lr", "fisher_samples",
                 "max_samples", "seed"):
        assert getattr(fleet, name) == cli[name].default, name
    assert fleet.eval_questions == cli["round_eval_questions"].default


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    got: dict[str, Any] = {}
    monkeypatch.setattr("fednano.cli.run_simulation",
                        lambda config, home, out: got.update(sim=config))
    monkeypatch.setattr("fednano.fleet.cli.run_fleet",
                        lambda options, **kw: got.update(fleet=options))
    return got


def test_old_names_still_work_with_a_note(captured: dict[str, Any]) -> None:
    done = runner.invoke(app, ["simulate", "--clients", "3", "--max-client-samples", "40"])
    assert done.exit_code == 0, done.output
    assert (captured["sim"].clients, captured["sim"].max_client_samples) == (3, 40)
    assert "--clients is deprecated, use --devices" in done.stderr
    assert "--max-client-samples is deprecated, use --max-samples" in done.stderr
    done = runner.invoke(app, ["fleet", "simulate", "--eval-questions", "50"])
    assert done.exit_code == 0, done.output
    assert captured["fleet"].eval_questions == 50
    assert "--eval-questions is deprecated, use --round-eval-questions" in done.stderr


def test_new_names_reach_both_runs(captured: dict[str, Any]) -> None:
    for command in (["simulate"], ["fleet", "simulate"]):
        done = runner.invoke(app, [*command, "--devices", "2", "--max-samples", "0",
                                   "--steps", "3", "--fisher-samples", "4"])
        assert done.exit_code == 0, done.output
        assert "deprecated" not in done.stderr
    sim, fleet = captured["sim"], captured["fleet"]
    assert (sim.clients, sim.max_client_samples, sim.train.steps, sim.train.fisher_samples) \
        == (fleet.devices, fleet.max_samples, fleet.steps, fleet.fisher_samples) == (2, None, 3, 4)


def test_an_old_and_a_new_name_together_are_refused(captured: dict[str, Any]) -> None:
    done = runner.invoke(app, ["simulate", "--devices", "4", "--clients", "3"])
    assert done.exit_code == 2
    assert "--clients is the former name of --devices" in done.output
    assert not captured


def test_a_rank_other_than_the_bases_is_refused(tmp_path: Path) -> None:
    from tests.recorded_base import write_recorded_base

    write_recorded_base(tmp_path)  # rank 8
    done = runner.invoke(app, ["simulate", "--rank", "4", "--home", str(tmp_path)])
    assert done.exit_code == 2
    message = " ".join(done.output.replace("│", " ").split())  # unwrap rich's error box
    assert "records NanoAdapter rank 8, not 4" in message
