"""A real PostgreSQL for the fleet tests: SIDECAR_TEST_PG_URL when set, else a throwaway server from
the `pgserver` wheel (PostgreSQL binaries shipped on PyPI) started once per test session. Each test
gets a database of its own. Never skipped: without a server the fleet tests fail."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

_OWNED: dict[str, Any] = {}  # admin URL -> the pgserver we started (restartable)


def restart(admin_url: str) -> str:
    """Restart PostgreSQL under the members' feet: `pg_ctl restart` on a server this kit started;
    on a given SIDECAR_TEST_PG_URL, every other connection is cut instead. Returns what was done."""
    srv = _OWNED.get(admin_url)
    if srv is None:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE pid <> pg_backend_pid() AND backend_type = 'client backend'")
        return "connections cut"
    import pgserver

    pgserver.pg_ctl(["-w", "restart", "-m", "fast"], pgdata=srv.pgdata, user=srv.system_user)
    return "restarted"


@contextmanager
def server() -> Iterator[str]:
    """The admin URL of a running PostgreSQL (started here when SIDECAR_TEST_PG_URL is not set)."""
    given = os.environ.get("SIDECAR_TEST_PG_URL")
    if given:
        yield given
        return
    where = tempfile.mkdtemp(prefix="sidecar-pg-")
    os.chmod(where, 0o755)  # noqa: S103  (the server runs as its own user and must reach its data directory)
    with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset (CI, root)
        warnings.simplefilter("ignore")
        import pgserver  # the PostgreSQL server in a wheel; as root it runs the server as its own user

        srv: Any = pgserver.get_server(where, cleanup_mode="stop")
    url = str(srv.get_uri())
    _OWNED[url] = srv
    try:
        yield url
    finally:
        _OWNED.pop(url, None)
        srv.cleanup()
        shutil.rmtree(where, ignore_errors=True)


@contextmanager
def database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server; its conninfo. Dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
