"""Devices: list, get, add (secret shown once + config), revoke, rotate the secret, config."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from cloud import registry
from cloud.api.deps import OperatorDep, PageDep, SessionDep, SettingsDep
from cloud.api.schemas import (
    DeviceCreate,
    DeviceCreated,
    DevicePublic,
    DeviceRevoke,
    DeviceSecret,
    Page,
)
from cloud.db.models import DeviceStatus

router = APIRouter(prefix="/devices", tags=["devices"])


@router.get("", response_model=Page[DevicePublic])
def list_devices(session: SessionDep, _: OperatorDep, page: PageDep,
                 status_: Annotated[DeviceStatus | None, Query(alias="status")] = None) -> dict:
    """Devices in provisioning order, paginated."""
    found = registry.list_devices(session, offset=page.offset, limit=page.limit, status=status_)
    return {"items": found.items, "total": found.total, "offset": page.offset,
            "limit": page.limit}


@router.post("", response_model=DeviceCreated, status_code=status.HTTP_201_CREATED)
def add_device(body: DeviceCreate, session: SessionDep, operator: OperatorDep,
               settings: SettingsDep) -> DeviceCreated:
    """Register a device. Its MQTT secret is in this response only; rewrite the broker files
    (``fednano devices broker-files``) for the broker to accept it."""
    reserved = {settings.broker_username}
    try:
        device, secret = registry.add_device(
            session, device_id=body.id, profile=body.profile, capabilities=body.capabilities,
            actor=operator.actor, reserved_ids=reserved,
            iterations=settings.mqtt_hash_iterations)
    except ValueError as err:
        raise HTTPException(422,
                            [{"loc": ["body", "id"], "msg": str(err), "type": "value_error"}],
                            ) from err
    config = registry.device_config(device, broker_url=settings.broker_url,
                                    bundle_url=settings.bundle_url)
    return DeviceCreated(device_id=device.id, secret=secret,
                         device=DevicePublic.model_validate(device), config=config)


@router.get("/{device_id}", response_model=DevicePublic)
def get_device(device_id: str, session: SessionDep, _: OperatorDep) -> object:
    """One device."""
    return registry.get_device(session, device_id=device_id)


@router.get("/{device_id}/config", response_class=Response,
            responses={200: {"content": {"application/yaml": {}}}})
def device_config(device_id: str, session: SessionDep, _: OperatorDep,
                  settings: SettingsDep) -> Response:
    """The device's ``device.yaml`` (no secret in it) as a download."""
    device = registry.get_device(session, device_id=device_id)
    text = registry.device_config_yaml(device, broker_url=settings.broker_url,
                                       bundle_url=settings.bundle_url)
    return Response(text, media_type="application/yaml", headers={
        "Content-Disposition": f'attachment; filename="{device.id}.yaml"'})


@router.post("/{device_id}/revoke", response_model=DevicePublic)
def revoke_device(device_id: str, session: SessionDep, operator: OperatorDep,
                  body: DeviceRevoke | None = None) -> object:
    """Revoke the device and its credentials (409 if already revoked)."""
    return registry.revoke_device(session, device_id=device_id, actor=operator.actor,
                                  reason=None if body is None else body.reason)


@router.post("/{device_id}/rotate-secret", response_model=DeviceSecret)
def rotate_secret(device_id: str, session: SessionDep, operator: OperatorDep,
                  settings: SettingsDep) -> DeviceSecret:
    """A new MQTT secret for the device (shown once); the old one stops working once the
    broker files are rewritten."""
    secret = registry.rotate_secret(session, device_id=device_id, actor=operator.actor,
                                    iterations=settings.mqtt_hash_iterations)
    return DeviceSecret(device_id=device_id, secret=secret)
