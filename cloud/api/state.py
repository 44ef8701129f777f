"""What the API's routes share: settings, the database, the blob store, the broker's status."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloud.blobs import BlobStore
from cloud.settings import CloudSettings

BrokerProbe = Callable[[], bool]


@dataclass
class AppState:
    """Built once in ``create_app``; routes reach it through ``deps``."""

    settings: CloudSettings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    broker_connected: BrokerProbe | None = None  # None: no broker configured in this process
