"""Every database query goes through ``cloud.db.crud``: checked on the source, not by running.

Outside ``cloud/db/crud`` (and the Alembic migrations) no module of ``cloud``, ``fednano`` or
``edge`` may build a SQL statement with SQLAlchemy (``select``, ``insert``, ``update``,
``delete``, ``union``, ``exists``: imported from ``sqlalchemy`` or called on the module) nor
query through a session (``execute``, ``scalars``, ``scalar``, ``query``, ``get`` called on a
name or attribute called ``session``). Raw checks on a connection (the health probe's
``SELECT 1``, SQLite's PRAGMAs) are not queries of the data and stay where they are.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("cloud", "fednano", "edge")
EXEMPT = (ROOT / "cloud" / "db" / "crud", ROOT / "cloud" / "db" / "migrations")
STATEMENTS = frozenset({"select", "insert", "update", "delete", "union", "exists"})
SESSION_QUERIES = frozenset({"execute", "scalars", "scalar", "query", "get"})


def _sqlalchemy_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(statement builders imported by name, names bound to a ``sqlalchemy`` module)."""
    builders, modules = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sqlalchemy":
            builders |= {a.asname or a.name for a in node.names if a.name in STATEMENTS}
        elif isinstance(node, ast.Import):
            modules |= {a.asname or a.name for a in node.names
                        if a.name.split(".")[0] == "sqlalchemy"}
    return builders, modules


def _receiver(node: ast.expr) -> str | None:
    """The last name of a call's receiver: ``session`` for ``session.x`` and ``self.session.x``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def offences(source: str, filename: str = "<source>") -> list[str]:
    """``line: call`` for each query built or run outside the CRUD layer."""
    tree = ast.parse(source, filename=filename)
    builders, modules = _sqlalchemy_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id in builders:
            found.append(f"{node.lineno}: {func.id}(")
        elif isinstance(func, ast.Attribute):
            owner = _receiver(func.value)
            statement = func.attr in STATEMENTS and owner is not None and (
                owner in modules or ast.unparse(func.value) in modules)
            through_session = func.attr in SESSION_QUERIES and owner == "session"
            if statement or through_session:
                found.append(f"{node.lineno}: {ast.unparse(func)}(")
    return sorted(found, key=lambda item: int(item.split(":")[0]))


def _sources() -> list[Path]:
    files = [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return [path for path in files if not any(path.is_relative_to(e) for e in EXEMPT)]


def test_queries_live_in_the_crud_layer() -> None:
    sources = _sources()
    assert len(sources) > 50, "the scan found too few sources: a wrong root?"
    found = {str(path.relative_to(ROOT)): offences(path.read_text(), str(path))
             for path in sources}
    assert {path: calls for path, calls in found.items() if calls} == {}


@pytest.mark.parametrize("source", [
    "from sqlalchemy import select\nrows = session.scalars(select(Round))\n",
    "from sqlalchemy import select as sel\nq = sel(Round.id)\n",
    "import sqlalchemy as sa\nq = sa.select(Round)\n",
    "import sqlalchemy\nq = sqlalchemy.delete(Round)\n",
    "row = self.session.get(Round, 1, with_for_update=True)\n",
    "n = session.scalar(query)\n",
    "rows = batch.session.execute(statement)\n",
    "rows = session.query(Round).all()\n",
])
def test_the_scan_sees_a_query_put_back(source: str) -> None:
    assert offences(source)


@pytest.mark.parametrize("source", [
    "from cloud.db import crud\nrows = crud.list_rounds(session, limit=1)\n",
    "from sqlalchemy import text\nconnection.execute(text('SELECT 1'))\n",
    "cursor.execute('PRAGMA journal_mode=WAL')\n",
    "value = payload.get('key')\nsettings.update(other)\n",
    "from sqlalchemy.orm import Session\nsession.add(row)\n",
])
def test_the_scan_leaves_other_calls_alone(source: str) -> None:
    assert offences(source) == []


def test_the_scan_fails_on_a_module_with_a_query_put_back() -> None:
    """What the repository test reports if the fleet gauges queried the database again."""
    source = (ROOT / "cloud" / "metrics.py").read_text()
    assert offences(source) == []
    source += ("\n\nfrom sqlalchemy import func, select\n\n\ndef _online(session):\n"
               "    return session.scalar(select(func.count()).select_from(Device))\n")
    assert [call.split(": ")[1] for call in offences(source)] == ["session.scalar(", "select("]
