"""``fednano-edge``: the device-side command line.

``validate`` checks a firmware profile or a device config before it is flashed (or at boot),
``profiles`` lists the shipped profiles, ``schema`` exports their JSON schemas for editors,
``self-check`` verifies a NanoEdge bundle and runs its start-up inference with a profile's
providers, ``fetch-bundle`` downloads a bundle with checksum verification, and ``run`` starts
the device agent. Only ``self-check`` and ``run`` import torch and onnxruntime (inside the
command), so the other commands run on a provisioning laptop.

Exit codes of ``run``: 0 after a clean shutdown (SIGTERM / SIGINT), 1 invalid config, bundle
or data, 2 bad usage, 3 unusable local state (the message names the file and the recovery),
4 the broker refused the device's credentials (retrying would not help).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, NoReturn

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from edge.config import DeviceConfig, load_device_config, write_schemas
from edge.profiles import (
    CPU,
    CUDA,
    TENSORRT,
    ConfigError,
    DeviceProfile,
    Issue,
    RuntimeSettings,
    default_profiles_dir,
    list_profiles,
    load_profile,
    profile_path,
    read_yaml_mapping,
)
from shared import logs
from shared.bundle import BundleError
from shared.version_option import add_version_option

if TYPE_CHECKING:
    from edge.local_data import DataSpec
    from edge.runtime import NanoEdgeRuntime, SelfTestReport

app = typer.Typer(
    name="fednano-edge",
    help="FedNano edge device: validate firmware profiles and device configs, list profiles, "
    "fetch and self-check a NanoEdge bundle, run the device agent.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)



add_version_option(app, "fednano-edge")


ProfilesDir = Annotated[
    Path | None,
    typer.Option(envvar="FEDNANO_PROFILES_DIR", show_default=False,
                 help="Folder of firmware profiles (env FEDNANO_PROFILES_DIR; default: the "
                 "repository's firmware_configs/)."),
]
Kind = Literal["profile", "device config"]
_SHORT = {TENSORRT: "TensorRT", CUDA: "CUDA", CPU: "CPU"}


@app.command()
def validate(
    path: Annotated[str, typer.Argument(
        help="A profile YAML, a device-config YAML, or the name of a shipped profile. "
        "The kind is detected: a device config has device_id, a profile has hardware.",
        show_default=False)],
    profiles_dir: ProfilesDir = None,
    skip_secrets: Annotated[bool, typer.Option(
        "--skip-secrets",
        help="Do not read the broker password (validating off the device).")] = False,
    allow_inline_password: Annotated[bool, typer.Option(
        "--allow-inline-password",
        help="Accept credentials.password written in the YAML (local demos only).")] = False,
) -> None:
    """Validate PATH and print a summary; exit 1 naming every bad field."""
    try:
        kind, source = _detect(path, profiles_dir)
        if kind == "profile":
            _print_profile(load_profile(source, directory=profiles_dir), source)
        else:
            config = load_device_config(
                Path(source), allow_inline_password=allow_inline_password,
                check_secrets=not skip_secrets, profiles_dir=profiles_dir)
            _print_device(config, source)
    except ConfigError as err:
        _fail(err)


@app.command()
def profiles(profiles_dir: ProfilesDir = None) -> None:
    """List the shipped firmware profiles (exit 1 if any fails validation)."""
    folder = profiles_dir or default_profiles_dir()
    table = Table("profile", "JetPack", "power mode", "providers", "budget MiB",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.columns[0].no_wrap = True
    broken: list[Issue] = []
    for name in list_profiles(folder):
        try:
            p = load_profile(name, directory=folder)
        except ConfigError as err:
            broken += err.issues
            table.add_row(Text(name), Text("INVALID", style="red"))
            continue
        providers = ">".join(_SHORT.get(x, x) for x in p.runtime.providers)
        if p.runtime.engine != "onnxruntime":  # another engine runs the CPU graph
            providers = f"{providers} on {p.runtime.engine}"
        table.add_row(*map(Text, (p.name, p.hardware.jetpack or "-", p.hardware.power_mode or "-",
                                  providers, str(p.memory_budget_mib))))
    _console().print(table)
    if broken:
        _fail(ConfigError(broken))


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option(
        help="Folder to write profile.schema.json and device-config.schema.json into "
        "(default: the profiles folder).", show_default=False)] = None,
) -> None:
    """Export the JSON schemas of profiles and device configs (for editors and CI)."""
    for path in write_schemas(out or default_profiles_dir()):
        _console().print(Text(f"wrote {path}"))


@app.command("self-check")
def self_check(
    bundle: Annotated[Path, typer.Argument(
        help="A bundle folder, or its .tar (unpacked into a temporary folder).",
        show_default=False)],
    profile: Annotated[str | None, typer.Option(
        help="Firmware profile (name or YAML) whose providers, threads and batch to use "
        "(default: onnxruntime's CPU provider).", show_default=False)] = None,
    profiles_dir: ProfilesDir = None,
    state_dir: Annotated[Path | None, typer.Option(
        help="The device's state folder, for the TensorRT engine cache (default: a temporary "
        "folder, so engines are rebuilt).", show_default=False)] = None,
    warmup: Annotated[int, typer.Option(
        help="Untimed self-tests before the timed one (TensorRT builds its engines on the "
        "first run).", min=0)] = 1,
) -> None:
    """Verify BUNDLE, open it with the profile's providers and run its self-test; exit 1 if bad."""
    try:
        settings = load_profile(profile, directory=profiles_dir).runtime if profile else None
    except ConfigError as err:
        _fail(err)
    with tempfile.TemporaryDirectory(prefix="fednano-self-check-") as tmp:
        started = time.perf_counter()
        runtime, report = _run_self_check(bundle, settings, state_dir or Path(tmp), warmup,
                                          scratch=Path(tmp))
        seconds = time.perf_counter() - started
    _print_self_check(runtime, report, bundle, seconds)


def _run_self_check(
    bundle: Path, settings: RuntimeSettings | None, state_dir: Path, warmup: int, *,
    scratch: Path,
) -> tuple[NanoEdgeRuntime, SelfTestReport]:
    """Unpack a tar into ``scratch``, load (no built-in self-test), warm up, timed self-test."""
    try:
        from edge import runtime as rt
    except ModuleNotFoundError as err:
        _fail_bundle(f"self-check needs torch and onnxruntime (pip install 'fednano[edge]'); "
                     f"missing {err.name!r}")
    try:
        folder = rt.unpack_bundle(bundle, scratch / "bundle") if bundle.is_file() else bundle
        if settings is None:
            loaded = rt.load_bundle(folder, self_test=False)
        else:
            loaded = rt.load_bundle_for_profile(folder, settings, state_dir, self_test=False)
        for _ in range(warmup):
            loaded.self_test()
        return loaded, loaded.self_test()
    except rt.BundleError as err:
        _fail_bundle(str(err))


def _print_self_check(
    runtime: NanoEdgeRuntime, report: SelfTestReport, source: Path, seconds: float,
) -> None:
    manifest = runtime.manifest
    table = _summary_table(f"bundle {runtime.bundle_version}: self-test passed ({source})")
    rows = {
        "bundle version": runtime.bundle_version,
        "base version": manifest.base_version,
        "precision": f"{manifest.precision} (embedder {manifest.embedder.dtype})",
        "encoder graph": f"{runtime.target}: {runtime.variant.file} "
                         f"({runtime.variant.calibration.activations or 'fp32'} activations)",
        "providers": " > ".join(report.providers),
        "visual tokens": " x ".join(map(str, report.shape)),
        "cosine to fp32": f"min {report.min_cosine:.4f}, mean {report.mean_cosine:.4f} "
                          f"(threshold {report.threshold:.4f}; CPU at export "
                          f"{runtime.variant.self_test_cosine:.4f})",
        "latency": f"{report.latency_ms:.1f} ms (one image)",
        "load + checks": f"{seconds:.1f} s",
    }
    for key, value in rows.items():
        table.add_row(Text(key), Text(value))
    _console().print(table)


def _detect(path: str, profiles_dir: Path | None) -> tuple[Kind, str]:
    """Is PATH a profile or a device config? A bare name is a shipped profile."""
    file = Path(path)
    if not file.is_file():
        return "profile", str(profile_path(path, profiles_dir))
    data = read_yaml_mapping(file)
    if "device_id" in data or "broker" in data:
        return "device config", path
    if "hardware" in data or "runtime" in data:
        return "profile", path
    raise ConfigError.single(file, "", "neither a device config (no device_id) nor a profile "
                             "(no hardware)")


def _print_profile(profile: DeviceProfile, source: str) -> None:
    table = _summary_table(f"profile {profile.name}: valid ({source})")
    _profile_rows(table, profile)
    _console().print(table)
    _print_warnings(profile.warnings())


def _print_device(config: DeviceConfig, source: str) -> None:
    table = _summary_table(f"device config {config.device_id}: valid ({source})")
    broker = config.broker
    rows = {
        "device id / username": config.username or f"{config.device_id} (certificate)",
        "broker": f"{broker.host}:{broker.port} ({'TLS' if broker.tls else 'plaintext'})",
        "credentials": config.credentials.source(),
        "bundle url": config.bundle_url,
        "state dir": str(config.state_dir),
    }
    for key, value in rows.items():
        table.add_row(Text(key), Text(value))
    table.add_section()
    _profile_rows(table, config.profile)
    _console().print(table)
    _print_warnings(config.warnings())


def _profile_rows(table: Table, p: DeviceProfile) -> None:
    hw, rt, release = p.hardware, p.runtime, p.hardware.release
    stack = (f"JetPack {release.version}: L4T {release.l4t}, CUDA {release.cuda}, "
             f"TensorRT {release.tensorrt}") if release else "-"
    power = f"{hw.power_mode} (documented id {hw.known_power_mode_id})" if hw.power_mode else "-"
    usable = hw.spec.usable_mib
    t = p.training
    rows = {
        "profile": p.name,
        "module": hw.module,
        "software": stack,
        "power mode": power,
        "providers": " > ".join(rt.providers),
        "precision / batch": f"{rt.precision} / {rt.batch_size}",
        "memory budget": f"{p.memory_budget_mib} MiB" + (f" of ~{usable} usable" if usable else ""),
        "tensorrt": (f"cache {rt.tensorrt.engine_cache_dir}, workspace "
                     f"{rt.tensorrt.workspace_mib} MiB") if rt.tensorrt else "-",
        "feature cache": f"{p.feature_cache.dir}: {p.feature_cache.max_mib} MiB, "
                         f"{p.feature_cache.max_entries} entries",
        "training": f"{t.steps} steps, batch {t.batch_size}, lr {t.lr:g}, prox_mu {t.prox_mu:g}, "
                    f"fisher {t.fisher_samples}",
        "max update": f"{p.max_update_bytes} bytes",
    }
    for key, value in rows.items():
        table.add_row(Text(key), Text(value))


def _summary_table(title: str) -> Table:
    return Table("field", "value", title=Text(title, style="green"), title_justify="left")


def _print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        _console(stderr=True).print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)


def _fail(err: ConfigError) -> NoReturn:
    console = _console(stderr=True)
    console.print(Text(f"invalid: {len(err.issues)} problem(s)", style="red"))
    for issue in err.issues:
        console.print(Text(f"  {issue}"), soft_wrap=True)
    raise typer.Exit(code=1)


def _fail_bundle(message: str) -> NoReturn:
    _console(stderr=True).print(Text(f"self-check failed: {message}", style="red"),
                                soft_wrap=True)
    raise typer.Exit(code=1)


def _console(stderr: bool = False) -> Console:
    return Console(stderr=stderr)


# ------------------------------------------------------------------------------ fetch-bundle


class _DownloadProgress:
    """A line on stderr every ``every_s`` seconds while a download runs (and at its end)."""

    def __init__(self, url: str, every_s: float = 2.0) -> None:
        self.url, self.every_s = url, every_s
        self.started = self.shown = time.monotonic()
        typer.echo(f"fetch-bundle: downloading {url}", err=True)

    def __call__(self, received: int, total: int | None) -> None:
        now = time.monotonic()
        if now - self.shown < self.every_s and received != total:
            return
        self.shown = now
        of = f" of {total / 2**20:.1f} MiB ({100 * received / total:.0f} %)" if total else ""
        typer.echo(f"fetch-bundle: {received / 2**20:.1f} MiB{of} in {now - self.started:.0f} s",
                   err=True)


@app.command("fetch-bundle")
def fetch_bundle(
    url: Annotated[str, typer.Argument(
        help="The bundle archive (<bundle_version>.tar): https://, http:// or file://.",
        show_default=False)],
    sha256: Annotated[str, typer.Option(
        "--sha256", help="Expected sha256 of the archive (64 hex digits), from the cloud's "
        "bundle listing; a mismatch installs nothing.", show_default=False)],
    dest: Annotated[Path, typer.Option(
        "--dest", help="Bundle folder to create or replace (the agent reads "
        "<state_dir>/bundle unless run --bundle says otherwise).", show_default=False)],
    max_mib: Annotated[int, typer.Option(help="Refuse archives larger than this.", min=1)] = 1024,
    timeout: Annotated[float, typer.Option(help="Network timeout in seconds.", min=1)] = 60.0,
) -> None:
    """Download a NanoEdge bundle, verify its sha256 and every file, unpack it into DEST."""
    from edge.fetch import fetch_bundle as fetch

    try:
        manifest = fetch(url, sha256, dest, max_bytes=max_mib * 2**20, timeout_s=timeout,
                         progress=_DownloadProgress(url))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    except BundleError as err:
        _fail_with("fetch-bundle failed", str(err))
    _console().print(Text(f"bundle {manifest.bundle_version} (base {manifest.base_version}) "
                          f"installed in {dest}", style="green"))


# ------------------------------------------------------------------------------------- run


@app.command()
def run(
    config: Annotated[Path, typer.Option(
        "--config", help="The device config YAML (profile + identity + broker + credentials "
        "+ state_dir).", show_default=False)],
    data: Annotated[str | None, typer.Option(
        envvar="FEDNANO_DATA", show_default=False,
        help="Local data of a simulated device: 'easyvqa:index=I,of=N[,alpha=A][,by=question|"
        "image-class][,seed=S][,min_samples=M][,max_samples=K]' (env FEDNANO_DATA). Without "
        "it the device joins with no samples and refuses tasks.")] = None,
    bundle: Annotated[Path | None, typer.Option(
        help="NanoEdge bundle folder (default: <state_dir>/bundle, where fetch-bundle puts "
        "it).", show_default=False)] = None,
    profiles_dir: ProfilesDir = None,
    allow_inline_password: Annotated[bool, typer.Option(
        "--allow-inline-password",
        help="Accept credentials.password written in the YAML (local demos only).")] = False,
    llm_timeout: Annotated[float, typer.Option(
        help="Seconds to wait for the cloud LLM per attempt (3 retries).", min=1)] = 30.0,
    activations: Annotated[str | None, typer.Option(
        help="How activations go to the cloud LLM and gradients come back: 'fp32' (exact), "
        "'bf16+zstd' or 'int8+zstd' (int8 per token). Default: the product's default "
        "(docs/edge-agent.md).", show_default=False)] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[Literal["text", "json"], typer.Option(
        envvar="FEDNANO_LOG_FORMAT",
        help="Log lines as text, or as JSON lines with the device, round and update ids "
        "(env FEDNANO_LOG_FORMAT).")] = "text",
) -> None:
    """Run the device agent until SIGTERM or SIGINT: presence, tasks, training, updates.

    Exit 0: clean shutdown; 1: invalid config, bundle or data; 3: unusable local state;
    4: the broker refused the device's credentials (not authorized, bad password).
    """
    if log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise typer.BadParameter(f"expected debug, info, warning or error, got {log_level!r}",
                                 param_hint="--log-level")
    try:
        device = load_device_config(config, allow_inline_password=allow_inline_password,
                                    profiles_dir=profiles_dir)
    except ConfigError as err:
        _fail(err)
    logs.configure(log_format, log_level.upper(), fields={"device_id": device.device_id})
    _run_agent(device, _data_spec(data), bundle, llm_timeout, _encoding(activations))


def _encoding(text: str | None) -> str | None:
    choices = ("fp32", "bf16+zstd", "int8+zstd")  # shared.activations.ENCODINGS, without torch
    if text is not None and text not in choices:
        raise typer.BadParameter(f"expected one of {', '.join(choices)}, got {text!r}",
                                 param_hint="--activations")
    return text


def _data_spec(text: str | None) -> DataSpec | None:
    from edge.local_data import DataSpec

    try:
        return None if text is None else DataSpec.parse(text)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--data") from err


def _run_agent(device: DeviceConfig, data: DataSpec | None, bundle: Path | None,
               llm_timeout: float, encoding: str | None = None) -> None:
    """Load the bundle and data, build the agent, serve until a signal; exit codes above."""
    import torch

    from edge.agent import EdgeAgent, stop_on_signals
    from edge.boot import LLMSettings, RemoteLLMFactory, default_bundle_dir, load_device
    from edge.state import StateError
    from shared.mqtt import ConnectRefused

    threads = device.profile.runtime.intra_op_threads
    if threads:
        torch.set_num_threads(threads)
    folder = bundle or default_bundle_dir(device)
    try:
        model, samples = load_device(device, folder, data)
    except BundleError as err:
        _fail_with("cannot start", f"{err} (install a bundle with: fednano-edge fetch-bundle "
                   f"URL --sha256 HEX --dest {folder})")
    try:
        settings = LLMSettings(timeout_s=llm_timeout)
        if encoding is not None:
            settings = dataclasses.replace(settings, encoding=encoding)  # type: ignore[arg-type]
        llm = RemoteLLMFactory(device.device_id, model.base_version, settings)
        agent = EdgeAgent(device, model, samples, llm)
        stop_on_signals(agent)
        agent.run()
    except StateError as err:
        _fail_with("local state unusable", str(err), code=3)
    except ConnectRefused as err:  # only refusals that a retry would get again come here
        _fail_with("the broker refused this device", f"{err}. Check the credentials in the "
                   "device config (password file, or certificate and key), or whether the "
                   "device was revoked; not retrying", code=4)


def _fail_with(title: str, message: str, code: int = 1) -> NoReturn:
    _console(stderr=True).print(Text(f"{title}: {message}", style="red"), soft_wrap=True)
    raise typer.Exit(code=code)


if __name__ == "__main__":
    app()
