"""What the API's routes share: settings, the database, the blob store, the broker's status
and, in the all-in-one process, the model that answers the dashboard's questions."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from cloud.blobs import BlobStore
from cloud.settings import CloudSettings

if TYPE_CHECKING:
    from cloud.ask import ModelAnswerer

BrokerProbe = Callable[[], bool]


@dataclass
class AppState:
    """Built once in ``create_app``; routes reach it through ``deps``."""

    settings: CloudSettings
    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    broker_connected: BrokerProbe | None = None  # None: no broker configured in this process
    answerer: ModelAnswerer | None = None  # None: no model in this process (POST /ask is 503)
