"""The fleet's private broker (``fednano.broker``) and the command line's argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.registry import ServiceAccount, acl_file_text, hash_secret
from fednano import broker as broker_module
from fednano.broker import BrokerUnavailable, Mosquitto, ensure_mosquitto
from fednano.cli import app
from shared.mqtt import BrokerAddress, ClientOptions, ConnectError, MqttClient


def test_missing_mosquitto_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_module, "mosquitto_binary", lambda: None)
    with pytest.raises(BrokerUnavailable, match="apt-get install -y mosquitto"):
        ensure_mosquitto(install=False)


def test_the_broker_needs_its_files_then_serves_the_accounts_in_them(tmp_path: Path) -> None:
    broker = Mosquitto()
    try:
        with pytest.raises(BrokerUnavailable, match="no passwd file"):
            broker.start()
        service = ServiceAccount("fednano-cloud", "s3cret")
        broker.password_file.write_text(
            f"{service.username}:{hash_secret(service.password, iterations=1000)}\n")
        broker.acl_file.write_text(acl_file_text(service_usernames=[service.username]))
        broker.start()
        options = ClientOptions(client_id="probe", username=service.username,
                                password=service.password, clean_start=True)
        with MqttClient(BrokerAddress.parse(broker.url), options) as client:
            client.connect(5)
        broker.restart(down_s=0.1)  # same port
        wrong = ClientOptions(client_id="probe2", username=service.username, password="nope")
        with pytest.raises(ConnectError), MqttClient(BrokerAddress.parse(broker.url),
                                                     wrong) as client:
            client.connect(5)
    finally:
        folder = broker.folder
        broker.close()
    assert not broker.running and not folder.exists()


def test_fleet_simulate_refuses_bad_options() -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["fleet", "simulate", "--faults", "meteor"])
    assert result.exit_code == 2 and "unknown faults" in result.output
    result = runner.invoke(app, ["fleet", "simulate", "--strategy", "magic"])
    assert result.exit_code == 2
    assert runner.invoke(app, ["demo", "--help"]).exit_code == 0
