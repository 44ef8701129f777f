"""Run the Alembic migrations from code: ``upgrade(url)``, ``downgrade(url, rev)``, checks.

Services call ``upgrade(url)`` at start-up (it is idempotent and serialised between processes);
tests use ``schema_diff(url)`` to prove the migrated schema matches the models.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import URL

from cloud.db.models import Base
from cloud.db.session import make_engine, normalize_url

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class ForeignKeyViolationError(RuntimeError):
    """A migration left rows whose foreign keys point nowhere (SQLite checks after the fact)."""


def alembic_config(url: str | URL) -> Config:
    """An Alembic config for this project's migrations against ``url`` (no ini file needed).

    The URL travels in ``attributes``, not the ini options, so a password with ``%`` in it
    does not meet configparser's interpolation.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    config.attributes["url"] = normalize_url(url).render_as_string(hide_password=False)
    return config


def upgrade(url: str | URL, revision: str = "head") -> None:
    """Migrate the database at ``url`` up to ``revision`` (default: the newest)."""
    with _sqlite_file_lock(url):
        command.upgrade(alembic_config(url), revision)
        _check_foreign_keys(url)


@contextmanager
def _sqlite_file_lock(url: str | URL) -> Iterator[None]:
    """Serialise migrations of one SQLite file between processes (PostgreSQL: advisory lock).

    Two processes creating a fresh SQLite database at once both switch it to WAL and read its
    schema; SQLite answers one of them "database is locked" at once (a lock upgrade that could
    deadlock skips the busy timeout), so they take turns on a lock file beside the database.
    """
    parsed = normalize_url(url)
    database = parsed.database or ""
    if parsed.get_backend_name() != "sqlite" or database in ("", ":memory:") or (
            database.startswith("file:")):
        yield
        return
    lock_path = Path(database).expanduser().with_name(Path(database).name + ".migrate-lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def downgrade(url: str | URL, revision: str) -> None:
    """Migrate the database at ``url`` down to ``revision`` (``"base"``: drop everything)."""
    with _sqlite_file_lock(url):
        command.downgrade(alembic_config(url), revision)
        _check_foreign_keys(url)


def head_revision() -> str:
    """The newest revision in the migration tree."""
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {MIGRATIONS_DIR}")
    return head


def current_revision(url: str | URL) -> str | None:
    """The revision the database at ``url`` is at; None for an unmigrated database."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def schema_diff(url: str | URL) -> list[Any]:
    """Differences between the models and the database's schema (``alembic check``); [] = same."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def _check_foreign_keys(url: str | URL) -> None:
    """SQLite migrates with foreign keys off (batch mode); make sure none were broken."""
    if normalize_url(url).get_backend_name() != "sqlite":
        return
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            broken = connection.execute(text("PRAGMA foreign_key_check")).fetchall()
    finally:
        engine.dispose()
    if broken:
        raise ForeignKeyViolationError(f"rows with dangling foreign keys after migrating: "
                                       f"{[tuple(row) for row in broken[:10]]}")
