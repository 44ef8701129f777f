"""A device's configuration: its firmware profile plus identity, broker, credentials and paths.

```yaml
device_id: orin-nano-0042                 # also the MQTT username the broker's ACL checks
profile: jetson-orin-nano-8gb             # a name in firmware_configs/, a path, or a mapping
broker:
  url: mqtts://broker.example.com:8883
  ca_file: /etc/fednano/ca.pem            # optional: the system CA store otherwise
credentials:
  password_file: /etc/fednano/password    # or password_env: FEDNANO_DEVICE_PASSWORD, or an
                                          # X.509 identity: certificate_file + key_file
bundle_url: https://cloud.example.com/api/v1/bundles/latest
state_dir: /var/lib/fednano
```

Relative paths are resolved against the config file's folder. A password written in the YAML
is refused unless the *loader* is told to allow it (``allow_inline_password=True``, for local
demos): the file cannot opt itself in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import ssl
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator

from edge.config_files import ConfigError, Issue, StrictModel, read_yaml_mapping, validate_model
from edge.profiles import PROFILE_SCHEMA_FILE, DeviceProfile, load_profile, profile_json_schema
from shared.hosts import check_host
from shared.identity import DEVICE_ID_PATTERN  # the cloud registry validates ids with it too
from shared.mqtt import BrokerAddress

DEVICE_CONFIG_SCHEMA_FILE = "device-config.schema.json"
MQTT_MAX_PASSWORD_BYTES = 65_535
MAX_PEM_BYTES = 64 * 1024
_ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"


class SecretError(ValueError):
    """The password cannot be read, or is unsafe; ``field`` names its config field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file's folder (``context["base_dir"]``)."""
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


class BrokerSettings(StrictModel):
    """The MQTT broker: ``mqtt://host[:1883]`` or ``mqtts://host[:8883]`` (TLS)."""

    url: str
    ca_file: Path | None = Field(None, description="CA bundle for mqtts; default: system CAs")

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, url: str) -> str:
        BrokerAddress.parse(url)  # the agent's client parses it again: one rule for both
        return url

    @field_validator("ca_file")
    @classmethod
    def _ca_path(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve(path, info)

    @model_validator(mode="after")
    def _ca_needs_tls(self) -> BrokerSettings:
        if self.ca_file is not None and not self.tls:
            raise ValueError(f"ca_file needs an mqtts:// URL, got {self.url!r}")
        return self

    @property
    def address(self) -> BrokerAddress:
        """What the agent's MQTT client connects to."""
        return BrokerAddress.parse(self.url, ca_file=self.ca_file)

    @property
    def tls(self) -> bool:  # not via ``address``: ``_ca_needs_tls`` asks before ca_file is checked
        return urlsplit(self.url).scheme == "mqtts"

    @property
    def host(self) -> str:
        return self.address.host

    @property
    def port(self) -> int:
        return self.address.port


def _check_port(parts: SplitResult, url: str) -> None:
    try:
        port = parts.port
    except ValueError as err:  # urllib: "Port out of range 0-65535" / "could not be cast"
        raise ValueError(f"invalid port in {url!r}: {err}") from None
    if port == 0:
        raise ValueError(f"port 0 is not a server port, got {url!r}")


def _redact(parts: SplitResult) -> str:
    return parts._replace(netloc=f"***@{parts.hostname}").geturl()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Credentials(StrictModel):
    """How the device proves who it is: a password (from exactly one of a file or an
    environment variable) or an X.509 key and certificate (both files).

    With a password the username is the device id. With a certificate the broker's certificate
    listener takes the identity from it (its common name is the device id): no username, no
    password. ``password`` (inline) is refused unless the loader allows it.
    """

    certificate_file: Path | None = Field(
        None, description="X.509: the device's certificate (PEM) the cloud's CA signed")
    key_file: Path | None = Field(
        None, description="X.509: the certificate's private key (PEM, not readable by others)")
    password_file: Path | None = Field(None, description="a file holding only the password")
    password_env: str | None = Field(None, pattern=_ENV_NAME,
                                     description="an environment variable holding it")
    password: SecretStr | None = Field(
        None, description="refused unless the loader allows inline passwords (demos only)")

    @field_validator("password_file", "certificate_file", "key_file")
    @classmethod
    def _password_path(cls, path: Path | None, info: ValidationInfo) -> Path | None:
        return None if path is None else _resolve(path, info)

    @field_validator("password")
    @classmethod
    def _inline_refused(cls, value: SecretStr | None, info: ValidationInfo) -> SecretStr | None:
        if value is not None and not (info.context or {}).get("allow_inline_password"):
            raise ValueError("inline passwords are refused (YAML files end up in backups and "
                             "repositories): use password_file or password_env")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> Credentials:
        given = [name for name in ("password_file", "password_env", "password")
                 if getattr(self, name) is not None]
        pair = [name for name in ("certificate_file", "key_file") if getattr(self, name)]
        if pair and len(pair) != 2:
            raise ValueError(f"an X.509 identity needs both certificate_file and key_file, got "
                             f"{pair}")
        if pair and given:
            raise ValueError(f"give a certificate or a password, not both, got {pair + given}")
        if not pair and len(given) != 1:
            raise ValueError(f"give exactly one of password_file or password_env (or "
                             f"certificate_file and key_file), got {given}")
        return self

    @property
    def x509(self) -> bool:
        """Whether the device authenticates with its certificate."""
        return self.certificate_file is not None

    def check_certificate(self) -> None:
        """Read the certificate and key now; ``SecretError`` naming the field if missing,
        unreadable, not PEM, or the key readable by every user."""
        for where, path, marker in (
                ("credentials.certificate_file", self.certificate_file, b"CERTIFICATE-----"),
                ("credentials.key_file", self.key_file, b"PRIVATE KEY-----")):
            assert path is not None
            try:
                mode, head = path.stat().st_mode, path.read_bytes()[:MAX_PEM_BYTES]
            except OSError as err:
                raise SecretError(where, f"cannot read {str(path)!r}: {err.strerror}") from err
            if marker not in head:
                raise SecretError(where, f"{str(path)!r} is not a PEM {marker[:-5].decode()}")
            if where.endswith("key_file") and mode & stat.S_IROTH:
                raise SecretError(where, f"{str(path)!r} is readable by every user: chmod 600 it")
        try:  # what TLS will do with them: a key that is not the certificate's fails here
            ssl.create_default_context().load_cert_chain(str(self.certificate_file),
                                                         str(self.key_file))
        except (ssl.SSLError, OSError) as err:
            raise SecretError("credentials.key_file", f"not the key of "
                              f"{str(self.certificate_file)!r} ({err.args[-1]})") from err

    def read_password(self, environ: Mapping[str, str] | None = None) -> str:
        """The password, read now; ``SecretError`` naming the field if missing or unsafe."""
        if self.x509:
            raise SecretError("credentials", "this device authenticates with its certificate, "
                                             "not a password")
        if self.password is not None:
            return _check_password(self.password.get_secret_value(), "credentials.password")
        if self.password_file is not None:
            return _read_password_file(self.password_file)
        where = "credentials.password_env"
        value = (os.environ if environ is None else environ).get(self.password_env or "")
        if not value:
            raise SecretError(where, f"environment variable {self.password_env!r} is not set "
                              "or empty")
        return _check_password(value, where)

    def source(self) -> str:
        """Where the password (or certificate) comes from, for summaries (never a secret)."""
        if self.certificate_file is not None:
            return f"certificate {self.certificate_file}"
        if self.password_file is not None:
            return f"file {self.password_file}"
        return f"env ${self.password_env}" if self.password_env else "inline (demo only)"


def _read_password_file(path: Path) -> str:
    where = "credentials.password_file"
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SecretError(where, f"cannot read {str(path)!r}: {err}") from err
    if mode & stat.S_IROTH:
        raise SecretError(where, f"{str(path)!r} is readable by every user: chmod 600 it")
    return _check_password(text.removesuffix("\n").removesuffix("\r"), where)


def _check_password(password: str, where: str) -> str:
    if not password:
        raise SecretError(where, "the password is empty")
    if len(password.encode("utf-8")) > MQTT_MAX_PASSWORD_BYTES:
        raise SecretError(where, f"longer than MQTT's {MQTT_MAX_PASSWORD_BYTES} bytes")
    return password


class DeviceConfig(StrictModel):
    """Everything one device needs at boot: its profile, who it is and where things are."""

    schema_version: Literal[1] = 1
    device_id: str = Field(pattern=DEVICE_ID_PATTERN,
                           description="1-64 of A-Z a-z 0-9 _ . -, starting alphanumeric")
    profile: DeviceProfile
    broker: BrokerSettings
    credentials: Credentials
    bundle_url: str = Field(description="where the NanoEdge bundle is fetched (https://, file://)")
    state_dir: Path = Field(description="durable local state; relative to the config file")

    @field_validator("device_id", mode="before")
    @classmethod
    def _topic_safe(cls, value: object) -> object:
        if isinstance(value, str) and not re.fullmatch(DEVICE_ID_PATTERN, value):
            raise ValueError("must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or digit "
                             "(it is an MQTT topic level and the broker username: no / + # $ "
                             f"or spaces), got {value!r}")
        return value

    @field_validator("bundle_url")
    @classmethod
    def _bundle_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("https", "http", "file"):
            raise ValueError(f"scheme must be https://, http:// or file://, got {url!r}")
        if parts.scheme != "file":
            check_host(parts.hostname, url)
            _check_port(parts, url)
        elif not parts.path:
            raise ValueError(f"a file:// URL needs a path, got {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"no credentials in the bundle URL, got {_redact(parts)!r}")
        return url

    @field_validator("state_dir")
    @classmethod
    def _state_path(cls, path: Path, info: ValidationInfo) -> Path:
        if str(path) in ("", "."):
            raise ValueError(f"state_dir must name a folder, got {str(path)!r}")
        return _resolve(path, info)

    @model_validator(mode="after")
    def _certificate_needs_tls(self) -> DeviceConfig:
        if self.credentials.x509 and not self.broker.tls:
            raise ValueError("an X.509 identity is presented over TLS: broker.url must be "
                             f"mqtts://, got {self.broker.url!r}")
        return self

    @property
    def username(self) -> str | None:
        """The broker username: the device id (the broker ACL's ``%u``); None with a
        certificate (the broker takes the identity from it)."""
        return None if self.credentials.x509 else self.device_id

    @property
    def broker_address(self) -> BrokerAddress:
        """Where and how to connect: the broker's address with this device's certificate when
        it has one."""
        address = self.broker.address
        if not self.credentials.x509:
            return address
        return dataclasses.replace(address, cert_file=self.credentials.certificate_file,
                                   key_file=self.credentials.key_file)

    def read_password(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The broker password, read now (None with a certificate)."""
        return None if self.credentials.x509 else self.credentials.read_password(environ)

    def warnings(self) -> list[str]:
        """Things that validate but deserve an operator's attention."""
        notes = list(self.profile.warnings())
        if not self.broker.tls and not _is_loopback(self.broker.host):
            notes.append(f"broker {self.broker.host} is plaintext mqtt://: the password and "
                         "updates cross the network unencrypted (use mqtts://)")
        bundle = urlsplit(self.bundle_url)
        if bundle.scheme == "http" and not _is_loopback(bundle.hostname or ""):
            notes.append("bundle_url is plain http://: use https:// outside a lab")
        if self.credentials.password is not None:
            notes.append("the password is inline in the YAML (allowed for this load only)")
        return notes


def load_device_config(
    path: Path, *, allow_inline_password: bool = False, check_secrets: bool = True,
    environ: Mapping[str, str] | None = None, profiles_dir: Path | None = None,
) -> DeviceConfig:
    """Load and validate a device config; ``ConfigError`` lists ``file: field: message`` issues.

    ``profile`` may be a profile name (looked up in ``profiles_dir``), a path relative to the
    config file, or an inline mapping. With ``check_secrets`` the password is read once now, so
    a missing file or variable fails at boot rather than at the first connect.
    """
    data = read_yaml_mapping(path)
    if isinstance(data.get("profile"), str):
        data["profile"] = _referenced_profile(data["profile"], path, profiles_dir)
    context = {"base_dir": path.parent, "allow_inline_password": allow_inline_password}
    config = validate_model(DeviceConfig, data, path, context)
    if check_secrets:
        try:
            if config.credentials.x509:
                config.credentials.check_certificate()
            else:
                config.credentials.read_password(environ)
        except SecretError as err:
            raise ConfigError.single(path, err.field, err.message) from err
    return config


def _referenced_profile(ref: str, config_path: Path, profiles_dir: Path | None) -> DeviceProfile:
    """A profile by name (``profiles_dir``) or by a path relative to the config file."""
    is_path = ref.endswith((".yaml", ".yml")) or "/" in ref
    target: str | Path = config_path.parent / ref if is_path else ref
    try:
        return load_profile(target, directory=profiles_dir)
    except ConfigError as err:
        lead = Issue(config_path, "profile", f"cannot load profile {ref!r}")
        raise ConfigError([lead, *err.issues]) from err


def device_config_json_schema() -> dict[str, Any]:
    """JSON schema of a device config, where ``profile`` is a name/path or an inline profile."""
    schema = DeviceConfig.model_json_schema()
    schema["title"] = "FedNano device config"
    schema["properties"]["profile"] = {
        "anyOf": [
            {"type": "string", "description": "a profile name in firmware_configs/ or a path"},
            {"$ref": "#/$defs/DeviceProfile"},
        ],
    }
    return schema


def write_schemas(directory: Path) -> list[Path]:
    """Export the profile and device-config JSON schemas into ``directory``; returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, schema in ((PROFILE_SCHEMA_FILE, profile_json_schema()),
                         (DEVICE_CONFIG_SCHEMA_FILE, device_config_json_schema())):
        path = directory / name
        path.write_text(json.dumps(schema, indent=2) + "\n", encoding="utf-8")
        written.append(path)
    return written
