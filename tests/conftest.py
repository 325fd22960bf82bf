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


@pytest.fixture(scope="session")
def moto_url() -> Iterator[str]:
    """moto's server (an SQS-protocol server, among others) on a free loopback port."""
    from moto.server import ThreadedMotoServer
    from procs import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def sqs(moto_url: str) -> Iterator[Any]:
    """A plain botocore SQS client on moto's server, for a test's own queues, sends and checks
    (each test creates queues with names of its own)."""
    import botocore.config
    import botocore.session

    client = botocore.session.get_session().create_client(
        "sqs", region_name="us-east-1", endpoint_url=moto_url, aws_access_key_id="testing",
        aws_secret_access_key="testing", config=botocore.config.Config(retries={"total_max_attempts": 1}))
    yield client
    client.close()
