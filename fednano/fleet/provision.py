"""Provisioning a simulated fleet through the real registry: devices, secrets, broker files.

Each device gets what a flashed device gets (``cloud.provisioning``): a ``device.yaml``
naming its profile, broker and state folder, and its ``password`` file (0600) -- or, for an
X.509 device, its key (0600) and certificate -- and the CA certificate when the broker is
reached over TLS.
Its local data is a shard of easy-VQA (``edge.local_data.DataSpec``): every device process
partitions the task with the same seed and keeps its own shard.
"""

from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from cloud import provisioning, registry
from cloud.db import crud
from cloud.db.session import session_scope
from cloud.provisioning import DeviceNetwork

SERVICE_USERNAME = "fednano-cloud"
ROGUE_ID = "rogue"
PROFILE = "sim-cpu"


@dataclass(frozen=True)
class FleetDevice:
    """A provisioned device: its id, its folder (config + password + state) and secret."""

    device_id: str
    folder: Path
    secret: str | None = field(repr=False)  # None: an X.509 device

    @property
    def config_path(self) -> Path:
        return self.folder / "device.yaml"

    @property
    def state_dir(self) -> Path:
        return self.folder / "state"


def device_ids(count: int) -> list[str]:
    """``dev-00``, ``dev-01``, ... (three digits past 100 devices)."""
    if count < 1:
        raise ValueError(f"a fleet needs at least one device, got {count!r}")
    width = max(2, len(str(count - 1)))
    return [f"dev-{i:0{width}d}" for i in range(count)]


def data_spec(index: int, count: int, *, alpha: float, seed: int,
              max_samples: int | None) -> str:
    """The ``--data`` of device ``index`` of ``count``: its easy-VQA shard (question skew)."""
    spec = f"easyvqa:index={index},of={count},alpha={alpha:g},by=question,seed={seed}"
    return spec if max_samples is None else f"{spec},max_samples={max_samples}"


def require_empty(sessions: sessionmaker[Session]) -> None:
    """``ValueError`` unless the database has no devices and no rounds yet."""
    with session_scope(sessions) as session:
        devices, rounds = crud.count_devices(session), crud.count_rounds(session)
    if devices or rounds:
        raise ValueError(f"the database already holds {devices} devices and {rounds} rounds: "
                         "a fleet run needs an empty database")


def provision(sessions: sessionmaker[Session], ids: list[str], *, folder: Path,
              network: DeviceNetwork, x509: Collection[str] = (),
              profile: str = PROFILE) -> list[FleetDevice]:
    """Register ``ids`` (those in ``x509`` with a certificate) and write each device's kit
    under ``folder/<id>/``."""
    devices = []
    with session_scope(sessions) as session:
        for device_id in ids:
            kit = provisioning.provision(session, network, device_id=device_id,
                                         profile=profile, x509=device_id in x509,
                                         actor="fleet", reserved_ids={SERVICE_USERNAME})
            kit.write(folder / device_id)
            devices.append(FleetDevice(device_id, folder / device_id, kit.secret))
    return devices


def service_account() -> registry.ServiceAccount:
    """The cloud services' broker account, with a fresh random password."""
    return registry.ServiceAccount(SERVICE_USERNAME, secrets.token_urlsafe(24))


def write_broker_files(sessions: sessionmaker[Session], directory: Path,
                       service: registry.ServiceAccount) -> registry.BrokerFiles:
    """The broker's dynamic-security file from the registry (as ``devices broker-files``)."""
    with session_scope(sessions) as session:
        return registry.write_broker_files(session, directory=directory, services=[service])
