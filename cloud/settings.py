"""The cloud's settings: one typed object per process, built in ``main`` and passed down.

Read from ``FEDNANO_*`` environment variables (``FEDNANO_DATABASE_URL``, ``FEDNANO_HOME``,
``FEDNANO_ENVIRONMENT``, ...) or keyword arguments; nothing is read at import time.
Secrets have a placeholder default so a laptop demo starts; in production mode the settings
refuse to load while any secret still has it (a warning otherwise).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cloud.db.session import normalize_url, sqlite_url
from cloud.layout import Layout
from shared.mqtt import BrokerAddress

DEFAULT_SECRET = "changethis"
DATABASE_FILE = "cloud.db"
_SECRET_FIELDS = ("secret_key", "broker_password")


def default_merge_processes() -> int:
    """The CPUs this process may use, at most 4 (a merge's decoding splits across them)."""
    return max(1, min(4, usable_cpus()))


def usable_cpus(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The CPUs this process may run on, lowered to its cgroup's CPU quota (a container's
    ``--cpus``) where one is set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus or 1, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota readable: the affinity stands
    return cpus or 1


class SettingsWarning(UserWarning):
    """A setting that works but must not stay as it is (the CLI shows it as one line)."""


class CloudSettings(BaseSettings):
    """Settings of the cloud services (API, coordinator, LLM workers)."""

    # hide_input_in_errors: a refused value may hold a secret (a broker URL with credentials),
    # and ``fednano cloud`` prints the whole error
    model_config = SettingsConfigDict(env_prefix="FEDNANO_", extra="forbid",
                                      hide_input_in_errors=True)

    environment: Literal["development", "test", "production"] = "development"
    home: Path = Field(default_factory=lambda: Layout.default().home,
                       description="models and caches (the frozen base), and by default the "
                                   "cloud's own data")
    data_dir: Path | None = Field(
        None, description="the cloud's own data: received updates and adapter versions "
                          "(blobs), the default SQLite database, the broker files; default: "
                          "home (a simulated fleet keeps each run's data apart this way)")
    database_url: str | None = Field(
        None, description="sqlite:///... or postgresql://...; default: SQLite under home")
    secret_key: SecretStr = Field(SecretStr(DEFAULT_SECRET),
                                  description="signs operator tokens and download links")
    broker_url: str = Field("mqtt://127.0.0.1:1883", description="mqtt:// or mqtts:// URL")
    broker_username: str = Field("fednano-cloud",
                                 description="the cloud services' own MQTT account")
    broker_password: SecretStr = SecretStr(DEFAULT_SECRET)
    broker_dir: Path | None = Field(
        None, description="where the broker's dynamic-security file goes; default home/broker")
    broker_file_group: str | None = Field(
        None, description="group given read access to the broker's dynamic-security file, "
                          "e.g. 'mosquitto' when a root-started broker drops to that user")
    broker_live_admin: bool = Field(
        True, description="apply device additions, revocations and secret rotations to the "
                          "running broker at once (its dynamic-security control topic); off: "
                          "only the database changes (a broker-less test or demo)")
    mqtt_hash_iterations: int = Field(
        10_000, ge=1_000, le=10_000_000,
        description="PBKDF2-SHA512 rounds of stored device secrets (paid at every MQTT connect)")
    device_broker_url: str | None = Field(
        None, description="the broker as devices reach it, written into the configs of "
                          "password devices (mqtts://broker.example.com:8883); default: "
                          "broker_url")
    device_x509_broker_url: str | None = Field(
        None, description="the broker's certificate listener as devices reach it (mqtts://; "
                          "require_certificate, use_identity_as_username), written into the "
                          "configs of X.509 devices; none: X.509 provisioning is off")
    device_ca_file: Path | None = Field(
        None, description="CA certificate (PEM) devices verify the broker with; copied into "
                          "every device kit (ca.crt). With device_ca_key_file it also signs "
                          "X.509 devices' certificates: the certificate listener's cafile")
    device_ca_key_file: Path | None = Field(
        None, description="the device CA's private key (PEM): signs X.509 devices' "
                          "certificates; none: X.509 provisioning is off")
    public_url: str = Field("http://127.0.0.1:8000",
                            description="the API's base URL as devices reach it")
    bundle_dir: Path | None = Field(
        None, description="folder of exported NanoEdge bundles (fednano bundle export --out) "
                          "served by the API; none: bundle downloads are off")
    tick_interval_s: float = Field(1.0, gt=0, le=60,
                                   description="how often the coordinator checks its rounds")
    ingest_batch: int = Field(
        100, ge=1, le=10_000,
        description="most updates the coordinator stores in one transaction (one commit, then "
                    "their acknowledgements); also how many unacknowledged messages the broker "
                    "sends it at once")
    merge_processes: int = Field(
        default_factory=lambda: default_merge_processes(), ge=1, le=64,
        description="processes that fold a large round's updates at once (the coordinator and "
                    "merge_processes - 1 workers; 1: the coordinator alone); a round is split "
                    "only when each gets at least 128 updates. Default: the usable CPUs, at "
                    "most 4")
    ingest_wait_ms: float = Field(
        0.0, ge=0, le=1000,
        description="how long a batch of updates may wait after its first message for more "
                    "(0: take what has arrived)")
    metrics_port: int | None = Field(
        None, ge=1, le=65535,
        description="TCP port of the coordinator's or LLM worker's Prometheus /metrics (the "
                    "API serves /metrics on its own port); none: not served")
    max_request_bytes: int = Field(
        8 * 2**20, ge=1024, le=2**31,
        description="largest request body the API reads (413 above it, before reading)")
    log_format: Literal["text", "json"] = Field(
        "text", description="log lines as text, or as JSON with device, round and update ids")

    @field_validator("home", "data_dir", "broker_dir", "bundle_dir", "device_ca_file",
                     "device_ca_key_file")
    @classmethod
    def _expand_user(cls, path: Path | None) -> Path | None:
        return None if path is None else path.expanduser()

    @field_validator("database_url")
    @classmethod
    def _known_database(cls, url: str | None) -> str | None:
        if url is not None:
            normalize_url(url)  # raises ValueError naming the scheme
        return url

    @field_validator("broker_url", "device_broker_url")
    @classmethod
    def _mqtt_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            BrokerAddress.parse(url)  # the rule the coordinator's and devices' clients use
        except ValueError as err:
            raise ValueError(f"must be mqtt://host[:port] or mqtts://host[:port]: {err}") from None
        return url

    @field_validator("device_x509_broker_url")
    @classmethod
    def _mqtts_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            address = BrokerAddress.parse(url)
        except ValueError as err:
            raise ValueError(f"must be mqtts://host[:port]: {err}") from None
        if not address.tls:
            raise ValueError(f"a certificate listener speaks TLS: must be mqtts://, got {url!r}")
        return url

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL, got {url!r}")
        return url.rstrip("/")

    @model_validator(mode="after")
    def _no_default_secrets(self) -> CloudSettings:
        names = [name for name in _SECRET_FIELDS
                 if getattr(self, name).get_secret_value() in (DEFAULT_SECRET, "")]
        if not names:
            return self
        variables = " and ".join(f"FEDNANO_{name.upper()}" for name in names)
        message = (f"{' and '.join(names)} still {'have' if len(names) > 1 else 'has'} the "
                   f"placeholder {DEFAULT_SECRET!r} (or nothing): set {variables} to long "
                   "random values")
        if self.environment == "production":
            raise ValueError(message)
        warnings.warn(f"{message} (refused with FEDNANO_ENVIRONMENT=production)",
                      SettingsWarning, stacklevel=2)
        return self

    @property
    def resolved_data_dir(self) -> Path:
        """``data_dir``, or ``home``."""
        return self.data_dir or Layout(self.home).data

    @property
    def resolved_database_url(self) -> str:
        """``database_url``, or the SQLite file under the data folder."""
        return self.database_url or sqlite_url(self.resolved_data_dir / DATABASE_FILE)

    @property
    def resolved_broker_dir(self) -> Path:
        """``broker_dir``, or ``broker`` under the data folder."""
        return self.broker_dir or self.resolved_data_dir / "broker"

    @property
    def blob_dir(self) -> Path:
        """Where received updates and adapter versions are stored (content-addressed)."""
        return self.resolved_data_dir / "blobs"

    @property
    def resolved_device_broker_url(self) -> str:
        """``device_broker_url``, or the cloud's own ``broker_url``."""
        return self.device_broker_url or self.broker_url

    @property
    def bundle_url(self) -> str:
        """Where devices download the current NanoEdge bundle."""
        return f"{self.public_url}/api/v1/bundles/latest"
