"""Presence: devices' online/offline and capabilities from their retained status messages.

``PresenceTracker.handle_presence`` keeps ``devices.online`` / ``last_seen_at`` and the reported
capabilities current for active devices; a malformed message, or one naming another device than
its topic, is refused (audited and answered on the device's tasks topic).
"""

from __future__ import annotations

import logging

from cloud.coordinator.wiring import Wiring
from cloud.db import crud
from cloud.db.models import DeviceStatus
from cloud.db.session import session_scope
from shared.messages import MessageError, Presence, Refusal, from_json

log = logging.getLogger(__name__)


class PresenceTracker(Wiring):
    """Receives ``devices/{id}/status``; see the module docstring."""

    def handle_presence(self, device_id: str, payload: bytes) -> bool:
        """Record a presence message from ``devices/{device_id}/status``; False if ignored."""
        if not payload:
            return False  # a cleared retained message
        try:
            presence = from_json(payload, Presence)
        except MessageError as err:
            return self._refuse_presence(device_id, "malformed", str(err))
        if presence.device_id != device_id:
            return self._refuse_presence(device_id, "identity", f"presence on {device_id}'s "
                                         f"topic names {presence.device_id!r}")
        with session_scope(self.sessions) as session:
            device = crud.get_device(session, device_id=device_id)
            if device is None or device.status is not DeviceStatus.ACTIVE:
                return False
            crud.set_presence(session, device_id=device_id, online=presence.state == "online",
                              at=self.clock())
            if presence.capabilities:  # replaced: what the device reports now, bounded
                device.capabilities = dict(presence.capabilities)
        return True

    def _refuse_presence(self, device_id: str, code: str, reason: str) -> bool:
        """A refused presence: audited with its code and answered on the device's tasks
        topic (its retained message stays the device's to replace)."""
        with session_scope(self.sessions) as session:
            crud.record_audit(session, actor=f"device:{device_id}", action="presence.refused",
                              subject=f"device:{device_id}",
                              details={"code": code, "reason": reason[:500]})
        log.warning("presence from %s refused (%s): %s", device_id, code, reason)
        self._answer(device_id, Refusal(of="presence", code=code, reason=reason[:1000],
                                        created_at=self.clock().timestamp()))
        return False
