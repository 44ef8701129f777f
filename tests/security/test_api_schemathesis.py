"""schemathesis against the live API (uvicorn on a loopback port, SQLite, an operator token):
every operation of the OpenAPI document with a few generated requests each; no server error
and no status the document does not list."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import status_code_conformance

from cloud.api.security import create_operator_token
from cloud.db.migrate import upgrade
from cloud.db.session import make_engine, make_session_factory, session_scope, sqlite_url
from cloud.settings import CloudSettings
from tests.cloud.dashboardkit import LiveServer

LIVE: dict[str, str] = {}  # the server's URL and the operator token


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    root = tmp_path_factory.mktemp("schemathesis")
    url = sqlite_url(root / "api.db")
    upgrade(url)
    engine = make_engine(url)
    with session_scope(make_session_factory(engine)) as session:
        _, LIVE["token"] = create_operator_token(session, name="schemathesis")
    engine.dispose()
    settings_ = CloudSettings(home=root, database_url=url, environment="test",
                              secret_key=SecretStr("k" * 40), broker_password=SecretStr("p" * 40),
                              mqtt_hash_iterations=1000)
    with LiveServer(settings_) as server:
        LIVE["url"] = server.url
        spec = httpx.get(f"{server.url}/api/v1/openapi.json", timeout=60).json()
        yield schemathesis.openapi.from_dict(spec)


def test_the_live_api_answers_only_documented_statuses(api_schema) -> None:  # type: ignore[no-untyped-def]
    operations = [result.ok() for result in api_schema.get_all_operations()]
    tested = 0
    for operation in operations:
        if operation.path.endswith("/ask"):  # needs the loaded model (503 documented)
            continue

        @given(operation.as_strategy())
        @settings(max_examples=4, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case) -> None:  # type: ignore[no-untyped-def]
            response = case.call(base_url=LIVE["url"], timeout=60,
                                 headers={"Authorization": f"Bearer {LIVE['token']}"})
            case.validate_response(response, checks=(not_a_server_error,
                                                     status_code_conformance))

        check()
        tested += 1
    assert tested >= 20, tested
