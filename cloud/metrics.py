"""Prometheus metrics of the cloud services: every definition in one place.

Each service process exposes what it measures: the REST API at ``GET /metrics`` on its own
port, the coordinator and each LLM worker on ``FEDNANO_METRICS_PORT`` (``serve``). The services
call the small functions below from one line each; nothing here imports the services.

Metrics live in prometheus_client's process-wide default registry, so an all-in-one process
(``fednano cloud serve``) shows the API's, the coordinator's and the worker's metrics together
on its ``/metrics``. Round phases are timed from the transitions this process saw (a phase that
began before a restart is not observed); the fleet gauges are read from the database at scrape
time, so they are right whichever process wrote the rows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from fastapi import FastAPI
    from prometheus_client.metrics_core import Metric
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_PHASE_SECONDS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64)

# --- updates (coordinator) ---------------------------------------------------------------------

UPDATES_RECEIVED = Counter(
    "fednano_updates_received", "Update messages received from devices (every delivery).")
UPDATES = Counter(
    "fednano_updates",
    "Received updates by outcome (accepted, buffered, rejected, duplicate) and, for a "
    "refusal, its code (none otherwise).", ["outcome", "code"])
INGEST_SECONDS = Histogram(
    "fednano_update_ingest_seconds",
    "Time to parse, validate and store one update, up to its database commit (updates "
    "stored together in one transaction share its time equally).",
    buckets=_SECONDS)
INGEST_BATCH = Histogram(
    "fednano_update_batch_size", "Updates stored together in one transaction (group commit).",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500))

# --- rounds (coordinator) ----------------------------------------------------------------------

ROUND_TRANSITIONS = Counter(
    "fednano_round_transitions", "Round state transitions by the state entered.", ["state"])
ROUND_PHASE_SECONDS = Histogram(
    "fednano_round_phase_seconds",
    "How long rounds stayed in a phase (collecting, aggregating, evaluating), from the "
    "transition into it to the next one.", ["phase"], buckets=_PHASE_SECONDS)
AGGREGATION_SECONDS = Histogram(
    "fednano_aggregation_seconds", "Time to merge a round's accepted updates into a version.",
    buckets=_SECONDS)

# --- LLM worker --------------------------------------------------------------------------------

LLM_QUEUE_DEPTH = Gauge(
    "fednano_llm_worker_queue_depth",
    "Split-training requests received by this worker and not yet computed.")
LLM_BATCH_REQUESTS = Histogram(
    "fednano_llm_batch_requests", "Requests computed together in one LLM call.", ["op"],
    buckets=_BATCH)
LLM_BATCH_ROWS = Histogram(
    "fednano_llm_batch_rows", "Rows (samples) computed together in one LLM call.", ["op"],
    buckets=_BATCH)
LLM_BATCH_SECONDS = Histogram(
    "fednano_llm_batch_seconds", "Time of one batched LLM call (forward, and backward for a "
    "step).", ["op"], buckets=_SECONDS)
LLM_REFUSED = Counter(
    "fednano_llm_requests_refused", "LLM requests answered with an error, by code.", ["code"])

_phase_started: dict[int, tuple[str, float]] = {}  # round id -> (phase, monotonic start)
_TERMINAL = frozenset({"closed", "failed"})


def update_handled(outcome: str, code: str | None, seconds: float) -> None:
    """One update message was handled: count it by outcome and code, time its ingestion."""
    UPDATES_RECEIVED.inc()
    UPDATES.labels(outcome=outcome, code=code or "none").inc()
    INGEST_SECONDS.observe(seconds)


def updates_batch(size: int) -> None:
    """``size`` updates were handled together in one transaction."""
    INGEST_BATCH.observe(size)


def round_transition(round_id: int, state: str) -> None:
    """Round ``round_id`` entered ``state``: close the previous phase's timer, start one."""
    ROUND_TRANSITIONS.labels(state=state).inc()
    now = time.monotonic()
    previous = _phase_started.pop(round_id, None)
    if previous is not None:
        ROUND_PHASE_SECONDS.labels(phase=previous[0]).observe(now - previous[1])
    if state not in _TERMINAL:
        _phase_started[round_id] = (state, now)


def llm_batch(op: str, requests: int, rows: int, seconds: float) -> None:
    """One batched LLM call of ``op`` (step or score) finished."""
    LLM_BATCH_REQUESTS.labels(op=op).observe(requests)
    LLM_BATCH_ROWS.labels(op=op).observe(rows)
    LLM_BATCH_SECONDS.labels(op=op).observe(seconds)


def llm_refused(code: str) -> None:
    LLM_REFUSED.labels(code=code).inc()


def watch_queue(depth: Callable[[], int]) -> None:
    """Report ``depth()`` as the LLM worker's queue depth at each scrape."""
    LLM_QUEUE_DEPTH.set_function(lambda: float(depth()))


# --- the fleet, from the database (API) --------------------------------------------------------


class FleetCollector(Collector):
    """Devices online and by status, rounds by state: counted in the database at scrape time."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        from sqlalchemy.exc import SQLAlchemyError

        from cloud.db import crud

        online = GaugeMetricFamily("fednano_devices_online", "Devices whose presence is online.")
        devices = GaugeMetricFamily("fednano_devices", "Registered devices by status.",
                                    labels=["status"])
        rounds = GaugeMetricFamily("fednano_rounds", "Rounds by state.", labels=["state"])
        try:
            with self.sessions() as session:
                online.add_metric([], crud.count_devices(session, online=True))
                for status, n in crud.count_devices_by_status(session).items():
                    devices.add_metric([status.value], n)
                for state, n in crud.count_rounds_by_state(session).items():
                    rounds.add_metric([state.value], n)
        except SQLAlchemyError as err:  # a scrape must not fail the whole endpoint
            log.warning("metrics: the database did not answer: %s", err)
            return
        yield from (online, devices, rounds)


_fleet: FleetCollector | None = None


def watch_fleet(sessions: sessionmaker[Session]) -> None:
    """Export the fleet gauges from ``sessions``' database (replaces an earlier one)."""
    global _fleet
    if _fleet is not None:
        REGISTRY.unregister(_fleet)
    _fleet = FleetCollector(sessions)
    REGISTRY.register(_fleet)


def mount(app: FastAPI, sessions: sessionmaker[Session]) -> None:
    """``GET /metrics`` on ``app`` (the text format, no authentication: it carries counts and
    timings, no ids or secrets), with the fleet gauges read from ``sessions``."""
    from fastapi import Response

    watch_fleet(sessions)

    @app.get("/metrics", include_in_schema=False)
    def metrics_endpoint() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def serve(port: int | None, host: str = "0.0.0.0") -> None:
    """Serve ``/metrics`` on ``port`` in a daemon thread; nothing when ``port`` is None."""
    if port is None:
        return
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
