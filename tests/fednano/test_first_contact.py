"""First contact: a user's environment that is not ready gives one line and a non-zero exit,
never a traceback. Each test runs the real ``fednano`` entry point in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.brokers import BrokerUnavailable, MosquittoBroker, free_port

STRONG = {"FEDNANO_SECRET_KEY": "k" * 40, "FEDNANO_BROKER_PASSWORD": "p" * 40}


def fednano(*argv: str, env: dict[str, str],
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("FEDNANO_")}
    return subprocess.run([sys.executable, "-m", "fednano.cli", *argv], env={**clean, **env},
                          capture_output=True, text=True, timeout=timeout, check=False)


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (asserts there is exactly one)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fednano: error: "), lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    return lines[0]


def test_an_unreachable_database(tmp_path: Path) -> None:
    url = f"postgresql://fednano@127.0.0.1:{free_port()}/fednano"
    line = one_error_line(fednano("devices", "list", env={
        **STRONG, "FEDNANO_HOME": str(tmp_path), "FEDNANO_DATABASE_URL": url}))
    assert "cannot reach the database" in line and "Connection refused" in line
    assert "FEDNANO_DATABASE_URL" in line


def test_a_broker_that_is_down(tmp_path: Path) -> None:
    line = one_error_line(fednano("cloud", "coordinator", env={
        **STRONG, "FEDNANO_HOME": str(tmp_path),
        "FEDNANO_BROKER_URL": f"mqtt://127.0.0.1:{free_port()}"}, timeout=60))
    assert "cannot connect to the broker" in line and "Connection refused" in line
    assert "Start the broker" in line


@pytest.mark.integration
def test_a_broker_that_refuses_the_password(tmp_path: Path) -> None:
    try:
        broker = MosquittoBroker(devices=(), services=("cloud",)).start()
    except BrokerUnavailable as err:
        pytest.fail(str(err))
    try:
        line = one_error_line(fednano("cloud", "coordinator", env={
            **STRONG, "FEDNANO_HOME": str(tmp_path), "FEDNANO_BROKER_URL": broker.url,
            "FEDNANO_BROKER_USERNAME": "cloud"}, timeout=120))
    finally:
        broker.close()
    assert "refused client" in line and "FEDNANO_BROKER_PASSWORD" in line


def test_no_base_built(tmp_path: Path) -> None:
    line = one_error_line(fednano("base", "info", env={"FEDNANO_HOME": str(tmp_path)}))
    assert "no FedNano base is built" in line and "fednano base build" in line


def test_placeholder_secrets_are_one_warning_line_without_source(tmp_path: Path) -> None:
    done = fednano("devices", "list", env={"FEDNANO_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fednano: warning: secret_key and "
                                                   "broker_password still have"), done.stderr
    assert "UserWarning" not in done.stderr


def test_version() -> None:
    done = fednano("--version", env={})
    assert done.returncode == 0 and done.stdout.startswith("fednano "), done


def test_strategy_lists_every_registered_strategy() -> None:
    from cloud.strategies import STRATEGIES
    from fednano.choices import simulation_baselines, strategy_names
    from fednano.simulate import BASELINES

    assert sorted(strategy_names()) == sorted(STRATEGIES)
    assert simulation_baselines() == list(BASELINES)
    helped = fednano("simulate", "--help", env={"COLUMNS": "400"})
    line = next(x for x in helped.stdout.splitlines() if "--strategy" in x)
    for name in (*STRATEGIES, *BASELINES):
        assert name in line, name
    done = fednano("fleet", "simulate", "--strategy", "nope", env={})
    assert done.returncode == 2
    for name in STRATEGIES:
        assert name in done.stderr
