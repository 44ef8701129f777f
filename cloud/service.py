"""The cloud assembled from its settings: database, broker clients, coordinator, LLM worker, API.

``fednano cloud ...`` is a thin layer over this module: it reads ``CloudSettings`` and picks
which service runs (``run_api``, ``run_coordinator``, ``run_llm_worker`` or all of them in one
process, ``run_all_in_one``); everything they are built from is here, so another entry point (a
test, a supervisor) assembles the same cloud. Every part takes the base from the settings' home
and its NanoAdapters' config from that base's manifest. Failures of the environment (no base,
broker down, database unreachable) propagate as their own exceptions; the CLI turns them into
one line (``fednano.errors``). Heavy modules (the LLM, FastAPI) are imported by the parts that
need them, so a coordinator without evaluation never loads the LLM.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from cloud.aggregation import Evaluator
    from cloud.ask import ModelAnswerer
    from cloud.base.build import LoadedBase
    from cloud.coordinator_mqtt import CoordinatorService
    from cloud.llm_worker import LLMWorker
    from cloud.settings import CloudSettings
    from shared.adapters import AdapterState
    from shared.mqtt import MqttClient

log = logging.getLogger(__name__)


def sessions(settings: CloudSettings) -> sessionmaker[Session]:
    """Sessions of the settings' database, migrated to the newest schema first."""
    from cloud.db import migrate
    from cloud.db.session import make_engine, make_session_factory

    migrate.upgrade(settings.resolved_database_url)
    return make_session_factory(make_engine(settings.resolved_database_url))


def configure_process(settings: CloudSettings, *, metrics: bool) -> None:
    """Log lines as the settings ask; with ``metrics``, this process's Prometheus ``/metrics``."""
    from cloud import metrics as prometheus
    from shared import logs

    logs.configure(settings.log_format)
    if metrics:
        prometheus.serve(settings.metrics_port)


def load_current_base(settings: CloudSettings) -> LoadedBase:
    """The current base under the settings' home, its NanoAdapters at the config its
    manifest records (``BaseNotBuiltError`` when there is none)."""
    from cloud.base.build import load_base

    return load_base(settings.home)


def answerer(base: LoadedBase) -> ModelAnswerer:
    """The dashboard's "ask the model": its own NanoEdge over the base, the newest version."""
    from cloud.ask import answerer_for_base

    return answerer_for_base(base, base.adapter_config)


# ------------------------------------------------------------------------------ coordinator


def coordinator_client(settings: CloudSettings) -> MqttClient:
    """The coordinator's (unconnected) client: persistent session, manual acknowledgements."""
    from cloud.coordinator_mqtt import coordinator_client_options
    from shared.mqtt import BrokerAddress, MqttClient

    return MqttClient(BrokerAddress.parse(settings.broker_url), coordinator_client_options(
        settings.broker_username, settings.broker_password.get_secret_value(),
        max_batch=settings.ingest_batch))


def coordinator_service(settings: CloudSettings, base: LoadedBase | None,
                        eval_questions: int) -> tuple[CoordinatorService, MqttClient]:
    """The coordinator over a connected client (connected first: a broker that is down is
    the error a user sees, before anything else is read), with the first global version
    ensured and the broker's accounts synced. ``base`` is needed only to evaluate versions."""
    from cloud.aggregation import Aggregator
    from cloud.blobs import BlobStore
    from cloud.coordinator import Coordinator
    from cloud.coordinator_mqtt import CoordinatorService, MqttPublisher

    blobs = BlobStore(settings.blob_dir)
    evaluator = _evaluator(base, eval_questions) if base is not None and eval_questions else None
    client = coordinator_client(settings)
    client.connect()
    version, initial = _first_version(settings, base)
    coordinator = Coordinator(sessions(settings), blobs=blobs, publisher=MqttPublisher(client),
                              aggregator=Aggregator(blobs, evaluator=evaluator,
                                                    merge_processes=settings.merge_processes),
                              base_version=version)
    coordinator.ensure_initial_version(initial)
    _sync_broker(settings)
    service = CoordinatorService(coordinator, client, tick_interval_s=settings.tick_interval_s,
                                 max_batch=settings.ingest_batch,
                                 batch_wait_s=settings.ingest_wait_ms / 1000)
    return service, client


def _evaluator(base: LoadedBase, questions: int) -> Evaluator:
    from cloud.evaluator import base_evaluator

    return base_evaluator(base, questions)


def _first_version(settings: CloudSettings,
                   base: LoadedBase | None) -> tuple[str, AdapterState]:
    """The base's version, and fresh NanoAdapters at its width and recorded config (seeded):
    the first global version. Without a loaded base only its manifest is read."""
    import torch

    from cloud.base.manifest import read_manifest
    from shared.adapters import NanoAdapters

    if base is not None:
        version, width, config = base.version, base.edge.width, base.adapter_config
    else:
        manifest = read_manifest(settings.home, None)
        version, width, config = manifest.version, manifest.config.width, manifest.adapter
    torch.manual_seed(0)
    return version, NanoAdapters(width, config).adapter_state_dict()


def _sync_broker(settings: CloudSettings) -> None:
    """Revocations made while the broker was unreachable reach it now (see broker_admin)."""
    from cloud import broker_admin
    from cloud.db.session import session_scope

    with session_scope(sessions(settings)) as session:
        broker_admin.sync_at_start(settings, session)


def schedule(settings: CloudSettings, rounds: int | None, accuracy: float | None) -> None:
    """Store the rounds schedule (a number of rounds or a target accuracy); nothing when
    neither is given, and a restart of the same command keeps the running schedule."""
    if rounds is None and accuracy is None:
        return
    from cloud.db import crud
    from cloud.db.session import session_scope
    from cloud.rounds import Schedule, load_schedule, save_schedule

    with session_scope(sessions(settings)) as session:
        stored = load_schedule(session)
        if stored.enabled and (stored.target_rounds, stored.target_accuracy) == (rounds,
                                                                                accuracy):
            return  # a restart of the same command: the running schedule goes on
        newest = crud.list_rounds(session, limit=1)
        save_schedule(session, Schedule(enabled=True, target_rounds=rounds,
                                        target_accuracy=accuracy,
                                        after_round_id=newest[0].id if newest else 0))


# ------------------------------------------------------------------------------ LLM worker


def llm_worker(settings: CloudSettings, base: LoadedBase,
               worker_id: str) -> tuple[LLMWorker, MqttClient]:
    """A frozen-LLM worker over its own connected client."""
    from cloud.llm_worker import LLMWorker, WorkerConfig, worker_client_options
    from shared.mqtt import BrokerAddress, MqttClient

    options = worker_client_options(worker_id, settings.broker_username,
                                    settings.broker_password.get_secret_value())
    client = MqttClient(BrokerAddress.parse(settings.broker_url), options)
    client.connect()
    worker = LLMWorker(base.backend, client, WorkerConfig(base_version=base.version,
                                                          worker_id=worker_id))
    return worker, client


# ------------------------------------------------------------------------------ the services


def run_api(settings: CloudSettings, *, host: str, port: int, ask: bool) -> None:
    """The REST API and dashboard alone; ``ask`` loads the base so "ask the model" answers."""
    import uvicorn

    from cloud.api.main import create_app

    sessions(settings)  # migrate before serving
    model = answerer(load_current_base(settings)) if ask else None
    uvicorn.run(create_app(settings, answerer=model), host=host, port=port)


def run_coordinator(settings: CloudSettings, *, rounds: int | None,
                    target_accuracy: float | None, eval_questions: int) -> None:
    """The round coordinator alone, until it stops (it loads the LLM only to evaluate)."""
    configure_process(settings, metrics=True)
    base = load_current_base(settings) if eval_questions else None
    service, client = coordinator_service(settings, base, eval_questions)
    schedule(settings, rounds, target_accuracy)
    try:
        service.run()
    finally:
        client.close()
        service.coordinator.aggregator.close()  # its merge workers, if any were started


def run_llm_worker(settings: CloudSettings, *, worker_id: str, device: str) -> None:
    """One frozen-LLM worker on ``device`` (cpu, cuda, cuda:N), until it stops."""
    configure_process(settings, metrics=True)
    base = load_current_base(settings)
    base.backend.to(device)
    worker, client = llm_worker(settings, base, worker_id)
    worker.subscribe()
    try:
        worker.serve_forever()
    finally:
        client.close()


def run_all_in_one(settings: CloudSettings, *, host: str, port: int, eval_questions: int,
                   rounds: int | None) -> bool:
    """API + dashboard + coordinator + LLM worker in this process, until the API stops.

    Returns False when a service thread died (the process should exit non-zero so that its
    supervisor restarts it), True on an ordinary shutdown.
    """
    import uvicorn

    from cloud.api.main import create_app

    configure_process(settings, metrics=False)
    base = load_current_base(settings)
    worker, worker_client = llm_worker(settings, base, "llm-worker-serve")
    service, client = coordinator_service(settings, base, eval_questions)
    schedule(settings, rounds, None)
    worker.start()
    service.start()
    stopping, died = threading.Event(), threading.Event()
    _stop_when_a_service_dies([service, worker], stopping, died)
    try:
        uvicorn.run(create_app(settings, broker_connected=lambda: client.connected,
                               answerer=answerer(base)), host=host, port=port)
    finally:
        stopping.set()
        service.stop()
        worker.stop()
        client.close()
        worker_client.close()
        service.coordinator.aggregator.close()  # its merge workers, if any were started
    return not died.is_set()


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
