"""Fleet mode end to end in one process: real apps (each member with its own SQLite file), a real
PostgreSQL, the Marketplace simulator as AWS, one manual clock. The members' loops are driven by the
test (ship, lead, flush) so every step is deterministic."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from flushkit import PRODUCT
from helpers import event
from test_task_replacement import H10, billed, post, simulator, task, task_settings

from sidecar.app import MEMBER, STORE, create_app
from sidecar.cli import main
from sidecar.clock import HOUR_S, ManualClock
from sidecar.config import Settings
from sidecar.fleet import Member
from sidecar.marketplace import MeteringClient
from sidecar.simulator import Simulator


def member_settings(db: Path, pg_url: str, member: str, **changes: Any) -> Settings:
    """A member's settings; tests not about the fleet's birth report its first hour."""
    return replace(Settings(db_path=db, region="us-east-1", product_code=PRODUCT, fleet_url=pg_url,
                            member_id=member, birth_hour="report"), **changes)


@asynccontextmanager
async def member(settings: Settings, clock: ManualClock, url: str) -> AsyncIterator[TestClient[Any, Any]]:
    """One member: the real app in fleet mode, sending (when it leads) to the simulator."""
    api = MeteringClient(settings, env={"AWS_ENDPOINT_URL_MARKETPLACE_METERING": url},
                         credentials=("AKIDTEST", "secret"))
    app = create_app(settings, clock=clock, api=api, background=False)
    async with TestClient(TestServer(app)) as c:
        await c.app[MEMBER].fleet.ready()
        yield c


def m(c: TestClient[Any, Any]) -> Member:
    return c.app[MEMBER]


async def lead_and_flush(c: TestClient[Any, Any]) -> None:
    """This member takes the lease (if free) and runs one flush pass."""
    fleet = m(c).fleet
    if fleet.epoch is None:
        assert await fleet.acquire_lease() is not None
    await m(c).flusher.flush_once()


def conflicts(sim: Simulator) -> int:
    return sim.counters.conflicts


async def test_two_members_serving_one_customer_in_one_hour_bill_one_record(pg_url: str, tmp_path: Path) -> None:
    """A rolling deployment: the old and the new task both serve cust-a in 10:00. AWS gets one
    record for 10:00 with both tasks' usage; nothing is lost to DuplicateRecord."""
    async with simulator() as (sim, url, clock), \
            member(member_settings(tmp_path / "a.db", pg_url, "task-a"), clock, url) as a, \
            member(member_settings(tmp_path / "b.db", pg_url, "task-b"), clock, url) as b:
        for i in range(10):
            clock.set(H10 + 5 * 60 + 60 * i)
            await post(a, [event(f"a-{i}", when=clock.now())])
            await post(b, [event(f"b-{i}", when=clock.now()), event(f"b2-{i}", when=clock.now())])
        await m(a).ship_once()
        await m(b).ship_once()
        clock.set(H10 + HOUR_S + 5 * 60 + 1)
        await lead_and_flush(b)
        assert billed(sim) == {H10: 30}
        assert billed(sim, "tokens-processed") == {H10: 0} or billed(sim, "tokens-processed") == {}
        assert conflicts(sim) == 0


async def test_a_replaced_task_loses_nothing_and_bills_its_hour_once(pg_url: str, tmp_path: Path) -> None:
    """The billing-fixes replacement scenario in fleet mode: the old task serves 10 requests 10:05-10:14
    and stops at 10:20 (ships, gives up the lease); its replacement, born 10:21 on a fresh file, serves
    30 by 10:50. The fleet bills 40 for 10:00, exactly once, no conflict (single-file mode could only
    defer the new task's 30 into 11:00)."""
    async with simulator() as (sim, url, clock):
        clock.set(H10 - 30 * 60)
        async with member(member_settings(tmp_path / "old.db", pg_url, "task-old"), clock, url) as old:
            await lead_and_flush(old)
            for i in range(10):
                clock.set(H10 + 5 * 60 + 60 * i)
                await post(old, [event(f"old-{i}", when=clock.now())])
            clock.set(H10 + 20 * 60)
            await m(old).shutdown(5.0)  # SIGTERM: ship everything, release the lease, never seal 10:00
        assert billed(sim) == {}
        clock.set(H10 + 21 * 60)
        async with member(member_settings(tmp_path / "new.db", pg_url, "task-new"), clock, url) as new:
            for i in range(30):
                clock.set(H10 + 21 * 60 + i)
                await post(new, [event(f"new-{i}", when=clock.now())])
            await m(new).ship_once()
            clock.set(H10 + HOUR_S + 5 * 60 + 1)
            await lead_and_flush(new)  # the lease was released: no wait for its TTL
        assert billed(sim) == {H10: 40}
        assert conflicts(sim) == 0


async def test_ack_fleet_answers_only_after_postgresql_committed(pg_url: str, tmp_path: Path) -> None:
    """SIDECAR_ACK=fleet: the 2xx means the fleet's database holds the usage, with no ship loop."""
    async with simulator() as (_sim, url, clock), \
            member(member_settings(tmp_path / "a.db", pg_url, "task-a", ack="fleet"), clock, url) as a:
        clock.set(H10 + 600)
        await post(a, [event("e1", when=clock.now()), event("e2", when=clock.now())])
        rows = {r["dimension"]: r["raw"] for r in await m(a).fleet.buckets()}
        assert rows["inference-requests"] == 2
        assert await m(a).local.outbox_backlog() == (0, None)


async def test_postgresql_unreachable(tmp_path: Path) -> None:
    """ack=local: events are still accepted and kept in the outbox, /healthz says degraded (200).
    ack=fleet: the answer is 503 + Retry-After, nothing claims to be billed."""
    dead = "postgresql://nobody@127.0.0.1:9/none?connect_timeout=1"
    async with simulator() as (_sim, url, clock):
        clock.set(H10 + 600)
        async with member_unready(member_settings(tmp_path / "l.db", dead, "task-l"), clock, url) as c:
            await post(c, [event("e1", when=clock.now())])
            await m(c)._ship_and_beat()
            health = await (await c.get("/healthz")).json()
            assert health["status"] == "degraded"
            assert health["fleet"]["ship_error"] and health["fleet"]["backlog_deltas"] == 2
        async with member_unready(member_settings(tmp_path / "f.db", dead, "task-f", ack="fleet"), clock, url) as c:
            resp = await c.post("/v1/events", json=[event("e2", when=clock.now())])
            assert resp.status == 503 and resp.headers["Retry-After"]
            assert (await resp.json())["stored_locally"] == 1
            started = time.monotonic()  # PostgreSQL known down: later requests fail fast
            resp = await c.post("/v1/events", json=[event("e3", when=clock.now())])
            assert resp.status == 503 and time.monotonic() - started < 2


@asynccontextmanager
async def member_unready(settings: Settings, clock: ManualClock, url: str) -> AsyncIterator[TestClient[Any, Any]]:
    """A member whose fleet database cannot be reached (it starts all the same)."""
    api = MeteringClient(settings, env={"AWS_ENDPOINT_URL_MARKETPLACE_METERING": url},
                         credentials=("AKIDTEST", "secret"))
    async with TestClient(TestServer(create_app(settings, clock=clock, api=api, background=False))) as c:
        yield c


async def test_a_mapping_made_on_one_member_holds_on_every_member(pg_url: str, tmp_path: Path) -> None:
    async with simulator() as (sim, url, clock), \
            member(member_settings(tmp_path / "a.db", pg_url, "task-a"), clock, url) as a, \
            member(member_settings(tmp_path / "b.db", pg_url, "task-b"), clock, url) as b:
        clock.set(H10 + 600)
        await post(b, [event("t1", when=clock.now(), customer={"tenant": "acme"})])
        resp = await a.put("/v1/customers/acme", json={"customer_identifier": "cust-acme"})
        assert resp.status == 200, await resp.text()
        await post(b, [event("t2", when=clock.now(), customer={"tenant": "acme"})])
        await m(b).ship_once()
        clock.set(H10 + HOUR_S + 5 * 60 + 1)
        await lead_and_flush(a)
        assert billed(sim) == {H10: 2}
        assert {k.customer for k in sim.billed} == {"cust-acme"}


async def test_members_show_in_healthz_usage_and_metrics(pg_url: str, tmp_path: Path) -> None:
    async with simulator() as (_sim, url, clock), \
            member(member_settings(tmp_path / "a.db", pg_url, "task-a"), clock, url) as a, \
            member(member_settings(tmp_path / "b.db", pg_url, "task-b"), clock, url) as b:
        clock.set(H10 + 600)
        await post(a, [event("e1", when=clock.now())])
        await m(b).fleet.acquire_lease()
        await m(a)._ship_and_beat()  # ships and heartbeats, then reads every member
        health = await (await a.get("/healthz")).json()
        assert health["status"] == "ok"
        assert [(x["member_id"], x["leader"]) for x in health["fleet"]["members"]] == [
            ("task-a", False), ("task-b", True)]
        usage = await (await a.get("/usage?format=json")).json()
        assert {(r["customer"], r["dimension"], r["raw"]) for r in usage["rows"]} == {
            ("identifier:cust-a", "inference-requests", 1), ("identifier:cust-a", "tokens-processed", 15)}
        text = await (await a.get("/metrics")).text()
        assert "sidecar_fleet_backlog_deltas 0.0" in text
        assert 'sidecar_fleet_member_heartbeat_age_seconds{member="task-a"}' in text


async def test_moving_a_single_file_deployment_to_fleet_mode(pg_url: str, tmp_path: Path) -> None:
    """A task ran in single-file mode: 09:00 is frozen (not yet sent), 10:00 is open, 700 tokens
    are a remainder. It restarts as a fleet member on the same file beside a new member: the 09:00
    record finishes from the file, the open usage and the remainder join the fleet. Every unit is
    billed once, no conflict."""
    db = tmp_path / "old.db"
    async with simulator() as (sim, url, clock):
        clock.set(H10 - HOUR_S + 600)  # 09:10
        async with task(task_settings(db, birth_hour="report"), clock, url) as single:
            await post(single, [event("s1", when=clock.now(), prompt=1500, completion=200)])
            clock.set(H10 + 400)  # 10:06: 09:00 seals and freezes; nothing is sent
            await single.app[STORE].prepare_flush(now=clock.now())
            await post(single, [event("s2", when=clock.now(), prompt=900, completion=0)])
        async with member(member_settings(db, pg_url, "old"), clock, url) as old, \
                member(member_settings(tmp_path / "new.db", pg_url, "new"), clock, url) as new:
            assert await old.app[STORE].pending_summary() == (2, 0.0)  # its frozen 09:00 records stay
            await m(old).legacy.flush_once()
            assert billed(sim) == {H10 - HOUR_S: 1} and billed(sim, "tokens-processed") == {H10 - HOUR_S: 1}
            await post(new, [event("n1", when=clock.now(), prompt=400, completion=0)])
            await m(old).ship_once()
            await m(new).ship_once()
            clock.set(H10 + HOUR_S + 400)
            await lead_and_flush(new)
        # 10:00: s2 and n1 (2 requests); tokens: 700 carried from 09:00 + 900 + 400 = 2,000
        assert billed(sim) == {H10 - HOUR_S: 1, H10: 2}
        assert billed(sim, "tokens-processed") == {H10 - HOUR_S: 1, H10: 2}
        assert conflicts(sim) == 0


async def test_the_cli_reads_the_fleet(pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`sidecar usage` with SIDECAR_FLEET_URL shows the fleet's buckets and every member; `release
    --state held` acts on the fleet's held records; `replay --state` says it is single-file only."""
    async with simulator() as (_sim, url, clock), \
            member(member_settings(tmp_path / "a.db", pg_url, "task-a"), clock, url) as a:
        clock.set(H10 + 600)
        await post(a, [event("e1", when=clock.now())])
        await m(a)._ship_and_beat()
        env = {"SIDECAR_FLEET_URL": pg_url, "SIDECAR_DB": str(tmp_path / "cli.db")}
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["usage", "--json"], env) == 0
        out = json.loads(capsys.readouterr().out)
        assert {(r["customer"], r["dimension"], r["raw"]) for r in out["rows"]} == {
            ("identifier:cust-a", "inference-requests", 1), ("identifier:cust-a", "tokens-processed", 15)}
        assert [x["member_id"] for x in out["members"]] == ["task-a"]
        assert await asyncio.to_thread(main, ["release", "--state", "held"], env) == 0
        assert json.loads(capsys.readouterr().out) == {"fleet": True, "released": 0}
        assert await asyncio.to_thread(main, ["replay", "--state", "rejected"], env) == 2
        assert "fleet mode" in capsys.readouterr().err


async def test_a_pass_longer_than_the_lease_keeps_it(pg_url: str, tmp_path: Path) -> None:
    """A leader sending a backlog for longer than the lease TTL renews it meanwhile (its own task):
    it never loses the lease to itself, and nothing is resent."""
    async with simulator() as (sim, url, clock), \
            member(member_settings(tmp_path / "a.db", pg_url, "task-a", lease_s=1.5), clock, url) as a:
        clock.set(H10 + 600)
        await post(a, [event(f"e{i}", when=clock.now(), customer={"customer_identifier": f"c{i}"})
                       for i in range(150)])
        await m(a).ship_once()
        clock.set(H10 + HOUR_S + 400)
        sim.configure(latency_s=0.5)  # 150 records x 2 dimensions: 12 calls, over 6 s of calls
        stop = asyncio.Event()
        loop_task = asyncio.create_task(m(a).leading_loop(stop))
        try:
            deadline = time.monotonic() + 60
            while sum(billed(sim).values()) < 150 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
            epoch = m(a).fleet.epoch
        finally:
            stop.set()
            await loop_task
        assert sum(billed(sim).values()) == 150
        assert epoch == 1 and m(a).fleet.epoch == 1  # acquired once, kept through the whole pass
        assert sim.counters.duplicates_same_quantity == 0 and conflicts(sim) == 0
