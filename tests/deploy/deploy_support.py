"""Reading docker-compose.yml, the Dockerfiles and the docker/ scripts the way Compose and
Docker would, offline: no Docker engine runs here, so the tests check the files themselves."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import typer
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKER_DIR = ROOT / "docker"
MOSQUITTO_CONF = DOCKER_DIR / "mosquitto" / "mosquitto.conf"
CLOUD_SERVICES = ("init", "api", "coordinator", "llm-worker")
SECRETS_MOUNT = "/run/secrets/"

_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}"
                       r"|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: ``${X}``, ``${X:-default}``, ``${X-default}``, ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group(1) or match.group(4)
        op, default = match.group(2), match.group(3) or ""
        if op == ":-" and not env.get(name):
            return default
        if op == "-" and name not in env:
            return default
        return env.get(name, "")

    return _VARIABLE.sub(one, value)


def load_compose(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """docker-compose.yml with YAML anchors merged and variables substituted from ``env``."""
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    return dict(interpolate(raw, env or {}))


def services(env: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    return dict(load_compose(env)["services"])


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (Compose accepts a list of NAME=value too)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts(service: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of each short-syntax volume entry."""
    result = []
    for entry in service.get("volumes", []):
        parts = entry.split(":")
        result.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return result


def mount_source(service: Mapping[str, Any], target: str) -> str | None:
    """What is mounted at ``target`` or at the nearest folder above it."""
    best: tuple[int, str] | None = None
    for source, mount, _ in mounts(service):
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and (
                best is None or len(mount) > best[0]):
            best = (len(mount), source)
    return None if best is None else best[1]


def load_script(name: str) -> ModuleType:
    """Import ``docker/<name>.py`` (scripts copied into the images, not a package)."""
    module_name = f"docker_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, DOCKER_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ Dockerfiles


def stack_run_module() -> ModuleType:
    """scripts/stack_run.py as a module (it is a script, not a package)."""
    spec = importlib.util.spec_from_file_location("stack_run", ROOT / "scripts" / "stack_run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stack_run"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        pending += " " + stripped.rstrip("\\").strip() if pending else stripped.rstrip("\\")
        if not stripped.endswith("\\"):
            keyword, _, args = pending.strip().partition(" ")
            instructions.append((keyword.upper(), args.strip()))
            pending = ""
    return instructions


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each build stage (a stage starts at FROM)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in dockerfile_instructions(path):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def pip_installs(path: Path) -> list[str]:
    """Every ``pip install ...`` command in the Dockerfile's RUN instructions, in order."""
    commands = []
    for keyword, args in dockerfile_instructions(path):
        if keyword == "RUN":
            commands += [c.strip() for c in re.split(r"&&|;", args)
                         if re.match(r"\s*pip install\b", c)]
    return commands


# ------------------------------------------------------------------------------ CLIs


def cli_apps() -> dict[str, typer.Typer]:
    """The console scripts of pyproject.toml and their typer apps."""
    from edge.cli import app as edge_app
    from fednano.cli import app as fednano_app

    return {"fednano": fednano_app, "fednano-edge": edge_app}


def _subcommands(command: Any) -> dict[str, Any]:
    """A group's sub-commands by name ({} for a plain command). Typer 0.2x vendors click, so
    this goes by the ``commands`` attribute rather than ``isinstance(..., click.Group)``."""
    return dict(getattr(command, "commands", None) or {})


def resolve_command(argv: Sequence[str]) -> tuple[Any, list[str], list[str]]:
    """(click command, the sub-command path, its own arguments) for a console-script argv."""
    apps = cli_apps()
    if argv[0] not in apps:
        raise AssertionError(f"{argv[0]!r} is not a console script of pyproject.toml")
    command = typer.main.get_command(apps[argv[0]])
    path: list[str] = []
    rest = list(argv[1:])
    while _subcommands(command):
        if not rest or rest[0] not in _subcommands(command):
            raise AssertionError(f"{' '.join([argv[0], *path])} has no command "
                                 f"{rest[0] if rest else None!r} (argv {list(argv)})")
        command = _subcommands(command)[rest[0]]
        path.append(rest.pop(0))
    return command, path, rest


def parse_command_line(argv: Sequence[str]) -> Any:
    """Parse ``argv`` with the real CLI (options, arguments, types) without running it; the
    click context, whose ``params`` hold the parsed values. Bad usage raises."""
    command, path, rest = resolve_command(argv)
    return command.make_context(" ".join([argv[0], *path]), rest)


def cli_envvars() -> set[str]:
    """Every environment variable an option of either CLI reads (typer ``envvar=``)."""
    names: set[str] = set()

    def walk(command: Any) -> None:
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            names.update([envvar] if isinstance(envvar, str) else envvar or [])
        for sub in _subcommands(command).values():
            walk(sub)

    for app in cli_apps().values():
        walk(typer.main.get_command(app))
    return names
