"""The fleet's end-to-end fixtures: the real base under FEDNANO_HOME (built once if missing,
as tests/integration does) and PostgreSQL databases (tests/cloud's server: FEDNANO_TEST_PG_URL
from scripts/services.sh, or a private cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cloud.conftest import postgres_server, postgres_url  # noqa: F401  (fixtures)
from tests.integration.conftest import fednano_home  # noqa: F401  (fixture)


@pytest.fixture(scope="session")
def built_home(fednano_home: Path) -> Path:  # noqa: F811
    """FEDNANO_HOME with a built base (not loaded here: the fleet's cloud process loads it)."""
    from cloud.base.build import build_base
    from cloud.base.manifest import BaseNotBuiltError, read_manifest

    try:
        read_manifest(fednano_home, None)
    except BaseNotBuiltError:
        build_base(fednano_home, progress=False)
    return fednano_home
