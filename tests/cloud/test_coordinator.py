"""The round coordinator on real SQLite and PostgreSQL: state machine, quorum and deadline with
an injected clock, exactly-once ingestion, resume after a restart, the schedule, presence."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cloud import aggregation
from cloud.coordinator import NoGlobalVersionError, stop_round
from cloud.db import crud
from cloud.db.crud import InvalidTransitionError
from cloud.db.models import ParticipationStatus, RoundState, UpdateStatus
from cloud.rounds import NotEnoughDevicesError, RoundConfig, Schedule, save_defaults, save_schedule
from shared import protocol, topics
from shared.adapters import AdapterState
from shared.merge import clip_to_median_norm
from tests.cloud.roundkit import (
    Cloud,
    FakeClock,
    add_devices,
    constant_evaluator,
    device_update,
    make_cloud,
    presence,
)

TWO = RoundConfig(deadline_s=60)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def cloud(migrated_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[Cloud]:
    instance = make_cloud(migrated_url, tmp_path, clock, evaluator=constant_evaluator(0.6))
    yield instance
    instance.engine.dispose()


def _round(cloud: Cloud, round_id: int):  # type: ignore[no-untyped-def]
    with cloud.session() as session:
        round_ = crud.require_round(session, round_id=round_id)
        return round_, {p.device_id: p.status for p in round_.participations}


def _submit(cloud: Cloud, device_id: str, **kwargs: object) -> str:
    task, parts = cloud.publisher.tasks(device_id)[-1]
    return cloud.coordinator.handle_update(device_id,
                                           device_update(task, parts, device_id, **kwargs)).outcome


def _last_step(cloud: Cloud) -> AdapterState:
    """θ_new − θ_parent: what the newest version changed, read back from the stored versions."""
    with cloud.session() as session:
        version = crud.latest_adapter_version(session)
        assert version is not None and version.parent_id is not None
        parent = crud.get_adapter_version(session, version_id=version.parent_id)
        assert parent is not None
        new, old = (aggregation.load_state(cloud.blobs, v) for v in (version, parent))
    return {key: new[key] - old[key] for key in new}


def test_the_announcement_does_not_hold_the_tick_but_tasks_are_waited_for(cloud: Cloud) -> None:
    # A broker busy saving its database delays PUBACKs; the retained announcement is
    # republished at every transition, so the tick must not wait on it (tasks it must).
    add_devices(cloud, "dev-a", "dev-b")
    cloud.coordinator.open_round(TWO)
    cloud.coordinator.tick()
    assert cloud.publisher.announcements() and cloud.publisher.tasks("dev-a")
    assert set(cloud.publisher.not_waited) == {topics.ROUND_ANNOUNCEMENT}


def test_a_round_runs_open_to_closed_with_lineage_and_metrics(cloud: Cloud) -> None:
    add_devices(cloud, "dev-a", "dev-b")
    round_id = cloud.coordinator.open_round(TWO)
    assert _round(cloud, round_id)[0].state is RoundState.OPEN
    cloud.coordinator.tick()
    round_, parts = _round(cloud, round_id)
    assert round_.state is RoundState.COLLECTING and round_.quorum == 2
    assert set(parts.values()) == {ParticipationStatus.NOTIFIED}
    task, _ = cloud.publisher.tasks("dev-a")[0]
    assert (task.round_id, task.global_version, task.base_version) == (round_id, 1, "base-test-1")
    assert cloud.publisher.announcements()[-1].state == "collecting"

    assert _submit(cloud, "dev-a", scale=0.1, n_samples=30) == "accepted"
    cloud.coordinator.tick()
    assert _round(cloud, round_id)[0].state is RoundState.COLLECTING  # 1 of 2
    assert _submit(cloud, "dev-b", scale=0.3, n_samples=10) == "accepted"
    cloud.coordinator.tick()

    round_, parts = _round(cloud, round_id)
    assert round_.state is RoundState.CLOSED and set(parts.values()) == {
        ParticipationStatus.SUBMITTED}
    with cloud.session() as session:
        version = crud.latest_adapter_version(session)
        assert version is not None and version.round_id == round_id and version.parent_id == 1
        weights = sorted(w for _, w in crud.version_lineage(session, version_id=version.id))
        assert weights == pytest.approx([0.25, 0.75])
        merged = aggregation.load_state(cloud.blobs, version)
        first = crud.get_adapter_version(session, version_id=1)
        assert first is not None
        initial = aggregation.load_state(cloud.blobs, first)
        metrics = {m.name: m.value for m in crud.list_metrics(session, round_id=round_id)
                   if m.device_id is None}
    # equal Fishers: the Fisher merge is the n-weighted mean delta 0.75*0.1 + 0.25*0.3 = 0.15
    for key, value in merged.items():
        assert torch.allclose(value - initial[key], torch.full_like(value, 0.15), atol=1e-6)
    assert metrics["accuracy"] == 0.6 and metrics["participants"] == 2
    assert metrics["updates_rejected"] == 0 and metrics["bytes_up"] > 0
    assert metrics["bytes_down"] > 0 and metrics["loss"] == 1.0
    assert cloud.publisher.announcements()[-1].global_version == version.id


def test_quorum_closes_early_and_late_updates_are_rejected(cloud: Cloud) -> None:
    add_devices(cloud, "dev-a", "dev-b", "dev-c")
    round_id = cloud.coordinator.open_round(RoundConfig(quorum_fraction=0.5, deadline_s=60))
    cloud.coordinator.tick()
    assert _round(cloud, round_id)[0].quorum == 2
    _submit(cloud, "dev-a")
    _submit(cloud, "dev-b")
    cloud.coordinator.tick()
    round_, parts = _round(cloud, round_id)
    assert round_.state is RoundState.CLOSED
    assert parts["dev-c"] is ParticipationStatus.DROPPED
    assert [c.round_id for c in cloud.publisher.cancels("dev-c")] == [round_id]
    result = cloud.coordinator.handle_update(
        "dev-c", device_update(*cloud.publisher.tasks("dev-c")[-1], "dev-c"))
    assert (result.outcome, result.code) == ("rejected", "late")


def test_deadline_aggregates_with_the_minimum_or_fails(cloud: Cloud, clock: FakeClock) -> None:
    add_devices(cloud, "dev-a", "dev-b")
    first = cloud.coordinator.open_round(RoundConfig(deadline_s=60))
    cloud.coordinator.tick()
    _submit(cloud, "dev-a")
    clock.advance(59)
    cloud.coordinator.tick()
    assert _round(cloud, first)[0].state is RoundState.COLLECTING
    clock.advance(2)
    cloud.coordinator.tick()
    round_, parts = _round(cloud, first)
    assert round_.state is RoundState.CLOSED and parts["dev-b"] is ParticipationStatus.DROPPED

    second = cloud.coordinator.open_round(RoundConfig(deadline_s=60, min_updates=2,
                                                      min_participants=2))
    cloud.coordinator.tick()
    _submit(cloud, "dev-a")
    clock.advance(61)
    cloud.coordinator.tick()
    round_, _ = _round(cloud, second)
    assert round_.state is RoundState.FAILED
    assert round_.failure_reason == "1 accepted updates by the deadline, the round needs 2"


def test_late_updates_are_buffered_when_configured(cloud: Cloud, clock: FakeClock) -> None:
    add_devices(cloud, "dev-a", "dev-b")
    round_id = cloud.coordinator.open_round(RoundConfig(deadline_s=60, late_policy="buffer"))
    cloud.coordinator.tick()
    _submit(cloud, "dev-a")
    clock.advance(61)
    cloud.coordinator.tick()
    assert _submit(cloud, "dev-b") == "buffered"
    with cloud.session() as session:
        statuses = {u.device_id: u.status for u in crud.list_updates(session, round_id=round_id)}
        version = crud.latest_adapter_version(session)
        assert version is not None
        lineage = crud.version_lineage(session, version_id=version.id)
    assert statuses == {"dev-a": UpdateStatus.ACCEPTED, "dev-b": UpdateStatus.BUFFERED}
    assert [u.device_id for u, _ in lineage] == ["dev-a"]  # buffered never merged here


def _lineage(cloud: Cloud) -> dict[tuple[int, str], float | None]:
    with cloud.session() as session:
        version = crud.latest_adapter_version(session)
        assert version is not None
        return {(u.round_id, u.device_id): w
                for u, w in crud.version_lineage(session, version_id=version.id)}


@pytest.mark.parametrize(("max_staleness", "carried"), [(2, True), (0, False)])
def test_a_buffered_update_is_merged_once_into_the_next_version(
        cloud: Cloud, clock: FakeClock, max_staleness: int, carried: bool) -> None:
    """dev-b misses round 1's deadline; its update is buffered and merged into round 2's
    version, counted as n·stale_weight^1 (40 · 0.5 = 20 samples), and never again after --
    unless it is more versions old than ``max_staleness`` allows."""
    add_devices(cloud, "dev-a", "dev-b")
    config = RoundConfig(deadline_s=60, late_policy="buffer", stale_weight=0.5,
                         max_staleness=max_staleness)
    first = cloud.coordinator.open_round(config)
    cloud.coordinator.tick()
    _submit(cloud, "dev-a", n_samples=10)
    clock.advance(61)
    cloud.coordinator.tick()  # round 1 merges dev-a alone
    assert _submit(cloud, "dev-b", n_samples=40) == "buffered"
    assert _lineage(cloud) == {(first, "dev-a"): 1.0}

    second = cloud.coordinator.open_round(config)
    cloud.coordinator.tick()
    assert _submit(cloud, "dev-a", n_samples=10) == "accepted"
    assert _submit(cloud, "dev-b", n_samples=10) == "accepted"
    cloud.coordinator.tick()
    assert _round(cloud, second)[0].state is RoundState.CLOSED
    if carried:
        assert _lineage(cloud) == {(second, "dev-a"): 0.25, (second, "dev-b"): 0.25,
                                   (first, "dev-b"): 0.5}
    else:
        assert _lineage(cloud) == {(second, "dev-a"): 0.5, (second, "dev-b"): 0.5}
    with cloud.session() as session:
        (count,) = crud.list_metrics(session, round_id=second, name="updates_carried_over")
    assert count.value == (1 if carried else 0)

    third = cloud.coordinator.open_round(config)
    cloud.coordinator.tick()
    _submit(cloud, "dev-a")
    _submit(cloud, "dev-b")
    cloud.coordinator.tick()
    assert set(_lineage(cloud)) == {(third, "dev-a"), (third, "dev-b")}


def test_a_buffered_update_without_a_fisher_sits_out_a_fisher_merge(cloud: Cloud,
                                                                   clock: FakeClock) -> None:
    add_devices(cloud, "dev-a", "dev-b")
    fedavg = RoundConfig(strategy="fedavg", deadline_s=60, late_policy="buffer")
    cloud.coordinator.open_round(fedavg)
    cloud.coordinator.tick()
    _submit(cloud, "dev-a", with_fisher=False)
    clock.advance(61)
    cloud.coordinator.tick()
    assert _submit(cloud, "dev-b", with_fisher=False) == "buffered"
    second = cloud.coordinator.open_round(RoundConfig(strategy="fisher-norm"))
    cloud.coordinator.tick()
    _submit(cloud, "dev-a")
    _submit(cloud, "dev-b")
    cloud.coordinator.tick()
    assert set(_lineage(cloud)) == {(second, "dev-a"), (second, "dev-b")}


def test_an_update_is_ingested_exactly_once(cloud: Cloud) -> None:
    add_devices(cloud, "dev-a", "dev-b")
    round_id = cloud.coordinator.open_round(TWO)
    cloud.coordinator.tick()
    payload = device_update(*cloud.publisher.tasks("dev-a")[-1], "dev-a", update_id="upd-once-1")
    assert cloud.coordinator.handle_update("dev-a", payload).outcome == "accepted"
    assert cloud.coordinator.handle_update("dev-a", payload).outcome == "duplicate"
    # Someone else's id is another update (identity = sender, id), judged on its own: here
    # dev-b replays dev-a's bytes, whose task is dev-a's.
    again = cloud.coordinator.handle_update("dev-b", payload)
    assert (again.outcome, again.code) == ("rejected", "task_mismatch")
    second = device_update(*cloud.publisher.tasks("dev-a")[-1], "dev-a", update_id="upd-once-2")
    assert cloud.coordinator.handle_update("dev-a", second).code == "duplicate"
    with cloud.session() as session:
        rows = crud.list_updates(session, round_id=round_id)
        redelivered = crud.list_audit_events(session, action="update.redelivered")
    assert [(r.device_id, r.update_id, r.status) for r in rows] == [
        ("dev-a", "upd-once-1", UpdateStatus.ACCEPTED),
        ("dev-b", "upd-once-1", UpdateStatus.REJECTED),
        ("dev-a", "upd-once-2", UpdateStatus.REJECTED)]
    assert rows[2].rejection_code == "duplicate"
    assert [e.details["update_id"] for e in redelivered] == ["upd-once-1"]


def test_the_gate_asks_about_the_sender_in_this_round(cloud: Cloud) -> None:
    """Registered but not selected: not_participant. Rejected once: may send again. Accepted
    once: a second update is a duplicate. (The context is two lookups for the sender.)"""
    add_devices(cloud, *(f"dev-{i}" for i in range(4)))
    round_id = cloud.coordinator.open_round(RoundConfig(fraction=0.5, min_participants=2,
                                                        max_delta_norm=1.0, seed=1))
    cloud.coordinator.tick()
    selected = sorted(_round(cloud, round_id)[1])
    outsider = next(d for d in (f"dev-{i}" for i in range(4)) if d not in selected)
    task, parts = cloud.publisher.tasks(selected[0])[-1]
    refused = cloud.coordinator.handle_update(outsider, device_update(task, parts, outsider))
    assert refused.code == "not_participant"
    device = selected[1]
    assert _submit(cloud, device, scale=5.0) == "rejected"  # over the norm bound
    assert _submit(cloud, device, scale=0.01) == "accepted"  # the rejection did not count
    again = cloud.coordinator.handle_update(device, device_update(
        *cloud.publisher.tasks(device)[-1], device))
    assert again.code == "duplicate"


def test_bad_updates_are_recorded_with_their_reasons(cloud: Cloud) -> None:
    add_devices(cloud, "dev-a", "dev-b", "dev-c")
    round_id = cloud.coordinator.open_round(RoundConfig(deadline_s=60, max_delta_norm=1.0))
    cloud.coordinator.tick()
    stale = cloud.coordinator.handle_update(
        "dev-a", device_update(*cloud.publisher.tasks("dev-a")[-1], "dev-a", global_version=7))
    huge = cloud.coordinator.handle_update(
        "dev-b", device_update(*cloud.publisher.tasks("dev-b")[-1], "dev-b", scale=5.0))
    junk = cloud.coordinator.handle_update("dev-c", b"not an envelope")
    assert (stale.code, huge.code, junk.code) == ("stale", "norm_bound", "malformed")
    _, parts = _round(cloud, round_id)
    assert parts == {"dev-a": ParticipationStatus.REJECTED, "dev-b": ParticipationStatus.REJECTED,
                     "dev-c": ParticipationStatus.NOTIFIED}
    with cloud.session() as session:
        rows = {u.device_id: (u.rejection_code, u.rejection_reason)
                for u in crud.list_updates(session, round_id=round_id)}
    assert rows["dev-a"][0] == "stale" and "global version 7" in (rows["dev-a"][1] or "")
    assert rows["dev-b"][0] == "norm_bound"


def test_a_restarted_coordinator_resumes_mid_round(migrated_url: str, tmp_path: Path,
                                                   clock: FakeClock) -> None:
    before = make_cloud(migrated_url, tmp_path, clock)
    add_devices(before, "dev-a", "dev-b")
    round_id = before.coordinator.open_round(TWO)
    before.coordinator.tick()
    _submit(before, "dev-a")
    before.engine.dispose()  # the coordinator process dies here

    after = make_cloud(migrated_url, tmp_path, clock)  # same database and blob folder
    after.coordinator.resume()
    assert after.publisher.tasks("dev-a") == []  # it submitted already
    (task, _), = after.publisher.tasks("dev-b")
    assert task.round_id == round_id
    assert after.publisher.announcements()[-1].round_id == round_id
    _submit(after, "dev-b")
    after.coordinator.tick()
    round_, _ = _round(after, round_id)
    assert round_.state is RoundState.CLOSED
    with after.session() as session:
        version = crud.latest_adapter_version(session)
        assert version is not None
        assert len(crud.version_lineage(session, version_id=version.id)) == 2
    after.engine.dispose()


def test_an_operator_stop_cancels_outstanding_tasks(cloud: Cloud) -> None:
    add_devices(cloud, "dev-a", "dev-b")
    round_id = cloud.coordinator.open_round(TWO)
    cloud.coordinator.tick()
    _submit(cloud, "dev-a")
    with cloud.session() as session:
        stop_round(session, round_id=round_id, actor="operator:alice")
    cloud.coordinator.tick()
    _, parts = _round(cloud, round_id)
    assert parts == {"dev-a": ParticipationStatus.SUBMITTED, "dev-b": ParticipationStatus.DROPPED}
    assert len(cloud.publisher.cancels("dev-b")) == 1 and not cloud.publisher.cancels("dev-a")
    with cloud.session() as session, pytest.raises(InvalidTransitionError):
        stop_round(session, round_id=round_id, actor="operator:alice")


def test_the_schedule_runs_rounds_until_its_target(cloud: Cloud) -> None:
    add_devices(cloud, "dev-a")
    with cloud.session() as session:
        save_defaults(session, RoundConfig(deadline_s=30))
        save_schedule(session, Schedule(enabled=True, target_rounds=2))
    for _ in range(2):
        cloud.coordinator.tick()
        _submit(cloud, "dev-a")
    cloud.coordinator.tick()
    with cloud.session() as session:
        rounds = crud.list_rounds(session)
        schedule = crud.get_setting(session, key="schedule")
    assert [r.state for r in rounds] == [RoundState.CLOSED, RoundState.CLOSED]
    assert schedule is not None and schedule["enabled"] is False
    assert schedule["stopped_reason"] == "reached the target of 2 rounds"


def test_the_schedule_stops_at_the_target_accuracy(cloud: Cloud) -> None:
    add_devices(cloud, "dev-a")
    with cloud.session() as session:
        save_schedule(session, Schedule(enabled=True, target_accuracy=0.5))
    cloud.coordinator.tick()
    _submit(cloud, "dev-a")
    cloud.coordinator.tick()  # accuracy 0.6 >= 0.5
    with cloud.session() as session:
        assert crud.count_rounds(session) == 1
        assert crud.get_setting(session, key="schedule")["enabled"] is False  # type: ignore[index]


def test_presence_and_sampling_only_pick_online_capable_devices(cloud: Cloud,
                                                                clock: FakeClock) -> None:
    add_devices(cloud, "dev-a", "dev-b", "dev-c")
    cloud.coordinator.handle_presence("dev-b", presence("dev-b", state="offline"))
    assert cloud.coordinator.handle_presence("dev-c", presence("dev-c", memory_mb=512))
    assert not cloud.coordinator.handle_presence("dev-a", presence("dev-b"))  # not its topic
    assert not cloud.coordinator.handle_presence("dev-a", b"{broken")
    with cloud.session() as session:
        device = crud.require_device(session, device_id="dev-b")
        assert device.online is False and device.last_seen_at == clock.now
    round_id = cloud.coordinator.open_round(RoundConfig(required_capabilities={"memory_mb": 256}))
    assert set(_round(cloud, round_id)[1]) == {"dev-c"}
    with pytest.raises(NotEnoughDevicesError):
        cloud.coordinator.open_round(RoundConfig(min_participants=3))


def test_sampling_is_seeded_and_sized_by_fraction(cloud: Cloud) -> None:
    add_devices(cloud, *(f"dev-{i}" for i in range(10)))
    config = RoundConfig(fraction=0.3, seed=4)
    chosen = [set(_round(cloud, cloud.coordinator.open_round(config))[1]) for _ in range(3)]
    assert all(len(c) == 3 for c in chosen)
    assert len({frozenset(c) for c in chosen}) > 1  # the round id feeds the seed


def test_no_round_without_a_global_version(migrated_url: str) -> None:
    from cloud.coordinator import open_round
    from cloud.db.session import make_engine, make_session_factory

    engine = make_engine(migrated_url)
    with make_session_factory(engine)() as session, pytest.raises(NoGlobalVersionError):
        open_round(session, config=TWO, actor="test")
    engine.dispose()


def test_server_momentum_carries_the_last_versions_step(cloud: Cloud) -> None:
    # FedAvg with server_lr 1 and momentum 0.5: round 1 steps by Δ1 = 0.1 everywhere, round 2 by
    # Δ2 + 0.5 x (θ_1 − θ_0) = 0.2 + 0.05, the previous step read back from the stored versions.
    add_devices(cloud, "dev-a")
    config = RoundConfig(strategy="fedavg", strategy_options={"server_momentum": 0.5},
                         deadline_s=60)
    steps = []
    for scale in (0.1, 0.2):
        round_id = cloud.coordinator.open_round(config)
        cloud.coordinator.tick()
        assert _submit(cloud, "dev-a", scale=scale, n_samples=10) == "accepted"
        cloud.coordinator.tick()
        assert _round(cloud, round_id)[0].state is RoundState.CLOSED
        steps.append(_last_step(cloud))
    for key in steps[0]:
        torch.testing.assert_close(steps[0][key], torch.full_like(steps[0][key], 0.1))
        torch.testing.assert_close(steps[1][key], torch.full_like(steps[1][key], 0.25))


def test_clip_to_median_norm_bounds_a_poisoned_delta(cloud: Cloud) -> None:
    # FedAvg, equal weights: deltas 0.1, 0.1 and 10 everywhere; the median norm is dev-a's, so
    # with c = 2 the outlier counts as 0.2 everywhere: mean (0.1 + 0.1 + 0.2) / 3.
    add_devices(cloud, "dev-a", "dev-b", "dev-c")
    config = RoundConfig(strategy="fedavg", clip_to_median_norm=2.0, deadline_s=60,
                         min_participants=3, max_delta_norm=None)
    round_id = cloud.coordinator.open_round(config)
    cloud.coordinator.tick()
    for device_id, scale in (("dev-a", 0.1), ("dev-b", 0.1), ("dev-c", 10.0)):
        assert _submit(cloud, device_id, scale=scale, n_samples=10) == "accepted"
    cloud.coordinator.tick()
    assert _round(cloud, round_id)[0].state is RoundState.CLOSED
    for step in _last_step(cloud).values():
        torch.testing.assert_close(step, torch.full_like(step, 0.4 / 3))


@pytest.mark.parametrize("strategy", ["fisher-norm", "fedavg", "fedmedian"])
def test_aggregation_streams_one_decoded_update_at_a_time(
        cloud: Cloud, monkeypatch: pytest.MonkeyPatch, strategy: str) -> None:
    # Every decoded delta is watched through a weak reference: when an update is decoded, none
    # decoded before it is still alive (the round's list is gone), except for the median, which
    # keeps them. The version is the list merge's, bit for bit.
    watched: list[weakref.ref[torch.Tensor]] = []
    fishers: list[bool] = []  # whether each decoded update came with its Fisher decoded
    most_alive = 0
    load_update = aggregation.load_update

    def watching(*args: object, **kwargs: object) -> object:
        nonlocal most_alive
        most_alive = max(most_alive, sum(ref() is not None for ref in watched))
        update = load_update(*args, **kwargs)  # type: ignore[arg-type]
        watched.extend(weakref.ref(value) for value in update.delta.values())
        fishers.append(update.fisher is not None)
        return update

    monkeypatch.setattr(aggregation, "load_update", watching)
    devices = [f"dev-{i}" for i in range(5)]
    add_devices(cloud, *devices)
    config = RoundConfig(strategy=strategy, clip_to_median_norm=2.0, deadline_s=60,
                         min_participants=5, max_delta_norm=None)
    round_id = cloud.coordinator.open_round(config)
    cloud.coordinator.tick()
    gen = torch.Generator().manual_seed(0)
    for index, device_id in enumerate(devices):
        task, parts = cloud.publisher.tasks(device_id)[-1]
        global_ = protocol.decode_global(parts)
        scale = 10.0 if index == 3 else 0.01  # one delta far beyond twice the median norm
        delta = {k: scale * torch.randn(v.shape, generator=gen) for k, v in global_.items()}
        fisher = {k: torch.rand(v.shape, generator=gen) for k, v in global_.items()}
        payload = device_update(task, parts, device_id, n_samples=10 + 7 * index, delta=delta,
                                fisher=fisher)
        assert cloud.coordinator.handle_update(device_id, payload).outcome == "accepted"
    cloud.coordinator.tick()
    assert _round(cloud, round_id)[0].state is RoundState.CLOSED
    assert len(watched) == 5 * len(global_)
    # The median keeps the four before the last (the clipped one as a scaled copy).
    assert most_alive == (3 * len(global_) if strategy == "fedmedian" else 0)
    # A Fisher every update carries is decoded only for the strategy that reads it.
    assert fishers == [strategy == "fisher-norm"] * 5

    with cloud.session() as session:
        round_ = crud.require_round(session, round_id=round_id)
        assert round_.base_version is not None
        base = aggregation.load_state(cloud.blobs, round_.base_version)
        rows = crud.list_updates(session, round_id=round_id, status=UpdateStatus.ACCEPTED)
        listed = [load_update(cloud.blobs, row, base) for row in rows]
        version = crud.latest_adapter_version(session)
        assert version is not None and version.round_id == round_id
        merged = aggregation.load_state(cloud.blobs, version)
    clipped = clip_to_median_norm([u.delta for u in listed], 2.0)
    listed = [dataclasses.replace(u, delta=d) for u, d in zip(listed, clipped, strict=True)]
    expected = config.make_strategy().aggregate(base, listed)
    assert expected is not None
    assert all(torch.equal(merged[key], expected[key]) for key in base)
