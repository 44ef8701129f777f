"""Who the bearer token belongs to (the dashboard's login check)."""

from __future__ import annotations

from fastapi import APIRouter

from cloud.api.deps import OperatorDep
from cloud.api.schemas import OperatorPublic

router = APIRouter(tags=["operators"])


@router.get("/me", response_model=OperatorPublic)
def me(operator: OperatorDep) -> OperatorPublic:
    """The operator the token was issued to (401 without a valid token)."""
    return OperatorPublic(name=operator.name)
