"""The API's app factory: ``create_app(settings)`` (OpenAPI at ``/api/v1/openapi.json``, the
operator dashboard at ``/dashboard``, Prometheus metrics at ``/metrics``).

Domain errors become HTTP statuses here, once: ``RecordNotFoundError`` and a missing bundle ->
404, ``ConflictError`` (duplicate, invalid transition, revoked device, too few devices) -> 409.
Request validation errors are FastAPI's 422 whose ``loc`` names the field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastapi import FastAPI, Request, status
from fastapi.responses import JSONResponse
from sqlalchemy import Engine
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from cloud import metrics
from cloud.api.guard import AuthBeforeBody
from cloud.api.routes import api_router
from cloud.api.security import operator_for
from cloud.api.state import AppState, BrokerProbe
from cloud.api.webui import mount_dashboard
from cloud.blobs import BlobStore
from cloud.bundle_catalog import BundleNotFoundError
from cloud.db.crud import ConflictError, RecordNotFoundError
from cloud.db.session import make_engine, make_session_factory
from cloud.settings import DEFAULT_SECRET, CloudSettings

if TYPE_CHECKING:
    from cloud.ask import ModelAnswerer

API_PREFIX = "/api/v1"
_DETAIL = {"application/json": {"schema": {
    "type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}}}
# Statuses any API route may answer besides its own (OpenAPI documents them on every route).
COMMON_RESPONSES: dict[int | str, dict] = {
    400: {"description": "malformed request (e.g. a body that is not JSON)", "content": _DETAIL},
    401: {"description": "missing, unknown or revoked operator token", "content": _DETAIL},
    404: {"description": "no such record (or route)", "content": _DETAIL},
    409: {"description": "conflicts with the current state (duplicate, invalid transition, "
                         "revoked device, too few devices)", "content": _DETAIL},
    413: {"description": "request body over the size limit (refused before it is read)"},
}


class InsecureSettingsError(RuntimeError):
    """Production mode with a default or empty secret: the server refuses to start."""


def check_production_secrets(settings: CloudSettings) -> None:
    """``InsecureSettingsError`` in production while a secret has its placeholder value.

    ``CloudSettings`` already refuses this when it is built from the environment; this also
    catches settings assembled without validation (``model_construct``).
    """
    if settings.environment != "production":
        return
    for name in ("secret_key", "broker_password"):
        if getattr(settings, name).get_secret_value() in (DEFAULT_SECRET, ""):
            raise InsecureSettingsError(f"refusing to start in production: {name} is the "
                                        f"default; set FEDNANO_{name.upper()}")


def create_app(settings: CloudSettings, *, engine: Engine | None = None,
               broker_connected: BrokerProbe | None = None,
               answerer: ModelAnswerer | None = None) -> FastAPI:
    """The FastAPI app over ``settings``' database (or ``engine``) and blob folder, with the
    dashboard at ``/dashboard``; ``answerer`` (the loaded model) enables ``POST /ask``."""
    check_production_secrets(settings)
    engine = engine or make_engine(settings.resolved_database_url)
    app = FastAPI(title="FedNano cloud", version="1", openapi_url=f"{API_PREFIX}/openapi.json",
                  docs_url=f"{API_PREFIX}/docs", redoc_url=None,
                  description="Operators' API: devices, rounds, models, metrics, audit.")
    app.state.fednano = AppState(settings=settings, engine=engine,
                                 sessions=make_session_factory(engine),
                                 blobs=BlobStore(settings.blob_dir),
                                 broker_connected=broker_connected, answerer=answerer)
    app.include_router(api_router, prefix=API_PREFIX, responses=COMMON_RESPONSES)
    sessions = app.state.fednano.sessions

    def authorize(token: str) -> bool:
        with sessions() as session:
            return operator_for(session, token) is not None

    # The last added runs first: the token, then the size, both before a body is read.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=settings.max_request_bytes)
    app.add_middleware(AuthBeforeBody, prefix=API_PREFIX, authorize=authorize)
    mount_dashboard(app)
    metrics.mount(app, app.state.fednano.sessions)
    app.add_exception_handler(RecordNotFoundError, _not_found)
    app.add_exception_handler(BundleNotFoundError, _not_found)
    app.add_exception_handler(ConflictError, _conflict)
    return app


async def _not_found(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_404_NOT_FOUND)


async def _conflict(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=status.HTTP_409_CONFLICT)
