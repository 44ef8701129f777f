"""The Prometheus metrics move when updates arrive: a real Mosquitto, the coordinator service,
devices on the wire; the coordinator's /metrics endpoint (``metrics.serve``) and the API's
``GET /metrics`` are scraped over HTTP and parsed like Prometheus does."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from cloud import metrics
from cloud.api.main import create_app
from cloud.coordinator import open_round
from cloud.db import crud
from cloud.db.models import RoundState
from cloud.rounds import RoundConfig
from cloud.settings import CloudSettings
from shared import logs
from tests.brokers import MosquittoBroker, free_port
from tests.cloud.roundkit import device_update
from tests.cloud.test_coordinator_mqtt import (
    DEVICES,
    Cloud,
    Device,
    _online,
    _register,
    broker,  # noqa: F401  (the real broker fixture)
    wait_for,
)

pytestmark = pytest.mark.integration
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        return parse(response.read().decode())


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def metrics_url() -> str:
    port = free_port()
    metrics.serve(port, host="127.0.0.1")  # once per process: the default registry
    return f"http://127.0.0.1:{port}/metrics"


@pytest.mark.parametrize("migrated_url", ["sqlite"], indirect=True)
def test_metrics_move_when_updates_arrive(broker: MosquittoBroker,  # noqa: F811
                                          migrated_url: str, tmp_path: Path,
                                          metrics_url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # Phases are timed by round id in this process: a round 1 that an earlier test left
    # collecting (on its own database) must not be taken for this test's round 1.
    monkeypatch.setattr(metrics, "_phase_started", {})
    cloud = Cloud(broker, migrated_url, tmp_path)
    _register(cloud)
    cloud.start()
    devices = {d: Device(broker, d) for d in DEVICES}
    wait_for(lambda: _online(cloud))
    before = scrape(metrics_url)
    round_id = cloud.query(lambda s: open_round(
        s, config=RoundConfig(deadline_s=300, max_delta_norm=5.0), actor="test").id)
    tasks = {d: device.task() for d, device in devices.items()}
    sent = {d: device_update(*tasks[d], d, scale=50.0 if d == "dev-c" else 0.02)
            for d in DEVICES}  # dev-c: over the norm bound
    devices["dev-a"].send(sent["dev-a"])
    devices["dev-a"].send(sent["dev-a"])  # a redelivery: the same update id
    for device_id in DEVICES[1:]:
        devices[device_id].send(sent[device_id])
    wait_for(lambda: cloud.query(lambda s: crud.require_round(s, round_id=round_id).state)
             is RoundState.CLOSED, timeout=30)
    after = scrape(metrics_url)
    cloud.stop()

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("fednano_updates_received_total") == 6
    assert moved("fednano_updates_total", outcome="accepted", code="none") == 4
    assert moved("fednano_updates_total", outcome="rejected", code="norm_bound") == 1
    assert moved("fednano_updates_total", outcome="duplicate", code="none") == 1
    assert moved("fednano_update_ingest_seconds_count") == 6
    assert moved("fednano_update_ingest_seconds_sum") > 0
    for state in ("collecting", "aggregating", "evaluating", "closed"):
        assert moved("fednano_round_transitions_total", state=state) == 1, state
    for phase in ("collecting", "aggregating", "evaluating"):
        assert moved("fednano_round_phase_seconds_count", phase=phase) == 1, phase
    assert moved("fednano_aggregation_seconds_count") == 1

    settings = CloudSettings(home=tmp_path, database_url=migrated_url, secret_key="k" * 40,
                             broker_password="p" * 40)
    api = scrape_app(create_app(settings, engine=cloud.engine))
    assert value(api, "fednano_devices_online") == len(DEVICES)
    assert value(api, "fednano_rounds", state="closed") == 1
    assert value(api, "fednano_devices", status="active") == len(DEVICES)
    cloud.engine.dispose()


def scrape_app(app: object) -> Samples:
    with TestClient(app) as client:  # type: ignore[arg-type]
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


@pytest.fixture
def root_logging() -> Iterator[None]:
    """The root logger's handlers and level as they were before the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def test_json_log_lines_carry_the_ids(capsys: pytest.CaptureFixture[str],
                                      root_logging: None) -> None:
    logs.configure("json", force=True)
    logging.getLogger("cloud.coordinator_mqtt").info(
        "update from %s: %s", "dev-a", "accepted",
        extra={"device_id": "dev-a", "update_id": "u-1", "round_id": 7})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["message"] == "update from dev-a: accepted"
    assert (line["device_id"], line["update_id"], line["round_id"]) == ("dev-a", "u-1", 7)
    assert line["level"] == "info" and line["ts"].endswith("+00:00")
    logs.configure("json", fields={"device_id": "sim-000"}, force=True)  # on every line
    logging.getLogger("edge.agent").info("connected", extra={"round_id": 3})
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert (line["device_id"], line["round_id"], line["message"]) == ("sim-000", 3, "connected")
    with pytest.raises(ValueError, match="log format"):
        logs.configure("xml")
