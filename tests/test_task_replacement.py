"""Tasks replaced: a fresh store never reports the hour it was born in, a dead task's file can be
finished with `flush --once --final`, remainders are settled by policy at a final seal, and unmapped
usage is loud everywhere (health, metrics, page, the SIGTERM log)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from flushkit import PRODUCT
from helpers import T0, event, rfc3339
from structlog.testing import capture_logs

from sidecar.app import FLUSHER, create_app, shutdown_flush
from sidecar.cli import main
from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Settings
from sidecar.events import validate_event
from sidecar.marketplace import MeteringClient
from sidecar.simulator import Simulator, SimulatorConfig, start
from sidecar.store import Store

H10 = hour_start(T0)


@asynccontextmanager
async def simulator() -> AsyncIterator[tuple[Simulator, str, ManualClock]]:
    """The local Marketplace simulator on a manual clock shared with the sidecar under test."""
    clock = ManualClock(H10 + 5 * 60)
    sim = Simulator(SimulatorConfig(subscribe_all=True, product_code=PRODUCT, seed=3), clock=clock.now)
    runner, url = await start(sim)
    try:
        yield sim, url, clock
    finally:
        await runner.cleanup()


def task_settings(db: Path, **changes: Any) -> Settings:
    """A task's settings: its own database file, the simulator as AWS."""
    return replace(Settings(db_path=db, region="us-east-1", product_code=PRODUCT), **changes)


@asynccontextmanager
async def task(settings: Settings, clock: ManualClock, url: str) -> AsyncIterator[TestClient[Any, Any]]:
    """One ECS task's sidecar: the real app, sending to the simulator."""
    api = MeteringClient(settings, env={"AWS_ENDPOINT_URL_MARKETPLACE_METERING": url},
                         credentials=("AKIDTEST", "secret"))
    app = create_app(settings, clock=clock, api=api, background=False)
    async with TestClient(TestServer(app)) as c:
        yield c


async def post(c: TestClient[Any, Any], events: list[dict[str, Any]]) -> None:
    """Post events; all must be accepted."""
    resp = await c.post("/v1/events", json=events)
    assert resp.status == 200, await resp.text()


def billed(sim: Simulator, dimension: str = "inference-requests") -> dict[int, int]:
    """What the simulator billed per hour for one dimension (all customers)."""
    out: dict[int, int] = {}
    for k, v in sim.billed.items():
        if k.dimension == dimension:
            out[k.hour_start] = out.get(k.hour_start, 0) + int(v.quantity)
    return out


async def test_replacement_task_never_reports_its_birth_hour(tmp_path: Path) -> None:
    """Old task: 10 requests 10:05-10:14, SIGTERM at 10:20 bills 10:00. New task born 10:21 on a fresh
    file: 30 requests by 10:50 go into its 11:00 record. AWS bills 10 + 30; no DuplicateRecord."""
    async with simulator() as (sim, url, clock):
        clock.set(H10 - 30 * 60)  # the old task has run since 09:30
        async with task(task_settings(tmp_path / "old.db"), clock, url) as old:
            for i in range(10):
                clock.set(H10 + 5 * 60 + 60 * i)
                await post(old, [event(f"old-{i}", when=clock.now())])
            clock.set(H10 + 20 * 60)
            await shutdown_flush(old.app, 5.0)
        assert billed(sim) == {H10: 10}
        clock.set(H10 + 21 * 60)
        async with task(task_settings(tmp_path / "new.db"), clock, url) as new:
            for i in range(30):
                clock.set(H10 + 21 * 60 + 60 * i)
                await post(new, [event(f"new-{i}", when=clock.now())])
            usage = await (await new.get("/usage?format=json")).json()
            assert {(r["hour"][11:16], r["state"]) for r in usage["rows"]} == {("11:00", "open")}
            assert {r["carried_in"] for r in usage["rows"] if r["dimension"] == "inference-requests"} == {30}
            clock.set(H10 + HOUR_S + 5 * 60 + 1)  # 11:05: the old code sent its own 10:00 record here
            await new.app[FLUSHER].flush_once()
            assert billed(sim) == {H10: 10}
            clock.set(H10 + 2 * HOUR_S + 5 * 60 + 1)
            await new.app[FLUSHER].flush_once()
        assert billed(sim) == {H10: 10, H10 + HOUR_S: 30}
        assert sim.counters.conflicts == 0


async def test_report_policy_reports_the_birth_hour(tmp_path: Path) -> None:
    """`SIDECAR_BIRTH_HOUR=report` (a product's very first task) bills the birth hour as before."""
    async with simulator() as (sim, url, clock), \
            task(task_settings(tmp_path / "t.db", birth_hour="report"), clock, url) as c:
        await post(c, [event(1, when=clock.now() - 10)])
        await shutdown_flush(c.app, 5.0)
        assert billed(sim) == {H10: 1}


async def test_reopened_after_a_gap_is_a_new_birth(tmp_path: Path) -> None:
    """A file no process owned since before this hour began (a volume re-attached later) defers this hour."""
    db = tmp_path / "gap.db"
    clock = ManualClock(H10 - 3 * HOUR_S)
    Store.open(db, settings=Settings(db_path=db), clock=clock).close()
    clock.set(H10 + 600)
    store = Store.open(db, settings=Settings(db_path=db), clock=clock)
    try:
        store.ingest_future([validate_event(event(1, when=H10 + 500), now=clock.now(), max_age_s=86400,
                                            max_future_s=300)]).result()
    finally:
        store.close()
    conn = sqlite3.connect(db)
    hours = {h for (h,) in conn.execute("SELECT hour FROM buckets")}
    conn.close()
    assert hours == {H10 + HOUR_S}


@pytest.mark.slow
async def test_flush_final_finishes_a_killed_tasks_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A SIGKILLed task's open hour: `flush --once` leaves it open; `flush --once --final` bills it."""
    sim = Simulator(SimulatorConfig(subscribe_all=True, product_code=PRODUCT))
    runner, url = await start(sim)
    try:
        db = tmp_path / "dead.db"
        now = time.time()
        if now % HOUR_S > HOUR_S - 20:  # an hour boundary inside this test would change the hour it checks
            await asyncio.sleep(HOUR_S - now % HOUR_S + 1)
            now = time.time()
        store = Store.open(db, settings=Settings(db_path=db, birth_hour="report"), clock=ManualClock(now))
        store.ingest_future([validate_event(event(i, when=now - 5), now=now, max_age_s=86400, max_future_s=300)
                             for i in range(4)]).result()
        store.close()  # no shutdown flush: the task was killed
        env = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
               "AWS_ENDPOINT_URL_MARKETPLACE_METERING": url, "SIDECAR_PRODUCT_CODE": PRODUCT,
               "SIDECAR_DB": str(db)}
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["flush", "--once", "--timeout", "5"], env) == 0
        assert sim.counters.billed == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["open_buckets"] == 2
        assert await asyncio.to_thread(main, ["flush", "--once", "--final", "--timeout", "5"], env) == 0
        got = {(k.dimension, int(v.quantity)) for k, v in sim.billed.items()}
        assert got == {("inference-requests", 4), ("tokens-processed", 0)}
    finally:
        await runner.cleanup()


# ---- remainders at the final seal --------------------------------------------------------


@pytest.mark.parametrize(("policy", "tokens", "gpu"), [
    ("half_up", 4, 1),  # 999 tokens >= 500, 0.95 GPU-hour >= 0.5
    ("up", 4, 1),
    ("down", 3, 0),
    ("keep", 3, 0),
])
async def test_remainders_at_sigterm_follow_the_policy(tmp_path: Path, policy: str, tokens: int, gpu: int) -> None:
    """3 requests, 3,999 tokens and 3,420 GPU-seconds, then SIGTERM: billed by `settle_remainders`;
    what is rounded up or given up is a settlement row, a metric and a log line."""
    async with simulator() as (sim, url, clock), \
            task(task_settings(tmp_path / "r.db", birth_hour="report", settle_remainders=policy), clock, url) as c:
        # Three requests one after the other, 1,140 s of engine time each: 3,420 GPU-seconds.
        end = clock.now() - 10
        await post(c, [event(n, when=end, prompt=1333, completion=0, gpu_seconds=1140.0,
                             engine_start=rfc3339(end - 1140 * (i + 1)), engine_end=rfc3339(end - 1140 * i))
                       for i, n in enumerate("abc")])
        with capture_logs() as logs:
            await shutdown_flush(c.app, 5.0)
        assert billed(sim) == {H10: 3}
        assert billed(sim, "tokens-processed") == {H10: tokens}
        assert billed(sim, "gpu-hours") == {H10: gpu}
        settled = [e for e in logs if e["event"] == "remainder_settled"]
        metrics = await (await c.get("/metrics")).text()
        if policy == "keep":
            assert settled == []
            return
        assert {(e["dimension"], e["raw"], e["billed_units"]) for e in settled} == {
            ("tokens-processed", 999, 1 if tokens == 4 else 0), ("gpu-hours", 3_420_000_000, gpu)}
        if policy == "down":
            assert 'sidecar_remainder_settled_raw{customer="identifier:cust-a",dimension="tokens-processed",' \
                   'result="given_up"} 999.0' in metrics
        else:
            assert 'sidecar_remainder_settled_raw{customer="identifier:cust-a",dimension="tokens-processed",' \
                   'result="rounded_up"} 1.0' in metrics


# ---- unmapped usage ----------------------------------------------------------------------


async def test_unmapped_usage_is_loud(tmp_path: Path) -> None:
    """Unmapped usage: /healthz and /metrics give its age and totals, the page shows it first, and
    SIGTERM logs an error with the totals it leaves behind."""
    async with simulator() as (_sim, url, clock), \
            task(task_settings(tmp_path / "u.db", birth_hour="report"), clock, url) as c:
        await post(c, [event(i, when=clock.now() - 120, customer={"tenant": "acme"}) for i in range(3)])
        clock.advance(600)
        health = await (await c.get("/healthz")).json()
        assert health["status"] == "degraded"
        assert health["unmapped"]["tenants"] == ["acme"]
        assert health["unmapped"]["events"] == 3
        assert health["unmapped"]["oldest_age_s"] == 720
        metrics = await (await c.get("/metrics")).text()
        assert "sidecar_unmapped_oldest_age_seconds 720.0" in metrics
        assert 'sidecar_unmapped_usage_raw{dimension="tokens-processed"} 45.0' in metrics
        page = await (await c.get("/usage", headers={"Accept": "text/html"})).text()
        assert "unmapped usage" in page.lower() and "acme" in page
        with capture_logs() as logs:
            await shutdown_flush(c.app, 2.0)
        left = [e for e in logs if e["event"] == "usage_left_behind"]
        assert left and left[0]["log_level"] == "error"
        assert left[0]["unmapped"]["events"] == 3


def test_customers_from_the_environment(tmp_path: Path) -> None:
    """SIDECAR_CUSTOMERS (JSON, e.g. from SSM Parameter Store) maps tenants at every start, over TOML."""
    from sidecar.config import load_settings

    env = {"SIDECAR_CUSTOMERS": json.dumps({"acme": {"customer_identifier": "acme-aws"}})}
    assert load_settings(env).customers["acme"].key == "identifier:acme-aws"
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError, match="SIDECAR_CUSTOMERS"):
        load_settings({"SIDECAR_CUSTOMERS": "{not json"})
    with pytest.raises(ConfigError, match=r"SIDECAR_CUSTOMERS\.acme"):
        load_settings({"SIDECAR_CUSTOMERS": json.dumps({"acme": {"customer_identifier": ""}})})
