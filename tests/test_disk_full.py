"""Disk full: ingest answers 507 with Retry-After, stored data is unharmed, and it recovers by itself."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import client_store, event

from sidecar.app import create_app
from sidecar.clock import ManualClock
from sidecar.config import Settings


def counts(db: Path) -> tuple[int, int]:
    """(event rows, inference-requests usage) straight from the file."""
    conn = sqlite3.connect(db)
    try:
        n = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        raw = conn.execute("SELECT coalesce(sum(raw), 0) FROM buckets WHERE dimension = 'inference-requests'"
                           ).fetchone()[0]
        return n, raw
    finally:
        conn.close()


async def fill_until_refused(client: TestClient[Any, Any], prefix: str) -> tuple[int, Any]:
    """Post batches until the sidecar refuses one; returns events acknowledged and the refusal."""
    acked = 0
    for i in range(2000):
        batch = [event(f"{prefix}-{i}-{j}", model="m" * 200) for j in range(50)]
        resp = await client.post("/v1/events", json=batch)
        if resp.status != 200:
            return acked, resp
        acked += (await resp.json())["accepted"]
    raise AssertionError("the database never filled up")


async def test_size_capped_database(settings: Settings, clock: ManualClock) -> None:
    """A database at its page cap refuses with 507 + Retry-After, keeps what it had, recovers when raised."""
    async with TestClient(TestServer(create_app(settings, clock=clock, background=False))) as client:
        store = client_store(client)
        await store.run(lambda c: c.execute("PRAGMA max_page_count = 60"))
        acked, refusal = await fill_until_refused(client, "cap")
        assert acked > 0
        assert refusal.status == 507
        assert refusal.headers["Retry-After"]
        body = await refusal.json()
        assert "full" in body["error"] and body["stored"] == 0
        assert counts(settings.db_path) == (acked, acked), "stored data unharmed, nothing half-stored"
        health = await client.get("/healthz")
        assert health.status == 200, "a full disk must not make ECS replace the task and its unsent data"
        assert (await health.json())["status"] == "degraded"
        await store.run(lambda c: c.execute("PRAGMA max_page_count = 1073741823"))
        resp = await client.post("/v1/events", json=[event("after-1"), event("after-2")])
        assert resp.status == 200
        assert (await resp.json())["accepted"] == 2
        assert counts(settings.db_path) == (acked + 2, acked + 2)
        assert (await (await client.get("/healthz")).json())["status"] == "ok"


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A real, tiny filesystem (needs root); skips the test where mounting is not allowed."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"sidecar-{uuid.uuid4().hex[:8]}",
                           str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_real_full_filesystem(tmp_path: Path, clock: ManualClock) -> None:
    """On a filesystem that really fills up, ingest refuses cleanly and recovers when space returns."""
    with small_tmpfs(tmp_path / "fs", "1m") as fs:
        settings = replace(Settings(), db_path=fs / "sidecar.db")
        async with TestClient(TestServer(create_app(settings, clock=clock, background=False))) as client:
            acked, refusal = await fill_until_refused(client, "fs")
            assert acked > 0
            assert refusal.status in (503, 507)
            assert refusal.headers["Retry-After"]
            assert counts(settings.db_path) == (acked, acked)
            subprocess.run(["mount", "-o", "remount,size=16m", str(fs)], check=True)
            resp = await client.post("/v1/events", json=[event("after-space")])
            assert resp.status == 200, await resp.text()
            assert counts(settings.db_path) == (acked + 1, acked + 1)
