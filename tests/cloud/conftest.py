"""Real databases for the cloud's tests: an SQLite file and a throwaway PostgreSQL cluster.

``postgres_url`` gives every test a fresh database on one session-wide PostgreSQL server:
``FEDNANO_TEST_PG_URL`` if set (e.g. started by ``scripts/services.sh``), otherwise a private
cluster started here on a free loopback port (never the machine's own server on 5432) and
stopped at the end. Without PostgreSQL the tests skip, or fail when ``CI`` is set.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from cloud.db import migrate
from cloud.db.session import make_engine, make_session_factory, normalize_url
from cloud.db.session import sqlite_url as sqlite_url_of

PG_USER = "postgres"


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def _pg_bindir() -> Path | None:
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                             check=False)
        candidates.append(Path(out.stdout.strip()))
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    return next((d for d in candidates if (d / "initdb").exists() and (d / "pg_ctl").exists()),
                None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: use the postgres account when we are root."""
    return ["runuser", "-u", PG_USER, "--", *argv] if os.geteuid() == 0 else argv


class _Cluster:
    """A private PostgreSQL cluster in a temp folder, listening on 127.0.0.1 only."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.root = Path(tempfile.mkdtemp(prefix="fednano-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, user=PG_USER)
        self.data = self.root / "data"
        self.port = 0

    def start(self) -> str:
        self._run([str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER,
                   "-A", "trust", "--no-sync", "-E", "UTF8"])
        for _attempt in range(3):  # a free port can be taken between the probe and the start
            self.port = _free_port()
            options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} "
                       "-c fsync=off -c full_page_writes=off")
            result = subprocess.run(_as_postgres([
                str(self.bindir / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                str(self.root / "log"), "-o", options, "start"]), capture_output=True,
                text=True, check=False)
            if result.returncode == 0:
                return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/postgres"
        raise RuntimeError(f"pg_ctl start failed: {result.stderr}\n{self._log()}")

    def stop(self) -> None:
        subprocess.run(_as_postgres([str(self.bindir / "pg_ctl"), "-D", str(self.data),
                                     "-m", "fast", "stop"]), capture_output=True, check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(_as_postgres(argv), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {result.stderr}")

    def _log(self) -> str:
        log = self.root / "log"
        return log.read_text(errors="replace")[-2000:] if log.exists() else ""


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL maintenance database that may create databases."""
    given = os.environ.get("FEDNANO_TEST_PG_URL")
    if given:
        yield normalize_url(given).render_as_string(hide_password=False)
        return
    bindir = _pg_bindir()
    if bindir is None:
        _unavailable("no initdb/pg_ctl (apt-get install postgresql, or set FEDNANO_TEST_PG_URL)")
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        _unavailable("running as root without runuser to start PostgreSQL as 'postgres'")
    cluster = _Cluster(bindir)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def _create_database(server_url: str, template: str | None = None) -> str:
    """A new database on the server (a copy of ``template`` if given); returns its URL."""
    name = f"fednano_test_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"{clause}'))
    finally:
        admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


def _drop_database(url: str) -> None:
    parsed = make_url(url)
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{parsed.database}" WITH (FORCE)'))
    finally:
        admin.dispose()


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    url = _create_database(postgres_server)
    yield url
    _drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for one test."""
    return sqlite_url_of(tmp_path / "fednano.db")


BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)]


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest) -> str:
    """An empty database; each test using it runs on SQLite and on PostgreSQL."""
    return str(request.getfixturevalue(f"{request.param}_url"))


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("template") / "fednano.db"
    migrate.upgrade(sqlite_url_of(path))  # the engine is disposed: the WAL is checkpointed
    return path


@pytest.fixture(scope="session")
def _postgres_template(postgres_server: str) -> Iterator[str]:
    url = _create_database(postgres_server)
    migrate.upgrade(url)
    yield str(make_url(url).database)
    _drop_database(url)


@pytest.fixture(params=BACKENDS)
def migrated_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database at the newest revision (a copy of one migrated once per session)."""
    if request.param == "sqlite":
        target = tmp_path / "fednano.db"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), target)
        yield sqlite_url_of(target)
        return
    server = request.getfixturevalue("postgres_server")
    url = _create_database(server, template=request.getfixturevalue("_postgres_template"))
    yield url
    _drop_database(url)


@pytest.fixture
def db_session(migrated_url: str) -> Iterator[Session]:
    """A session on a migrated database (SQLite and PostgreSQL); the test commits or not."""
    engine = make_engine(migrated_url)
    try:
        with make_session_factory(engine)() as session:
            yield session
    finally:
        engine.dispose()
