"""Devices: list, get, add (secret or key shown once + config), revoke, rotate the secret,
config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status
from sqlalchemy.orm import Session

from cloud import broker_admin, registry
from cloud.api.deps import OperatorDep, PageDep, SessionDep, SettingsDep
from cloud.api.schemas import (
    DeviceCreate,
    DeviceCreated,
    DevicePublic,
    DeviceRevoke,
    DeviceSecret,
    Page,
)
from cloud.broker_admin import BrokerAdmin
from cloud.db import crud
from cloud.db.models import DeviceStatus
from cloud.provisioning import DeviceNetwork, ProvisioningError, credential_kind, provision
from cloud.settings import CloudSettings

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
    """Register a device. Its MQTT secret -- or, with ``"credential": "x509"``, its private key
    and the certificate the device CA signed -- is in this response only; the running broker
    accepts the device at once. ``config`` names the broker and bundle as devices reach them;
    409 when X.509 is asked for and the cloud has no device CA or certificate listener."""
    try:
        network = DeviceNetwork.from_settings(settings)
        kit = provision(session, network, device_id=body.id, profile=body.profile,
                        x509=body.credential == "x509", capabilities=body.capabilities,
                        actor=operator.actor, reserved_ids={settings.broker_username},
                        iterations=settings.mqtt_hash_iterations)
    except ProvisioningError as err:
        raise HTTPException(409, str(err)) from err
    except ValueError as err:
        field = "profile" if isinstance(err, registry.UnknownProfileError) else "id"
        raise HTTPException(422,
                            [{"loc": ["body", field], "msg": str(err), "type": "value_error"}],
                            ) from err
    session.commit()  # registered for good before the broker or the caller hears of it
    _broker_change(session, settings, operator.actor, kit.device.id,
                   lambda admin: admin.add_device(kit.device.id, kit.broker_secret))
    issued = kit.certificate
    return DeviceCreated(
        device_id=kit.device.id, secret=kit.secret, credential=kit.kind.value,
        certificate_pem=None if issued is None else issued.certificate_pem.decode(),
        certificate_sha256=None if issued is None else issued.sha256,
        private_key_pem=None if issued is None else issued.key_pem.decode(),
        ca_certificate_pem=None if kit.ca_pem is None else kit.ca_pem.decode(),
        device=DevicePublic.model_validate(kit.device), config=kit.config)


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
    try:
        text = DeviceNetwork.from_settings(settings).config_yaml(
            device, credential_kind(session, device_id))
    except ProvisioningError as err:
        raise HTTPException(409, str(err)) from err
    return Response(text, media_type="application/yaml", headers={
        "Content-Disposition": f'attachment; filename="{device.id}.yaml"'})


@router.post("/{device_id}/revoke", response_model=DevicePublic)
def revoke_device(device_id: str, session: SessionDep, operator: OperatorDep,
                  settings: SettingsDep, body: DeviceRevoke | None = None) -> object:
    """Revoke the device and its credentials (409 if already revoked): its updates are
    refused from now on, and the running broker closes its connection and refuses the next."""
    device = registry.revoke_device(session, device_id=device_id, actor=operator.actor,
                                    reason=None if body is None else body.reason)
    session.commit()  # revoked for good before the broker deletes it (see sync_registry)
    _broker_change(session, settings, operator.actor, device_id,
                   lambda admin: admin.remove_device(device_id))
    return device


@router.post("/{device_id}/rotate-secret", response_model=DeviceSecret)
def rotate_secret(device_id: str, session: SessionDep, operator: OperatorDep,
                  settings: SettingsDep) -> DeviceSecret:
    """A new MQTT secret for the device (shown once); the old one stops working at once (its
    live connection is closed)."""
    secret = registry.rotate_secret(session, device_id=device_id, actor=operator.actor,
                                    iterations=settings.mqtt_hash_iterations)
    session.commit()  # the new secret is stored before the broker or the caller has it
    _broker_change(session, settings, operator.actor, device_id,
                   lambda admin: admin.set_secret(device_id, secret))
    return DeviceSecret(device_id=device_id, secret=secret)


def _broker_change(session: Session, settings: CloudSettings, actor: str, device_id: str,
                   change: Callable[[BrokerAdmin], None]) -> None:
    """Apply the change to the running broker; a failure is audited (the database change
    stands, the gate enforces it, the coordinator syncs revocations at its next start)."""
    error = broker_admin.apply(settings, change)
    if error is not None:
        crud.record_audit(session, actor=actor, action="broker.sync_failed",
                          subject=f"device:{device_id}", details={"error": error[:500]})
