"""A real PostgreSQL for the fleet tests: SIDECAR_TEST_PG_URL when set, else a throwaway server from
the `pgserver` wheel (PostgreSQL binaries shipped on PyPI) started once per test session. Each test
gets a database of its own. Never skipped: without a server the fleet tests fail."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

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


class Proxy:
    """A TCP proxy on loopback in front of PostgreSQL (its socket or TCP port), in a thread of its
    own, that a test can cut (every connection closed, new ones refused) and restore: a network
    partition between members and their database, whatever server the tests use."""

    def __init__(self, conninfo: str) -> None:
        info = conninfo_to_dict(conninfo)
        host, port = str(info.get("host") or "localhost"), int(info.get("port") or 5432)
        self._target = (None, None, f"{host}/.s.PGSQL.{port}") if host.startswith("/") else (host, port, None)
        self.cut_now = False
        self._writers: set[asyncio.StreamWriter] = set()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=10)
        self.conninfo = make_conninfo(conninfo, host="127.0.0.1", port=str(self.port))

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_now:
            writer.close()
            return
        host, port, path = self._target
        try:
            if path is not None:
                up_reader, up_writer = await asyncio.open_unix_connection(path)
            else:
                up_reader, up_writer = await asyncio.open_connection(host, port)
        except OSError:
            writer.close()
            return
        if self.cut_now:  # cut while connecting
            writer.transport.abort()
            up_writer.transport.abort()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
                self._writers.discard(dst)

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def cut(self) -> None:
        """Close every connection through the proxy and refuse new ones."""
        async def go() -> None:
            self.cut_now = True
            for w in list(self._writers):
                w.transport.abort()
            self._writers.clear()
        asyncio.run_coroutine_threadsafe(go(), self.loop).result(timeout=10)

    def restore(self) -> None:
        self.cut_now = False

    def close(self) -> None:
        """Close every connection and the listener, finish the pipes, stop the thread's loop."""
        async def shutdown() -> None:
            self.cut_now = True
            self.server.close()
            for w in list(self._writers):
                w.transport.abort()
            await self.server.wait_closed()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()
