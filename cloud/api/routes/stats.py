"""Summaries the dashboard plots: rounds with their metrics, devices' contributions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from cloud.api.deps import OperatorDep, SessionDep
from cloud.api.schemas import ContributionPublic, RoundPublic, RoundSummaryPublic
from cloud.db import crud
from cloud.db.crud import MAX_PAGE_SIZE

router = APIRouter(prefix="/stats", tags=["stats"])


@router.get("/rounds", response_model=list[RoundSummaryPublic])
def rounds(session: SessionDep, _: OperatorDep,
           limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = 100) -> list[RoundSummaryPublic]:
    """The newest ``limit`` rounds, oldest first, with the version each produced, participations
    by status and round-level metrics (accuracy, loss, participants, bytes up/down, ...)."""
    return [RoundSummaryPublic(**RoundPublic.model_validate(s.round).model_dump(),
                               version_id=s.version_id, participation=s.participation,
                               metrics=s.metrics)
            for s in crud.round_summaries(session, limit=limit)]


@router.get("/devices", response_model=list[ContributionPublic])
def devices(session: SessionDep, _: OperatorDep) -> list[ContributionPublic]:
    """Per device: updates by status, accepted samples, rounds it was selected for."""
    found = crud.device_contributions(session)
    return [ContributionPublic.model_validate(found[d]) for d in sorted(found)]
