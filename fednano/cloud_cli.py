"""``fednano cloud ...`` and ``fednano devices ...``: the cloud's entry points.

Settings come from ``FEDNANO_*`` environment variables (``cloud.settings.CloudSettings``: the
database URL, broker URL and account, home, secrets); options only choose what to run. The
services are assembled in ``cloud.service``; these commands only read the settings and pick one.
Heavy imports happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from cloud.broker_admin import BrokerAdmin
    from cloud.settings import CloudSettings

cloud_app = typer.Typer(help="Run the cloud: REST API, round coordinator, LLM worker (alone or "
                        "all in one). Configured by FEDNANO_* environment variables.",
                        no_args_is_help=True)
token_app = typer.Typer(help="Operator API tokens (Bearer) for the REST API.",
                        no_args_is_help=True)
cloud_app.add_typer(token_app, name="token")
devices_app = typer.Typer(help="Provision devices: add (prints the secret once), list, revoke, "
                          "write the broker's accounts file.", no_args_is_help=True)
console = Console()

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


# ------------------------------------------------------------------------------ services


@cloud_app.command("api")
def api(host: Host = "127.0.0.1", port: Port = 8000,
        ask: Annotated[bool, typer.Option(
            "--ask", help="Load the base model too, so the dashboard's 'ask the model' page "
                          "answers (POST /api/v1/ask; loads the LLM).")] = False) -> None:
    """The operators' REST API and dashboard alone (OpenAPI at /api/v1/docs, the dashboard at
    /dashboard)."""
    from cloud.service import run_api

    run_api(load_settings(), host=host, port=port, ask=ask)


@cloud_app.command("coordinator")
def coordinator(
    rounds: Annotated[int | None, typer.Option(help="Run this many rounds, then stop opening "
                                               "new ones (the schedule).", min=1)] = None,
    target_accuracy: Annotated[float | None, typer.Option(
        help="Stop opening rounds once a version reaches this accuracy.", min=0, max=1)] = None,
    eval_questions: EvalQuestions = 0,
) -> None:
    """The round coordinator alone (persistent MQTT session; resumes rounds from the database)."""
    from cloud.service import run_coordinator

    run_coordinator(load_settings(), rounds=rounds, target_accuracy=target_accuracy,
                    eval_questions=eval_questions)


@cloud_app.command("llm-worker")
def llm_worker(
    worker_id: Annotated[str, typer.Option(help="This worker's MQTT client id.")] = "llm-worker",
    device: Annotated[str, typer.Option(help="Where the LLM runs: cpu, cuda, cuda:N.")] = "cpu",
) -> None:
    """A frozen-LLM worker serving split-training requests (shared subscription: run several)."""
    from cloud.service import run_llm_worker

    run_llm_worker(load_settings(), worker_id=worker_id, device=device)


@cloud_app.command("serve")
def serve(host: Host = "127.0.0.1", port: Port = 8000,
          eval_questions: EvalQuestions = 200,
          rounds: Annotated[int | None, typer.Option(help="Schedule this many rounds.",
                                                     min=1)] = None) -> None:
    """All in one process: REST API + dashboard + coordinator + LLM worker (the demo); exit 1
    when a service thread died."""
    from cloud.service import run_all_in_one

    if not run_all_in_one(load_settings(), host=host, port=port,
                          eval_questions=eval_questions, rounds=rounds):
        raise typer.Exit(code=1)


# ------------------------------------------------------------------------------ tokens


@token_app.command("create")
def token_create(name: Annotated[str, typer.Argument(help="Who the token is for (audit "
                                                     "actor operator:NAME).")]) -> None:
    """Create an operator token and print it once (only its SHA-256 is stored)."""
    from cloud.api.security import create_operator_token
    from cloud.db.session import session_scope
    from cloud.service import sessions

    with session_scope(sessions(load_settings())) as session:
        row, token = create_operator_token(session, name=name, actor="cli")
    console.print(f"token {row.id} for {name} (shown once):", markup=False)
    print(token)


@token_app.command("list")
def token_list() -> None:
    """Tokens: id, operator, prefix, created, last used, revoked."""
    from cloud.db import crud
    from cloud.db.session import session_scope
    from cloud.service import sessions

    with session_scope(sessions(load_settings())) as session:
        for row in crud.list_tokens(session, limit=1000):
            print(row.id, row.name, row.prefix, row.created_at.isoformat(),
                  row.last_used_at.isoformat() if row.last_used_at else "-",
                  "revoked" if row.revoked_at else "active", sep="\t")


@token_app.command("revoke")
def token_revoke(token_id: int) -> None:
    """Revoke a token by id."""
    from cloud.db import crud
    from cloud.db.session import session_scope
    from cloud.service import sessions

    with session_scope(sessions(load_settings())) as session:
        crud.revoke_token(session, token_id=token_id)
        crud.record_audit(session, actor="cli", action="token.revoke",
                          subject=f"token:{token_id}")
    console.print(f"token {token_id} revoked")


# ------------------------------------------------------------------------------ devices


@devices_app.command("add")
def devices_add(
    device_id: Annotated[str, typer.Argument(help="Device id = MQTT username.")],
    profile: Annotated[str, typer.Option(help="Firmware profile: one of firmware_configs/ "
                                              "(fednano-edge profiles lists them).")],
    out: Annotated[Path | None, typer.Option(
        help="Write the device's kit here: device.yaml, its password (or key and "
             "certificate), ca.crt.")] = None,
    x509: Annotated[bool, typer.Option(
        "--x509", help="Authenticate with a certificate the device CA signs now "
                       "(FEDNANO_DEVICE_CA_FILE/_KEY_FILE, FEDNANO_DEVICE_X509_BROKER_URL) "
                       "instead of a password; needs --out.")] = False,
) -> None:
    """Register a device; prints its secret once, or writes its kit (secrets mode 0600) with
    --out. The config names the broker and bundle as devices reach them
    (FEDNANO_DEVICE_BROKER_URL, FEDNANO_PUBLIC_URL)."""
    from cloud.db.crud import DuplicateRecordError
    from cloud.db.session import session_scope
    from cloud.provisioning import DeviceNetwork, provision
    from cloud.service import sessions

    if x509 and out is None:
        raise typer.BadParameter("an X.509 device's private key is written to its kit: give "
                                 "--out DIR", param_hint="--x509")
    settings = load_settings()
    staged = None
    try:
        network = DeviceNetwork.from_settings(settings)
        with session_scope(sessions(settings)) as session:
            kit = provision(session, network, device_id=device_id, profile=profile, x509=x509,
                            actor="cli", reserved_ids={settings.broker_username},
                            iterations=settings.mqtt_hash_iterations)
            staged = kit.stage(out) if out is not None else None
    except BaseException as err:
        if staged is not None:  # the registration was not committed: its kit goes too
            staged.discard()
        if isinstance(err, ValueError | DuplicateRecordError):  # nothing added, nothing kept
            raise typer.BadParameter(str(err)) from err
        if isinstance(err, OSError):
            raise typer.BadParameter(f"cannot write the kit: {err}", param_hint="--out") from err
        raise
    try:
        paths = staged.place() if staged is not None else []
    except OSError as err:
        raise typer.BadParameter(
            f"{device_id} is registered but its kit could not be moved into place ({err}); "
            f"it is in {staged.staging if staged else '?'}", param_hint="--out") from err
    _broker_change(settings, lambda admin: admin.add_device(device_id, kit.broker_secret))
    if out is not None:
        console.print(f"added {device_id} ({kit.kind.value}): wrote "
                      f"{', '.join(p.name for p in paths)} to {out}", markup=False)
    else:
        console.print(f"added {device_id}; its MQTT secret (shown once):", markup=False)
        print(kit.secret)


@devices_app.command("list")
def devices_list() -> None:
    """Devices: id, profile, status, online, last seen."""
    from cloud import registry
    from cloud.db.session import session_scope
    from cloud.service import sessions

    with session_scope(sessions(load_settings())) as session:
        page = registry.list_devices(session, limit=1000)
        for d in page.items:
            print(d.id, d.profile, d.status.value, "online" if d.online else "offline",
                  d.last_seen_at.isoformat() if d.last_seen_at else "-", sep="\t")


@devices_app.command("revoke")
def devices_revoke(device_id: str,
                   reason: Annotated[str | None, typer.Option(help="Kept in the audit log.")]
                   = None) -> None:
    """Revoke a device and its credentials, at the gate and at the running broker (its live
    connection is closed; its next CONNECT is refused, or for an X.509 device everything it
    publishes or subscribes)."""
    from cloud import registry
    from cloud.db.crud import ConflictError, RecordNotFoundError
    from cloud.db.session import session_scope
    from cloud.service import sessions

    settings = load_settings()
    try:
        with session_scope(sessions(settings)) as session:
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
    from cloud.service import sessions

    settings = load_settings()
    service = registry.ServiceAccount(settings.broker_username,
                                      settings.broker_password.get_secret_value())
    with session_scope(sessions(settings)) as session:
        files = registry.write_broker_files(session, directory=settings.resolved_broker_dir,
                                            services=[service],
                                            group=settings.broker_file_group)
    console.print(f"wrote {files.dynsec_file}", markup=False)

