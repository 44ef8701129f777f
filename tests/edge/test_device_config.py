"""Device configs: MQTT-safe identity, broker URL, credentials never inline by default."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from edge.cli import app
from edge.config import DeviceConfig, load_device_config
from edge.profiles import ConfigError, default_profiles_dir

ENV = {"FEDNANO_TEST_PASSWORD": "s3cret-from-env"}


def _password_file(tmp_path: Path, text: str = "s3cret-from-file\n", mode: int = 0o600) -> Path:
    path = tmp_path / "password"
    path.write_text(text)
    path.chmod(mode)
    return path


def _config(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "device_id": "orin-nano-0042",
        "profile": "jetson-orin-nano-8gb",
        "broker": {"url": "mqtts://broker.example.com:8883"},
        "credentials": {"password_file": "password"},
        "bundle_url": "https://cloud.example.com/api/v1/bundles/latest",
        "state_dir": "state",
    }
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for part in parents:
            target = target[part]
        if value is _DROP:
            target.pop(last)
        else:
            target[last] = value
    return data


_DROP = object()


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "device.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _load(tmp_path: Path, data: dict[str, Any], **kwargs: Any) -> DeviceConfig:
    _password_file(tmp_path)
    return load_device_config(_write(tmp_path, data), environ=ENV, **kwargs)


def _errors(tmp_path: Path, data: dict[str, Any], **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, data, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------------ valid


def test_a_valid_config_loads_with_paths_resolved(tmp_path: Path) -> None:
    config = _load(tmp_path, _config())
    assert config.profile.name == "jetson-orin-nano-8gb"
    assert config.username == config.device_id == "orin-nano-0042"
    assert (config.broker.host, config.broker.port, config.broker.tls) == (
        "broker.example.com", 8883, True)
    assert config.state_dir == tmp_path / "state"
    assert config.credentials.password_file == tmp_path / "password"
    assert config.credentials.read_password() == "s3cret-from-file"
    assert config.warnings() == []


def test_the_password_never_shows_in_repr_or_summary(tmp_path: Path) -> None:
    config = _load(tmp_path, _config(credentials={"password_env": "FEDNANO_TEST_PASSWORD"}))
    assert config.credentials.read_password(ENV) == "s3cret-from-env"
    assert "s3cret" not in repr(config)
    assert config.credentials.source() == "env $FEDNANO_TEST_PASSWORD"


def test_profile_inline_or_by_relative_path(tmp_path: Path) -> None:
    shipped = default_profiles_dir() / "sim-cpu.yaml"
    inline = yaml.safe_load(shipped.read_text())
    assert _load(tmp_path, _config(profile=inline)).profile.name == "sim-cpu"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "sim-cpu.yaml").write_text(shipped.read_text())
    config = _load(tmp_path, _config(profile="profiles/sim-cpu.yaml"))
    assert config.profile.hardware.module == "sim-cpu"


@pytest.mark.parametrize("url, host, port, tls", [
    ("mqtt://localhost", "localhost", 1883, False),
    ("mqtts://broker.example.com", "broker.example.com", 8883, True),
    ("mqtt://127.0.0.1:11883", "127.0.0.1", 11883, False),
    ("mqtt://[::1]:1883/", "::1", 1883, False),
])
def test_broker_urls(tmp_path: Path, url: str, host: str, port: int, tls: bool) -> None:
    broker = _load(tmp_path, _config(broker={"url": url})).broker
    assert (broker.host, broker.port, broker.tls) == (host, port, tls)


# ------------------------------------------------------------------------ device id


@pytest.mark.parametrize("device_id", [
    "dev/1", "dev#", "dev+1", "+", "#", "$SYS", "dev 1", "", "-leading-dash", "a" * 65,
    "dev\x00", "dév",
])
def test_unsafe_device_ids_are_rejected(tmp_path: Path, device_id: str) -> None:
    assert "device_id" in _errors(tmp_path, _config(device_id=device_id))


@pytest.mark.parametrize("device_id", ["a", "orin-nano-0042", "Cam_07.site-3", "a" * 64])
def test_safe_device_ids_are_accepted(tmp_path: Path, device_id: str) -> None:
    assert _load(tmp_path, _config(device_id=device_id)).device_id == device_id


# --------------------------------------------------------------------------- broker


@pytest.mark.parametrize("url, expected", [
    ("http://broker:1883", "scheme must be mqtt:// or mqtts://"),
    ("broker.example.com:1883", "scheme must be mqtt:// or mqtts://"),
    ("mqtt://:1883", "the URL has no host"),
    ("mqtt://broker:70000", "invalid port"),
    ("mqtt://broker:0", "port 0 is not a broker port"),
    ("mqtt://broker/fednano", "no path, query or fragment"),
    ("mqtt://bad_host!:1883", "invalid host"),
])
def test_bad_broker_urls(tmp_path: Path, url: str, expected: str) -> None:
    message = _errors(tmp_path, _config(broker={"url": url}))
    assert "broker.url" in message and expected in message


def test_credentials_in_the_broker_url_are_refused_and_not_echoed(tmp_path: Path) -> None:
    message = _errors(tmp_path, _config(broker={"url": "mqtts://dev:hunter2@broker:8883"}))
    assert "credentials do not belong in the URL" in message
    assert "hunter2" not in message


def test_ca_file_needs_tls(tmp_path: Path) -> None:
    message = _errors(tmp_path, _config(broker={"url": "mqtt://broker", "ca_file": "ca.pem"}))
    assert "ca_file needs an mqtts:// URL" in message


def test_plaintext_to_a_remote_broker_warns(tmp_path: Path) -> None:
    config = _load(tmp_path, _config(broker={"url": "mqtt://broker.example.com"}))
    assert any("plaintext" in w for w in config.warnings())
    local = _load(tmp_path, _config(broker={"url": "mqtt://127.0.0.1:1883"}))
    assert local.warnings() == []


@pytest.mark.parametrize("url", ["ftp://cloud/bundle", "https://", "file://"])
def test_bad_bundle_urls(tmp_path: Path, url: str) -> None:
    assert "bundle_url" in _errors(tmp_path, _config(bundle_url=url))


# ---------------------------------------------------------------------- credentials


def test_inline_password_is_refused_by_default(tmp_path: Path) -> None:
    message = _errors(tmp_path, _config(credentials={"password": "hunter2"}))
    assert "credentials.password: inline passwords are refused" in message
    assert "password_file or password_env" in message
    assert "hunter2" not in message


def test_inline_password_only_when_the_loader_allows_it(tmp_path: Path) -> None:
    config = _load(tmp_path, _config(credentials={"password": "hunter2"}),
                   allow_inline_password=True)
    assert config.credentials.read_password() == "hunter2"
    assert any("inline" in w for w in config.warnings())


def test_password_from_env(tmp_path: Path) -> None:
    data = _config(credentials={"password_env": "FEDNANO_TEST_PASSWORD"})
    assert _load(tmp_path, data).credentials.read_password(ENV) == "s3cret-from-env"


def test_missing_env_password_fails_at_load_naming_the_field(tmp_path: Path) -> None:
    data = _config(credentials={"password_env": "FEDNANO_UNSET_PASSWORD"})
    message = _errors(tmp_path, data)
    assert "credentials.password_env: environment variable 'FEDNANO_UNSET_PASSWORD'" in message
    config = _load(tmp_path, data, check_secrets=False)  # off-device validation
    assert config.credentials.password_env == "FEDNANO_UNSET_PASSWORD"


def test_password_file_problems(tmp_path: Path) -> None:
    path = _write(tmp_path, _config())
    with pytest.raises(ConfigError, match=r"credentials\.password_file: cannot read"):
        load_device_config(path)
    _password_file(tmp_path, mode=0o644)
    with pytest.raises(ConfigError, match="readable by every user: chmod 600"):
        load_device_config(path)
    _password_file(tmp_path, text="\n")
    with pytest.raises(ConfigError, match="the password is empty"):
        load_device_config(path)


@pytest.mark.parametrize("credentials", [
    {},
    {"password_file": "password", "password_env": "FEDNANO_TEST_PASSWORD"},
])
def test_exactly_one_password_source(tmp_path: Path, credentials: dict[str, str]) -> None:
    assert "give exactly one of password_file or password_env (or certificate_file and " \
           "key_file)" in _errors(
        tmp_path, _config(credentials=credentials))


X509 = {"certificate_file": "device.crt", "key_file": "device.key"}


def _x509_files(tmp_path: Path, key_mode: int = 0o600) -> None:
    from cloud.pki import Issuer  # tests may use both sides: the cloud's CA signs it

    issued = Issuer.create().device_certificate("orin-nano-0042")
    (tmp_path / "device.crt").write_bytes(issued.certificate_pem)
    (tmp_path / "device.key").write_bytes(issued.key_pem)
    (tmp_path / "device.key").chmod(key_mode)


def test_an_x509_identity_is_a_certificate_and_a_key_over_tls(tmp_path: Path) -> None:
    _x509_files(tmp_path)
    config = load_device_config(_write(tmp_path, _config(credentials=X509)))
    assert config.username is None and config.read_password() is None
    address = config.broker_address
    assert (address.cert_file, address.key_file) == (tmp_path / "device.crt",
                                                     tmp_path / "device.key")
    assert config.credentials.source() == f"certificate {tmp_path / 'device.crt'}"


@pytest.mark.parametrize(("credentials", "message"), [
    ({"certificate_file": "device.crt"}, "needs both certificate_file and key_file"),
    ({**X509, "password_file": "password"}, "a certificate or a password, not both"),
])
def test_x509_credentials_come_whole_and_alone(tmp_path: Path, credentials: dict[str, str],
                                               message: str) -> None:
    assert message in _errors(tmp_path, _config(credentials=credentials))


def test_an_x509_identity_needs_tls(tmp_path: Path) -> None:
    _x509_files(tmp_path)
    data = _config(credentials=X509, broker={"url": "mqtt://broker.example.com:1883"})
    assert "an X.509 identity is presented over TLS" in _errors(tmp_path, data)


def test_x509_file_problems(tmp_path: Path) -> None:
    path = _write(tmp_path, _config(credentials=X509))
    with pytest.raises(ConfigError, match=r"credentials\.certificate_file: cannot read"):
        load_device_config(path)
    _x509_files(tmp_path, key_mode=0o644)
    with pytest.raises(ConfigError, match=r"credentials\.key_file: .* readable by every user"):
        load_device_config(path)
    (tmp_path / "device.key").chmod(0o600)
    (tmp_path / "device.crt").rename(tmp_path / "mine.crt")
    _x509_files(tmp_path)  # another key
    (tmp_path / "mine.crt").rename(tmp_path / "device.crt")
    with pytest.raises(ConfigError, match=r"credentials\.key_file: not the key of .*device\.crt"):
        load_device_config(path)
    (tmp_path / "device.crt").write_text("junk")
    with pytest.raises(ConfigError, match=r"credentials\.certificate_file: .* not a PEM"):
        load_device_config(path)


def test_username_is_not_configurable(tmp_path: Path) -> None:
    data = _config(credentials={"password_file": "password", "username": "other"})
    assert "credentials.username: unknown field" in _errors(tmp_path, data)


# ------------------------------------------------------------------ typos and profile


def test_typo_names_the_field(tmp_path: Path) -> None:
    data = _config()
    data["brokr"] = data.pop("broker")
    message = _errors(tmp_path, data)
    assert "device.yaml: brokr: unknown field (did you mean 'broker'?)" in message


def test_a_typo_inside_an_inline_profile_names_the_full_path(tmp_path: Path) -> None:
    profile = yaml.safe_load((default_profiles_dir() / "sim-cpu.yaml").read_text())
    profile["runtime"]["batchsize"] = profile["runtime"].pop("batch_size")
    message = _errors(tmp_path, _config(profile=profile))
    assert "profile.runtime.batchsize: unknown field (did you mean 'batch_size'?)" in message


def test_an_unknown_profile_name_points_at_both_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, _config(profile="jetson-orin-nano"))
    first, second = info.value.issues
    assert (first.field, first.source) == ("profile", tmp_path / "device.yaml")
    assert "did you mean 'jetson-orin-nano-8gb'" in second.message


def test_missing_required_fields(tmp_path: Path) -> None:
    message = _errors(tmp_path, _config(state_dir=_DROP, bundle_url=_DROP))
    assert "state_dir: required field is missing" in message
    assert "bundle_url: required field is missing" in message


# ------------------------------------------------------------------------------ CLI

runner = CliRunner()


def _cli(*args: str, env: dict[str, str] | None = None) -> Any:
    return runner.invoke(app, ["validate", *args], env={"COLUMNS": "200", **(env or {})})


def test_cli_validates_a_device_config(tmp_path: Path) -> None:
    _password_file(tmp_path)
    result = _cli(str(_write(tmp_path, _config())))
    assert result.exit_code == 0, result.output
    assert "device config orin-nano-0042: valid" in result.output
    assert "broker.example.com:8883 (TLS)" in result.output
    assert "MAXN_SUPER" in result.output
    assert "s3cret" not in result.output


def test_cli_rejects_a_bad_device_id(tmp_path: Path) -> None:
    _password_file(tmp_path)
    result = _cli(str(_write(tmp_path, _config(device_id="fleet/+/dev"))))
    assert result.exit_code == 1
    assert "device_id: must be 1-64 of A-Z a-z 0-9 _ . -" in result.output
    assert "got 'fleet/+/dev'" in result.output


def test_cli_secrets_checked_unless_skipped(tmp_path: Path) -> None:
    path = _write(tmp_path, _config(credentials={"password_env": "FEDNANO_CLI_PASSWORD"}))
    result = _cli(str(path))
    assert result.exit_code == 1
    assert "credentials.password_env" in result.output
    assert _cli(str(path), "--skip-secrets").exit_code == 0
    assert _cli(str(path), env={"FEDNANO_CLI_PASSWORD": "pw"}).exit_code == 0


def test_cli_inline_password_needs_the_flag(tmp_path: Path) -> None:
    path = _write(tmp_path, _config(credentials={"password": "hunter2"}))
    refused = _cli(str(path))
    assert refused.exit_code == 1 and "inline passwords are refused" in refused.output
    allowed = _cli(str(path), "--allow-inline-password")
    assert allowed.exit_code == 0, allowed.output
    assert "warning:" in allowed.output and "hunter2" not in allowed.output
