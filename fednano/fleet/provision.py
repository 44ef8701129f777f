"""Provisioning a simulated fleet through the real registry: devices, secrets, broker files.

Each device gets what a flashed device gets (``cloud.registry.write_device_files``): a
``device.yaml`` naming its profile, broker and state folder, and a ``password`` file (0600).
Its local data is a shard of easy-VQA (``edge.local_data.DataSpec``): every device process
partitions the task with the same seed and keeps its own shard.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from cloud import registry
from cloud.db import crud
from cloud.db.session import session_scope

SERVICE_USERNAME = "fednano-cloud"
ROGUE_ID = "rogue"
PROFILE = "sim-cpu"


@dataclass(frozen=True)
class FleetDevice:
    """A provisioned device: its id, its folder (config + password + state) and secret."""

    device_id: str
    folder: Path
    secret: str = field(repr=False)

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
              broker_url: str, bundle_url: str, profile: str = PROFILE) -> list[FleetDevice]:
    """Register ``ids`` and write each device's files under ``folder/<id>/``."""
    devices = []
    with session_scope(sessions) as session:
        for device_id in ids:
            device, secret = registry.add_device(session, device_id=device_id, profile=profile,
                                                 actor="fleet", reserved_ids={SERVICE_USERNAME})
            registry.write_device_files(folder / device_id, device=device, secret=secret,
                                        broker_url=broker_url, bundle_url=bundle_url)
            devices.append(FleetDevice(device_id, folder / device_id, secret))
    return devices


def service_account() -> registry.ServiceAccount:
    """The cloud services' broker account, with a fresh random password."""
    return registry.ServiceAccount(SERVICE_USERNAME, secrets.token_urlsafe(24))


def write_broker_files(sessions: sessionmaker[Session], directory: Path,
                       service: registry.ServiceAccount) -> registry.BrokerFiles:
    """The broker's dynamic-security file from the registry (as ``devices broker-files``)."""
    with session_scope(sessions) as session:
        return registry.write_broker_files(session, directory=directory, services=[service])
