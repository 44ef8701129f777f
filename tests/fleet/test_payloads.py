"""The rogue's payloads reach the checks they are built for, through the real coordinator."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cloud.db import crud
from cloud.db.session import sqlite_url
from cloud.rounds import RoundConfig
from fednano.fleet.payloads import (
    corrupted_frame,
    nan_frame,
    redeliveries,
    rogue_updates,
)
from shared import codec
from shared.messages import MessageError, UpdateMessage, unpack
from tests.cloud.roundkit import Cloud, FakeClock, add_devices, device_update, make_cloud

ALL_ROGUE = {"corrupt", "truncated", "oversized", "nan", "stale-base"}


@pytest.fixture
def cloud(tmp_path: Path) -> Cloud:
    from cloud.db import migrate

    url = sqlite_url(tmp_path / "cloud.db")
    migrate.upgrade(url)
    made = make_cloud(url, tmp_path, FakeClock())
    add_devices(made, "dev-a", "rogue")
    return made


def test_nan_frame_has_a_valid_checksum_and_fails_only_the_finite_check() -> None:
    state = {"w": torch.ones(2, 3)}
    with pytest.raises(codec.NonFiniteValues):
        codec.decode(nan_frame(state))
    with pytest.raises(codec.ChecksumMismatch):
        codec.decode(corrupted_frame(codec.encode(state, codec.Scheme())))


def test_each_rogue_payload_gets_its_rejection(cloud: Cloud) -> None:
    cloud.coordinator.open_round(RoundConfig(deadline_s=60))
    cloud.coordinator.tick()
    task, parts = cloud.publisher.tasks("rogue")[-1]
    bad = rogue_updates(task, parts, ALL_ROGUE, older_version=None)
    assert [b.expected for b in bad] == ["codec", "malformed", "too_large", "non_finite",
                                         "base_mismatch"]
    for item in bad:
        result = cloud.coordinator.handle_update("rogue", item.payload)
        assert (result.outcome, result.code) == ("rejected", item.expected), item.label
    with cloud.session() as session:
        rows = crud.list_updates(session, round_id=task.round_id)
        refused = crud.list_audit_events(session, action="update.refused")
    assert sorted(r.rejection_code for r in rows) == sorted(
        b.expected for b in bad if b.expected != "malformed")
    assert all(r.rejection_reason for r in rows)
    assert [e.details["code"] for e in refused] == ["malformed"]


def test_stale_needs_an_older_version(cloud: Cloud) -> None:
    cloud.coordinator.open_round(RoundConfig(deadline_s=60))
    cloud.coordinator.tick()
    task, parts = cloud.publisher.tasks("rogue")[-1]
    bad = rogue_updates(task, parts, {"stale-base"}, older_version=task.global_version + 5)
    assert [b.expected for b in bad] == ["base_mismatch", "stale"]
    result = cloud.coordinator.handle_update("rogue", bad[1].payload)
    assert result.code == "stale"


def test_redeliveries_are_stored_once_then_a_second_update_is_a_duplicate(cloud: Cloud) -> None:
    cloud.coordinator.open_round(RoundConfig(deadline_s=60))
    cloud.coordinator.tick()
    honest = device_update(*cloud.publisher.tasks("dev-a")[-1], "dev-a")
    assert cloud.coordinator.handle_update("dev-a", honest).outcome == "accepted"
    items = redeliveries(honest, prefix="dev-a")
    outcomes = [cloud.coordinator.handle_update("dev-a", i.payload) for i in items]
    assert [(o.outcome, o.code) for o in outcomes] == [
        ("duplicate", None), ("duplicate", None), ("rejected", "duplicate")]
    assert [i.expected for i in items] == ["ignored", "ignored", "duplicate"]
    with cloud.session() as session:
        assert len(crud.list_audit_events(session, action="update.redelivered")) == 2


def test_truncated_payload_is_not_an_envelope(cloud: Cloud) -> None:
    cloud.coordinator.open_round(RoundConfig(deadline_s=60))
    cloud.coordinator.tick()
    task, parts = cloud.publisher.tasks("rogue")[-1]
    (item,) = rogue_updates(task, parts, {"truncated"}, older_version=None)
    with pytest.raises(MessageError):
        unpack(item.payload, UpdateMessage)
