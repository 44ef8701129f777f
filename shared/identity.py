"""Names both sides of the wire agree on: device identity and the MQTT topic tree's root.
(What the messages carry is ``shared.protocol``'s.)

A device id is the device's MQTT username, a level of its topics and the broker ACL's ``%u``,
a file name on the device and a database key in the cloud: the edge validates its config with
it and the cloud registry validates new devices with it, so it lives here, once. So do the
firmware profile names a device may be provisioned with (``list_profiles``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Safe in an MQTT topic level and as the broker username that ACL patterns substitute (%u):
# no '/', '+', '#', '$', spaces or control characters; also a safe file and database key.
DEVICE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
DEVICE_ID_MAX_LENGTH = 64
# A firmware profile's name (the stem of its YAML file in firmware_configs/).
PROFILE_NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
PROFILE_NAME_MAX_LENGTH = 63

TOPIC_ROOT = "fednano/v1"
# What the broker ACL grants every device: its own subtree (``%u`` is the username, i.e. the
# device id, so a device cannot publish or read as another one) ...
DEVICE_ACL_PATTERN = f"{TOPIC_ROOT}/devices/%u/#"
# ... and read access to the cloud's broadcasts (the retained round announcement).
BROADCAST_TOPIC_FILTER = f"{TOPIC_ROOT}/rounds/#"
# Everything under the root: what the cloud's own services may read and write.
ALL_TOPICS_FILTER = f"{TOPIC_ROOT}/#"


def validate_device_id(device_id: object) -> str:
    """Return ``device_id`` if it is a valid device id, else raise ``ValueError`` saying why."""
    if not isinstance(device_id, str) or not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise ValueError("device id must be 1-64 of A-Z a-z 0-9 _ . - starting with a letter or "
                         "digit (it is an MQTT topic level and the broker username: no / + # $ "
                         f"or spaces), got {device_id!r}")
    return device_id


def validate_profile_name(name: object) -> str:
    """Return ``name`` if it is a valid firmware profile name, else raise ``ValueError``."""
    if not isinstance(name, str) or not re.fullmatch(PROFILE_NAME_PATTERN, name):
        raise ValueError("profile name must be 1-63 of a-z 0-9 . _ - starting with a letter or "
                         f"digit, got {name!r}")
    return name


def default_profiles_dir() -> Path:
    """``$FEDNANO_PROFILES_DIR`` if set, else the repository's ``firmware_configs/``."""
    env = os.environ.get("FEDNANO_PROFILES_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1] / "firmware_configs"


def list_profiles(directory: Path | None = None) -> list[str]:
    """Names of the profiles shipped in ``directory`` (default: ``default_profiles_dir()``):
    the profiles a device may be provisioned with."""
    folder = directory or default_profiles_dir()
    if not folder.is_dir():
        raise ValueError(f"profiles directory does not exist, got {str(folder)!r}")
    return sorted(path.stem for path in folder.glob("*.yaml"))
