"""One module per resource; ``api_router`` mounts them all under ``/api/v1``."""

from fastapi import APIRouter

from cloud.api.routes import audit, bundles, devices, health, models, rounds

api_router = APIRouter()
for module in (health, devices, rounds, models, bundles, audit):
    api_router.include_router(module.router)

__all__ = ["api_router"]
