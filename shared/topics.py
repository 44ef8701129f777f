"""The MQTT topic tree, built in one place.

Every topic a device or a cloud service publishes or subscribes to comes from a function here,
so the tree, the broker ACL (``shared.identity.DEVICE_ACL_PATTERN``) and the code agree::

    fednano/v1/devices/{id}/status        device -> cloud  retained presence, last will "offline"
    fednano/v1/devices/{id}/tasks         cloud -> device  round task / control
    fednano/v1/devices/{id}/updates       device -> cloud  compressed delta + Fisher
    fednano/v1/devices/{id}/llm/requests  device -> LLM    split-training step (v5 response topic)
    fednano/v1/devices/{id}/llm/responses LLM -> device
    fednano/v1/rounds/current             cloud -> all     retained round announcement
"""

from __future__ import annotations

from shared.identity import TOPIC_ROOT, validate_device_id

DEVICES = f"{TOPIC_ROOT}/devices"
ROUND_ANNOUNCEMENT = f"{TOPIC_ROOT}/rounds/current"
LLM_SHARE_GROUP = "llm"


def device_root(device_id: str) -> str:
    return f"{DEVICES}/{validate_device_id(device_id)}"


def status(device_id: str) -> str:
    return f"{device_root(device_id)}/status"


def tasks(device_id: str) -> str:
    return f"{device_root(device_id)}/tasks"


def updates(device_id: str) -> str:
    return f"{device_root(device_id)}/updates"


def llm_requests(device_id: str) -> str:
    return f"{device_root(device_id)}/llm/requests"


def llm_responses(device_id: str) -> str:
    return f"{device_root(device_id)}/llm/responses"


# Filters the cloud subscribes with ('+' is one device id).
ALL_STATUS = f"{DEVICES}/+/status"
ALL_UPDATES = f"{DEVICES}/+/updates"
ALL_LLM_REQUESTS = f"{DEVICES}/+/llm/requests"
# LLM workers share the request stream: the broker hands each request to one of them.
SHARED_LLM_REQUESTS = f"$share/{LLM_SHARE_GROUP}/{ALL_LLM_REQUESTS}"
# LLM requests and replies travel at QoS 0. A device resends an unanswered request under the
# same id, so nothing depends on the broker keeping them, and a QoS 1 message is a change the
# broker's database is saved after (what keeps acknowledged updates through a kill -9): at
# QoS 1 the saves cut split training's round trips 6.3x (benchmarks/llm_qos.py,
# docs/security.md). Tasks, updates and presence stay QoS 1.
LLM_QOS = 0


def device_of(topic: str) -> str:
    """The device id in a ``fednano/v1/devices/{id}/...`` topic; ``ValueError`` otherwise.

    The broker's ACL only lets device ``id`` publish under its own subtree, so the id taken
    from the topic (never from the payload) is the one the cloud can trust.
    """
    prefix = f"{DEVICES}/"
    if not topic.startswith(prefix):
        raise ValueError(f"not a device topic: {topic!r}")
    device_id, sep, _ = topic[len(prefix):].partition("/")
    if not sep:
        raise ValueError(f"not a device topic: {topic!r}")
    return validate_device_id(device_id)
