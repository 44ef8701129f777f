"""First contact without tracebacks: the ``fednano`` command's failures from outside the program.

A database that does not answer, a broker that is down or refuses the account, no base built
yet: these are the user's environment, not a bug, so the command prints one line -- what
failed, why, what to do -- and exits non-zero. Everything else still shows its traceback.

``run(app)`` is the entry point's wrapper; ``explain(err)`` is the mapping, one place for every
command (whatever module the command lives in). Settings warnings (``SettingsWarning``, e.g.
the development placeholder secrets) print as one line too, without a source line.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import NoReturn, TextIO

PROG = "fednano"
EXIT_ENVIRONMENT = 1  # the environment is not ready (database, broker, base)


def _first_line(text: object) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _database(err: BaseException) -> str | None:
    try:
        from sqlalchemy.exc import InterfaceError, OperationalError
    except ModuleNotFoundError:  # an install without the cloud's dependencies
        return None
    if not isinstance(err, OperationalError | InterfaceError):
        return None
    reason = _first_line(getattr(err, "orig", None) or err)
    return (f"cannot reach the database: {reason}. Is it running, and is FEDNANO_DATABASE_URL "
            "right (postgresql://user@host:port/db, password in PGPASSWORD)?")


def _broker(err: BaseException) -> str | None:
    from shared.mqtt import ConnectError, ConnectRefused

    if isinstance(err, ConnectRefused) and err.permanent:
        return (f"{err}. Check FEDNANO_BROKER_USERNAME and FEDNANO_BROKER_PASSWORD against the "
                "broker's accounts (`fednano devices broker-files` writes them before the "
                "broker starts).")
    if isinstance(err, ConnectError):
        return f"{err}. Start the broker, or set FEDNANO_BROKER_URL to where it runs."
    return None


def _base(err: BaseException) -> str | None:
    try:
        from cloud.base.manifest import BaseIntegrityError, BaseNotBuiltError
    except ModuleNotFoundError:
        return None
    if isinstance(err, BaseNotBuiltError):
        return (f"{_first_line(err)} (or set FEDNANO_HOME / --home to the folder that has "
                "one)")
    if isinstance(err, BaseIntegrityError):
        return f"{_first_line(err)}: rebuild it with `fednano base build`"
    return None


EXPLAINERS: tuple[Callable[[BaseException], str | None], ...] = (_database, _broker, _base)


def explain(err: BaseException) -> str | None:
    """One line for a failure of the user's environment; None for anything else."""
    for explainer in EXPLAINERS:
        message = explainer(err)
        if message is not None:
            return message
    return None


def fail(message: str, code: int = EXIT_ENVIRONMENT, stream: TextIO | None = None) -> NoReturn:
    print(f"{PROG}: error: {message}", file=stream or sys.stderr, flush=True)
    raise SystemExit(code)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None,
                  _default: Callable[..., None] = warnings.showwarning) -> None:
    from cloud.settings import SettingsWarning

    if issubclass(category, SettingsWarning):
        print(f"{PROG}: warning: {message}", file=file or sys.stderr, flush=True)
    else:
        _default(message, category, filename, lineno, file, line)


def run(app: Callable[[], object]) -> None:
    """Run a CLI app; environment failures become one line on stderr and exit code 1."""
    warnings.showwarning = _show_warning
    try:
        app()
    except Exception as err:  # re-raised unless the environment is the cause
        message = explain(err)
        if message is None:
            raise
        fail(message)
