"""CloudSettings: FEDNANO_* environment, SQLite under FEDNANO_HOME, no default secrets in
production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cloud.settings import CloudSettings

STRONG: dict[str, Any] = {"secret_key": "k" * 40, "broker_password": "p" * 40}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("FEDNANO_DATABASE_URL", "FEDNANO_ENVIRONMENT", "FEDNANO_SECRET_KEY",
                 "FEDNANO_BROKER_PASSWORD", "FEDNANO_BROKER_URL", "FEDNANO_BROKER_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("FEDNANO_HOME", str(tmp_path / "home"))


def test_sqlite_under_fednano_home_by_default(tmp_path: Path) -> None:
    settings = CloudSettings(**STRONG)
    assert settings.home == tmp_path / "home"
    assert settings.resolved_database_url == f"sqlite:///{tmp_path}/home/cloud.db"
    assert settings.resolved_broker_dir == tmp_path / "home" / "broker"
    assert settings.bundle_url == "http://127.0.0.1:8000/api/v1/bundles/latest"


def test_the_environment_is_read_when_built_not_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDNANO_DATABASE_URL", "postgresql://fednano@db:5432/fednano")
    monkeypatch.setenv("FEDNANO_BROKER_URL", "mqtts://broker.example:8883")
    monkeypatch.setenv("FEDNANO_HOME", "~/somewhere")
    settings = CloudSettings(**STRONG)
    assert settings.resolved_database_url == "postgresql://fednano@db:5432/fednano"
    assert settings.broker_url == "mqtts://broker.example:8883"
    assert settings.home == Path("~/somewhere").expanduser()


def test_default_secrets_only_warn_outside_production() -> None:
    with pytest.warns(UserWarning, match="secret_key still has the placeholder 'changethis'"):
        CloudSettings(broker_password="p" * 40)


@pytest.mark.parametrize("missing", ["secret_key", "broker_password"])
def test_production_refuses_default_secrets(missing: str) -> None:
    values: dict[str, Any] = {**STRONG, missing: "changethis"}
    with pytest.raises(ValidationError, match=f"{missing} still has the placeholder"):
        CloudSettings(environment="production", **values)
    CloudSettings(environment="production", **STRONG)  # set: fine


def test_production_reads_its_secrets_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDNANO_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="secret_key"):
        CloudSettings()
    monkeypatch.setenv("FEDNANO_SECRET_KEY", "k" * 40)
    monkeypatch.setenv("FEDNANO_BROKER_PASSWORD", "p" * 40)
    assert CloudSettings().secret_key.get_secret_value() == "k" * 40
    assert "k" * 40 not in repr(CloudSettings())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("database_url", "mysql://u@h/db", "must be sqlite:/// or postgresql://"),
    ("broker_url", "http://broker:1883", "must be mqtt://host"),
    ("public_url", "ftp://x", "must be an http:// or https:// URL"),
    ("mqtt_hash_iterations", 10, "greater than or equal to 1000"),
    ("environment", "prod", "'development', 'test' or 'production'"),
    ("databse_url", "sqlite://", "Extra inputs are not permitted"),
])
def test_bad_values_name_the_field(field: str, value: object, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        values: dict[str, Any] = {**STRONG, field: value}
        CloudSettings(**values)
    assert field in str(info.value)


@pytest.mark.parametrize(("url", "message"), [
    ("mqtt://fednano:hunter2@broker", "credentials do not belong in the URL"),
    ("mqtt://broker/fednano", "no path, query or fragment"),
    ("mqtt://broker:0", "port 0 is not a broker port"),
])
def test_the_broker_url_is_checked_as_the_client_parses_it(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        CloudSettings(**STRONG, broker_url=url)
    assert all("hunter2" not in error["msg"] for error in info.value.errors())
    assert "hunter2" not in str(info.value)  # what `fednano cloud` prints: no input echoed
