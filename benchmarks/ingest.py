"""Ingest capacity: N lightweight devices send pre-computed updates to the real coordinator.

    python benchmarks/ingest.py --devices 100,1000 --out benchmarks/results/ingest
    python benchmarks/ingest.py --devices 100,1000 --rate 50 --out ...      # paced, not a burst
    python benchmarks/ingest.py --devices 100,1000 \\
        --database postgresql://postgres@127.0.0.1:PORT/postgres --out ...  # (scripts/services.sh)

For each N, from nothing: a fresh database (a SQLite file, or a new PostgreSQL database created
through the given server URL and dropped afterwards), N devices registered through the registry
(each its own secret), a private Mosquitto with the registry's per-device accounts and rights,
and the real coordinator process (``fednano cloud coordinator --eval-questions 0``: the
persistent MQTT session, the validation gate, the blob store, the database).

The devices live in swarm processes (spawned, at most ``DEVICES_PER_PROCESS`` each): one
``MqttClient`` per device (its own credentials, connection, last will and retained presence),
doing on the wire what ``fednano-edge run`` does except training. Phases:

1. connect, publish the online presence; wait until the database has every device online;
2. open a round of all N (quorum N) as the API does; the coordinator publishes N tasks;
   each device receives its task and builds its update from it: the task's ids and versions
   around Δθ + Fisher frames pre-computed once in the task's codec, at the global adapter's
   shapes (8 random variants, Δθ well inside the norm bound) -- valid updates the gate accepts;
   then wait until the database has every task recorded as sent (the coordinator's own
   bookkeeping of the fan-out, which would otherwise still run while the updates arrive);
3. timed: every device publishes its update, all at once (a burst: the queue a round's end
   puts on the coordinator) or one every 1/``--rate`` s.

Measured from the database, not from the coordinator's logs: an update is *stored* when its
``updates`` row exists; ``received_at`` is set as the coordinator builds the row, after the
gate and the blob write, just before its commit. Latency = ``received_at`` - the device's
publish time (one machine, one clock). Capacity = stored updates / (last ``received_at`` -
first publish). Lost = updates the broker acknowledged (PUBACK) whose id has no row once the
run ends (every update stored, or ``--timeout`` passed): must be 0, and a run that times out
still reports what it saw. Then the round aggregates: the merge time (last update stored ->
round closed) is reported too. Writes ``summary.json`` and
``summary.md`` into ``--out`` and prints the table.

Everything runs on this machine: devices, broker, coordinator and database share its cores.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import secrets
import shlex
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import torch
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from cloud import registry
from cloud.coordinator import open_round
from cloud.db import crud, migrate
from cloud.db.models import (
    Device,
    Participation,
    ParticipationStatus,
    Round,
    RoundState,
    Update,
    UpdateStatus,
)
from cloud.db.session import (
    make_engine,
    make_session_factory,
    normalize_url,
    session_scope,
    sqlite_url,
)
from cloud.rounds import RoundConfig
from fednano.broker import Mosquitto
from fednano.fleet import provision as prov
from fednano.processes import ManagedProcess
from shared import protocol, topics
from shared.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Presence,
    TrainTask,
    UpdateMessage,
    pack,
    to_json,
    unpack,
)
from shared.mqtt import BrokerAddress, ClientOptions, MqttClient, Will

VARIANTS = 8
DEVICES_PER_PROCESS = 250
POLL_S = 0.2
READY_TIMEOUT_S = 120.0


class BenchError(RuntimeError):
    """A run that could not be measured (the message says which phase and why)."""


@dataclass
class IngestRun:
    """One measured run (what ``summary.json`` holds per N)."""

    devices: int
    database: str
    mode: str  # "burst" or "rate N/s"
    update_bytes: int
    connect_s: float
    task_fanout_s: float  # round opened -> every device holds its task
    published: int
    acked: int
    stored: int
    accepted: int
    rejected: int
    lost: int  # acknowledged by the broker, never stored
    ingest_s: float  # first publish -> last stored
    updates_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    merge_s: float | None  # last stored -> round closed (aggregated)
    round_state: str


# ------------------------------------------------------------------------------ the devices


class LightDevice:
    """A device on the wire without the model: presence, tasks in, one update out."""

    def __init__(self, device_id: str, secret: str, address: BrokerAddress) -> None:
        self.device_id = device_id
        offline = to_json(Presence(device_id=device_id, state="offline", profile=prov.PROFILE))
        self.client = MqttClient(address, ClientOptions(
            client_id=device_id, username=device_id, password=secret,
            will=Will(topics.status(device_id), offline), clean_start=True,
            session_expiry_s=0))
        self.tasks = self.client.subscribe(topics.tasks(device_id))  # before connect
        self.task: TrainTask | None = None
        self.task_parts: dict[str, bytes] | None = None

    def connect(self) -> None:
        self.client.connect()
        online = Presence(device_id=self.device_id, state="online", profile=prov.PROFILE,
                          agent_version="ingest-bench")
        self.client.publish(topics.status(self.device_id), to_json(online),
                            max_bytes=DEFAULT_MAX_MESSAGE_BYTES, retain=True)

    def receive_task(self, timeout: float) -> TrainTask:
        received = self.tasks.get(timeout=timeout)
        if received is None:
            raise BenchError(f"{self.device_id}: no task within {timeout:g} s")
        task, parts = unpack(received.payload, TrainTask)
        self.task, self.task_parts = task, parts
        return task

    def update(self, parts: dict[str, bytes]) -> tuple[str, bytes]:
        """This device's update for its task: its own ids around the shared parts."""
        task = self.task
        assert task is not None
        update_id = f"{self.device_id}-{uuid.uuid4().hex[:12]}"
        message = UpdateMessage(update_id=update_id, task_id=task.task_id,
                                round_id=task.round_id, global_version=task.global_version,
                                base_version=task.base_version, n_samples=64,
                                metrics={"loss": 1.0})
        return update_id, pack(message, parts)

    def close(self) -> None:
        self.client.close()


def precomputed_parts(task: TrainTask, task_parts: dict[str, bytes]) -> list[dict[str, bytes]]:
    """``VARIANTS`` valid (Δθ, Fisher) part sets at the global adapter's shapes and codec."""
    state = protocol.decode_global(task_parts)
    generator = torch.Generator().manual_seed(0)
    variants = []
    for _ in range(VARIANTS):
        delta = {k: 1e-3 * torch.randn(v.shape, generator=generator) for k, v in state.items()}
        fisher = {k: torch.rand(v.shape, generator=generator) + 1e-3 for k, v in state.items()}
        variants.append(protocol.update_parts(delta, fisher, task.codec))
    return variants


def swarm_process(conn: Connection, broker_url: str, credentials: list[tuple[str, str]],
                  first_index: int, timeout_s: float) -> None:
    """One process of the swarm: at most ``DEVICES_PER_PROCESS`` devices (paho's network loop
    uses ``select``, which cannot watch descriptors past 1024: about 340 clients a process).

    Talks to the parent over ``conn``: -> ("connected",), -> ("ready", update bytes),
    <- ("go", start, rate), -> ("sent", {update id: publish time}, [acked update ids]),
    <- ("close",).
    Any failure is sent as ("error", text).
    """
    devices: list[LightDevice] = []
    try:
        address = BrokerAddress.parse(broker_url)
        devices = [LightDevice(d, secret, address) for d, secret in credentials]
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(LightDevice.connect, devices))
        conn.send(("connected",))
        for device in devices:
            device.receive_task(timeout_s)
        first = devices[0]
        assert first.task is not None and first.task_parts is not None
        variants = precomputed_parts(first.task, first.task_parts)
        updates = [d.update(variants[(first_index + i) % VARIANTS])
                   for i, d in enumerate(devices)]
        conn.send(("ready", len(updates[0][1])))
        _, start, rate = conn.recv()
        conn.send(("sent", *_fire(devices, updates, first_index, start, rate, timeout_s)))
        conn.recv()
    except Exception as err:  # noqa: BLE001  (a process boundary: the parent reports it)
        conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        for device in devices:
            device.close()


def _fire(devices: list[LightDevice], updates: list[tuple[str, bytes]], first_index: int,
          start: float, rate: float | None, timeout_s: float) -> tuple[dict[str, float], list[str]]:
    """Publish every update at ``start`` (a burst) or device ``first_index + i`` at
    ``start + (first_index + i) / rate``; publish times by update id and how many the broker
    acknowledged (their ids)."""
    published: dict[str, float] = {}
    mids = []
    for i, (device, (update_id, payload)) in enumerate(zip(devices, updates, strict=True)):
        offset = 0.0 if rate is None else (first_index + i) / rate
        time.sleep(max(0.0, start + offset - time.time()))
        published[update_id] = time.time()
        mids.append((device, update_id, device.client.publish_nowait(
            topics.updates(device.device_id), payload, max_bytes=DEFAULT_MAX_MESSAGE_BYTES)))
    deadline = time.monotonic() + timeout_s
    acked = []
    for device, update_id, mid in mids:
        reason = device.client.wait_ack(mid, max(0.0, deadline - time.monotonic()))
        if reason is not None and not reason.is_failure:
            acked.append(update_id)
    return published, acked


class Swarm:
    """The parent's side: the swarm processes, stepped through their phases together."""

    def __init__(self, broker_url: str, credentials: dict[str, str], timeout_s: float) -> None:
        context = multiprocessing.get_context("spawn")
        items = list(credentials.items())
        self.workers: list[tuple[BaseProcess, Connection]] = []
        for first in range(0, len(items), DEVICES_PER_PROCESS):
            parent, child = context.Pipe()
            process = context.Process(target=swarm_process, daemon=True, args=(
                child, broker_url, items[first:first + DEVICES_PER_PROCESS], first, timeout_s))
            process.start()
            self.workers.append((process, parent))
        self.timeout_s = timeout_s

    def expect(self, phase: str, timeout_s: float | None = None) -> list[tuple[Any, ...]]:
        """Every worker's next message, which must be ``phase``."""
        replies = []
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        for process, conn in self.workers:
            if not conn.poll(timeout_s):
                raise BenchError(f"a swarm process sent nothing for {timeout_s:g} s "
                                 f"(waiting for {phase!r}; alive: {process.is_alive()})")
            reply = conn.recv()
            if reply[0] != phase:
                raise BenchError(f"a swarm process failed before {phase!r}: {reply[-1]}")
            replies.append(reply)
        return replies

    def send(self, *message: Any) -> None:
        for _, conn in self.workers:
            conn.send(message)

    def close(self) -> None:
        for process, conn in self.workers:
            with suppress(OSError):
                conn.send(("close",))
            process.join(30)
            if process.is_alive():
                process.kill()


# ------------------------------------------------------------------------------ the system


@contextmanager
def database(spec: str, work: Path, n: int) -> Iterator[str]:
    """A fresh, migrated database URL: a SQLite file, or a new PostgreSQL database."""
    if spec == "sqlite":
        url = sqlite_url(work / "cloud.db")
        migrate.upgrade(url)
        yield url
        return
    admin = create_engine(normalize_url(spec), isolation_level="AUTOCOMMIT")
    name = f"fednano_ingest_{n}_{secrets.token_hex(4)}"
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = normalize_url(spec).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def register(sessions: sessionmaker[Session], n: int) -> dict[str, str]:
    """N devices through the registry; their secrets by id."""
    secrets_by_id = {}
    with session_scope(sessions) as session:
        for device_id in prov.device_ids(n):
            _, secret = registry.add_device(session, device_id=device_id, profile=prov.PROFILE,
                                            actor="ingest-bench",
                                            reserved_ids={prov.SERVICE_USERNAME})
            secrets_by_id[device_id] = secret
    return secrets_by_id


def start_coordinator(work: Path, home: Path, url: str, broker: Mosquitto,
                      service: registry.ServiceAccount) -> ManagedProcess:
    env = {**os.environ, "FEDNANO_HOME": str(home), "FEDNANO_DATA_DIR": str(work / "data"),
           "FEDNANO_DATABASE_URL": url, "FEDNANO_BROKER_URL": broker.url,
           "FEDNANO_BROKER_USERNAME": service.username,
           "FEDNANO_BROKER_PASSWORD": service.password,
           "FEDNANO_SECRET_KEY": secrets.token_urlsafe(32), "FEDNANO_TICK_INTERVAL_S": "0.5"}
    argv = [sys.executable, "-m", "fednano.cli", "cloud", "coordinator", "--eval-questions", "0"]
    return ManagedProcess("coordinator", argv, log_path=work / "coordinator.log",
                          env=env).start()


def wait_until(check: Any, timeout: float, coordinator: ManagedProcess) -> bool:
    """Poll ``check`` until it holds (True) or ``timeout`` passes (False); ``BenchError`` if
    the coordinator exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        if not coordinator.running:
            raise BenchError(f"the coordinator exited ({coordinator.returncode}):\n"
                             f"{coordinator.log_tail()}")
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True


def wait_for(what: str, check: Any, timeout: float, coordinator: ManagedProcess) -> None:
    if not wait_until(check, timeout, coordinator):
        raise BenchError(f"timed out after {timeout:g} s waiting for {what}")


def scalar(sessions: sessionmaker[Session], query: Any) -> Any:
    with session_scope(sessions) as session:
        return session.scalar(query)


# ------------------------------------------------------------------------------ one run


def run_one(n: int, *, database_spec: str, home: Path, rate: float | None,
            timeout_s: float, say: Any) -> IngestRun:
    with tempfile.TemporaryDirectory(prefix=f"ingest-{n}-") as tmp:
        work = Path(tmp)
        with database(database_spec, work, n) as url:
            engine = make_engine(url)
            try:
                return _measure(n, work, url, make_session_factory(engine), home=home,
                                rate=rate, timeout_s=timeout_s, say=say,
                                database_label=make_url(url).get_backend_name())
            finally:
                engine.dispose()


def _measure(n: int, work: Path, url: str, sessions: sessionmaker[Session], *, home: Path,
             rate: float | None, timeout_s: float, say: Any, database_label: str) -> IngestRun:
    secrets_by_id = register(sessions, n)
    service = prov.service_account()
    broker = Mosquitto(install=True)
    prov.write_broker_files(sessions, broker.folder, service)
    with broker:
        coordinator = start_coordinator(work, home, url, broker, service)
        swarm: Swarm | None = None
        try:
            wait_for("the initial adapter version", lambda: _has_version(sessions),
                     READY_TIMEOUT_S, coordinator)
            started = time.perf_counter()
            swarm = Swarm(broker.url, secrets_by_id, READY_TIMEOUT_S)
            swarm.expect("connected")
            online = select(func.count()).select_from(Device).where(Device.online.is_(True))
            wait_for(f"{n} devices online", lambda: scalar(sessions, online) == n,
                     READY_TIMEOUT_S, coordinator)
            connect_s = time.perf_counter() - started
            say(f"  {n} devices ({len(swarm.workers)} processes) connected and online in "
                f"{connect_s:.1f} s")

            started = time.perf_counter()
            with session_scope(sessions) as session:
                round_id = open_round(session, config=RoundConfig(
                    min_participants=n, min_updates=n, quorum_fraction=1.0,
                    deadline_s=timeout_s * 4), actor="ingest-bench").id
            update_bytes = swarm.expect("ready")[0][1]
            notified = (select(func.count()).select_from(Participation)
                        .where(Participation.round_id == round_id,
                               Participation.status == ParticipationStatus.NOTIFIED))
            wait_for(f"{n} tasks recorded as sent", lambda: scalar(sessions, notified) == n,
                     READY_TIMEOUT_S, coordinator)
            fanout_s = time.perf_counter() - started
            say(f"  round {round_id}: {n} tasks delivered and recorded, updates built in "
                f"{fanout_s:.1f} s")

            swarm.send("go", time.time() + 0.5, rate)
            published: dict[str, float] = {}
            acked: set[str] = set()
            publishing_s = 0.5 + (0.0 if rate is None else n / rate)
            for _, times, ids in swarm.expect("sent", publishing_s + timeout_s):
                published.update(times)
                acked.update(ids)
            say(f"  {len(published)} updates published, {len(acked)} acknowledged by the broker")
            stored_query = (select(func.count()).select_from(Update)
                            .where(Update.round_id == round_id))
            if not wait_until(lambda: scalar(sessions, stored_query) >= len(published),
                              timeout_s, coordinator):
                say(f"  not every update was stored within {timeout_s:g} s")
            else:
                closed = (select(Round.state).where(Round.id == round_id))
                wait_for("the round to aggregate", lambda: scalar(sessions, closed) in (
                    RoundState.CLOSED, RoundState.FAILED), timeout_s, coordinator)
            return _result(sessions, round_id, n, published, acked, update_bytes,
                           database_label, rate, connect_s, fanout_s)
        finally:
            if swarm is not None:
                swarm.close()
            coordinator.stop()


def _has_version(sessions: sessionmaker[Session]) -> bool:
    with session_scope(sessions) as session:
        return crud.latest_adapter_version(session) is not None


def _result(sessions: sessionmaker[Session], round_id: int, n: int,
            published: dict[str, float], acked: set[str], update_bytes: int,
            database_label: str, rate: float | None, connect_s: float,
            fanout_s: float) -> IngestRun:
    with session_scope(sessions) as session:
        rows = session.execute(select(Update.update_id, Update.status, Update.received_at)
                               .where(Update.round_id == round_id)).all()
        round_ = session.get(Round, round_id)
        assert round_ is not None
        state, closed_at = round_.state, round_.closed_at
    mine = [r for r in rows if r.update_id in published]
    if not mine:
        raise BenchError("no update was stored")
    latencies = sorted(r.received_at.timestamp() - published[r.update_id] for r in mine)
    last = max(r.received_at.timestamp() for r in mine)
    ingest_s = last - min(published.values())
    return IngestRun(
        devices=n, database=database_label,
        mode="burst" if rate is None else f"rate {rate:g}/s",
        update_bytes=update_bytes, connect_s=round(connect_s, 2),
        task_fanout_s=round(fanout_s, 2), published=len(published), acked=len(acked),
        stored=len(mine), accepted=sum(r.status is UpdateStatus.ACCEPTED for r in mine),
        rejected=sum(r.status is UpdateStatus.REJECTED for r in mine),
        lost=len(acked - {r.update_id for r in mine}),
        ingest_s=round(ingest_s, 3), updates_per_s=round(len(mine) / ingest_s, 1),
        latency_p50_ms=round(1000 * _quantile(latencies, 0.50), 1),
        latency_p99_ms=round(1000 * _quantile(latencies, 0.99), 1),
        latency_max_ms=round(1000 * latencies[-1], 1),
        merge_s=None if closed_at is None else round(closed_at.timestamp() - last, 2),
        round_state=state.value)


def _quantile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank quantile of an already sorted, non-empty list."""
    return sorted_values[max(0, math.ceil(q * len(sorted_values)) - 1)]


# ------------------------------------------------------------------------------ the command


def table(runs: list[IngestRun]) -> str:
    lines = ["| devices | database | publishing | update | updates/s | p50 ms | p99 ms | max ms | "
             "acked | stored | rejected | lost | merge s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r.devices} | {r.database} | {r.mode} | {r.update_bytes / 1024:.0f} KiB"
                     f" | {r.updates_per_s:g} | {r.latency_p50_ms:g} | {r.latency_p99_ms:g} | "
                     f"{r.latency_max_ms:g} | {r.acked} | {r.stored} | {r.rejected} | "
                     f"{r.lost} | {r.merge_s if r.merge_s is not None else '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", default="100,1000",
                        help="comma-separated fleet sizes, one run each (default 100,1000)")
    parser.add_argument("--database", default="sqlite",
                        help="sqlite (a fresh file per run) or a PostgreSQL server URL whose "
                             "user may create databases (a fresh one per run, dropped after)")
    parser.add_argument("--rate", type=float, default=None,
                        help="publish one update every 1/RATE s instead of all at once")
    parser.add_argument("--home", type=Path, default=None,
                        help="FEDNANO_HOME with the built base (its width and version are what "
                             "the coordinator needs); default: the cloud's default home")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds to wait for the updates to be stored (default 600)")
    parser.add_argument("--out", type=Path, default=None, help="write summary.json/.md here")
    args = parser.parse_args(argv)
    if args.rate is not None and args.rate <= 0:
        parser.error(f"--rate must be > 0, got {args.rate!r}")
    try:
        sizes = [int(x) for x in args.devices.split(",")]
    except ValueError:
        parser.error(f"--devices takes comma-separated integers, got {args.devices!r}")
    if any(n < 1 for n in sizes):
        parser.error(f"every fleet size must be >= 1, got {args.devices!r}")
    home = args.home or _default_home()

    runs = []
    for n in sizes:
        print(f"{n} devices ({args.database if args.database == 'sqlite' else 'postgresql'}, "
              f"{'burst' if args.rate is None else f'{args.rate:g}/s'})", flush=True)
        try:
            runs.append(run_one(n, database_spec=args.database, home=home, rate=args.rate,
                                timeout_s=args.timeout, say=lambda s: print(s, flush=True)))
        except BenchError as err:
            print(f"ingest benchmark failed at {n} devices: {err}", file=sys.stderr)
            return 1
    command = shlex.join(["python", "benchmarks/ingest.py", *(argv or sys.argv[1:])])
    print(f"\n{table(runs)}\n\n{command}")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "summary.json").write_text(json.dumps(
            {"command": command, "runs": [asdict(r) for r in runs]}, indent=2) + "\n")
        (args.out / "summary.md").write_text(f"{table(runs)}\n\n`{command}`\n")
    return 1 if any(r.lost or r.rejected or r.stored != r.published for r in runs) else 0


def _default_home() -> Path:
    from cloud.layout import Layout

    return Layout.default().home


if __name__ == "__main__":
    sys.exit(main())
