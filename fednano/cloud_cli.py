"""``fednano cloud ...`` and ``fednano devices ...``: the cloud's entry points.

Settings come from ``FEDNANO_*`` environment variables (``cloud.settings.CloudSettings``: the
database URL, broker URL and account, home, secrets); options only choose what to run.
Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol

import typer
from rich.console import Console

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from cloud.aggregation import Evaluator
    from cloud.ask import ModelAnswerer
    from cloud.base.build import LoadedBase
    from cloud.broker_admin import BrokerAdmin
    from cloud.coordinator_mqtt import CoordinatorService
    from cloud.llm_worker import LLMWorker
    from cloud.settings import CloudSettings
    from shared.adapters import AdapterState
    from shared.mqtt import MqttClient

cloud_app = typer.Typer(help="Run the cloud: REST API, round coordinator, LLM worker (alone or "
                        "all in one). Configured by FEDNANO_* environment variables.",
                        no_args_is_help=True)
token_app = typer.Typer(help="Operator API tokens (Bearer) for the REST API.",
                        no_args_is_help=True)
cloud_app.add_typer(token_app, name="token")
devices_app = typer.Typer(help="Provision devices: add (prints the secret once), list, revoke, "
                          "write the broker's accounts file.", no_args_is_help=True)
console = Console()
log = logging.getLogger(__name__)

Host = Annotated[str, typer.Option(help="Interface the API listens on.")]
Port = Annotated[int, typer.Option(help="TCP port of the API.", min=1, max=65535)]
EvalQuestions = Annotated[int, typer.Option(
    help="Held-out easy-VQA questions each new version is evaluated on (0: no evaluation).",
    min=0)]


def load_settings() -> CloudSettings:
    """``CloudSettings`` from the environment; a readable error instead of a traceback."""
    from pydantic import ValidationError

    from cloud.settings import CloudSettings

    try:
        return CloudSettings()
    except ValidationError as err:
        console.print(f"invalid cloud settings: {err}", style="red", markup=False)
        raise typer.Exit(code=2) from err


def _sessions(settings: CloudSettings) -> sessionmaker[Session]:
    from cloud.db import migrate
    from cloud.db.session import make_engine, make_session_factory

    migrate.upgrade(settings.resolved_database_url)
    return make_session_factory(make_engine(settings.resolved_database_url))


def _serve_metrics(settings: CloudSettings) -> None:
    from cloud import metrics

    metrics.serve(settings.metrics_port)


def _logging(settings: CloudSettings) -> None:
    from shared import logs

    logs.configure(settings.log_format)


# ------------------------------------------------------------------------------ services


@cloud_app.command("api")
def api(host: Host = "127.0.0.1", port: Port = 8000,
        ask: Annotated[bool, typer.Option(
            "--ask", help="Load the base model too, so the dashboard's 'ask the model' page "
                          "answers (POST /api/v1/ask; loads the LLM).")] = False) -> None:
    """The operators' REST API and dashboard alone (OpenAPI at /api/v1/docs, the dashboard at
    /dashboard)."""
    import uvicorn

    from cloud.api.main import create_app

    settings = load_settings()
    _sessions(settings)  # migrate before serving
    answerer = _answerer(_load_base(settings)) if ask else None
    uvicorn.run(create_app(settings, answerer=answerer), host=host, port=port)


@cloud_app.command("coordinator")
def coordinator(
    rounds: Annotated[int | None, typer.Option(help="Run this many rounds, then stop opening "
                                               "new ones (the schedule).", min=1)] = None,
    target_accuracy: Annotated[float | None, typer.Option(
        help="Stop opening rounds once a version reaches this accuracy.", min=0, max=1)] = None,
    eval_questions: EvalQuestions = 0,
) -> None:
    """The round coordinator alone (persistent MQTT session; resumes rounds from the database)."""
    settings = load_settings()
    _logging(settings)
    _serve_metrics(settings)
    base = _load_base(settings) if eval_questions else None
    service, client = _coordinator_service(settings, base, eval_questions)
    _schedule(settings, rounds, target_accuracy)
    try:
        service.run()
    finally:
        client.close()


@cloud_app.command("llm-worker")
def llm_worker(
    worker_id: Annotated[str, typer.Option(help="This worker's MQTT client id.")] = "llm-worker",
    device: Annotated[str, typer.Option(help="Where the LLM runs: cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """A frozen-LLM worker serving split-training requests (shared subscription: run several)."""
    settings = load_settings()
    _logging(settings)
    _serve_metrics(settings)
    base = _load_base(settings)
    base.backend.to(device)
    worker, client = _llm_worker(settings, base, worker_id)
    worker.subscribe()
    try:
        worker.serve_forever()
    finally:
        client.close()


@cloud_app.command("serve")
def serve(host: Host = "127.0.0.1", port: Port = 8000,
          eval_questions: EvalQuestions = 200,
          rounds: Annotated[int | None, typer.Option(help="Schedule this many rounds.",
                                                     min=1)] = None) -> None:
    """All in one process: REST API + dashboard + coordinator + LLM worker (the demo)."""
    import uvicorn

    from cloud.api.main import create_app

    settings = load_settings()
    _logging(settings)
    base = _load_base(settings)
    worker, worker_client = _llm_worker(settings, base, "llm-worker-serve")
    service, client = _coordinator_service(settings, base, eval_questions)
    _schedule(settings, rounds, None)
    worker.start()
    service.start()
    stopping, died = threading.Event(), threading.Event()
    _stop_when_a_service_dies([service, worker], stopping, died)
    try:
        uvicorn.run(create_app(settings, broker_connected=lambda: client.connected,
                               answerer=_answerer(base)), host=host, port=port)
    finally:
        stopping.set()
        service.stop()
        worker.stop()
        client.close()
        worker_client.close()
    if died.is_set():
        raise typer.Exit(code=1)


class _Service(Protocol):
    @property
    def alive(self) -> bool: ...


def _stop_when_a_service_dies(services: list[_Service], stopping: threading.Event,
                              died: threading.Event) -> None:
    """If the coordinator's or the LLM worker's thread dies (its error is logged by the
    thread), stop the whole process (exit 1) rather than serve an API with no rounds behind
    it: a supervisor (systemd, compose, the fleet runner) restarts it and it resumes."""

    def watch() -> None:
        while not stopping.wait(1.0):
            if not all(s.alive for s in services):
                log.error("a cloud service thread died: stopping this process")
                died.set()
                os.kill(os.getpid(), signal.SIGTERM)  # uvicorn shuts down cleanly
                return

    threading.Thread(target=watch, daemon=True, name="service-watchdog").start()


# ------------------------------------------------------------------------------ assembly


def _load_base(settings: CloudSettings) -> LoadedBase:
    """The current base, its NanoAdapters at the config its manifest records."""
    from cloud.base.build import load_base
    from cloud.base.manifest import BaseNotBuiltError

    try:
        return load_base(settings.home)
    except BaseNotBuiltError as err:
        console.print(str(err), style="red", markup=False)
        raise typer.Exit(code=1) from err


def _answerer(base: LoadedBase) -> ModelAnswerer:
    """The dashboard's "ask the model": its own NanoEdge over the base, the newest version."""
    from cloud.ask import answerer_for_base

    return answerer_for_base(base, base.adapter_config)


def coordinator_client(settings: CloudSettings) -> MqttClient:
    """The coordinator's (unconnected) client: persistent session, manual acknowledgements."""
    from cloud.coordinator_mqtt import coordinator_client_options
    from shared.mqtt import BrokerAddress, MqttClient

    return MqttClient(BrokerAddress.parse(settings.broker_url), coordinator_client_options(
        settings.broker_username, settings.broker_password.get_secret_value(),
        max_batch=settings.ingest_batch))


def _coordinator_service(settings: CloudSettings, base: LoadedBase | None,
                         eval_questions: int) -> tuple[CoordinatorService, MqttClient]:
    from cloud.aggregation import Aggregator
    from cloud.blobs import BlobStore
    from cloud.coordinator import Coordinator
    from cloud.coordinator_mqtt import CoordinatorService, MqttPublisher

    blobs = BlobStore(settings.blob_dir)
    evaluator = _evaluator(base, eval_questions) if base is not None and eval_questions else None
    client = coordinator_client(settings)
    client.connect()
    coordinator_ = Coordinator(_sessions(settings), blobs=blobs,
                               publisher=MqttPublisher(client),
                               aggregator=Aggregator(blobs, evaluator=evaluator),
                               base_version=_base_version(settings, base))
    coordinator_.ensure_initial_version(_initial_state(settings, base))
    _sync_broker(settings)
    service = CoordinatorService(coordinator_, client, tick_interval_s=settings.tick_interval_s,
                                 max_batch=settings.ingest_batch,
                                 batch_wait_s=settings.ingest_wait_ms / 1000)
    return service, client


def _sync_broker(settings: CloudSettings) -> None:
    """Revocations made while the broker was unreachable reach it now (see broker_admin)."""
    from cloud import broker_admin
    from cloud.db.session import session_scope

    with session_scope(_sessions(settings)) as session:
        broker_admin.sync_at_start(settings, session)


def _base_version(settings: CloudSettings, base: LoadedBase | None) -> str:
    from cloud.base.manifest import BaseNotBuiltError, read_manifest

    if base is not None:
        return base.version
    try:
        return read_manifest(settings.home, None).version
    except BaseNotBuiltError as err:
        console.print(str(err), style="red", markup=False)
        raise typer.Exit(code=1) from err


def _initial_state(settings: CloudSettings, base: LoadedBase | None) -> AdapterState:
    """Fresh NanoAdapters at the base's width and recorded config (seeded): the first global
    version."""
    import torch

    from cloud.base.manifest import read_manifest
    from shared.adapters import NanoAdapters

    if base is not None:
        width, config = base.edge.width, base.adapter_config
    else:
        manifest = read_manifest(settings.home, None)
        width, config = manifest.config.width, manifest.adapter
    torch.manual_seed(0)
    return NanoAdapters(width, config).adapter_state_dict()


def _evaluator(base: LoadedBase, questions: int) -> Evaluator:
    from cloud.evaluator import base_evaluator

    return base_evaluator(base, questions)


def _llm_worker(settings: CloudSettings, base: LoadedBase,
                worker_id: str) -> tuple[LLMWorker, MqttClient]:
    from cloud.llm_worker import LLMWorker, WorkerConfig, worker_client_options
    from shared.mqtt import BrokerAddress, MqttClient

    options = worker_client_options(worker_id, settings.broker_username,
                                    settings.broker_password.get_secret_value())
    client = MqttClient(BrokerAddress.parse(settings.broker_url), options)
    client.connect()
    worker = LLMWorker(base.backend, client, WorkerConfig(base_version=base.version,
                                                          worker_id=worker_id))
    return worker, client


def _schedule(settings: CloudSettings, rounds: int | None, accuracy: float | None) -> None:
    if rounds is None and accuracy is None:
        return
    from cloud.db import crud
    from cloud.db.session import session_scope
    from cloud.rounds import Schedule, load_schedule, save_schedule

    with session_scope(_sessions(settings)) as session:
        stored = load_schedule(session)
        if stored.enabled and (stored.target_rounds, stored.target_accuracy) == (rounds,
                                                                                accuracy):
            return  # a restart of the same command: the running schedule goes on
        newest = crud.list_rounds(session, limit=1)
        save_schedule(session, Schedule(enabled=True, target_rounds=rounds,
                                        target_accuracy=accuracy,
                                        after_round_id=newest[0].id if newest else 0))


# ------------------------------------------------------------------------------ tokens


@token_app.command("create")
def token_create(name: Annotated[str, typer.Argument(help="Who the token is for (audit "
                                                     "actor operator:NAME).")]) -> None:
    """Create an operator token and print it once (only its SHA-256 is stored)."""
    from cloud.api.security import create_operator_token
    from cloud.db.session import session_scope

    with session_scope(_sessions(load_settings())) as session:
        row, token = create_operator_token(session, name=name, actor="cli")
    console.print(f"token {row.id} for {name} (shown once):", markup=False)
    print(token)


@token_app.command("list")
def token_list() -> None:
    """Tokens: id, operator, prefix, created, last used, revoked."""
    from cloud.db import crud
    from cloud.db.session import session_scope

    with session_scope(_sessions(load_settings())) as session:
        for row in crud.list_tokens(session, limit=1000):
            print(row.id, row.name, row.prefix, row.created_at.isoformat(),
                  row.last_used_at.isoformat() if row.last_used_at else "-",
                  "revoked" if row.revoked_at else "active", sep="\t")


@token_app.command("revoke")
def token_revoke(token_id: int) -> None:
    """Revoke a token by id."""
    from cloud.db import crud
    from cloud.db.session import session_scope

    with session_scope(_sessions(load_settings())) as session:
        crud.revoke_token(session, token_id=token_id)
        crud.record_audit(session, actor="cli", action="token.revoke",
                          subject=f"token:{token_id}")
    console.print(f"token {token_id} revoked")


# ------------------------------------------------------------------------------ devices


@devices_app.command("add")
def devices_add(
    device_id: Annotated[str, typer.Argument(help="Device id = MQTT username.")],
    profile: Annotated[str, typer.Option(help="Firmware profile (firmware_configs/).")],
    out: Annotated[Path | None, typer.Option(help="Write device.yaml + password here.")] = None,
) -> None:
    """Register a device; prints its secret once (or writes it, mode 0600, with --out)."""
    from cloud import registry
    from cloud.db.crud import DuplicateRecordError
    from cloud.db.session import session_scope

    settings = load_settings()
    try:
        with session_scope(_sessions(settings)) as session:
            device, secret = registry.add_device(
                session, device_id=device_id, profile=profile, actor="cli",
                reserved_ids={settings.broker_username},
                iterations=settings.mqtt_hash_iterations)
            config = {"broker_url": settings.broker_url, "bundle_url": settings.bundle_url}
            if out is not None:
                paths = registry.write_device_files(out, device=device, secret=secret, **config)
    except (ValueError, DuplicateRecordError) as err:
        raise typer.BadParameter(str(err)) from err
    _broker_change(settings, lambda admin: admin.add_device(device_id, secret))
    if out is not None:
        console.print(f"added {device_id}: wrote {paths[0]} and {paths[1]}", markup=False)
    else:
        console.print(f"added {device_id}; its MQTT secret (shown once):", markup=False)
        print(secret)


@devices_app.command("list")
def devices_list() -> None:
    """Devices: id, profile, status, online, last seen."""
    from cloud import registry
    from cloud.db.session import session_scope

    with session_scope(_sessions(load_settings())) as session:
        page = registry.list_devices(session, limit=1000)
        for d in page.items:
            print(d.id, d.profile, d.status.value, "online" if d.online else "offline",
                  d.last_seen_at.isoformat() if d.last_seen_at else "-", sep="\t")


@devices_app.command("revoke")
def devices_revoke(device_id: str,
                   reason: Annotated[str | None, typer.Option(help="Kept in the audit log.")]
                   = None) -> None:
    """Revoke a device and its credentials, at the gate and at the running broker (its live
    connection is closed, its next CONNECT refused)."""
    from cloud import registry
    from cloud.db.crud import ConflictError, RecordNotFoundError
    from cloud.db.session import session_scope

    settings = load_settings()
    try:
        with session_scope(_sessions(settings)) as session:
            registry.revoke_device(session, device_id=device_id, actor="cli", reason=reason)
    except (RecordNotFoundError, ConflictError) as err:
        raise typer.BadParameter(str(err)) from err
    _broker_change(settings, lambda admin: admin.remove_device(device_id))
    console.print(f"revoked {device_id}", markup=False)


def _broker_change(settings: CloudSettings, change: Callable[[BrokerAdmin], None]) -> None:
    """Apply a registry change to the running broker; say so when it could not be reached."""
    from cloud import broker_admin

    error = broker_admin.apply(settings, change)
    if error is not None:
        console.print(f"the database changed but the broker was not updated ({error}); the "
                      "coordinator syncs revocations at its next start", markup=False)


@devices_app.command("broker-files")
def devices_broker_files() -> None:
    """Write the broker's dynamic-security file from the registry (before the broker starts:
    a running broker takes changes live, and rewrites this file itself)."""
    from cloud import registry
    from cloud.db.session import session_scope

    settings = load_settings()
    service = registry.ServiceAccount(settings.broker_username,
                                      settings.broker_password.get_secret_value())
    with session_scope(_sessions(settings)) as session:
        files = registry.write_broker_files(session, directory=settings.resolved_broker_dir,
                                            services=[service],
                                            group=settings.broker_file_group)
    console.print(f"wrote {files.dynsec_file}", markup=False)

