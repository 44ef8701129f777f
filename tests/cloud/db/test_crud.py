"""CRUD on the migrated schema, on SQLite and PostgreSQL: what the coordinator will build on."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from cloud.db import crud
from cloud.db.crud import updates as updates_module
from cloud.db.models import (
    AuditEvent,
    DeviceStatus,
    ParticipationStatus,
    RoundState,
    Update,
    UpdateStatus,
)
from cloud.db.session import make_engine, make_session_factory, session_scope

SHA = "ab" * 32
OTHER_SHA = "cd" * 32


def _devices(session: Session, *ids: str) -> None:
    for device_id in ids:
        crud.create_device(session, device_id=device_id, profile="sim-cpu")


def _record(**changes: object) -> crud.UpdateRecord:
    fields: dict = dict(update_id="u-1", round_id=1, device_id="d1", base_version=1,
                        n_samples=10, status=UpdateStatus.ACCEPTED, blob_sha256=SHA,
                        blob_size=100, blob_path="blobs/u-1")
    fields.update(changes)
    return crud.UpdateRecord(**fields)


def _accepted(update_id: str, round_id: int, device_id: str,
              **changes: object) -> crud.UpdateRecord:
    return _record(update_id=update_id, round_id=round_id, device_id=device_id,
                   blob_path=f"blobs/{update_id}", **changes)


def test_times_come_back_timezone_aware_utc(db_session: Session) -> None:
    _devices(db_session, "d1")
    seen = datetime(2030, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    crud.set_presence(db_session, device_id="d1", online=True, at=seen)
    db_session.commit()
    db_session.expire_all()
    device = crud.require_device(db_session, device_id="d1")
    assert device.last_seen_at == seen
    assert device.last_seen_at is not None and device.last_seen_at.utcoffset() == timedelta(0)
    assert device.created_at.tzinfo is not None


def test_naive_datetimes_are_refused(db_session: Session) -> None:
    _devices(db_session, "d1")
    with pytest.raises(Exception, match="naive datetimes"):
        crud.set_presence(db_session, device_id="d1", online=True, at=datetime(2030, 1, 1))


def test_devices_page_in_provisioning_order(db_session: Session) -> None:
    _devices(db_session, "c", "a", "b")
    crud.mark_revoked(db_session, device_id="a")
    assert [d.id for d in crud.list_devices(db_session)] == ["c", "a", "b"]
    assert [d.id for d in crud.list_devices(db_session, offset=1, limit=1)] == ["a"]
    assert [d.id for d in crud.list_devices(db_session, status=DeviceStatus.ACTIVE)] == ["c", "b"]
    assert crud.count_devices(db_session) == 3
    assert crud.count_devices(db_session, status=DeviceStatus.REVOKED) == 1
    with pytest.raises(ValueError, match="limit must be between 1 and 1000, got 0"):
        crud.list_devices(db_session, limit=0)
    with pytest.raises(ValueError, match="offset must be >= 0, got -1"):
        crud.list_devices(db_session, offset=-1)


def test_a_device_id_is_taken_once(db_session: Session) -> None:
    _devices(db_session, "d1")
    db_session.commit()
    with pytest.raises(crud.DuplicateRecordError, match="device 'd1' exists already"):
        _devices(db_session, "d1")
    assert crud.count_devices(db_session) == 1
    with pytest.raises(crud.RecordNotFoundError, match="no device 'ghost'"):
        crud.require_device(db_session, device_id="ghost")


def test_a_duplicate_racing_past_the_check_is_a_conflict(
        db_session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(db_session, "d1", "d2")
    db_session.commit()
    monkeypatch.setattr(db_session, "get", lambda *args, **kwargs: None)  # the check misses
    with pytest.raises(crud.DuplicateRecordError, match="device 'd1' exists already"):
        _devices(db_session, "d1")  # ... and the database refuses the second d1
    monkeypatch.undo()
    _devices(db_session, "d3")  # only the savepoint was rolled back: the session goes on
    db_session.commit()
    assert crud.count_devices(db_session) == 3


def test_credentials_rotate_with_one_active(db_session: Session) -> None:
    _devices(db_session, "d1", "d2")
    crud.add_credential(db_session, device_id="d1", secret_hash="h1")
    crud.add_credential(db_session, device_id="d2", secret_hash="h2")
    assert crud.revoke_credentials(db_session, device_id="d1") == 1
    crud.add_credential(db_session, device_id="d1", secret_hash="h1b")
    active = crud.active_credential(db_session, device_id="d1")
    assert active is not None and active.secret_hash == "h1b"
    assert crud.active_device_hashes(db_session) == [("d1", "h1b"), ("d2", "h2")]
    crud.mark_revoked(db_session, device_id="d2")
    assert crud.active_device_hashes(db_session) == [("d1", "h1b")]


def test_a_round_walks_its_state_machine(db_session: Session) -> None:
    deadline = datetime(2030, 1, 1, tzinfo=timezone.utc)
    round_ = crud.create_round(db_session, strategy="fednano", quorum=3, min_updates=2,
                               config={"local_steps": 20}, deadline_at=deadline)
    assert (round_.state, round_.started_at, round_.closed_at) == (RoundState.OPEN, None, None)
    for state in (RoundState.COLLECTING, RoundState.AGGREGATING, RoundState.EVALUATING):
        crud.transition_round(db_session, round_id=round_.id, to=state)
    assert round_.started_at is not None and round_.closed_at is None
    crud.transition_round(db_session, round_id=round_.id, to=RoundState.CLOSED)
    db_session.commit()
    assert round_.closed_at is not None and round_.deadline_at == deadline
    with pytest.raises(crud.InvalidTransitionError, match="from 'closed' to 'collecting'"):
        crud.transition_round(db_session, round_id=round_.id, to=RoundState.COLLECTING)
    assert crud.unfinished_rounds(db_session) == []


def test_a_failed_round_says_why(db_session: Session) -> None:
    round_ = crud.create_round(db_session, strategy="fedavg", quorum=2, min_updates=1)
    with pytest.raises(ValueError, match="a reason is required for 'failed'"):
        crud.transition_round(db_session, round_id=round_.id, to=RoundState.FAILED)
    with pytest.raises(crud.InvalidTransitionError, match="from 'open' to 'evaluating'"):
        crud.transition_round(db_session, round_id=round_.id, to=RoundState.EVALUATING)
    crud.transition_round(db_session, round_id=round_.id, to=RoundState.FAILED,
                          reason="1 of 1 minimum updates by the deadline: got 0")
    db_session.commit()
    assert round_.failure_reason and round_.closed_at


@pytest.mark.parametrize(("quorum", "minimum", "message"), [
    (0, 1, "quorum must be >= 1, got 0"),
    (2, 3, r"min_updates must be between 1 and quorum \(2\), got 3"),
    (2, 0, r"min_updates must be between 1 and quorum \(2\), got 0"),
])
def test_round_quorum_is_checked(db_session: Session, quorum: int, minimum: int,
                                 message: str) -> None:
    with pytest.raises(ValueError, match=message):
        crud.create_round(db_session, strategy="fednano", quorum=quorum, min_updates=minimum)


def test_participations_are_unique_per_round_and_device(db_session: Session) -> None:
    _devices(db_session, "d1", "d2")
    round_ = crud.create_round(db_session, strategy="fednano", quorum=2, min_updates=1)
    for device_id in ("d2", "d1"):
        crud.add_participation(db_session, round_id=round_.id, device_id=device_id)
    crud.set_participation_status(db_session, round_id=round_.id, device_id="d1",
                                  status=ParticipationStatus.NOTIFIED)
    done = crud.set_participation_status(db_session, round_id=round_.id, device_id="d1",
                                         status=ParticipationStatus.SUBMITTED)
    assert done.notified_at is not None and done.finished_at is not None
    listed = crud.list_participations(db_session, round_id=round_.id)
    assert [(p.device_id, p.status) for p in listed] == [
        ("d1", ParticipationStatus.SUBMITTED), ("d2", ParticipationStatus.SELECTED)]
    db_session.commit()
    with pytest.raises(IntegrityError):
        crud.add_participation(db_session, round_id=round_.id, device_id="d1")


def test_updates_are_stored_exactly_once(db_session: Session) -> None:
    _devices(db_session, "d1", "d2")
    round_ = crud.create_round(db_session, strategy="fednano", quorum=2, min_updates=1)
    first, created = crud.record_update(db_session, record=_accepted("u-1", round_.id, "d1"))
    again, created_again = crud.record_update(db_session, record=_accepted("u-1", round_.id, "d1"))
    assert (created, created_again) == (True, False) and again.id == first.id
    with pytest.raises(crud.UpdateConflictError, match="'u-1' was stored as"):
        crud.record_update(db_session, record=_accepted("u-1", round_.id + 1, "d1"))
    other, created_other = crud.record_update(db_session,
                                              record=_accepted("u-1", round_.id, "d2"))
    assert created_other and other.id != first.id  # (sender, id): d2's u-1 is another update
    rejected = _accepted("u-2", round_.id, "d2", status=UpdateStatus.REJECTED, blob_sha256=None,
                         rejection_code="non_finite", rejection_reason="delta has NaN")
    crud.record_update(db_session, record=rejected)
    db_session.commit()
    assert crud.count_updates(db_session, round_id=round_.id) == 3
    assert crud.count_updates(db_session, round_id=round_.id, status=UpdateStatus.ACCEPTED) == 2
    assert [u.update_id for u in crud.list_updates(db_session, round_id=round_.id)] == [
        "u-1", "u-1", "u-2"]


def test_a_duplicate_racing_past_the_lookup_is_still_stored_once(
        db_session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    _devices(db_session, "d1")
    round_ = crud.create_round(db_session, strategy="fednano", quorum=1, min_updates=1)
    crud.record_update(db_session, record=_accepted("u-1", round_.id, "d1"))
    real = updates_module.get_update
    calls: list[str] = []

    def first_lookup_misses(session: Session, *, device_id: str,
                            update_id: str) -> Update | None:
        calls.append(update_id)  # as if another ingester inserted it right after our lookup
        return None if len(calls) == 1 else real(session, device_id=device_id,
                                                 update_id=update_id)

    monkeypatch.setattr(updates_module, "get_update", first_lookup_misses)
    stored, created = crud.record_update(db_session, record=_accepted("u-1", round_.id, "d1"))
    assert not created and stored.update_id == "u-1" and len(calls) == 2
    assert crud.count_updates(db_session, round_id=round_.id) == 1  # the savepoint kept the rest


@pytest.mark.parametrize(("changes", "message"), [
    ({"status": UpdateStatus.REJECTED}, "a rejection_reason is required"),
    ({"rejection_reason": "late"}, "a rejection_reason is required"),
    ({"blob_sha256": None}, "a accepted update needs its blob_sha256"),
    ({"blob_sha256": "XY"}, "expected a lowercase hex sha256, got 'XY'"),
    ({"n_samples": -1}, "n_samples must be >= 0, got -1"),
    ({"update_id": ""}, "update_id must be 1-64 characters"),
])
def test_update_records_are_validated(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _record(**changes)


def test_versions_keep_their_lineage(db_session: Session) -> None:
    _devices(db_session, "d1", "d2")
    initial = crud.create_adapter_version(db_session, blob_sha256=SHA, blob_size=10,
                                          blob_path="versions/0")
    round_ = crud.create_round(db_session, strategy="fednano", quorum=2, min_updates=1,
                               base_version_id=initial.id)
    u1, _ = crud.record_update(db_session, record=_accepted("u-1", round_.id, "d1"))
    u2, _ = crud.record_update(db_session, record=_accepted("u-2", round_.id, "d2",
                                                             n_samples=30))
    merged = crud.create_adapter_version(
        db_session, blob_sha256=OTHER_SHA, blob_size=10, blob_path="versions/1",
        parent_id=initial.id, round_id=round_.id, strategy="fednano",
        lineage={u1.id: 0.25, u2.id: 0.75})
    db_session.commit()
    assert crud.latest_adapter_version(db_session) is merged
    assert round_.base_version is initial and merged.parent is initial
    lineage = crud.version_lineage(db_session, version_id=merged.id)
    assert [(u.update_id, w) for u, w in lineage] == [("u-1", 0.25), ("u-2", 0.75)]


def test_only_accepted_or_buffered_updates_can_be_merged(db_session: Session) -> None:
    _devices(db_session, "d1")
    round_ = crud.create_round(db_session, strategy="fednano", quorum=1, min_updates=1)
    late = _accepted("u-1", round_.id, "d1", status=UpdateStatus.REJECTED,
                     rejection_code="late", rejection_reason="after the deadline")
    row, _ = crud.record_update(db_session, record=late)
    with pytest.raises(ValueError, match=f"only accepted or buffered updates can be merged, "
                                         rf"got updates \[{row.id}\]"):
        crud.create_adapter_version(db_session, blob_sha256=SHA, blob_size=1, blob_path="v",
                                    lineage={row.id: 1.0})
    with pytest.raises(crud.RecordNotFoundError, match=r"no update \[999\]"):
        crud.create_adapter_version(db_session, blob_sha256=SHA, blob_size=1, blob_path="v",
                                    lineage={999: 1.0})


def test_metrics_and_audit_events(db_session: Session) -> None:
    _devices(db_session, "d1")
    round_ = crud.create_round(db_session, strategy="fednano", quorum=1, min_updates=1)
    crud.record_metric(db_session, name="accuracy", value=0.81, round_id=round_.id)
    crud.record_metric(db_session, name="bytes_up", value=4096, round_id=round_.id,
                       device_id="d1")
    crud.record_audit(db_session, actor="operator:alice", action="round.start",
                      subject=f"round:{round_.id}", details={"quorum": 1})
    db_session.commit()
    assert [(m.name, m.value) for m in crud.list_metrics(db_session, round_id=round_.id)] == [
        ("accuracy", 0.81), ("bytes_up", 4096.0)]
    events = crud.list_audit_events(db_session, subject=f"round:{round_.id}")
    assert [(e.actor, e.action, e.details) for e in events] == [
        ("operator:alice", "round.start", {"quorum": 1})]
    with pytest.raises(ValueError, match="audit actor must not be empty"):
        crud.record_audit(db_session, actor="", action="x", subject="y")


def test_state_survives_a_restart(migrated_url: str) -> None:
    """What a restarted coordinator sees: a new engine reads the round mid-collection."""
    engine = make_engine(migrated_url)
    with session_scope(make_session_factory(engine)) as session:
        _devices(session, "d1")
        round_id = crud.create_round(session, strategy="fednano", quorum=2, min_updates=1).id
        crud.transition_round(session, round_id=round_id, to=RoundState.COLLECTING)
        crud.record_update(session, record=_accepted("u-1", round_id, "d1"))
    engine.dispose()

    engine = make_engine(migrated_url)
    with session_scope(make_session_factory(engine)) as session:
        [resumed] = crud.unfinished_rounds(session)
        assert (resumed.id, resumed.state) == (round_id, RoundState.COLLECTING)
        assert crud.count_updates(session, round_id=round_id) == 1
    engine.dispose()


def test_session_scope_rolls_back_on_error(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    with pytest.raises(RuntimeError), session_scope(factory) as session:
        _devices(session, "d1")
        raise RuntimeError("boom")
    with session_scope(factory) as session:
        assert crud.count_devices(session) == 0
        assert session.scalars(select(AuditEvent)).all() == []
    engine.dispose()


def test_concurrent_writers_wait_instead_of_failing(migrated_url: str) -> None:
    """Four threads each add devices in their own transactions: none hits 'database is locked'."""
    engine = make_engine(migrated_url)
    factory = make_session_factory(engine)
    errors: list[BaseException] = []

    def writer(worker: int) -> None:
        try:
            for i in range(5):
                with session_scope(factory) as session:
                    crud.count_devices(session)  # read first, then write: the upgrade case
                    _devices(session, f"w{worker}-{i}")
        except Exception as err:  # noqa: BLE001  (collected and asserted below)
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with session_scope(factory) as session:
        assert crud.count_devices(session) == 20
    engine.dispose()
    assert errors == []


def test_the_named_queries_of_the_coordinator_and_the_reports(db_session: Session) -> None:
    _devices(db_session, "d1", "d2", "d3")
    crud.set_presence(db_session, device_id="d1", online=True)
    crud.set_presence(db_session, device_id="d3", online=True)
    crud.mark_revoked(db_session, device_id="d3")  # offline too
    crud.set_presence(db_session, device_id="d2", online=False)
    assert [d.id for d in crud.online_devices(db_session, status=DeviceStatus.ACTIVE)] == ["d1"]
    assert crud.count_devices(db_session, online=True) == 1
    assert crud.count_devices_by_status(db_session) == {DeviceStatus.ACTIVE: 2,
                                                        DeviceStatus.REVOKED: 1}
    assert crud.device_statuses(db_session, device_ids={"d1", "d3", "nobody"}) == {
        "d1": DeviceStatus.ACTIVE, "d3": DeviceStatus.REVOKED}

    first = crud.create_round(db_session, strategy="fednano", quorum=2, min_updates=1)
    second = crud.create_round(db_session, strategy="fednano", quorum=1, min_updates=1)
    for device_id in ("d2", "d1"):
        crud.add_participation(db_session, round_id=first.id, device_id=device_id)
    crud.set_participation_status(db_session, round_id=first.id, device_id="d1",
                                  status=ParticipationStatus.NOTIFIED)
    outstanding = (ParticipationStatus.SELECTED, ParticipationStatus.NOTIFIED)
    assert crud.participant_ids(db_session, round_id=first.id, statuses=outstanding) == [
        "d2", "d1"]  # in selection order
    assert crud.participant_ids(db_session, round_id=first.id, statuses=outstanding,
                                limit=1) == ["d2"]
    assert crud.finished_rounds_with(db_session, statuses=outstanding) == []
    crud.transition_round(db_session, round_id=first.id, to=RoundState.CLOSED)
    assert crud.finished_rounds_with(db_session, statuses=outstanding) == [first.id]
    assert [r.id for r in crud.all_rounds(db_session)] == [first.id, second.id]
    assert [r.id for r in crud.all_rounds(db_session, state=RoundState.OPEN)] == [second.id]
    assert crud.count_rounds_by_state(db_session) == {RoundState.CLOSED: 1, RoundState.OPEN: 1}
    assert crud.get_round(db_session, round_id=999) is None
    assert [p.device_id for p in crud.all_participations(db_session)] == ["d2", "d1"]

    update, _ = crud.record_update(db_session, record=_accepted("u-1", second.id, "d1"))
    crud.record_update(db_session, record=_record(
        update_id="u-2", round_id=second.id, device_id="d2", status=UpdateStatus.REJECTED,
        blob_sha256=None, rejection_code="late", rejection_reason="too late"))
    assert [u.update_id for u in crud.all_updates(db_session)] == ["u-1", "u-2"]
    assert [u.update_id for u in crud.all_updates(db_session, status=UpdateStatus.REJECTED)] == [
        "u-2"]
    assert crud.round_version(db_session, round_id=second.id) is None
    version = crud.create_adapter_version(db_session, blob_sha256=SHA, blob_size=1, blob_path="v",
                                          round_id=second.id, lineage={update.id: 1.0})
    assert crud.round_version(db_session, round_id=second.id) is version

    for subject in ("device:d1", "device:d2", "device:d1"):
        crud.record_audit(db_session, actor="test", action="update.refused", subject=subject)
    refused = crud.all_audit_events(db_session, action="update.refused", subject="device:d1")
    assert len(refused) == 2 == crud.count_audit_events(db_session, subject="device:d1")
