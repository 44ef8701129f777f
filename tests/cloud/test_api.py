"""The operators' REST API through FastAPI's TestClient, on real SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

from cloud.api.main import InsecureSettingsError, check_production_secrets, create_app
from cloud.db import crud
from cloud.db.session import make_engine, make_session_factory, session_scope
from cloud.settings import CloudSettings
from tests.cloud.roundkit import FakeClock, add_devices, device_update, make_cloud

API = "/api/v1"


def _settings(home: Path, url: str, **extra: object) -> CloudSettings:
    return CloudSettings(home=home, database_url=url, environment="test",
                         secret_key=SecretStr("k" * 40), broker_password=SecretStr("p" * 40),
                         mqtt_hash_iterations=1000, broker_live_admin=False,
                         **extra)  # type: ignore[arg-type]


@pytest.fixture
def settings(migrated_url: str, tmp_path: Path) -> CloudSettings:
    return _settings(tmp_path, migrated_url)


# ------------------------------------------------------------------------------ auth, health


def test_health_and_readiness_need_no_token(settings: CloudSettings) -> None:
    app = create_app(settings, broker_connected=lambda: False)
    with TestClient(app) as anonymous:
        assert anonymous.get(f"{API}/health").json() == {"status": "ok"}
        ready = anonymous.get(f"{API}/ready")
        assert ready.status_code == 503 and ready.json() == {
            "ready": False, "database": "ok", "broker": "disconnected"}
        assert anonymous.get(f"{API}/openapi.json").json()["info"]["title"] == "FedNano cloud"
    app.state.fednano.engine.dispose()


def test_ready_without_a_broker_configured(client: TestClient) -> None:
    assert client.get(f"{API}/ready").json() == {"ready": True, "database": "ok",
                                                 "broker": "not configured"}


@pytest.mark.parametrize("header", [None, "Bearer fnt_not-a-real-token", "Basic YWxpY2U6eA=="])
def test_operator_routes_refuse_missing_or_bad_tokens(client: TestClient,
                                                      header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    client.headers.pop("Authorization")
    response = client.get(f"{API}/devices", headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


def test_a_revoked_token_stops_working(client: TestClient, settings: CloudSettings) -> None:
    assert client.get(f"{API}/devices").status_code == 200
    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        (row,) = crud.list_tokens(session)
        assert row.last_used_at is not None and row.token_sha256 != row.prefix
        crud.revoke_token(session, token_id=row.id)
    engine.dispose()
    assert client.get(f"{API}/devices").status_code == 401


def test_production_refuses_default_secrets(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="secret_key"):
        CloudSettings(home=tmp_path, environment="production",
                      broker_password=SecretStr("p" * 40))
    unchecked = CloudSettings.model_construct(environment="production",
                                              secret_key=SecretStr("changethis"),
                                              broker_password=SecretStr("p" * 40))
    with pytest.raises(InsecureSettingsError, match="secret_key"):
        check_production_secrets(unchecked)


# ------------------------------------------------------------------------------ devices


def test_devices_add_get_config_rotate_revoke(client: TestClient) -> None:
    created = client.post(f"{API}/devices", json={"id": "orin-0001", "profile": "sim-cpu"})
    assert created.status_code == 201
    body = created.json()
    assert len(body["secret"]) == 43 and body["device"]["status"] == "active"
    assert body["config"]["device_id"] == "orin-0001" and body["secret"] not in str(
        body["config"])
    assert client.get(f"{API}/devices/orin-0001").json()["profile"] == "sim-cpu"
    config = client.get(f"{API}/devices/orin-0001/config")
    assert config.headers["content-type"].startswith("application/yaml")
    assert yaml.safe_load(config.text)["bundle_url"].endswith("/api/v1/bundles/latest")
    rotated = client.post(f"{API}/devices/orin-0001/rotate-secret").json()["secret"]
    assert rotated != body["secret"]
    revoked = client.post(f"{API}/devices/orin-0001/revoke", json={"reason": "stolen"})
    assert revoked.json()["status"] == "revoked"
    assert client.post(f"{API}/devices/orin-0001/revoke").status_code == 409
    assert client.post(f"{API}/devices",
                       json={"id": "orin-0001", "profile": "sim-cpu"}).status_code == 409
    assert client.get(f"{API}/devices/nobody").status_code == 404
    events = client.get(f"{API}/audit", params={"subject": "device:orin-0001"}).json()
    assert [e["action"] for e in events["items"]] == [
        "device.add", "device.rotate_secret", "device.revoke"]
    assert {e["actor"] for e in events["items"]} == {"operator:alice"}


@contextlib.contextmanager
def _operator_client(settings: CloudSettings) -> Iterator[TestClient]:
    """What the ``client`` fixture gives, for settings made in the test."""
    from cloud.api.security import create_operator_token

    engine = make_engine(settings.resolved_database_url)
    with session_scope(make_session_factory(engine)) as session:
        _, token = create_operator_token(session, name="alice")
    engine.dispose()
    app = create_app(settings)
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {token}"
        yield client
    app.state.fednano.engine.dispose()


def test_x509_devices_get_a_key_and_a_certificate_the_device_ca_signed(
        migrated_url: str, tmp_path: Path) -> None:
    from cryptography import x509

    from cloud.pki import Issuer

    ca = Issuer.create()
    ca.write(tmp_path / "ca.crt", tmp_path / "ca.key")
    settings = _settings(tmp_path, migrated_url, device_broker_url="mqtts://mqtt.example:8883",
                         device_x509_broker_url="mqtts://mqtt.example:8884",
                         device_ca_file=tmp_path / "ca.crt",
                         device_ca_key_file=tmp_path / "ca.key")
    with _operator_client(settings) as client:
        created = client.post(f"{API}/devices", json={"id": "orin-x", "profile": "sim-cpu",
                                                     "credential": "x509"})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["secret"] is None and body["credential"] == "x509"
        certificate = x509.load_pem_x509_certificate(body["certificate_pem"].encode())
        certificate.verify_directly_issued_by(ca.certificate)
        assert certificate.subject.rfc4514_string() == "CN=orin-x"
        assert "PRIVATE KEY" in body["private_key_pem"]
        assert body["ca_certificate_pem"] == ca.certificate_pem.decode()
        assert body["config"]["broker"] == {"url": "mqtts://mqtt.example:8884",
                                            "ca_file": "ca.crt"}
        assert body["config"]["credentials"] == {"certificate_file": "device.crt",
                                                 "key_file": "device.key"}
        config = yaml.safe_load(client.get(f"{API}/devices/orin-x/config").text)
        assert config["broker"]["url"] == "mqtts://mqtt.example:8884"
        rotate = client.post(f"{API}/devices/orin-x/rotate-secret")
        assert rotate.status_code == 409 and "X.509" in rotate.json()["detail"]
        password = client.post(f"{API}/devices", json={"id": "orin-p", "profile": "sim-cpu"})
        assert password.json()["config"]["broker"]["url"] == "mqtts://mqtt.example:8883"
        audit = client.get(f"{API}/audit", params={"subject": "device:orin-x"}).json()
        assert audit["items"][0]["details"]["certificate_sha256"] == (
            certificate.fingerprint(certificate.signature_hash_algorithm).hex())  # type: ignore[arg-type]


def test_x509_is_refused_with_the_settings_to_set_when_off(client: TestClient) -> None:
    response = client.post(f"{API}/devices", json={"id": "orin-x", "profile": "sim-cpu",
                                                  "credential": "x509"})
    assert response.status_code == 409
    assert "FEDNANO_DEVICE_X509_BROKER_URL" in response.json()["detail"]
    assert client.get(f"{API}/devices/orin-x").status_code == 404  # nothing half-added


@pytest.mark.parametrize(("body", "field"), [
    ({"id": "bad/id", "profile": "sim-cpu"}, "id"),
    ({"id": "ok-1", "profile": "Not A Profile"}, "profile"),
    ({"id": "ok-1", "profile": "orin-nano"}, "profile"),  # well formed, but no such profile
    ({"id": "ok-1"}, "profile"),
    ({"id": "ok-1", "profile": "sim-cpu", "colour": "red"}, "colour"),
    ({"id": "fednano-cloud", "profile": "sim-cpu"}, "id"),  # the cloud's own broker user
])
def test_bad_device_bodies_are_422_naming_the_field(client: TestClient, body: dict,
                                                    field: str) -> None:
    response = client.post(f"{API}/devices", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][-1] == field


def test_lists_paginate_with_a_total(client: TestClient) -> None:
    for i in range(5):
        client.post(f"{API}/devices", json={"id": f"dev-{i}", "profile": "sim-cpu"})
    first = client.get(f"{API}/devices", params={"limit": 2}).json()
    last = client.get(f"{API}/devices", params={"offset": 4, "limit": 2}).json()
    assert (first["total"], len(first["items"]), first["limit"]) == (5, 2, 2)
    assert [d["id"] for d in first["items"]] == ["dev-0", "dev-1"]
    assert [d["id"] for d in last["items"]] == ["dev-4"]
    bad = client.get(f"{API}/devices", params={"limit": 0})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "limit"]
    audit = client.get(f"{API}/audit", params={"limit": 3}).json()
    assert audit["total"] == 6 and len(audit["items"]) == 3  # + the token's creation


# ------------------------------------------------------------------------------ rounds, models


def test_round_defaults_and_schedule(client: TestClient) -> None:
    assert client.get(f"{API}/rounds/defaults").json()["strategy"] == "fednano"
    bad = client.put(f"{API}/rounds/defaults", json={"fraction": 2})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "fraction"]
    put = client.put(f"{API}/rounds/defaults", json={"strategy": "fedavg", "deadline_s": 30})
    assert put.status_code == 200
    assert client.get(f"{API}/rounds/defaults").json()["deadline_s"] == 30
    schedule = client.put(f"{API}/rounds/schedule", json={"enabled": True, "target_rounds": 3})
    assert schedule.json()["enabled"] is True and schedule.json()["after_round_id"] == 0
    assert client.get(f"{API}/rounds/schedule").json()["target_rounds"] == 3


def test_rounds_start_get_stop_through_the_api(client: TestClient, settings: CloudSettings,
                                               tmp_path: Path) -> None:
    assert client.post(f"{API}/rounds").status_code == 409  # no global version yet
    cloud = make_cloud(settings.resolved_database_url, tmp_path, FakeClock())
    bad = client.post(f"{API}/rounds", json={"overrides": {"quorum_fraction": 0}})
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["body", "overrides", "quorum_fraction"]
    refused = client.post(f"{API}/rounds")
    assert refused.status_code == 409 and "eligible devices" in refused.json()["detail"]
    add_devices(cloud, "dev-a", "dev-b")
    started = client.post(f"{API}/rounds", json={"overrides": {"deadline_s": 45}})
    assert started.status_code == 201 and started.json()["state"] == "open"
    round_id = started.json()["id"]
    cloud.coordinator.tick()
    detail = client.get(f"{API}/rounds/{round_id}").json()
    assert detail["state"] == "collecting" and detail["config"]["deadline_s"] == 45
    assert {p["device_id"] for p in detail["participations"]} == {"dev-a", "dev-b"}
    stopped = client.post(f"{API}/rounds/{round_id}/stop", json={"reason": "maintenance"})
    assert stopped.json()["state"] == "closed"
    assert client.post(f"{API}/rounds/{round_id}/stop").status_code == 409
    assert client.get(f"{API}/rounds/999").status_code == 404
    assert client.get(f"{API}/rounds/not-a-number").status_code == 422
    listed = client.get(f"{API}/rounds").json()
    assert listed["total"] == 1 and listed["items"][0]["id"] == round_id
    cloud.engine.dispose()


def test_models_metrics_and_adapter_download(client: TestClient, settings: CloudSettings,
                                             tmp_path: Path) -> None:
    cloud = make_cloud(settings.resolved_database_url, tmp_path, FakeClock())
    add_devices(cloud, "dev-a", "dev-b")
    round_id = cloud.coordinator.open_round()
    cloud.coordinator.tick()
    for device_id, n in (("dev-a", 30), ("dev-b", 10)):
        task, parts = cloud.publisher.tasks(device_id)[-1]
        cloud.coordinator.handle_update(device_id, device_update(task, parts, device_id,
                                                                 n_samples=n))
    bad_task, bad_parts = cloud.publisher.tasks("dev-b")[-1]
    cloud.coordinator.tick()

    versions = client.get(f"{API}/models").json()
    assert versions["total"] == 2 and versions["items"][0]["round_id"] == round_id
    latest = client.get(f"{API}/models/latest").json()
    lineage = client.get(f"{API}/models/latest/lineage").json()
    assert sorted((e["device_id"], e["weight"]) for e in lineage) == [("dev-a", 0.75),
                                                                       ("dev-b", 0.25)]
    download = client.get(f"{API}/models/{latest['id']}/adapter")
    assert download.status_code == 200
    digest = hashlib.sha256(download.content).hexdigest()
    assert download.headers["x-checksum-sha256"] == digest == latest["blob_sha256"]
    assert download.headers["etag"] == f'"{digest}"'
    cached = client.get(f"{API}/models/{latest['id']}/adapter",
                        headers={"If-None-Match": f'"{digest}"'})
    assert cached.status_code == 304 and cached.content == b""
    assert client.get(f"{API}/models/77").status_code == 404

    metrics = client.get(f"{API}/rounds/{round_id}/metrics").json()
    assert metrics["summary"]["participants"] == 2
    assert metrics["summary"]["updates_rejected"] == 0
    assert metrics["summary"]["bytes_up"] > 0 and metrics["summary"]["bytes_down"] > 0
    assert {m["device_id"] for m in metrics["per_device"]} == {"dev-a", "dev-b"}
    late = cloud.coordinator.handle_update("dev-b", device_update(bad_task, bad_parts, "dev-b"))
    assert late.code == "duplicate"
    detail = client.get(f"{API}/rounds/{round_id}").json()
    assert [u["rejection_code"] for u in detail["updates"]] == [None, None, "duplicate"]
    cloud.engine.dispose()


def test_bundles_are_off_without_a_folder(client: TestClient) -> None:
    response = client.get(f"{API}/bundles/latest")
    assert response.status_code == 404 and "FEDNANO_BUNDLE_DIR" in response.json()["detail"]


def _fake_bundle(root: Path) -> str:
    """A bundle folder with one file and a valid manifest (what the exporter would write)."""
    from shared.bundle import (
        ENCODER_TARGETS,
        BundleIdentity,
        BundleManifest,
        CalibrationInfo,
        EmbedderInfo,
        EncoderVariant,
        GateInfo,
        ModelInfo,
        file_records,
        write_archive,
    )

    staging = root / "staging"
    staging.mkdir(parents=True)
    (staging / "tokenizer.json").write_text('{"model": "toy"}')
    identity = BundleIdentity(
        base_version="base-test-1", precision="fp32",
        model=ModelInfo(encoder="toy", image_size=8, n_visual=4, width=8, vocab_size=16,
                        input="pixels", output="tokens", opset=17),
        embedder=EmbedderInfo(dtype="float16"), files=file_records(staging),
        encoders={target: EncoderVariant(
            file="encoder_connector.onnx", precision="fp32",
            calibration=CalibrationInfo(n_images=0), self_test_cosine=1.0,
            quality_gate=GateInfo(metric="cosine", threshold=0.9, mean=1.0, min=1.0,
                                  n_images=0, n_tokens=0, passed=True))
            for target in ENCODER_TARGETS})
    manifest = BundleManifest.create(identity, created_at="2030-01-01T00:00:00Z")
    folder = staging.rename(root / manifest.bundle_version)
    (folder / "manifest.json").write_text(manifest.to_json())
    write_archive(folder, folder.with_suffix(".tar"))
    return manifest.bundle_version


def test_bundles_list_files_and_archive_with_checksums(migrated_url: str, tmp_path: Path,
                                                       token: str) -> None:
    version = _fake_bundle(tmp_path / "bundles")
    app = create_app(_settings(tmp_path, migrated_url, bundle_dir=tmp_path / "bundles"))
    with TestClient(app) as anonymous:  # devices fetch bundles without operator tokens
        (listed,) = anonymous.get(f"{API}/bundles").json()
        assert listed["bundle_version"] == version and listed["archive"] is True
        file = anonymous.get(f"{API}/bundles/{version}/files/tokenizer.json")
        assert hashlib.sha256(file.content).hexdigest() == file.headers["x-checksum-sha256"] == (
            listed["files"]["tokenizer.json"]["sha256"])
        archive = anonymous.get(f"{API}/bundles/latest")
        assert archive.headers["content-type"] == "application/x-tar"
        assert hashlib.sha256(archive.content).hexdigest() == archive.headers["x-checksum-sha256"]
        assert anonymous.get(f"{API}/bundles/{version}/files/..%2Fsecret").status_code == 404
        assert anonymous.get(f"{API}/bundles/0123456789abcdef").status_code == 404
    app.state.fednano.engine.dispose()
