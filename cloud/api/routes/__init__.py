"""One module per resource; ``api_router`` mounts them all under ``/api/v1``."""

from fastapi import APIRouter

from cloud.api.routes import (
    ask,
    audit,
    bundles,
    devices,
    health,
    me,
    models,
    rounds,
    stats,
    updates,
)

api_router = APIRouter()
for module in (health, me, devices, rounds, updates, models, bundles, audit, stats, ask):
    api_router.include_router(module.router)

__all__ = ["api_router"]
