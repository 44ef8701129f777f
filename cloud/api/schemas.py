"""Request and response bodies: the template's Base / Create / Public ladder per resource."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from cloud.db.models import DeviceStatus, ParticipationStatus, RoundState, UpdateStatus
from cloud.rounds import RoundConfig
from shared.identity import DEVICE_ID_PATTERN, PROFILE_NAME_PATTERN
from shared.messages import MAX_CAPABILITIES_BYTES, MAX_CAPABILITIES_DEPTH, check_bounded_json

T = TypeVar("T")
MAX_ASK_IMAGE_BYTES = 4 * 2**20


class Page(BaseModel, Generic[T]):
    """A page of a list: ``items`` from ``offset`` (at most ``limit``) of ``total``."""

    items: list[T]
    total: int
    offset: int
    limit: int


class _Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ------------------------------------------------------------------------------ devices


class DeviceBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    profile: str = Field(pattern=PROFILE_NAME_PATTERN, description="firmware profile name")
    capabilities: dict[str, Any] = Field(default_factory=dict)


class DeviceCreate(DeviceBase):
    id: str = Field(pattern=DEVICE_ID_PATTERN, description="also its MQTT username")
    credential: Literal["password", "x509"] = Field(
        "password", description="password: an MQTT secret; x509: a key and a certificate the "
                                "device CA signs (the broker's certificate listener)")


def _displayable(value: object) -> object:
    """Stored capabilities as they are when they are bounded JSON, else a note saying so: a
    device's data (older rows included) must never make the device list fail."""
    try:
        check_bounded_json(value, max_depth=MAX_CAPABILITIES_DEPTH + 1,
                           max_bytes=4 * MAX_CAPABILITIES_BYTES, what="capabilities")
    except (TypeError, ValueError) as err:
        return {"_unavailable": str(err)[:200]}
    return value


class DevicePublic(_Public):
    id: str
    profile: str
    status: DeviceStatus
    online: bool
    capabilities: Annotated[dict[str, Any], BeforeValidator(_displayable)]
    created_at: datetime
    last_seen_at: datetime | None
    revoked_at: datetime | None


class DeviceSecret(BaseModel):
    """A device's MQTT secret: returned once, never stored in clear."""

    device_id: str
    secret: str


class DeviceCreated(BaseModel):
    """A new device and its credential, shown once: the secret (password devices) or the key
    and certificate (X.509 devices), and the CA certificate devices verify the broker with."""

    device_id: str
    credential: Literal["password", "x509"]
    secret: str | None = None
    certificate_pem: str | None = None
    certificate_sha256: str | None = Field(None, description="the certificate's fingerprint "
                                                              "(hex), as the audit log has it")
    private_key_pem: str | None = None
    ca_certificate_pem: str | None = None
    device: DevicePublic
    config: dict[str, Any] = Field(description="the device.yaml content (no secret in it)")


class DeviceRevoke(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str | None = Field(None, max_length=500)


# ------------------------------------------------------------------------------ rounds


# The fields of ``RoundConfig``, each optional, unknown keys refused (a closed schema in the
# OpenAPI document); the merged configuration is validated as a whole by ``RoundConfig``.
_OVERRIDE_FIELDS: dict[str, Any] = {name: (field.annotation, field)
                                     for name, field in RoundConfig.model_fields.items()}
RoundOverrides = create_model("RoundOverrides", __config__=ConfigDict(extra="forbid"),
                              **_OVERRIDE_FIELDS)


class RoundCreate(BaseModel):
    """Start a round now: the stored defaults, with these fields of ``RoundConfig`` replaced."""

    model_config = ConfigDict(extra="forbid")

    overrides: RoundOverrides = Field(default_factory=RoundOverrides)


class RoundStop(BaseModel):
    model_config = ConfigDict(extra="forbid")

    reason: str = Field("operator stop", min_length=1, max_length=500)
    halt_schedule: bool = Field(True, description="also stop opening rounds automatically")


class ParticipationPublic(_Public):
    device_id: str
    status: ParticipationStatus
    selected_at: datetime
    notified_at: datetime | None
    finished_at: datetime | None


class RoundPublic(_Public):
    id: int
    state: RoundState
    strategy: str
    quorum: int
    min_updates: int
    base_version_id: int | None
    deadline_at: datetime | None
    created_at: datetime
    started_at: datetime | None
    closed_at: datetime | None
    failure_reason: str | None


class UpdatePublic(_Public):
    update_id: str
    round_id: int
    device_id: str
    status: UpdateStatus
    base_version: int
    n_samples: int
    rejection_code: str | None
    rejection_reason: str | None
    blob_sha256: str | None
    blob_size: int | None
    received_at: datetime


class RoundDetail(RoundPublic):
    config: dict[str, Any]
    participations: list[ParticipationPublic]
    updates: list[UpdatePublic]


class ScheduleUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool
    target_rounds: int | None = Field(None, ge=1)
    target_accuracy: float | None = Field(None, gt=0, le=1)
    max_consecutive_failures: int = Field(3, ge=1)


# ------------------------------------------------------------------------------ models, metrics


class VersionPublic(_Public):
    id: int
    parent_id: int | None
    round_id: int | None
    strategy: str | None
    blob_sha256: str
    blob_size: int
    created_at: datetime


class LineageEntry(BaseModel):
    update_id: str
    device_id: str
    n_samples: int
    weight: float | None


class MetricPublic(_Public):
    name: str
    value: float
    device_id: str | None
    version_id: int | None
    recorded_at: datetime


class RoundMetrics(BaseModel):
    round_id: int
    summary: dict[str, float] = Field(description="round-level metrics by name")
    per_device: list[MetricPublic]


class AuditEventPublic(_Public):
    id: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]


class BundlePublic(BaseModel):
    bundle_version: str
    base_version: str
    precision: str
    created_at: str
    files: dict[str, dict[str, Any]]
    archive: bool


# ------------------------------------------------------------------------------ dashboard


class RoundSummaryPublic(RoundPublic):
    """A round with what the dashboard plots: the version it produced, its participations by
    status and its round-level metrics (accuracy, loss, participants, bytes_up, ...)."""

    version_id: int | None
    participation: dict[str, int]
    metrics: dict[str, float]


class ContributionPublic(BaseModel):
    """A device's contributions: updates by status, accepted samples, rounds it was in."""

    model_config = ConfigDict(from_attributes=True)

    device_id: str
    updates: dict[str, int]
    samples: int
    rounds: int
    last_update_at: datetime | None


class OperatorPublic(BaseModel):
    name: str


class AskRequest(BaseModel):
    """A question about an image for the current global model."""

    model_config = ConfigDict(extra="forbid")

    question: str = Field(min_length=1, max_length=300)
    image_base64: str = Field(min_length=1, max_length=MAX_ASK_IMAGE_BYTES * 4 // 3 + 4,
                              description="the image file (PNG, JPEG, ...), base64-encoded")


class CandidatePublic(BaseModel):
    answer: str
    probability: float


class AskAnswer(BaseModel):
    answer: str = Field(description="greedy free-text answer")
    best_candidate: str | None = Field(description="the closed-answer prediction (what the "
                                                   "evaluator scores), if the task has one")
    candidates: list[CandidatePublic]
    version_id: int
    elapsed_ms: float


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    database: str
    broker: str
