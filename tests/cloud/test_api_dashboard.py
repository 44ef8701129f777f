"""What the dashboard adds to the API, through FastAPI's TestClient on real SQLite and
PostgreSQL: the static shell (no data, strict CSP), ``/me``, the stats the charts plot, updates
across rounds, and "ask the model" on a tiny random model with the run's adapter shapes."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr

from cloud import aggregation
from cloud.api.main import create_app
from cloud.api.security import create_operator_token
from cloud.api.webui import SECURITY_HEADERS
from cloud.ask import ModelAnswerer
from cloud.db import crud
from cloud.db.models import UpdateStatus
from cloud.settings import CloudSettings
from tests.cloud.dashboardkit import (
    CANDIDATES,
    FLEET,
    WallClock,
    run_rounds,
    shape_image,
    tiny_answerer,
    toy_evaluator,
)
from tests.cloud.roundkit import Cloud, make_cloud

API = "/api/v1"
PNG = base64.b64encode(shape_image("blue")).decode()


@pytest.fixture
def settings(migrated_url: str, tmp_path: Path) -> CloudSettings:
    return CloudSettings(home=tmp_path, database_url=migrated_url, environment="test",
                         secret_key=SecretStr("k" * 40), broker_password=SecretStr("p" * 40),
                         mqtt_hash_iterations=1000, broker_live_admin=False)


@pytest.fixture
def cloud(settings: CloudSettings, tmp_path: Path) -> Iterator[Cloud]:
    """The dashboard kit's run: 4 devices, 3 closed rounds, 2 rejected updates."""
    instance = make_cloud(settings.resolved_database_url, tmp_path, WallClock(),
                          evaluator=toy_evaluator)
    run_rounds(instance)
    yield instance
    instance.engine.dispose()


@pytest.fixture(scope="module")
def answerer() -> ModelAnswerer:
    return tiny_answerer()


def _client(settings: CloudSettings, cloud: Cloud, **options: object) -> TestClient:
    with cloud.session() as session:
        _, token = create_operator_token(session, name="alice")
    client = TestClient(create_app(settings, **options))  # type: ignore[arg-type]
    client.headers["Authorization"] = f"Bearer {token}"
    return client


@pytest.fixture
def client(settings: CloudSettings, cloud: Cloud,
           answerer: ModelAnswerer) -> Iterator[TestClient]:
    with _client(settings, cloud, answerer=answerer) as test_client:
        yield test_client
    test_client.app.state.fednano.engine.dispose()  # type: ignore[attr-defined]


# ------------------------------------------------------------------------------ the shell


def test_the_dashboard_shell_is_static_with_a_strict_csp(client: TestClient) -> None:
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 307 and root.headers["location"] == "/dashboard/"
    client.headers.pop("Authorization")  # the shell needs no token: it holds no data
    page = client.get("/dashboard/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name, value in SECURITY_HEADERS.items():
        assert page.headers[name] == value
    assert "script-src 'self';" in page.headers["content-security-policy"]
    assert 'id="login"' in page.text and "orin-nano-01" not in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no CDN, no third party
    script = client.get("/dashboard/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    licence = client.get("/dashboard/vendor/uplot/LICENSE")
    assert licence.status_code == 200 and "MIT" in licence.text
    assert client.get(f"{API}/health").headers.get("content-security-policy") is None


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/me"), ("GET", "/stats/rounds"), ("GET", "/stats/devices"), ("GET", "/updates"),
    ("POST", "/ask")])
def test_the_new_routes_refuse_requests_without_a_token(client: TestClient, method: str,
                                                        path: str) -> None:
    client.headers.pop("Authorization")
    response = client.request(method, f"{API}{path}",
                              json={"question": "q", "image_base64": PNG})
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


# ------------------------------------------------------------------------------ stats


def test_me_names_the_tokens_operator(client: TestClient) -> None:
    assert client.get(f"{API}/me").json() == {"name": "alice"}


def test_round_stats_carry_the_runs_metrics_versions_and_participations(
        client: TestClient, cloud: Cloud) -> None:
    stats = client.get(f"{API}/stats/rounds").json()
    assert [(r["id"], r["state"], r["version_id"]) for r in stats] == [
        (1, "closed", 2), (2, "closed", 3), (3, "closed", 4)]
    assert stats[0]["participation"] == {"submitted": 4}
    assert stats[1]["participation"] == {"submitted": 3, "rejected": 1}
    with cloud.session() as session:
        for entry in stats:
            recorded = {m.name: m.value for m in crud.list_metrics(session, round_id=entry["id"])
                        if m.device_id is None}
            assert entry["metrics"] == pytest.approx(recorded)
            assert {"accuracy", "loss", "eval_loss", "bytes_up", "bytes_down",
                    "participants", "updates_rejected"} <= set(entry["metrics"])
    assert [r["metrics"]["updates_rejected"] for r in stats] == [0, 1, 1]
    assert [r["id"] for r in client.get(f"{API}/stats/rounds", params={"limit": 2}).json()] == [
        2, 3]  # the newest two, oldest first
    assert client.get(f"{API}/stats/rounds", params={"limit": 0}).status_code == 422


def test_device_contributions_count_updates_samples_and_rounds(client: TestClient) -> None:
    found = {c["device_id"]: c for c in client.get(f"{API}/stats/devices").json()}
    assert set(found) == {d for d, _, _ in FLEET}
    assert found["orin-nano-01"]["updates"] == {"accepted": 3}
    assert found["orin-nano-01"]["samples"] == 120 and found["orin-nano-01"]["rounds"] == 3
    assert found["orin-nx-02"]["updates"] == {"accepted": 2, "rejected": 1}
    assert found["orin-nx-02"]["samples"] == 50  # rejected samples do not count
    assert found["xavier-03"]["last_update_at"] is not None


def test_updates_across_rounds_filter_by_status_and_device(client: TestClient) -> None:
    rejected = client.get(f"{API}/updates", params={"status": "rejected"}).json()
    assert rejected["total"] == 2
    assert [(u["round_id"], u["device_id"], u["rejection_code"]) for u in rejected["items"]] == [
        (3, "xavier-03", "norm_bound"), (2, "orin-nx-02", "base_mismatch")]  # newest first
    assert "base-old-7" in rejected["items"][1]["rejection_reason"]
    mine = client.get(f"{API}/updates", params={"device_id": "orin-nano-01", "limit": 2}).json()
    assert mine["total"] == 3 and len(mine["items"]) == 2
    assert {u["status"] for u in mine["items"]} == {UpdateStatus.ACCEPTED.value}
    bad = client.get(f"{API}/updates", params={"status": "lost"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "status"]


# ------------------------------------------------------------------------------ ask the model


def test_ask_answers_with_the_current_global_version(client: TestClient, cloud: Cloud,
                                                     answerer: ModelAnswerer) -> None:
    response = client.post(f"{API}/ask", json={"question": "what color is the shape?",
                                                "image_base64": PNG})
    assert response.status_code == 200, response.text
    body = response.json()
    with cloud.session() as session:
        latest = crud.latest_adapter_version(session)
        assert latest is not None and body["version_id"] == latest.id
        state = aggregation.load_state(cloud.blobs, latest)
    assert torch.equal(answerer.edge.adapters.image.lora_B.weight, state["image.lora_B.weight"])
    assert [c["answer"] for c in body["candidates"]] != [] and body["best_candidate"] == (
        body["candidates"][0]["answer"])
    assert sorted(c["answer"] for c in body["candidates"]) == sorted(CANDIDATES)
    assert sum(c["probability"] for c in body["candidates"]) == pytest.approx(1.0, abs=1e-5)
    data_url = client.post(f"{API}/ask", json={"question": "what color is the shape?",
                                                "image_base64": f"data:image/png;base64,{PNG}"})
    assert data_url.json()["candidates"] == body["candidates"]  # deterministic, same version


@pytest.mark.parametrize(("body", "field"), [
    ({"question": "q?", "image_base64": "%%%not base64"}, "image_base64"),
    ({"question": "q?", "image_base64": base64.b64encode(b"not an image").decode()},
     "image_base64"),
    ({"question": "   ", "image_base64": PNG}, "question"),
    ({"question": "x" * 301, "image_base64": PNG}, "question"),
    ({"question": "q?"}, "image_base64"),
])
def test_ask_refuses_bad_requests_naming_the_field(client: TestClient, body: dict,
                                                   field: str) -> None:
    response = client.post(f"{API}/ask", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == field


def test_ask_without_a_model_or_with_one_that_does_not_fit(settings: CloudSettings,
                                                           cloud: Cloud) -> None:
    request = {"question": "what shape is it?", "image_base64": PNG}
    with _client(settings, cloud) as no_model:
        response = no_model.post(f"{API}/ask", json=request)
        assert response.status_code == 503 and "fednano cloud serve" in response.json()["detail"]
    with _client(settings, cloud, answerer=tiny_answerer(rank=3)) as other_rank:
        response = other_rank.post(f"{API}/ask", json=request)
        assert response.status_code == 409 and "does not fit" in response.json()["detail"]


def test_the_answerer_loads_each_version_once(answerer: ModelAnswerer) -> None:
    from PIL import Image

    image = Image.new("RGB", (40, 40), "green")
    loads: list[str] = []
    state = {k: v.clone() for k, v in answerer.edge.adapters.adapter_state_dict().items()}

    def load(tag: str):  # type: ignore[no-untyped-def]
        return lambda: loads.append(tag) or state

    first = answerer.answer(image, "what color?", version="unit-1", load_state=load("1"))
    again = answerer.answer(image, "what color?", version="unit-1", load_state=load("1"))
    answerer.answer(image, "what color?", version="unit-2", load_state=load("2"))
    assert loads == ["1", "2"]
    assert first.candidates == again.candidates and first.text == again.text
    assert [c.probability for c in first.candidates] == sorted(
        (c.probability for c in first.candidates), reverse=True)
    with pytest.raises(ValueError, match="question"):
        answerer.answer(image, " ", version="unit-2", load_state=load("2"))
