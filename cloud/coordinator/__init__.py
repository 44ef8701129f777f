"""The round coordinator: a transport-agnostic core whose every decision lives in the database.

``Coordinator`` is made of three parts, each a module and a base class, all over one
``Wiring`` (database sessions, blob store, publisher, aggregator, clock):

- ``lifecycle``: the round state machine. ``open_round`` samples participants and persists a
  round (the API calls it too); ``tick`` advances every unfinished round OPEN -> COLLECTING ->
  AGGREGATING -> EVALUATING -> CLOSED (or FAILED): tasks out, quorum or deadline, merge,
  evaluation, metrics, cancelled leftovers, the retained announcement; the schedule opens the
  next round.
- ``ingest``: each received update through the validation gate and stored exactly once by
  (sender, ``update_id``), a batch per transaction, every refusal recorded and answered.
- ``presence``: devices' online/offline and capabilities.

``plans`` keeps each unfinished round's typed config and merge strategy, built once per round;
``wiring`` holds what the parts share (no part calls another's methods). Nothing lives only
in memory: a new ``Coordinator`` on the same database resumes mid-round (``resume`` re-sends
tasks to participants that have not submitted). Time comes from an injected clock, so tests
move time instead of sleeping. Publishing goes through a ``Publisher`` (the MQTT binding in
``cloud.coordinator_mqtt``, a recorder in tests) outside database transactions.
"""

from __future__ import annotations

from cloud.coordinator.ingest import IngestResult, UpdateIngest
from cloud.coordinator.lifecycle import (
    NoGlobalVersionError,
    RoundLifecycle,
    open_round,
    stop_round,
)
from cloud.coordinator.plans import RoundPlan, RoundPlans
from cloud.coordinator.presence import PresenceTracker
from cloud.coordinator.wiring import (
    COORDINATOR_ACTOR,
    OUTSTANDING,
    TRANSIENT_ERRORS,
    Clock,
    Publisher,
    Wiring,
)

__all__ = [
    "COORDINATOR_ACTOR",
    "OUTSTANDING",
    "TRANSIENT_ERRORS",
    "Clock",
    "Coordinator",
    "IngestResult",
    "NoGlobalVersionError",
    "PresenceTracker",
    "Publisher",
    "RoundLifecycle",
    "RoundPlan",
    "RoundPlans",
    "UpdateIngest",
    "Wiring",
    "open_round",
    "stop_round",
]


class Coordinator(RoundLifecycle, UpdateIngest, PresenceTracker):
    """The coordinator: rounds, updates and presence over one ``Wiring`` (see the package
    docstring), built as ``Coordinator(sessions, blobs=..., publisher=..., aggregator=...,
    base_version=...)``."""
