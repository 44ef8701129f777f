"""Provisioning a device for the network it will run on: registry entry, credential, kit.

``DeviceNetwork`` is what a device must be told about the cloud, from the cloud's settings: the
broker as devices reach it (not the cloud's own, often internal, ``broker_url``), the CA
certificate it verifies the broker with, the bundle URL, and -- when X.509 is on -- the
certificate listener and the CA that signs devices' certificates.

``provision`` registers a device (``cloud.registry``) with a password, or with a certificate
the CA signs now, and returns its ``DeviceKit``: ``device.yaml``, the secret or the key and
certificate (shown once, never stored) and ``ca.crt``. ``DeviceKit.write`` puts the kit in a
folder, keys and passwords mode 0600, ready to copy onto the device::

    kit = provision(session, DeviceNetwork.from_settings(settings), device_id="orin-7",
                    profile="jetson-orin-nano-8gb", x509=True)
    kit.write(Path("kits/orin-7"))
    # then apply kit.broker_secret to the running broker (cloud.broker_admin)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.orm import Session

from cloud import registry
from cloud.db import crud
from cloud.db.models import CredentialKind, Device
from cloud.pki import IssuedCertificate, Issuer, PkiError
from cloud.settings import CloudSettings
from shared.files import atomic_write
from shared.identity import list_profiles
from shared.mqtt import BrokerAddress

CONFIG_FILE = "device.yaml"
PASSWORD_FILE = "password"
CERTIFICATE_FILE = "device.crt"
KEY_FILE = "device.key"
CA_FILE = "ca.crt"
STATE_DIR = "state"


class ProvisioningError(ValueError):
    """The cloud is not set up for what was asked (the message says which setting to set)."""


@dataclass(frozen=True)
class DeviceNetwork:
    """What every device is told about the cloud (see the module docstring)."""

    broker_url: str
    bundle_url: str
    ca_pem: bytes | None = None
    x509_broker_url: str | None = None
    issuer: Issuer | None = field(default=None, repr=False)
    # (CA certificate, CA key) files the issuer is loaded from when an X.509 device is added:
    # a key that cannot be read then fails that addition only, not every password device's
    issuer_files: tuple[Path, Path] | None = None

    def __post_init__(self) -> None:
        BrokerAddress.parse(self.broker_url)  # ValueError naming the problem
        if self.x509_broker_url is not None and not BrokerAddress.parse(self.x509_broker_url).tls:
            raise ValueError(f"the certificate listener must be mqtts://, got "
                             f"{self.x509_broker_url!r}")

    @classmethod
    def from_settings(cls, settings: CloudSettings) -> DeviceNetwork:
        """From ``FEDNANO_DEVICE_*`` (``ProvisioningError`` when the CA certificate cannot be
        read; the CA key is read only when an X.509 device is added)."""
        ca_pem, issuer_files = None, None
        if settings.device_ca_file is not None:
            try:
                ca_pem = settings.device_ca_file.read_bytes()
            except OSError as err:
                raise ProvisioningError(f"cannot read FEDNANO_DEVICE_CA_FILE "
                                        f"{settings.device_ca_file}: {err.strerror}") from None
            if settings.device_ca_key_file is not None:
                issuer_files = (settings.device_ca_file, settings.device_ca_key_file)
        return cls(broker_url=settings.resolved_device_broker_url,
                   bundle_url=settings.bundle_url, ca_pem=ca_pem,
                   x509_broker_url=settings.device_x509_broker_url, issuer_files=issuer_files)

    def require_x509(self) -> tuple[Issuer, str]:
        """The issuer and the certificate listener; ``ProvisioningError`` naming what is off
        or why the CA cannot sign."""
        has_issuer = self.issuer is not None or self.issuer_files is not None
        missing = [name for name, present in (
            ("FEDNANO_DEVICE_X509_BROKER_URL", self.x509_broker_url is not None),
            ("FEDNANO_DEVICE_CA_FILE and FEDNANO_DEVICE_CA_KEY_FILE", has_issuer))
            if not present]
        if missing:
            raise ProvisioningError(f"X.509 provisioning is off: set {' and '.join(missing)}")
        assert self.x509_broker_url is not None
        if self.issuer is not None:
            return self.issuer, self.x509_broker_url
        assert self.issuer_files is not None
        try:
            return Issuer.load(*self.issuer_files), self.x509_broker_url
        except PkiError as err:
            raise ProvisioningError(f"the device CA cannot sign: {err}") from None

    def config(self, device: Device, kind: CredentialKind) -> dict[str, Any]:
        """The device's config (``edge.config.DeviceConfig`` format) for its credential kind:
        files named relative to the config (the kit's layout)."""
        x509 = kind is CredentialKind.X509
        url = self.x509_broker_url if x509 else self.broker_url
        if url is None:
            raise ProvisioningError("X.509 provisioning is off: set "
                                    "FEDNANO_DEVICE_X509_BROKER_URL")
        broker: dict[str, Any] = {"url": url}
        if self.ca_pem is not None and BrokerAddress.parse(url).tls:
            broker["ca_file"] = CA_FILE
        credentials = ({"certificate_file": CERTIFICATE_FILE, "key_file": KEY_FILE} if x509
                       else {"password_file": PASSWORD_FILE})
        return {"schema_version": 1, "device_id": device.id, "profile": device.profile,
                "broker": broker, "credentials": credentials, "bundle_url": self.bundle_url,
                "state_dir": STATE_DIR}

    def config_yaml(self, device: Device, kind: CredentialKind) -> str:
        """``config`` as the YAML file a device boots from (no secret in it)."""
        where = ("its key (device.key, mode 0600) and certificate beside it"
                 if kind is CredentialKind.X509 else "its password in the password file, "
                                                     "mode 0600")
        header = (f"# FedNano device config for {device.id} (generated by the cloud "
                  f"registry).\n# {where[0].upper()}{where[1:]}.\n")
        return header + yaml.safe_dump(self.config(device, kind), sort_keys=False)


@dataclass(frozen=True)
class DeviceKit:
    """Everything a newly provisioned device needs, secrets included (shown once)."""

    device: Device
    network: DeviceNetwork = field(repr=False)
    secret: str | None = field(default=None, repr=False)
    certificate: IssuedCertificate | None = field(default=None, repr=False)

    @property
    def kind(self) -> CredentialKind:
        return CredentialKind.X509 if self.certificate is not None else CredentialKind.PASSWORD

    @property
    def config(self) -> dict[str, Any]:
        return self.network.config(self.device, self.kind)

    @property
    def ca_pem(self) -> bytes | None:
        """The CA certificate, when the config names it (a TLS broker): the kit's ``ca.crt``."""
        return self.network.ca_pem if "ca_file" in self.config["broker"] else None

    @property
    def broker_secret(self) -> str | None:
        """What the running broker's client for this device gets: its password, or None for
        an X.509 device (no password logs it in)."""
        return self.secret

    def files(self) -> dict[str, tuple[bytes, int]]:
        """The kit's files: name -> (content, mode)."""
        files = {CONFIG_FILE: (self.network.config_yaml(self.device, self.kind).encode(),
                               0o644)}
        if self.secret is not None:
            files[PASSWORD_FILE] = (f"{self.secret}\n".encode(), 0o600)
        if self.certificate is not None:
            files[CERTIFICATE_FILE] = (self.certificate.certificate_pem, 0o644)
            files[KEY_FILE] = (self.certificate.key_pem, 0o600)
        if self.ca_pem is not None:
            files[CA_FILE] = (self.ca_pem, 0o644)
        return files

    def write(self, directory: Path) -> list[Path]:
        """Write the kit into ``directory`` (each file atomically); returns the paths."""
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for name, (content, mode) in self.files().items():
            atomic_write(directory / name, content, prefix=f".{name}.", mode=mode)
            written.append(directory / name)
        return written

    def stage(self, directory: Path) -> StagedKit:
        """Write the kit into a new folder beside ``directory``, to be moved into it once the
        device's registration is committed (``StagedKit.place``), or discarded if it is not:
        no key is left on disk for a device that was never registered."""
        directory.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            names = [path.name for path in self.write(staging)]
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return StagedKit(staging, directory, names)


@dataclass(frozen=True)
class StagedKit:
    """A kit written beside its folder (``DeviceKit.stage``)."""

    staging: Path
    directory: Path
    names: list[str]

    def place(self) -> list[Path]:
        """Move the files into the folder (each one a rename); returns their paths."""
        self.directory.mkdir(parents=True, exist_ok=True)
        placed = []
        for name in self.names:
            os.replace(self.staging / name, self.directory / name)
            placed.append(self.directory / name)
        self.staging.rmdir()
        return placed

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def provision(session: Session, network: DeviceNetwork, *, device_id: str, profile: str,
              x509: bool = False, actor: str = registry.SYSTEM_ACTOR,
              capabilities: Mapping[str, Any] | None = None,
              reserved_ids: Collection[str] = (),
              known_profiles: Collection[str] | None = None,
              iterations: int = registry.DEFAULT_HASH_ITERATIONS) -> DeviceKit:
    """Register a device and make its kit. ``known_profiles`` defaults to the shipped
    profiles (an unknown one is refused now, not when the device boots);
    ``ProvisioningError`` when X.509 is asked for and the cloud is not set up for it."""
    known = list_profiles() if known_profiles is None else known_profiles
    if x509:
        issuer, _ = network.require_x509()
        device, issued = registry.add_x509_device(
            session, device_id=device_id, profile=profile, issuer=issuer, actor=actor,
            capabilities=capabilities, reserved_ids=reserved_ids, known_profiles=known)
        return DeviceKit(device, network, certificate=issued)
    device, secret = registry.add_device(
        session, device_id=device_id, profile=profile, actor=actor, capabilities=capabilities,
        reserved_ids=reserved_ids, known_profiles=known, iterations=iterations)
    return DeviceKit(device, network, secret=secret)


def credential_kind(session: Session, device_id: str) -> CredentialKind:
    """The kind of the device's current (or, when revoked, last) credential."""
    device = crud.require_device(session, device_id=device_id)
    credentials = device.credentials
    return credentials[-1].kind if credentials else CredentialKind.PASSWORD
