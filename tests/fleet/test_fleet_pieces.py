"""The fleet's orchestration pieces without processes or a broker: options, the device-log
watcher, provisioning, fault triggers and the fault plan's one-at-a-time rule."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from cloud.db import crud, migrate
from cloud.db.models import RoundState
from cloud.db.session import make_engine, make_session_factory, session_scope, sqlite_url
from cloud.provisioning import DeviceNetwork
from cloud.registry import ServiceAccount
from cloud.rounds import RoundConfig
from edge.local_data import DataSpec
from fednano.fleet import provision as prov
from fednano.fleet.faults import (
    BrokerKill,
    CloudRestart,
    FaultPlan,
    KillDevice,
    Note,
    Sent,
    SlowDevice,
    default_round,
)
from fednano.fleet.observe import DeviceLogs, RoundView, Snapshot
from fednano.fleet.options import FAULTS, FleetOptions, parse_faults
from fednano.fleet.payloads import redeliveries, rogue_updates
from fednano.fleet.report import (
    Check,
    FleetReport,
    RoundRow,
    check_acknowledged,
    check_merged,
    check_rounds,
    check_verdicts,
    read_rejections,
    read_rounds,
    report_markdown,
)
from tests.cloud.roundkit import (
    FakeClock,
    add_devices,
    constant_evaluator,
    device_update,
    make_cloud,
)


def test_faults_parse_in_a_fixed_order() -> None:
    assert parse_faults("nan, kill-device") == ("kill-device", "nan")
    assert parse_faults("all") == FAULTS
    assert parse_faults("") == ()
    with pytest.raises(ValueError, match="unknown faults"):
        parse_faults("nan,meteor")
    assert FleetOptions(faults=("nan",)).rogue and not FleetOptions(faults=("duplicate",)).rogue
    with pytest.raises(ValueError, match="unknown strategy"):
        FleetOptions(strategy="magic")
    with pytest.raises(ValueError, match="fisher_samples must be at least 1"):
        FleetOptions(strategy="fisher-norm", fisher_samples=0)
    assert FleetOptions(strategy="fednano", steps=100, fisher_samples=0).fisher_samples == 0
    assert FleetOptions(strategy="fedavg", fisher_samples=0).fisher_samples == 0


def test_default_rounds_spread_the_faults() -> None:
    assert [default_round(f, 3) for f in ("kill-device", "slow-device", "broker-restart")] == [
        1, 2, 3]
    assert default_round("broker-restart", 1) == 1


def test_device_logs_are_read_incrementally(tmp_path: Path) -> None:
    log = tmp_path / "dev-00.log"
    logs = DeviceLogs()
    logs.follow("dev-00", log)
    logs.poll()  # no file yet
    log.write_text("x INFO edge.agent: dev-00: round 2: training (task t, 64 samples)\n"
                   "x INFO edge.agent: dev-00: round 2: update u-abc delivered\n"
                   "x INFO edge.agent: dev-00: round 3: update u-half")
    logs.poll()
    assert logs.training_since("dev-00", 2) is not None
    assert logs.training_since("dev-00", 3) is None
    assert logs.delivered["dev-00"] == {"u-abc"}
    with log.open("a") as handle:  # the half line is completed
        handle.write("def delivered\n")
    logs.poll()
    assert logs.delivered["dev-00"] == {"u-abc", "u-halfdef"}


def test_data_specs_are_disjoint_shards_of_one_partition() -> None:
    specs = [DataSpec.parse(prov.data_spec(i, 3, alpha=0.5, seed=1, max_samples=20))
             for i in range(3)]
    assert [(s.index, s.of, s.alpha, s.max_samples) for s in specs] == [
        (i, 3, 0.5, 20) for i in range(3)]
    assert prov.device_ids(3) == ["dev-00", "dev-01", "dev-02"]
    assert prov.device_ids(101)[-1] == "dev-100"


def test_provisioning_writes_what_a_device_boots_from(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "cloud.db")
    migrate.upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    try:
        prov.require_empty(sessions)
        network = DeviceNetwork(broker_url="mqtt://127.0.0.1:1999",
                                bundle_url="http://127.0.0.1:8000/api/v1/bundles/latest")
        devices = prov.provision(sessions, ["dev-00", "rogue"], folder=tmp_path / "devices",
                                 network=network)
        config = yaml.safe_load(devices[0].config_path.read_text())
        assert config["device_id"] == "dev-00" and config["profile"] == "sim-cpu"
        assert (devices[0].folder / "password").read_text().strip() == devices[0].secret
        files = prov.write_broker_files(sessions, tmp_path / "broker",
                                        ServiceAccount("fednano-cloud", "pw"))
        users = [c["username"] for c in json.loads(files.dynsec_file.read_text())["clients"]]
        assert users == ["fednano-cloud", "fednano-health", "dev-00", "rogue"]
        with pytest.raises(ValueError, match="empty database"):
            prov.require_empty(sessions)
        with session_scope(sessions) as session:
            assert crud.count_devices(session) == 2
    finally:
        engine.dispose()


# ------------------------------------------------------------------------------ fault triggers


class FakeProcess:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def kill(self) -> None:
        self.calls.append("kill")

    def start(self) -> None:
        self.calls.append("start")

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


class FakeFleet:
    """Just enough of the runner for the faults."""

    def __init__(self) -> None:
        self.snapshot = Snapshot()
        self.logs = DeviceLogs()
        self.processes = {d: FakeProcess() for d in ("dev-00", "dev-01")}
        self.cloud: list[str] = []
        self.ready = False
        self.notes: list[Note] = []
        self.broker_process: FakeProcess | None = None

    @property
    def broker(self) -> Any:
        if self.broker_process is None:
            raise AssertionError("no broker here")
        return self.broker_process

    def device(self, device_id: str) -> Any:
        return self.processes[device_id]

    def kill_cloud(self) -> None:
        self.cloud.append("kill")

    def start_cloud(self) -> None:
        self.cloud.append("start")

    def cloud_ready(self) -> bool:
        return self.ready

    def note(self, fault: str, round_id: int | None, message: str) -> None:
        self.notes.append(Note(0.0, fault, round_id, message))

    def collecting(self, round_id: int, statuses: dict[str, str], deadline_s: float = 60) -> None:
        deadline = datetime.now(timezone.utc) + timedelta(seconds=deadline_s)
        view = RoundView(round_id, RoundState.COLLECTING, None, deadline, None, statuses)
        self.snapshot = Snapshot(rounds={round_id: view})

    def training(self, device_id: str, round_id: int, seconds_ago: float) -> None:
        self.logs._training[(device_id, round_id)] = time.monotonic() - seconds_ago


def test_a_device_is_killed_only_while_it_trains_and_restarted() -> None:
    fleet = FakeFleet()
    kill = KillDevice(1, ["dev-01", "dev-00"])
    now = time.monotonic()
    fleet.collecting(1, {"dev-00": "notified", "dev-01": "submitted"})
    fleet.training("dev-01", 1, 10)  # already submitted: not a target
    fleet.training("dev-00", 1, 1)  # not long enough yet
    kill.poll(fleet, now)
    assert kill.fired_round is None
    fleet.training("dev-00", 1, 10)
    fleet.logs._training[("dev-00", 1)] = now - 10
    kill.poll(fleet, now)
    assert fleet.processes["dev-00"].calls == ["kill"] and kill.active
    kill.poll(fleet, now + 1)  # still down
    kill.poll(fleet, now + 10)  # restarted
    kill.poll(fleet, now + 10)
    assert fleet.processes["dev-00"].calls == ["kill", "start"] and kill.done


def test_a_broker_kill_is_a_sigkill_then_a_start_on_the_same_port() -> None:
    fleet = FakeFleet()
    broker = FakeProcess()
    fleet.broker_process = broker
    kill = BrokerKill(1, ["dev-00"])
    fleet.collecting(1, {"dev-00": "notified"})
    fleet.training("dev-00", 1, 10)
    now = time.monotonic()
    kill.poll(fleet, now)
    assert broker.calls == ["kill"] and "SIGKILL" in fleet.notes[-1].message
    kill.poll(fleet, now + 10)
    assert broker.calls == ["kill", "start"]
    kill.poll(fleet, now + 10)
    assert kill.done


def test_a_slow_device_stalls_past_the_deadline() -> None:
    fleet = FakeFleet()
    slow = SlowDevice(1, ["dev-00"])
    fleet.collecting(1, {"dev-00": "notified"}, deadline_s=30)
    fleet.training("dev-00", 1, 5)
    now = time.monotonic()
    slow.poll(fleet, now)
    assert fleet.processes["dev-00"].calls == ["pause"]
    slow.poll(fleet, now + 20)
    assert fleet.processes["dev-00"].calls == ["pause"]
    slow.poll(fleet, now + 40)
    assert fleet.processes["dev-00"].calls == ["pause", "resume"]


def test_disruptive_faults_fire_one_at_a_time_and_the_cloud_must_be_ready() -> None:
    fleet = FakeFleet()
    restart, kill = CloudRestart(1, ["dev-00"]), KillDevice(1, ["dev-00"])
    plan = FaultPlan([restart, kill])
    fleet.collecting(1, {"dev-00": "notified"})
    fleet.training("dev-00", 1, 10)
    now = time.monotonic()
    plan.poll(fleet, now)
    assert fleet.cloud == ["kill"] and kill.fired_round is None  # one at a time
    plan.poll(fleet, now + 5)  # started again, not ready yet
    plan.poll(fleet, now + 6)
    assert fleet.cloud == ["kill", "start"] and restart.active and kill.fired_round is None
    fleet.ready = True
    plan.poll(fleet, now + 7)
    assert restart.done and fleet.processes["dev-00"].calls == []
    plan.poll(fleet, now + 8)  # calm for a while first
    assert fleet.processes["dev-00"].calls == []
    plan.poll(fleet, now + 13)
    assert fleet.processes["dev-00"].calls == ["kill"]
    plan.give_up_pending("the run ended")
    assert not kill.skipped  # it had fired


def test_pending_faults_are_reported_as_skipped() -> None:
    plan = FaultPlan([KillDevice(5, ["dev-00"])])
    plan.give_up_pending("the rounds ended before it could fire")
    assert plan.actions[0].done and plan.actions[0].skipped


def test_report_checks_and_markdown() -> None:
    rows = [RoundRow(1, "closed", 3, 3, 0, 0, 0.61, 1.2, 1000, 2000, 10, 20.0),
            RoundRow(2, "failed", 3, 0, 3, 0, None, None, 0, 0, 0, 5.0, "0 accepted updates")]
    check = check_rounds(rows, 2)
    assert not check.ok and "failed: 2 (0 accepted updates)" in check.detail
    report = FleetReport(options=FleetOptions().model_dump(mode="json"), base_version="b",
                         bundle_version="v", database="sqlite", api_url="http://x",
                         rounds=rows, checks={"rounds_closed": check, "x": Check(True, "fine")})
    assert report.final_accuracy == 0.61 and not report.ok
    text = report_markdown(report)
    assert "| 1 | closed | 3/3 | 0 | 0 | 0.610 |" in text and "FAILED rounds_closed" in text


def test_the_report_reads_rounds_verdicts_and_checks_from_the_database(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "cloud.db")
    migrate.upgrade(url)
    cloud = make_cloud(url, tmp_path, FakeClock(), evaluator=constant_evaluator(0.6))
    add_devices(cloud, "dev-a", "rogue")
    round_id = cloud.coordinator.open_round(RoundConfig(deadline_s=60))
    cloud.coordinator.tick()
    honest = device_update(*cloud.publisher.tasks("dev-a")[-1], "dev-a", update_id="upd-dev-a-1")
    assert cloud.coordinator.handle_update("dev-a", honest).outcome == "accepted"
    task, parts = cloud.publisher.tasks("rogue")[-1]
    bad = rogue_updates(task, parts, {"nan", "truncated"}, older_version=None)
    bad += redeliveries(honest, prefix="dev-a")
    sent = [Sent(item, round_id, "dev-a" if item.fault == "duplicate" else "rogue", True)
            for item in bad]
    for item in sent:
        cloud.coordinator.handle_update(item.device_id, item.bad.payload)
    cloud.coordinator.tick()  # nobody left to answer: merge dev-a's update, evaluate, close

    (row,) = read_rounds(cloud.sessions)
    assert (row.round_id, row.state, row.selected, row.participants, row.rejected,
            row.accuracy) == (round_id, "closed", 2, 1, 2, 0.6)
    rejected, refused, again = read_rejections(cloud.sessions)
    assert [(r.device_id, r.code) for r in rejected] == [("rogue", "non_finite"),
                                                         ("dev-a", "duplicate")]
    assert [(r.device_id, r.code) for r in refused] == [("rogue", "malformed")]
    assert again == {"dev-a": 2}
    assert check_merged(cloud.sessions).ok
    assert check_verdicts(cloud.sessions, sent).ok
    assert check_acknowledged(cloud.sessions, {"dev-a": ["upd-dev-a-1"]}, sent).ok
    lost = {"dev-a": ["upd-dev-a-1", "upd-dev-a-lost"]}
    missing = check_acknowledged(cloud.sessions, lost, sent)
    assert not missing.ok and "upd-dev-a-lost" in missing.detail
    cloud.engine.dispose()
