"""The fleet's private broker (``fednano.broker``) and the command line's argument checks."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cloud.registry import ServiceAccount, dynsec_document, hash_secret
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
        with pytest.raises(BrokerUnavailable, match=r"no dynamic-security\.json"):
            broker.start()
        service = ServiceAccount("fednano-cloud", "s3cret")
        broker.dynsec_file.write_text(json.dumps(dynsec_document(
            services=[(service.username, hash_secret(service.password, iterations=1000))],
            devices=[])))
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


def test_the_broker_does_not_outlive_a_killed_parent() -> None:
    """A fleet runner SIGKILLed (no finally, no signal handler) leaves no broker behind, even
    when run as root, where Mosquitto runs as its own user."""
    if shutil.which("setpriv") is None:
        pytest.skip("util-linux setpriv is not installed: no death signal for children")
    script = (
        "import sys, time\n"
        "from fednano.broker import Mosquitto\n"
        "broker = Mosquitto()\n"
        "broker.dynsec_file.write_text('{}')\n"
        "broker.start()\n"
        "print(broker.pid, broker.port, broker.folder, flush=True)\n"
        "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    folder: Path | None = None
    try:
        assert parent.stdout is not None
        pid_text, port_text, folder_text = parent.stdout.readline().split()
        pid, port, folder = int(pid_text), int(port_text), Path(folder_text)
        assert _listening(port)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _listening(port), f"mosquitto (pid {pid}) outlived its parent"
    finally:
        parent.kill()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
