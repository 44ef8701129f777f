"""The whole system on one machine: 3 device processes (+ a rogue client), the private
Mosquitto, the all-in-one cloud on PostgreSQL and the real base, 2 rounds, with faults:
a device killed mid-round and restarted, a NaN update, a corrupted update, a duplicate
delivery and the cloud crashing mid-round. The devices are provisioned for this machine's
network address, not the loopback: they reach the broker over TLS, dev-00 with an X.509
certificate the run's CA signed, the others with passwords. Everything is asserted from the
database."""

from __future__ import annotations

import ipaddress
from io import StringIO
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import func, select

from cloud.db import crud
from cloud.db.models import (
    AdapterVersion,
    AuditEvent,
    Participation,
    ParticipationStatus,
    Round,
    RoundState,
    Update,
    UpdateStatus,
)
from cloud.db.session import make_engine, make_session_factory, session_scope
from fednano.fleet.options import FleetOptions
from fednano.fleet.runner import FleetPaths, FleetRunner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

FAULTS = ("kill-device", "corrupt", "nan", "duplicate", "cloud-restart")


@pytest.fixture(scope="module")
def fleet_run(built_home: Path, postgres_server: str,
              tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    from tests.cloud.conftest import _create_database, _drop_database

    url = _create_database(postgres_server)
    options = FleetOptions(devices=3, rounds=2, steps=3, batch_size=8, fisher_samples=8,
                           max_samples=48, eval_questions=40, deadline_s=300,
                           llm_timeout_s=10, database=url, faults=FAULTS, timeout_s=900,
                           network="tls", x509_devices=1)
    out = tmp_path_factory.mktemp("fleet")
    paths = FleetPaths(out=out, home=built_home, bundles=built_home / "bundles")
    output = StringIO()
    runner = FleetRunner(options, paths, console=Console(file=output, width=140), live=False)
    try:
        report = runner.run()  # stops every process it started, whatever happens
    finally:
        print(output.getvalue())
    engine = make_engine(url)
    try:
        yield report, make_session_factory(engine), out
    finally:
        engine.dispose()
        _drop_database(url)


def test_rounds_closed_with_accuracy(fleet_run) -> None:  # type: ignore[no-untyped-def]
    report, sessions, _ = fleet_run
    with session_scope(sessions) as session:
        rounds = session.scalars(select(Round).order_by(Round.id)).all()
        assert [r.state for r in rounds] == [RoundState.CLOSED, RoundState.CLOSED]
        for round_ in rounds:
            accuracy = crud.list_metrics(session, round_id=round_.id, name="accuracy")
            assert accuracy and 0.0 < accuracy[-1].value <= 1.0
    assert report.ok, {name: c.detail for name, c in report.checks.items()}


def test_bad_updates_rejected_with_reasons(fleet_run) -> None:  # type: ignore[no-untyped-def]
    _, sessions, _ = fleet_run
    with session_scope(sessions) as session:
        rejected = session.scalars(select(Update).where(
            Update.status == UpdateStatus.REJECTED)).all()
        codes = {(u.device_id, u.rejection_code) for u in rejected}
        assert {("rogue", "non_finite"), ("rogue", "codec"), ("dev-00", "duplicate")} <= codes
        assert all(u.rejection_reason for u in rejected)
        redelivered = session.scalar(select(func.count()).select_from(AuditEvent).where(
            AuditEvent.action == "update.redelivered", AuditEvent.subject == "device:dev-00"))
        assert redelivered is not None and redelivered >= 2


def test_no_acknowledged_or_accepted_update_lost(fleet_run) -> None:  # type: ignore[no-untyped-def]
    report, sessions, _ = fleet_run
    with session_scope(sessions) as session:
        stored = set(session.scalars(select(Update.update_id)))
        for round_ in session.scalars(select(Round)):
            accepted = {u.id for u in crud.list_updates(session, round_id=round_.id,
                                                        status=UpdateStatus.ACCEPTED)}
            version = session.scalar(select(AdapterVersion).where(
                AdapterVersion.round_id == round_.id))
            assert version is not None
            merged = {u.id for u, _ in crud.version_lineage(session, version_id=version.id)}
            assert accepted and accepted == merged
    acknowledged = {uid for ids in report.acknowledged.values() for uid in ids}
    assert len(acknowledged) == 6 and acknowledged <= stored  # 3 devices x 2 rounds
    with session_scope(sessions) as session:
        honest = session.scalars(select(Participation.status).where(
            Participation.device_id != "rogue")).all()
    assert honest == [ParticipationStatus.SUBMITTED] * 6  # killed, crashed: nobody left out


def test_killed_device_came_back_and_delivered(fleet_run) -> None:  # type: ignore[no-untyped-def]
    report, sessions, out = fleet_run
    (kill,) = [n for n in report.faults if n.fault == "kill-device" and "SIGKILL" in n.message]
    target = kill.message.split()[1]
    with session_scope(sessions) as session:
        status = session.scalar(select(Participation.status).where(
            Participation.round_id == kill.round_id, Participation.device_id == target))
    assert status is ParticipationStatus.SUBMITTED
    assert next(d for d in report.devices if d["device_id"] == target)["starts"] == 2
    assert (out / "logs" / "cloud.log").read_text().count("=== start") == 2  # crashed once


def test_devices_joined_over_the_network_with_and_without_x509(fleet_run) -> None:  # type: ignore[no-untyped-def]
    _, sessions, out = fleet_run
    from edge.config import load_device_config

    for device_id, kind in (("dev-00", "x509"), ("dev-01", "password"), ("dev-02", "password")):
        config = load_device_config(out / "devices" / device_id / "device.yaml")
        assert config.broker.tls and not ipaddress.ip_address(config.broker.host).is_loopback
        assert config.credentials.x509 == (kind == "x509")
        with session_scope(sessions) as session:
            (credential,) = crud.require_device(session, device_id=device_id).credentials
            assert credential.kind.value == kind
            submitted = session.scalars(select(Participation.status).where(
                Participation.device_id == device_id)).all()
        assert submitted == [ParticipationStatus.SUBMITTED] * 2, device_id
