"""Shared fixtures: a fresh database file, a manual clock, the real app behind a test client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import T0

from sidecar import logs
from sidecar.app import create_app
from sidecar.clock import ManualClock
from sidecar.config import Settings
from sidecar.store import Store

logs.configure(level="info", fmt="console")


@pytest.fixture
def clock() -> ManualClock:
    """A clock that stands still at T0 until a test moves it."""
    return ManualClock(T0)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Default settings on a fresh database file."""
    return Settings(db_path=tmp_path / "sidecar.db", birth_hour="report")


@pytest.fixture
def store(settings: Settings, clock: ManualClock) -> Iterator[Store]:
    """An open store on a fresh database file."""
    s = Store.open(settings.db_path, settings=settings, clock=clock)
    yield s
    s.close()


@pytest.fixture
async def client(settings: Settings, clock: ManualClock) -> AsyncIterator[TestClient[Any, Any]]:
    """The real aiohttp app (no background loops) behind aiohttp's test client."""
    app = create_app(settings, clock=clock, background=False)
    async with TestClient(TestServer(app)) as c:
        yield c




@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A real PostgreSQL server for the whole session (see tests/pgkit.py)."""
    import pgkit

    with pgkit.server() as url:
        yield url


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    """A fresh database of its own for one test."""
    import pgkit

    with pgkit.database(pg_server) as url:
        yield url
