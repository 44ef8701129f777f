"""The API against malformed paths and queries, oversized and unauthenticated bodies, and
hostile stored device data: 4xx, never 500; a body refused before it is read."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from cloud.db import crud
from cloud.db.session import make_engine, make_session_factory, session_scope
from cloud.settings import CloudSettings
from tests.cloud.dashboardkit import LiveServer

API = "/api/v1"
HUGE = "99999999999999999999999"


@pytest.fixture
def settings(migrated_url: str, tmp_path: Path) -> CloudSettings:
    return CloudSettings(home=tmp_path, database_url=migrated_url, environment="test",
                         secret_key=SecretStr("k" * 40), broker_password=SecretStr("p" * 40),
                         mqtt_hash_iterations=1000, max_request_bytes=2**20)


@pytest.mark.parametrize("path", [
    f"/rounds/{HUGE}", f"/rounds/{HUGE}/metrics", f"/rounds/-{HUGE}", f"/rounds?offset={HUGE}",
    f"/devices?offset={HUGE}", f"/updates?offset={HUGE}", f"/audit?offset={HUGE}",
    f"/models/{HUGE}", "/models/²", f"/models?offset={HUGE}", f"/rounds?limit={HUGE}",
    "/rounds/9223372036854775808", "/rounds/0"])
def test_integers_beyond_int64_are_4xx(client: TestClient, path: str) -> None:
    response = client.get(API + path)
    assert 400 <= response.status_code < 500, (path, response.status_code, response.text)


def test_stopping_a_round_beyond_int64_is_4xx(client: TestClient) -> None:
    assert client.post(f"{API}/rounds/{HUGE}/stop").status_code == 422


def test_hostile_stored_capabilities_never_break_the_device_list(
        client: TestClient, settings: CloudSettings) -> None:
    deep: object = {}
    for _ in range(900):
        deep = {"x": deep}
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        crud.create_device(session, device_id="dev-deep", profile="sim-cpu")
        crud.get_device(session, device_id="dev-deep").capabilities = {"deep": deep}  # type: ignore[union-attr]
    engine.dispose()
    listed = client.get(f"{API}/devices")
    assert listed.status_code == 200
    (device,) = listed.json()["items"]
    assert "_unavailable" in device["capabilities"]
    assert client.get(f"{API}/devices/dev-deep").status_code == 200


def test_round_overrides_are_a_closed_schema(client: TestClient) -> None:
    schema = client.get(f"{API}/openapi.json").json()["components"]["schemas"]
    overrides = schema["RoundOverrides"]
    assert overrides["additionalProperties"] is False and "deadline_s" in overrides["properties"]
    refused = client.post(f"{API}/rounds", json={"overrides": {"no_such_key": 1}})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "overrides", "no_such_key"]


def test_error_statuses_are_documented(client: TestClient) -> None:
    paths = client.get(f"{API}/openapi.json").json()["paths"]
    stop = paths[f"{API}/rounds/{{round_id}}/stop"]["post"]["responses"]
    assert {"401", "404", "409", "413", "422"} <= set(stop)
    assert {"401", "413"} <= set(paths[f"{API}/devices"]["post"]["responses"])


def _raw_post(url: str, path: str, headers: dict[str, str], declared: int,
              sent: bytes) -> int:
    """POST declaring ``declared`` body bytes but sending only ``sent``: the answer's status
    (a server that waits for the whole body never answers: the socket times out)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
                      f"\r\nContent-Length: {declared}\r\n{head}\r\n").encode() + sent)
        status = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(status.split()[1])


def test_a_100_mib_body_is_refused_before_it_is_read(settings: CloudSettings,
                                                      token: str) -> None:
    with LiveServer(settings) as server:
        assert _raw_post(server.url, f"{API}/devices", {}, 100 * 2**20, b"{" * 1024) == 401
        assert _raw_post(server.url, f"{API}/devices", {"Authorization": "Bearer nope"},
                         100 * 2**20, b"{" * 1024) == 401
        assert _raw_post(server.url, f"{API}/devices", {"Authorization": f"Bearer {token}"},
                         100 * 2**20, b"{" * 1024) == 413
