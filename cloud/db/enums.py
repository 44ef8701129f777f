"""The statuses the cloud stores and reasons about: plain enums, no database.

They live apart from the SQLAlchemy models so pure logic (the validation gate, the round state
machine's rules) can name a round's state or an update's verdict without importing the ORM.
``cloud.db.models`` stores each as a string column with a CHECK constraint on its values and
re-exports them, so ``from cloud.db.models import RoundState`` keeps working.
"""

from __future__ import annotations

import enum


class DeviceStatus(str, enum.Enum):
    """A device is ``active`` until revoked; revoked devices keep their history."""

    ACTIVE = "active"
    REVOKED = "revoked"


class CredentialKind(str, enum.Enum):
    """How a device authenticates to the broker: a password, or an X.509 certificate."""

    PASSWORD = "password"
    X509 = "x509"


class RoundState(str, enum.Enum):
    """A round's state; ``ROUND_TRANSITIONS`` lists the allowed moves."""

    OPEN = "open"                  # persisted, participants being chosen and told
    COLLECTING = "collecting"      # tasks out, updates arriving until quorum or deadline
    AGGREGATING = "aggregating"    # the strategy is merging the accepted updates
    EVALUATING = "evaluating"      # the new version is being evaluated
    CLOSED = "closed"              # done: a new version (or none, when stopped) is recorded
    FAILED = "failed"              # gave up: too few updates by the deadline, or an error


TERMINAL_ROUND_STATES = frozenset({RoundState.CLOSED, RoundState.FAILED})
ROUND_TRANSITIONS: dict[RoundState, frozenset[RoundState]] = {
    RoundState.OPEN: frozenset({RoundState.COLLECTING, RoundState.CLOSED, RoundState.FAILED}),
    RoundState.COLLECTING: frozenset({RoundState.AGGREGATING, RoundState.CLOSED,
                                      RoundState.FAILED}),
    RoundState.AGGREGATING: frozenset({RoundState.EVALUATING, RoundState.FAILED}),
    RoundState.EVALUATING: frozenset({RoundState.CLOSED, RoundState.FAILED}),
    RoundState.CLOSED: frozenset(),
    RoundState.FAILED: frozenset(),
}


class ParticipationStatus(str, enum.Enum):
    """Where one device stands in one round."""

    SELECTED = "selected"    # sampled by the coordinator
    NOTIFIED = "notified"    # its task was published
    SUBMITTED = "submitted"  # an update was accepted
    REJECTED = "rejected"    # its update was rejected (the update row says why)
    DROPPED = "dropped"      # nothing arrived by the deadline, or it went offline


class UpdateStatus(str, enum.Enum):
    """What the validation gate decided about an update."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"
    BUFFERED = "buffered"    # late, kept for a later round (when the round config says so)
