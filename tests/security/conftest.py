"""The database fixtures of ``tests/cloud`` (SQLite and PostgreSQL, migrated) for these tests."""

from tests.cloud.conftest import (  # noqa: F401  (fixtures, found by pytest by name)
    _postgres_template,
    _sqlite_template,
    migrated_url,
    postgres_server,
)
