"""``fednano cloud token`` and ``fednano devices`` against a real SQLite database."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cloud.db import crud
from cloud.db.session import make_engine, make_session_factory
from fednano.cli import app


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {"FEDNANO_HOME": str(tmp_path), "FEDNANO_ENVIRONMENT": "test",
            "FEDNANO_SECRET_KEY": "k" * 40, "FEDNANO_BROKER_PASSWORD": "p" * 40,
            "FEDNANO_MQTT_HASH_ITERATIONS": "1000", "FEDNANO_BROKER_LIVE_ADMIN": "false"}


def _run(env: dict[str, str], *args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, result.output
    return result.output


def test_help_lists_the_entry_points() -> None:
    output = CliRunner().invoke(app, ["cloud", "--help"]).output
    for command in ("serve", "api", "coordinator", "llm-worker", "token"):
        assert command in output


def test_token_and_device_commands(env: dict[str, str], tmp_path: Path) -> None:
    token = _run(env, "cloud", "token", "create", "alice").strip().splitlines()[-1]
    assert token.startswith("fnt_")
    out = tmp_path / "flash"
    _run(env, "devices", "add", "orin-7", "--profile", "sim-cpu", "--out", str(out))
    assert yaml.safe_load((out / "device.yaml").read_text())["device_id"] == "orin-7"
    assert len((out / "password").read_text().strip()) == 43
    assert "orin-7\tsim-cpu\tactive" in _run(env, "devices", "list")
    _run(env, "devices", "revoke", "orin-7", "--reason", "lost")
    assert "revoked" in _run(env, "devices", "list")
    again = CliRunner().invoke(app, ["devices", "revoke", "orin-7"], env=env)
    assert again.exit_code != 0 and "revoked" in again.output
    _run(env, "devices", "broker-files")
    assert (tmp_path / "broker" / "dynamic-security.json").exists()
    assert "alice" in _run(env, "cloud", "token", "list")

    engine = make_engine(f"sqlite:///{tmp_path / 'cloud.db'}")
    with make_session_factory(engine)() as session:
        assert crud.find_token(session, token=token, touch=False) is not None
    engine.dispose()


def test_devices_add_writes_a_kit_for_the_network_devices_reach(env: dict[str, str],
                                                                 tmp_path: Path) -> None:
    from cloud.pki import Issuer
    from edge.config import load_device_config  # the kit is what a device boots from

    Issuer.create().write(tmp_path / "ca.crt", tmp_path / "ca.key")
    env = {**env, "FEDNANO_DEVICE_BROKER_URL": "mqtts://mqtt.example:8883",
           "FEDNANO_DEVICE_X509_BROKER_URL": "mqtts://mqtt.example:8884",
           "FEDNANO_DEVICE_CA_FILE": str(tmp_path / "ca.crt"),
           "FEDNANO_DEVICE_CA_KEY_FILE": str(tmp_path / "ca.key")}
    output = _run(env, "devices", "add", "orin-x", "--profile", "jetson-orin-nano-8gb", "--x509",
                  "--out", str(tmp_path / "x"))
    assert "added orin-x (x509)" in output
    config = load_device_config(tmp_path / "x" / "device.yaml")
    assert (config.broker.url, config.username) == ("mqtts://mqtt.example:8884", None)
    assert config.broker_address.key_file == tmp_path / "x" / "device.key"
    _run(env, "devices", "add", "orin-p", "--profile", "sim-cpu", "--out", str(tmp_path / "p"))
    config = load_device_config(tmp_path / "p" / "device.yaml")
    assert config.broker.url == "mqtts://mqtt.example:8883"
    assert config.broker.ca_file == tmp_path / "p" / "ca.crt"
    assert len(config.read_password() or "") == 43


def test_an_unreadable_ca_key_stops_x509_devices_only(env: dict[str, str],
                                                      tmp_path: Path) -> None:
    from cloud.pki import Issuer

    Issuer.create().write(tmp_path / "ca.crt", tmp_path / "ca.key")
    env = {**env, "FEDNANO_DEVICE_X509_BROKER_URL": "mqtts://mqtt.example:8884",
           "FEDNANO_DEVICE_CA_FILE": str(tmp_path / "ca.crt"),
           "FEDNANO_DEVICE_CA_KEY_FILE": str(tmp_path / "gone.key")}
    _run(env, "devices", "add", "orin-p", "--profile", "sim-cpu")
    result = CliRunner().invoke(app, ["devices", "add", "orin-x", "--profile", "sim-cpu",
                                      "--x509", "--out", str(tmp_path / "x")], env=env)
    assert result.exit_code == 2
    assert "the device CA cannot sign: cannot read the CA key" in " ".join(result.output.split())


def test_a_refused_device_leaves_no_kit_behind(env: dict[str, str], tmp_path: Path) -> None:
    _run(env, "devices", "add", "orin-7", "--profile", "sim-cpu")
    kits = tmp_path / "kits"
    result = CliRunner().invoke(app, ["devices", "add", "orin-7", "--profile", "sim-cpu",
                                      "--out", str(kits / "orin-7")], env=env)
    assert result.exit_code == 2 and "exists already" in " ".join(result.output.split())
    assert not kits.exists()  # refused before anything was written


@pytest.mark.parametrize(("args", "message"), [
    (["orin-7", "--profile", "orin-nano"], "unknown profile 'orin-nano'"),
    (["orin-7", "--profile", "sim-cpu", "--x509"], "give --out DIR"),
    (["orin-7", "--profile", "sim-cpu", "--x509", "--out", "kit"],
     "X.509 provisioning is off: set FEDNANO_DEVICE_X509_BROKER_URL"),
])
def test_devices_add_refuses_in_one_line(env: dict[str, str], args: list[str],
                                         message: str) -> None:
    result = CliRunner().invoke(app, ["devices", "add", *args], env=env)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert "Traceback" not in result.output
    listed = CliRunner().invoke(app, ["devices", "list"], env=env)
    assert "orin-7" not in listed.output  # nothing half-added


def test_production_with_default_secrets_refuses_to_start(env: dict[str, str]) -> None:
    result = CliRunner().invoke(app, ["cloud", "token", "list"],
                                env={**env, "FEDNANO_ENVIRONMENT": "production",
                                     "FEDNANO_SECRET_KEY": "changethis"})
    assert result.exit_code == 2 and "secret_key" in result.output


def test_the_coordinator_acknowledges_only_what_it_stored(monkeypatch: pytest.MonkeyPatch,
                                                          env: dict[str, str]) -> None:
    """`fednano cloud coordinator` / `serve` connect with a persistent session and manual acks
    (tests/cloud/test_coordinator_mqtt.py shows what that buys on a real broker)."""
    from cloud.service import coordinator_client
    from fednano.cloud_cli import load_settings

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    options = coordinator_client(load_settings()).options
    assert options.manual_ack and not options.clean_start and options.session_expiry_s > 0


def test_the_cloud_takes_the_adapter_rank_from_the_base(monkeypatch: pytest.MonkeyPatch,
                                                        env: dict[str, str],
                                                        tmp_path: Path) -> None:
    """No --rank to disagree with: the first global version has the rank the base records."""
    from cloud.service import _first_version
    from fednano.cloud_cli import load_settings
    from tests.recorded_base import RECORDED_VERSION, write_recorded_base

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for command in ("serve", "api", "coordinator", "llm-worker"):
        help_text = CliRunner().invoke(app, ["cloud", command, "--help"]).output
        assert "--rank" not in help_text, command
    write_recorded_base(tmp_path, adapter={"rank": 4, "alpha": 8.0})
    version, state = _first_version(load_settings(), None)
    assert version == RECORDED_VERSION and state["image.lora_A.weight"].shape == (4, 576)
