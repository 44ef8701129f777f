"""Migrations go up, down and up again on SQLite and PostgreSQL, and match the models."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import inspect, text
from sqlalchemy.exc import IntegrityError

from cloud.db import migrate
from cloud.db.models import Base
from cloud.db.session import make_engine

ROOT = Path(__file__).resolve().parents[3]
TABLES = {"devices", "credentials", "rounds", "participations", "updates", "adapter_versions",
          "version_updates", "metrics", "audit_events", "api_tokens", "settings"}


def _tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _enum_types(url: str) -> list[str]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return list(connection.scalars(text("SELECT typname FROM pg_type WHERE typtype = 'e'")))
    finally:
        engine.dispose()


def test_the_models_cover_the_designed_tables() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_one_linear_history_ends_at_head() -> None:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(migrate.alembic_config("sqlite://"))
    assert scripts.get_heads() == [migrate.head_revision()]
    assert [s.revision for s in scripts.walk_revisions()][-1] == "0001"


def test_up_down_up_matches_the_models(database_url: str) -> None:
    assert migrate.current_revision(database_url) is None
    migrate.upgrade(database_url)
    assert migrate.current_revision(database_url) == migrate.head_revision()
    assert _tables(database_url) == TABLES | {"alembic_version"}
    assert migrate.schema_diff(database_url) == []

    migrate.downgrade(database_url, "base")
    assert _tables(database_url) == {"alembic_version"}
    assert migrate.current_revision(database_url) is None
    if database_url.startswith("postgresql"):
        assert _enum_types(database_url) == []  # native_enum=False leaves no types behind

    migrate.upgrade(database_url)
    assert migrate.schema_diff(database_url) == []
    migrate.upgrade(database_url)  # idempotent: already at head
    assert migrate.current_revision(database_url) == migrate.head_revision()


def test_schema_diff_sees_drift(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with engine.begin() as connection:
        connection.execute(text("DROP INDEX ix_updates_round_id_status"))
    engine.dispose()
    diff = migrate.schema_diff(migrated_url)
    assert [d[0] for d in diff] == ["add_index"]
    assert diff[0][1].name == "ix_updates_round_id_status"


def _insert_fails(url: str, sql: str) -> None:
    engine = make_engine(url)
    try:
        with pytest.raises(IntegrityError), engine.begin() as connection:
            connection.execute(text(sql))
    finally:
        engine.dispose()


NOW = "'2030-01-01 00:00:00'"


@pytest.mark.parametrize("sql", [
    # foreign keys are on (SQLite needs a pragma for that)
    f"INSERT INTO credentials (device_id, secret_hash, created_at) VALUES ('ghost', 'h', {NOW})",
    # enums are CHECKed
    "INSERT INTO devices (id, profile, status, online, capabilities, created_at) "
    f"VALUES ('d1', 'sim-cpu', 'lost', false, '{{}}', {NOW})",
    # a revoked device has revoked_at
    "INSERT INTO devices (id, profile, status, online, capabilities, created_at) "
    f"VALUES ('d1', 'sim-cpu', 'revoked', false, '{{}}', {NOW})",
    # k-of-n quorum: 1 <= minimum <= k
    "INSERT INTO rounds (state, strategy, config, quorum, min_updates, created_at) "
    f"VALUES ('open', 'fednano', '{{}}', 2, 3, {NOW})",
    # a failed round says why
    "INSERT INTO rounds (state, strategy, config, quorum, min_updates, created_at, closed_at) "
    f"VALUES ('failed', 'fednano', '{{}}', 2, 1, {NOW}, {NOW})",
])
def test_constraints_hold_in_the_migrated_schema(migrated_url: str, sql: str) -> None:
    _insert_fails(migrated_url, sql)


def test_one_active_credential_per_device(migrated_url: str) -> None:
    engine = make_engine(migrated_url)
    with engine.begin() as connection:
        connection.execute(text(
            "INSERT INTO devices (id, profile, status, online, capabilities, created_at) "
            f"VALUES ('d1', 'sim-cpu', 'active', false, '{{}}', {NOW})"))
        for revoked in (NOW, NOW, "NULL"):  # revoked ones may pile up
            connection.execute(text("INSERT INTO credentials (device_id, secret_hash, created_at,"
                                    f" revoked_at) VALUES ('d1', 'h', {NOW}, {revoked})"))
    engine.dispose()
    _insert_fails(migrated_url, "INSERT INTO credentials (device_id, secret_hash, created_at) "
                                f"VALUES ('d1', 'h2', {NOW})")


def test_sqlite_runs_in_wal_mode_with_foreign_keys(sqlite_url: str, tmp_path: Path) -> None:
    migrate.upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()
    raw = sqlite3.connect(tmp_path / "fednano.db")  # the file persists the WAL setting
    assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    raw.close()


def test_offline_sql_renders_for_postgresql(capsys: pytest.CaptureFixture[str]) -> None:
    command.upgrade(migrate.alembic_config("postgresql+psycopg://u@h/db"), "head", sql=True)
    sql = capsys.readouterr().out
    assert "CREATE TABLE rounds" in sql and "pg_advisory_xact_lock" not in sql
    assert "ALTER TABLE rounds ADD CONSTRAINT fk_rounds_base_version_id_adapter_versions" in sql


@pytest.mark.integration
def test_services_starting_together_migrate_once(database_url: str) -> None:
    """Two processes upgrading the same empty database at once: one migrates, one waits."""
    code = "import sys; from cloud.db import migrate; migrate.upgrade(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", code, database_url], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert migrate.current_revision(database_url) == migrate.head_revision()
    assert migrate.schema_diff(database_url) == []
