"""Rounds: list, get, start, stop; the defaults new rounds use; the schedule; metrics."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from cloud import rounds as round_settings
from cloud.api.deps import OperatorDep, PageDep, RoundId, SessionDep
from cloud.api.schemas import (
    MetricPublic,
    Page,
    RoundCreate,
    RoundDetail,
    RoundMetrics,
    RoundPublic,
    RoundStop,
    ScheduleUpdate,
    UpdatePublic,
)
from cloud.coordinator import open_round, stop_round
from cloud.db import crud
from cloud.db.models import RoundState
from cloud.rounds import RoundConfig, Schedule

router = APIRouter(prefix="/rounds", tags=["rounds"])


@router.get("", response_model=Page[RoundPublic])
def list_rounds(session: SessionDep, _: OperatorDep, page: PageDep,
                state: Annotated[RoundState | None, Query()] = None) -> dict:
    """Rounds, newest first, paginated."""
    items = crud.list_rounds(session, offset=page.offset, limit=page.limit, state=state)
    return {"items": items, "total": crud.count_rounds(session, state=state),
            "offset": page.offset, "limit": page.limit}


@router.get("/defaults", response_model=RoundConfig)
def get_defaults(session: SessionDep, _: OperatorDep) -> RoundConfig:
    """The configuration new rounds start from."""
    return round_settings.load_defaults(session)


@router.put("/defaults", response_model=RoundConfig)
def put_defaults(body: RoundConfig, session: SessionDep, operator: OperatorDep) -> RoundConfig:
    """Replace the round defaults (422 names a bad field)."""
    round_settings.save_defaults(session, body)
    crud.record_audit(session, actor=operator.actor, action="rounds.defaults",
                      subject="round_defaults", details=body.model_dump(mode="json"))
    return body


@router.get("/schedule", response_model=Schedule)
def get_schedule(session: SessionDep, _: OperatorDep) -> Schedule:
    """Whether the coordinator opens rounds by itself, and its targets."""
    return round_settings.load_schedule(session)


@router.put("/schedule", response_model=Schedule)
def put_schedule(body: ScheduleUpdate, session: SessionDep, operator: OperatorDep) -> Schedule:
    """Start (``enabled: true``, counting rounds from now) or stop the automatic rounds."""
    newest = crud.list_rounds(session, limit=1)
    schedule = Schedule(**body.model_dump(), after_round_id=newest[0].id if newest else 0)
    round_settings.save_schedule(session, schedule)
    crud.record_audit(session, actor=operator.actor, action="schedule.set", subject="schedule",
                      details=schedule.model_dump(mode="json"))
    return schedule


@router.post("", response_model=RoundPublic, status_code=status.HTTP_201_CREATED)
def start_round(session: SessionDep, operator: OperatorDep,
                body: RoundCreate | None = None) -> object:
    """Open a round now with the defaults (and ``overrides``); the coordinator sends the tasks.
    409 if too few devices are online or no global version exists yet."""
    overrides = {} if body is None else body.overrides.model_dump(exclude_unset=True)
    config = _config(round_settings.load_defaults(session), overrides)
    return open_round(session, config=config, actor=operator.actor)


def _config(defaults: RoundConfig, overrides: dict[str, Any]) -> RoundConfig:
    try:
        return RoundConfig.model_validate({**defaults.model_dump(), **overrides})
    except ValidationError as err:
        raise RequestValidationError([
            {**e, "loc": ("body", "overrides", *e["loc"])} for e in err.errors(
                include_url=False, include_context=False)]) from err


@router.get("/{round_id}", response_model=RoundDetail)
def get_round(round_id: RoundId, session: SessionDep, _: OperatorDep) -> RoundDetail:
    """A round with its configuration, participants and updates (with rejection reasons)."""
    round_ = crud.require_round(session, round_id=round_id)
    updates = [UpdatePublic.model_validate(u) for u in crud.list_updates(session,
                                                                         round_id=round_id)]
    return RoundDetail.model_validate({**RoundPublic.model_validate(round_).model_dump(),
                                       "config": round_.config, "updates": updates,
                                       "participations": round_.participations})


@router.post("/{round_id}/stop", response_model=RoundPublic)
def stop(round_id: RoundId, session: SessionDep, operator: OperatorDep,
         body: RoundStop | None = None) -> object:
    """Close an open or collecting round without a new version (409 once it is aggregating
    or finished); by default the schedule stops too."""
    body = body or RoundStop()
    round_ = stop_round(session, round_id=round_id, actor=operator.actor, reason=body.reason)
    if body.halt_schedule:
        schedule = round_settings.load_schedule(session)
        if schedule.enabled:
            round_settings.save_schedule(session, schedule.model_copy(
                update={"enabled": False, "stopped_reason": f"{operator.actor}: {body.reason}"}))
    return round_


@router.get("/{round_id}/metrics", response_model=RoundMetrics)
def round_metrics(round_id: RoundId, session: SessionDep, _: OperatorDep) -> RoundMetrics:
    """Accuracy, loss, participants, bytes up/down, rejected updates; per-device rows apart."""
    crud.require_round(session, round_id=round_id)
    rows = crud.list_metrics(session, round_id=round_id)
    return RoundMetrics(round_id=round_id,
                        summary={m.name: m.value for m in rows if m.device_id is None},
                        per_device=[MetricPublic.model_validate(m) for m in rows
                                    if m.device_id is not None])
