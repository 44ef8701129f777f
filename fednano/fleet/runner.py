"""The fleet runner: the real system on one machine, driven round by round, faults included.

``FleetRunner.run`` does what an operator and a fleet of devices would do::

    base (built if missing) + NanoEdge bundle (exported if missing)
    -> database (SQLite in the run folder, or an empty PostgreSQL database), migrated
    -> devices provisioned in the registry (device.yaml + password each), round defaults and
       a schedule of R rounds, an operator token
    -> private Mosquitto (free loopback port; with --network tls also TLS listeners on this
       machine's address, for passwords and for X.509 devices) with the registry's accounts
    -> the cloud: ``fednano cloud serve`` (API + coordinator + LLM worker), until /ready
    -> N ``fednano-edge run`` processes, each with its own DataSpec shard
    -> rounds run by the cloud's schedule; the runner watches the database and the device
       logs, shows progress, injects the faults (``fednano.fleet.faults``)
    -> report from the database (+ the REST API cross-checked), then everything stopped

Every child runs in its own process group and is stopped in ``finally`` (SIGTERM, then
SIGKILL): Ctrl-C, an error or a timeout leave nothing running.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from cloud.db.session import make_engine, make_session_factory, session_scope, sqlite_url
from cloud.pki import Issuer
from cloud.provisioning import DeviceNetwork
from cloud.rounds import RoundConfig, Schedule, save_defaults, save_schedule
from fednano.broker import BrokerTls, BrokerUnavailable, Mosquitto, ensure_mosquitto, public_address
from fednano.fleet import provision as prov
from fednano.fleet import report as rep
from fednano.fleet.faults import (
    BrokerKill,
    BrokerRestart,
    CloudRestart,
    Duplicate,
    FaultAction,
    FaultPlan,
    KillDevice,
    Note,
    Rogue,
    SlowDevice,
    default_round,
    mqtt_client,
)
from fednano.fleet.observe import DeviceLogs, Snapshot, read_snapshot
from fednano.fleet.options import FleetOptions
from fednano.processes import ManagedProcess, ProcessSet
from shared.messages import TaskHParams

POLL_S = 0.5
CLOUD_READY_TIMEOUT_S = 600.0
MAX_UNEXPECTED_RESTARTS = 3


class FleetError(RuntimeError):
    """The run could not go on (the message says why and where the logs are)."""


@dataclass(frozen=True)
class FleetPaths:
    out: Path  # the run's folder: database, blobs, device folders, logs, report
    home: Path  # FEDNANO_HOME: the frozen base
    bundles: Path  # exported NanoEdge bundles

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def data(self) -> Path:
        return self.out / "cloud"


# ------------------------------------------------------------------------------ preparation


def ensure_base(home: Path, logs: Path, console: Console) -> str:
    """The current base's version under ``home``, building it first (a few minutes) if none."""
    from cloud.base.manifest import BaseNotBuiltError, read_manifest

    try:
        return read_manifest(home, None).version
    except BaseNotBuiltError:
        console.print(f"no base under {home}: building it once from the packaged weights "
                      f"(a few minutes; log {logs / 'base-build.log'})", highlight=False)
    _run_step([sys.executable, "-m", "fednano.cli", "base", "build", "--home", str(home)],
              logs / "base-build.log", "fednano base build", console)
    return read_manifest(home, None).version


def ensure_bundle(home: Path, bundles: Path, base_version: str, logs: Path,
                  console: Console) -> Path:
    """The newest int8 bundle of ``base_version`` under ``bundles``; exported if there is none."""
    found = _find_bundle(bundles, base_version)
    if found is not None:
        return found
    console.print(f"exporting the NanoEdge bundle of base {base_version} into {bundles} "
                  f"(about a minute; log {logs / 'bundle-export.log'})", highlight=False)
    _run_step([sys.executable, "-m", "fednano.cli", "bundle", "export", "--out", str(bundles),
               "--home", str(home)], logs / "bundle-export.log", "fednano bundle export", console)
    found = _find_bundle(bundles, base_version)
    if found is None:
        raise FleetError(f"bundle export wrote no bundle of base {base_version} into {bundles}")
    return found


def _find_bundle(bundles: Path, base_version: str) -> Path | None:
    from cloud.bundle_catalog import list_bundles

    for entry in list_bundles(bundles):
        if entry.manifest.base_version == base_version and entry.manifest.precision == "int8":
            return entry.folder
    return None


def _run_step(argv: list[str], log_path: Path, what: str, console: Console | None = None,
              every_s: float = 20.0) -> None:
    """Run one preparation command into ``log_path``; on ``console`` a line every ``every_s``
    seconds with the elapsed time and the log's latest line (a progress bar's state)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("wb") as log:
        child = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=_child_env({}))
        try:
            while True:
                try:
                    returncode = child.wait(timeout=every_s)
                    break
                except subprocess.TimeoutExpired:
                    if console is not None:
                        console.print(f"  {what}: {time.monotonic() - started:.0f} s, "
                                      f"{_latest_line(log_path)}", highlight=False,
                                      markup=False)
        finally:
            if child.poll() is None:  # interrupted: the step goes with us
                child.kill()
                child.wait()
    if returncode != 0:
        tail = log_path.read_text(errors="replace")[-2000:]
        raise FleetError(f"{what} failed (exit {returncode}); log {log_path}:\n{tail}")


def _latest_line(path: Path, limit: int = 100) -> str:
    """The last non-empty line of ``path``, where a progress bar's ``\\r`` also ends one."""
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - 4096))
        tail = handle.read().decode("utf-8", errors="replace")
    lines = [line.strip() for line in tail.replace("\r", "\n").split("\n") if line.strip()]
    return lines[-1][:limit] if lines else "(nothing logged yet)"


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    """The environment of a child: ours without FEDNANO_* settings (each child gets its own)
    except the profiles folder, offline model hub, no tokenizer threads."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FEDNANO_") or k == "FEDNANO_PROFILES_DIR"}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1"})
    env.update(extra)
    return env


def prepare_out(out: Path, *, overwrite: bool) -> None:
    """A fresh run folder (``overwrite`` deletes what a previous run left there)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FleetError(f"{out} is not empty: choose another --out or pass --overwrite")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# ------------------------------------------------------------------------------ the runner


class FleetRunner:
    """One fleet run (see the module docstring)."""

    def __init__(self, options: FleetOptions, paths: FleetPaths, *,
                 console: Console | None = None, live: bool | None = None,
                 keep_serving: bool = False, overwrite: bool = False) -> None:
        self.options = options
        self.overwrite = overwrite
        self.paths = paths
        self.console = console or Console()
        self.live = self.console.is_terminal if live is None else live
        self.keep_serving = keep_serving
        self.processes = ProcessSet()
        self.logs = DeviceLogs()
        self.snapshot = Snapshot()
        self.notes: list[Note] = []
        self.plan = FaultPlan()
        self.token = ""
        self.api_url = ""
        self._t0 = time.monotonic()
        self._ready_s = 0.0
        self._devices: dict[str, ManagedProcess] = {}
        self._unexpected: dict[str, int] = {}
        self._sessions: sessionmaker[Session] | None = None
        self._engine: Engine | None = None
        self._broker: Mosquitto | None = None
        self._ca_files: tuple[Path, Path] | None = None  # the run's device CA (--network tls)
        self._cloud: ManagedProcess | None = None
        self._fault_clients: list[Rogue | Duplicate] = []
        self._last_line = ""

    # --- the Fleet protocol of the faults -------------------------------------------------------

    @property
    def broker(self) -> Mosquitto:
        if self._broker is None:
            raise RuntimeError("the broker is not started yet")
        return self._broker

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            raise RuntimeError("the database is not set up yet")
        return self._sessions

    def device(self, device_id: str) -> ManagedProcess:
        return self._devices[device_id]

    def kill_cloud(self) -> None:
        if self._cloud is not None:
            self._cloud.kill()

    def start_cloud(self) -> None:
        if self._cloud is not None:
            self._cloud.start()

    def note(self, fault: str, round_id: int | None, message: str) -> None:
        note = Note(round(time.monotonic() - self._t0, 1), fault, round_id, message)
        self.notes.append(note)
        self.console.print(f"[{note.at_s:6.0f} s] {fault}: {message}", highlight=False,
                           markup=False)

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> rep.FleetReport:
        """Provision, start, drive, report; everything is stopped on the way out."""
        self._t0 = time.monotonic()
        try:
            self._preflight()
            base_version, bundle = self._prepare()
            devices, rogue = self._provision()
            self._start_broker()
            self._start_cloud_and_wait()
            self._start_fault_clients(devices, rogue)
            self._start_devices(devices, bundle)
            self._drive()
            report = self._report(base_version, bundle.name)
            if self.keep_serving:
                self._serve_until_interrupted()
        finally:
            self._shutdown()
        self._write(report)
        return report

    def _preflight(self) -> None:
        """What fails in seconds fails before the minutes a base build takes: the run folder,
        the database (reachable, migrated, empty) and the broker binary."""
        prepare_out(self.paths.out, overwrite=self.overwrite)
        self.paths.logs.mkdir(parents=True, exist_ok=True)
        self._setup_database()
        ensure_mosquitto()

    def _prepare(self) -> tuple[str, Path]:
        base_version = ensure_base(self.paths.home, self.paths.logs, self.console)
        bundle = ensure_bundle(self.paths.home, self.paths.bundles, base_version,
                               self.paths.logs, self.console)
        return base_version, bundle

    def _database_url(self) -> str:
        if self.options.database == "sqlite":
            return sqlite_url(self.paths.data / "cloud.db")
        return self.options.database

    def _setup_database(self) -> None:
        from cloud.db import migrate

        url = self._database_url()
        self.paths.data.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(url)
        self._engine = make_engine(url)
        self._sessions = make_session_factory(self._engine)
        try:
            prov.require_empty(self.sessions)
        except ValueError as err:
            raise FleetError(str(err)) from err

    def _provision(self) -> tuple[list[prov.FleetDevice], prov.FleetDevice | None]:
        """Devices, their files, round defaults, the schedule and an operator token."""
        from cloud.api.security import create_operator_token

        o = self.options
        self._api_port = _free_port()
        self.api_url = f"http://127.0.0.1:{self._api_port}"
        network = self._start_network(f"{self.api_url}/api/v1/bundles/latest")
        folder = self.paths.out / "devices"
        ids = prov.device_ids(o.devices)
        devices = prov.provision(self.sessions, ids, folder=folder, network=network,
                                 x509=ids[:o.x509_devices])
        rogue = None
        if o.rogue:
            (rogue,) = prov.provision(self.sessions, [prov.ROGUE_ID], folder=folder,
                                      network=network)
        with session_scope(self.sessions) as session:
            save_defaults(session, self.round_config())
            # Off until every device is online: the runner then starts it through the API.
            save_schedule(session, Schedule(enabled=False))
            _, self.token = create_operator_token(session, name="fleet", actor="fleet")
        return devices, rogue

    def _start_network(self, bundle_url: str) -> DeviceNetwork:
        """The broker (not started yet) and what devices are told about it. ``tls``: a new
        CA (kept in the run folder, the cloud signs X.509 devices with it) signs the broker's
        certificate for this machine's network address, which devices then use."""
        if self.options.network == "loopback":
            self._broker = Mosquitto(install=True)
            return DeviceNetwork(broker_url=self.broker.url, bundle_url=bundle_url)
        try:
            host = public_address()
        except BrokerUnavailable as err:
            raise FleetError(f"{err}: run with --network loopback") from err
        issuer = Issuer.create("FedNano fleet CA")
        ca_files = (self.paths.out / "ca" / "ca.crt", self.paths.out / "ca" / "ca.key")
        ca_files[0].parent.mkdir(parents=True, exist_ok=True)
        issuer.write(*ca_files)
        self._ca_files = ca_files
        server = issuer.server_certificate([host, "127.0.0.1"])
        self._broker = Mosquitto(install=True, tls=BrokerTls(
            host, issuer.certificate_pem, server.certificate_pem, server.key_pem))
        return DeviceNetwork(broker_url=self.broker.tls_url, bundle_url=bundle_url,
                             ca_pem=issuer.certificate_pem, x509_broker_url=self.broker.x509_url,
                             issuer=issuer)

    def round_config(self) -> RoundConfig:
        """Every honest device takes part in every round; aggregate when all submitted, or at
        the deadline with whoever did."""
        o = self.options
        hparams = TaskHParams(steps=o.steps, batch_size=o.batch_size, lr=o.lr,
                              fisher_samples=o.fisher_samples)
        return RoundConfig(strategy=o.strategy, min_participants=o.devices, min_updates=1,
                           quorum_fraction=1.0, deadline_s=o.deadline_s, hparams=hparams,
                           seed=o.seed)

    def _start_broker(self) -> None:
        self._service = prov.service_account()
        prov.write_broker_files(self.sessions, self.broker.folder, self._service)
        self.broker.start()

    def _cloud_env(self) -> dict[str, str]:
        return _child_env({
            "FEDNANO_HOME": str(self.paths.home), "FEDNANO_DATA_DIR": str(self.paths.data),
            "FEDNANO_DATABASE_URL": self._database_url(),
            "FEDNANO_BROKER_URL": self.broker.url,
            "FEDNANO_BROKER_USERNAME": self._service.username,
            "FEDNANO_BROKER_PASSWORD": self._service.password,
            "FEDNANO_SECRET_KEY": secrets.token_urlsafe(32),
            "FEDNANO_BUNDLE_DIR": str(self.paths.bundles), "FEDNANO_PUBLIC_URL": self.api_url,
            "FEDNANO_TICK_INTERVAL_S": "0.5", **self._device_network_env()})

    def _device_network_env(self) -> dict[str, str]:
        """What the cloud tells devices it provisions itself (``POST /devices``)."""
        if self.broker.tls is None or self._ca_files is None:
            return {}
        return {"FEDNANO_DEVICE_BROKER_URL": self.broker.tls_url,
                "FEDNANO_DEVICE_X509_BROKER_URL": self.broker.x509_url,
                "FEDNANO_DEVICE_CA_FILE": str(self._ca_files[0]),
                "FEDNANO_DEVICE_CA_KEY_FILE": str(self._ca_files[1])}

    def _start_cloud_and_wait(self) -> None:
        argv = [sys.executable, "-m", "fednano.cli", "cloud", "serve", "--host", "127.0.0.1",
                "--port", str(self._api_port),
                "--eval-questions", str(self.options.eval_questions)]
        self._cloud = self.processes.add(ManagedProcess(
            "cloud", argv, log_path=self.paths.logs / "cloud.log", env=self._cloud_env()))
        self._cloud.start()
        self.console.print(f"cloud starting (log {self._cloud.log_path})", highlight=False)
        deadline = time.monotonic() + CLOUD_READY_TIMEOUT_S
        while not self._cloud_ready():
            if not self._cloud.running:
                raise FleetError(f"the cloud exited ({self._cloud.returncode}); log "
                                 f"{self._cloud.log_path}:\n{self._cloud.log_tail()}")
            if time.monotonic() > deadline:
                raise FleetError(f"the cloud was not ready after {CLOUD_READY_TIMEOUT_S:.0f} s")
            time.sleep(POLL_S)
        self.console.print(f"API {self.api_url}/api/v1/docs  dashboard {self.api_url}/dashboard"
                           f"  operator token {self.token}", highlight=False, markup=False)

    def _cloud_ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/api/v1/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _start_fault_clients(self, devices: list[prov.FleetDevice],
                             rogue: prov.FleetDevice | None) -> None:
        o, factory = self.options, mqtt_client(self.broker.url)
        ids = [d.device_id for d in devices]
        actions: list[FaultAction] = []
        if rogue is not None:
            assert rogue.secret is not None  # the rogue is a password device
            actions.append(Rogue(set(o.faults), device_id=rogue.device_id,
                                 password=rogue.secret, factory=factory, rounds=o.rounds))
        if "duplicate" in o.faults:
            actions.append(Duplicate(default_round("duplicate", o.rounds),
                                     device_id=devices[0].device_id,
                                     username=self._service.username,
                                     password=self._service.password, factory=factory))
        processes = {"kill-device": (KillDevice, ids[::-1]), "slow-device": (
            SlowDevice, ids[-2::-1] or ids), "cloud-restart": (CloudRestart, ids),
            "broker-restart": (BrokerRestart, ids), "broker-kill": (BrokerKill, ids)}
        for fault, (kind, candidates) in processes.items():
            if fault in o.faults:
                actions.append(kind(default_round(fault, o.rounds), candidates))
        for action in actions:
            if isinstance(action, Rogue | Duplicate):
                action.connect()
                self._fault_clients.append(action)
        self.plan = FaultPlan(actions)

    def _start_devices(self, devices: list[prov.FleetDevice], bundle: Path) -> None:
        o = self.options
        env = _child_env({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
        for index, device in enumerate(devices):
            spec = prov.data_spec(index, o.devices, alpha=o.alpha, seed=o.seed,
                                  max_samples=o.max_samples)
            argv = [sys.executable, "-m", "edge.cli", "run", "--config", str(device.config_path),
                    "--data", spec, "--bundle", str(bundle),
                    "--llm-timeout", f"{o.llm_timeout_s:g}"]
            log_path = self.paths.logs / f"{device.device_id}.log"
            process = self.processes.add(ManagedProcess(device.device_id, argv,
                                                        log_path=log_path, env=env))
            self._devices[device.device_id] = process.start()
            self.logs.follow(device.device_id, log_path)
        self.console.print(f"{len(devices)} devices starting (logs in {self.paths.logs})",
                           highlight=False)

    # --- driving --------------------------------------------------------------------------------

    def _drive(self) -> None:
        """Watch, inject faults and show progress until the schedule's rounds are done."""
        live = Live(self._view(), console=self.console, auto_refresh=False,
                    transient=False) if self.live else None
        try:
            if live is not None:
                live.start()
            while not self._finished():
                self._tick()
                if live is not None:
                    live.update(self._view(), refresh=True)
                else:
                    self._print_progress()
                time.sleep(POLL_S)
        finally:
            if live is not None:
                live.stop()
        self.plan.give_up_pending("the rounds ended before it could fire")

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self._t0 > self.options.timeout_s:
            raise FleetError(f"the run did not finish within {self.options.timeout_s:.0f} s "
                             f"(logs in {self.paths.logs})")
        self.logs.poll()
        try:
            self.snapshot = read_snapshot(self.sessions)
        except OperationalError:
            return  # the database is busy (SQLite) or restarting: next tick
        if not self._ready_s and self._expected_online() <= self.snapshot.online:
            self._ready_s = now - self._t0
            self._start_schedule()
        self._watch_processes()
        self.plan.poll(self, now)

    def _expected_online(self) -> set[str]:
        rogue = {a.device_id for a in self.plan.actions if isinstance(a, Rogue)}
        return set(self._devices) | rogue

    def _start_schedule(self) -> None:
        """As an operator would: ``PUT /api/v1/rounds/schedule`` (rounds counted from now)."""
        body = {"enabled": True, "target_rounds": self.options.rounds}
        self._api("PUT", "/api/v1/rounds/schedule", body)
        self.note("schedule", None, f"every device online after {self._ready_s:.0f} s: "
                  f"schedule of {self.options.rounds} rounds started through the API")

    def _finished(self) -> bool:
        s = self.snapshot
        rounds_done = s.rounds and all(r.finished for r in s.rounds.values())
        schedule_done = not s.schedule.enabled and s.schedule.stopped_reason is not None
        busy = any(a.active for a in self.plan.actions)
        return bool(rounds_done and (schedule_done or s.closed >= self.options.rounds)
                    and not busy)

    def _watch_processes(self) -> None:
        """The cloud or a device that died on its own (not by a fault): restart it, up to
        MAX_UNEXPECTED_RESTARTS times, noting it."""
        down_by_fault = {getattr(a, "target", None) for a in self.plan.actions if a.active}
        if any(isinstance(a, CloudRestart) and a.active for a in self.plan.actions):
            down_by_fault.add("cloud")
        for process in self.processes:
            if process.running or process.name in down_by_fault or process.starts == 0:
                continue
            count = self._unexpected.get(process.name, 0) + 1
            self._unexpected[process.name] = count
            if count > MAX_UNEXPECTED_RESTARTS:
                raise FleetError(f"{process.name} keeps exiting ({process.returncode}); log "
                                 f"{process.log_path}:\n{process.log_tail()}")
            self.note("unexpected", None, f"{process.name} exited on its own with code "
                      f"{process.returncode}: restarted (see {process.log_path})")
            process.start()

    # --- progress -------------------------------------------------------------------------------

    def _view(self) -> Group:
        table = Table("round", "state", "submitted", "rejected", "accuracy", "s",
                      title=f"fleet: {self.options.devices} devices, {self.options.rounds} "
                      "rounds", title_justify="left")
        rejected: dict[int, int] = {}
        for update in self.snapshot.updates.values():
            if update.status == "rejected":
                rejected[update.round_id] = rejected.get(update.round_id, 0) + 1
        for r in self.snapshot.rounds.values():
            submitted = sum(s == "submitted" for s in r.participants.values())
            table.add_row(str(r.id), r.state.value, f"{submitted}/{len(r.participants)}",
                          str(rejected.get(r.id, 0)),
                          "-" if r.accuracy is None else f"{r.accuracy:.3f}", _elapsed(r))
        return Group(table, Text(self._status_line()))

    def _status_line(self) -> str:
        online = len(set(self._devices) & self.snapshot.online)
        alive = sum(p.running for p in self._devices.values())
        elapsed = time.monotonic() - self._t0
        return (f"{elapsed:5.0f} s  devices online {online}/{len(self._devices)}, processes "
                f"alive {alive}, broker {'up' if self.broker.running else 'DOWN'}, cloud "
                f"{'up' if self._cloud is not None and self._cloud.running else 'DOWN'}")

    def _print_progress(self) -> None:
        rounds = ", ".join(f"{r.id}:{r.state.value}"
                           + (f"({r.accuracy:.3f})" if r.accuracy is not None else "")
                           for r in self.snapshot.rounds.values())
        online = len(set(self._devices) & self.snapshot.online)
        line = f"rounds [{rounds}] devices online {online}/{len(self._devices)}"
        if line != self._last_line:
            self._last_line = line
            self.console.print(f"[{time.monotonic() - self._t0:6.0f} s] {line}",
                               highlight=False, markup=False)

    # --- the end --------------------------------------------------------------------------------

    def _report(self, base_version: str, bundle_version: str) -> rep.FleetReport:
        self.logs.poll()
        report = rep.FleetReport(
            options=self.options.model_dump(mode="json"), base_version=base_version,
            bundle_version=bundle_version,
            database="sqlite" if self.options.database == "sqlite" else "postgresql",
            api_url=self.api_url, rounds=rep.read_rounds(self.sessions),
            faults=list(self.notes), seconds=time.monotonic() - self._t0,
            ready_seconds=self._ready_s)
        report.rejected, report.refused, report.redelivered = rep.read_rejections(self.sessions)
        report.devices = self._device_rows()
        report.acknowledged = {d: sorted(ids) for d, ids in self.logs.delivered.items()}
        sent = self.plan.sent
        report.checks = {
            "rounds_closed": rep.check_rounds(report.rounds, self.options.rounds),
            "acknowledged_stored": rep.check_acknowledged(self.sessions, self.logs.delivered,
                                                          sent),
            "accepted_merged": rep.check_merged(self.sessions),
            "api_agrees": self._check_api(report),
        }
        if sent:
            report.checks["verdicts"] = rep.check_verdicts(self.sessions, sent)
        skipped = [f"{a.fault}: {a.skipped}" for a in self.plan.actions if a.skipped]
        if skipped:
            report.checks["faults_fired"] = rep.Check(False, "; ".join(skipped))
        return report

    def _device_rows(self) -> list[dict[str, Any]]:
        from cloud.db import crud

        rows = []
        with session_scope(self.sessions) as session:
            for device_id, process in self._devices.items():
                device = crud.require_device(session, device_id=device_id)
                rows.append({"device_id": device_id, "samples": device.capabilities.get("samples"),
                             "starts": process.starts,
                             "delivered": len(self.logs.delivered.get(device_id, ()))})
        return rows

    def _check_api(self, report: rep.FleetReport) -> rep.Check:
        """The REST API (operator token) tells the same rounds and metrics as the database."""
        try:
            page = self._api_get("/api/v1/rounds?limit=200")
            states = {item["id"]: item["state"] for item in page["items"]}
            summaries = {r.round_id: self._api_get(f"/api/v1/rounds/{r.round_id}/metrics")
                         ["summary"] for r in report.rounds}
        except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
            return rep.Check(False, f"the API did not answer: {err}")
        expected = {r.round_id: r.state for r in report.rounds}
        if states != expected:
            return rep.Check(False, f"API rounds {states} differ from the database {expected}")
        for row in report.rounds:
            api_accuracy = summaries[row.round_id].get("accuracy")
            if api_accuracy != row.accuracy:
                return rep.Check(False, f"round {row.round_id}: API accuracy {api_accuracy}, "
                                 f"database {row.accuracy}")
        return rep.Check(True, f"GET /api/v1/rounds and /rounds/{{id}}/metrics agree on "
                         f"{len(states)} rounds")

    def _api_get(self, path: str) -> Any:
        return self._api("GET", path)

    def _api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One REST call with the operator token; urllib's errors propagate."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"{self.api_url}{path}", data=data, method=method,
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())

    def cloud_ready(self) -> bool:
        """The cloud answers /api/v1/ready with 200 (database and broker connected)."""
        return self._cloud_ready()

    def _serve_until_interrupted(self) -> None:
        """Stop the devices; keep the broker and the cloud (API, dashboard) until Ctrl-C."""
        for process in self._devices.values():
            process.stop()
        self.console.print(f"serving {self.api_url}/dashboard and {self.api_url}/api/v1/docs "
                           f"(operator token {self.token}); Ctrl-C to stop", highlight=False,
                           markup=False)
        try:
            while self._cloud is not None and self._cloud.running:
                time.sleep(1)
        except KeyboardInterrupt:
            pass

    def _shutdown(self) -> None:
        for client in self._fault_clients:
            client.close()
        self.processes.stop_all()
        if self._broker is not None:
            self.paths.logs.mkdir(parents=True, exist_ok=True)
            (self.paths.logs / "broker.log").write_text(self._broker.log(tail=10**7))
            self._broker.close()
        if self._engine is not None:
            self._engine.dispose()

    def _write(self, report: rep.FleetReport) -> None:
        (self.paths.out / "report.json").write_text(report.to_json())
        (self.paths.out / "report.md").write_text(rep.report_markdown(report))
        (self.paths.out / "options.json").write_text(
            json.dumps({"options": self.options.model_dump(mode="json"),
                        "paths": {k: str(v) for k, v in asdict(self.paths).items()}}, indent=2))


def _elapsed(r: Any) -> str:
    if r.started_at is None:
        return "-"
    end = r.closed_at.timestamp() if r.closed_at is not None else time.time()
    return f"{end - r.started_at.timestamp():.0f}"


def _free_port() -> int:
    from fednano.broker import free_port

    return free_port()
