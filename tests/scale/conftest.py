"""Scale-out tests (``make test-scale``): every test here runs on a real PostgreSQL server (a fresh database on
the session's throw-away cluster, tests/pg.py) and most start several real worker or training processes."""

from __future__ import annotations

from pathlib import Path

import pytest

_HERE = Path(__file__).parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.scale)


@pytest.fixture
def database_url(postgres_cluster) -> str:
    return postgres_cluster.create_database("scale")
