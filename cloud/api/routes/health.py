"""Liveness (the process answers) and readiness (database reachable, broker connected)."""

from __future__ import annotations

from fastapi import APIRouter, Response, status
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from cloud.api.deps import StateDep
from cloud.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health() -> Health:
    """Liveness: the API process is up."""
    return Health(status="ok")


@router.get("/ready", response_model=Readiness,
            responses={503: {"model": Readiness, "description": "not ready"}})
def ready(state: StateDep, response: Response) -> Readiness:
    """Readiness: the database answers and, when this process has one, the broker is connected."""
    try:
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        database = "ok"
    except SQLAlchemyError as err:
        database = f"unreachable: {type(err).__name__}"
    if state.broker_connected is None:
        broker = "not configured"
    else:
        broker = "ok" if state.broker_connected() else "disconnected"
    ok = database == "ok" and broker in ("ok", "not configured")
    if not ok:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(ready=ok, database=database, broker=broker)
