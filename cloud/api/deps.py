"""Dependencies of the routes, as ``Annotated`` aliases (the FastAPI template's ``deps.py``)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from cloud.api.security import operator_for
from cloud.api.state import AppState
from cloud.blobs import BlobStore
from cloud.db.crud import MAX_PAGE_SIZE
from cloud.settings import CloudSettings
from shared.messages import INT64_MAX

_bearer = HTTPBearer(auto_error=False, description="an operator token (fednano cloud token "
                                                   "create)")


def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.fednano
    return state


StateDep = Annotated[AppState, Depends(get_state)]


def get_settings(state: StateDep) -> CloudSettings:
    return state.settings


def get_blobs(state: StateDep) -> BlobStore:
    return state.blobs


def get_db(state: StateDep) -> Iterator[Session]:
    """One transaction per request: committed when the route returns, rolled back if it raises."""
    with state.sessions() as session, session.begin():
        yield session


SettingsDep = Annotated[CloudSettings, Depends(get_settings)]
BlobsDep = Annotated[BlobStore, Depends(get_blobs)]
SessionDep = Annotated[Session, Depends(get_db)]


@dataclass(frozen=True)
class Operator:
    """The authenticated operator (audit actor ``operator:<name>``)."""

    name: str

    @property
    def actor(self) -> str:
        return f"operator:{self.name}"


def current_operator(session: SessionDep,
                     credentials: Annotated[HTTPAuthorizationCredentials | None,
                                            Depends(_bearer)]) -> Operator:
    """401 without a bearer token or with one that is unknown or revoked."""
    challenge = {"WWW-Authenticate": "Bearer"}
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing bearer token",
                            headers=challenge)
    name = operator_for(session, credentials.credentials)
    if name is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid or revoked token",
                            headers=challenge)
    return Operator(name)


OperatorDep = Annotated[Operator, Depends(current_operator)]


@dataclass(frozen=True)
class PageParams:
    offset: int
    limit: int


RoundId = Annotated[int, Path(ge=1, le=INT64_MAX, description="a round id")]


def page_params(offset: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
                limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 50) -> PageParams:
    return PageParams(offset, limit)


PageDep = Annotated[PageParams, Depends(page_params)]
