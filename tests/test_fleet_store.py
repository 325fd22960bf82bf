"""Fleet mode's PostgreSQL store against a real PostgreSQL: migrations under a lock, idempotent
shipping, the fleet-wide hour lifecycle, tenant mappings, and the lease that fences a deposed leader."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import T0

from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Settings
from sidecar.errors import LeaseLost
from sidecar.model import CustomerRef
from sidecar.store.outbox import ShippedDelta
from sidecar.store.pg import FleetStore, migrate, pg_schema_files
from sidecar.store.records import Settlement

H10 = hour_start(T0)
H09 = H10 - HOUR_S
SEALED = H10 + 400  # 09:00 is past its grace
A = "identifier:cust-a"


def settings(tmp_path: Path, **kw: Any) -> Settings:
    """A member's settings; tests not about the fleet's birth report its first hour."""
    return replace(Settings(db_path=tmp_path / "m.db", product_code="prod-f", fleet_url="unused",
                            birth_hour="report"), **kw)


def d(seq: int, *, customer: str = A, hour: int = H09, raw: int = 1, tokens: bool = False) -> ShippedDelta:
    """A delta of inference requests (or, with `tokens`, of tokens-processed, unit 1,000)."""
    dimension, unit = ("tokens-processed", 1000) if tokens else ("inference-requests", 1)
    return ShippedDelta(seq=seq, customer=customer, dimension=dimension, hour=hour, unit=unit, raw=raw,
                        events=raw if dimension == "inference-requests" else 1, first_event_at=hour + 60)


@pytest.fixture
async def fleet(pg_url: str, tmp_path: Path) -> AsyncIterator[tuple[FleetStore, FleetStore, ManualClock]]:
    """Two members of one fleet on one PostgreSQL database, on one manual clock at 10:02."""
    clock = ManualClock(T0)
    a = await FleetStore.open(pg_url, settings=settings(tmp_path), clock=clock, member_id="member-a")
    b = await FleetStore.open(pg_url, settings=settings(tmp_path), clock=clock, member_id="member-b")
    try:
        yield a, b, clock
    finally:
        await a.close()
        await b.close()


async def test_migrations_apply_once_when_members_start_together(pg_url: str) -> None:
    """Four members migrating at the same moment: each file applied exactly once, none fails."""
    async def one() -> list[str]:
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            return await migrate(conn)

    results = await asyncio.gather(*(one() for _ in range(4)))
    names = [p.stem for p in pg_schema_files()]
    assert sorted(n for r in results for n in r) == names
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
        assert await migrate(conn) == []


Fleet = tuple[FleetStore, FleetStore, ManualClock]


async def test_shipping_the_same_deltas_twice_counts_them_once(fleet: Fleet) -> None:
    """A member that did not see PostgreSQL's answer ships again: nothing is added twice."""
    a, _, _ = fleet
    assert await a.ship("file-1", [d(1), d(2, raw=2)]) == 2
    assert await a.ship("file-1", [d(1), d(2, raw=2), d(3, raw=4)]) == 1
    assert await a.ship("file-1", [d(3, raw=4)]) == 0
    (b,) = await a.buckets()
    assert (b["raw"], b["events"], b["state"]) == (7, 7, "open")


async def test_members_deltas_merge_into_one_bucket_per_customer_hour(
        fleet: Fleet) -> None:
    """Two members (two files) serving one customer in one hour: one bucket, one record."""
    a, b, clock = fleet
    await a.ship("file-a", [d(1, raw=3)])
    await b.ship("file-b", [d(1, raw=5)])
    assert await a.acquire_lease() is not None
    clock.set(SEALED)
    frozen, _ = await a.prepare_flush(now=clock.now())
    assert frozen == 1
    (rec,) = await a.claim(now=clock.now(), limit=25)
    assert rec.payload == {"CustomerIdentifier": "cust-a", "Dimension": "inference-requests", "Quantity": 8,
                           "Timestamp": H09 + 60}
    assert rec.product_code == "prod-f"


async def test_a_delta_for_a_sealed_hour_goes_to_the_open_hour(fleet: Fleet) -> None:
    """Usage shipped after the fleet sealed its hour is carried into the customer's open hour."""
    a, b, clock = fleet
    await a.ship("file-a", [d(1, raw=3)])
    await a.acquire_lease()
    clock.set(SEALED)
    await a.prepare_flush(now=clock.now())
    await b.ship("file-b", [d(1, raw=5)])  # b was cut off from PostgreSQL during the seal
    by_hour = {r["hour"]: r for r in await a.buckets()}
    assert (by_hour[H09]["raw"], by_hour[H09]["state"]) == (3, "pending")
    assert (by_hour[H10]["raw"], by_hour[H10]["carried_in"], by_hour[H10]["state"]) == (5, 5, "open")


async def test_remainders_carry_fleet_wide(fleet: Fleet) -> None:
    """Tokens below a unit in one hour (from two members) carry into the next sealed hour."""
    a, b, clock = fleet
    await a.ship("file-a", [d(1, raw=700, tokens=True)])
    await b.ship("file-b", [d(1, raw=600, tokens=True)])
    await a.ship("file-a", [d(2, raw=800, hour=H10, tokens=True)])
    await a.acquire_lease()
    clock.set(SEALED)
    await a.prepare_flush(now=clock.now())
    clock.set(SEALED + HOUR_S)
    await a.prepare_flush(now=clock.now())
    got = {r["hour"]: (r["quantity"], r["remainder"]) for r in await a.buckets()}
    assert got == {H09: (1, 300), H10: (1, 100)}


async def test_a_tenant_mapped_on_one_member_holds_for_all(fleet: Fleet) -> None:
    """Unmapped usage from any member joins the customer's bucket when any member maps the tenant."""
    a, b, _ = fleet
    await a.ship("file-a", [d(1, customer="tenant:acme", raw=2)])
    assert {r["state"] for r in await a.buckets()} == {"unmapped"}
    assert await b.map_tenant("acme", CustomerRef(customer_identifier="acme-aws")) == 1
    await a.ship("file-a", [d(2, customer="tenant:acme", raw=3)])
    (bucket,) = await a.buckets()
    assert (bucket["customer"], bucket["raw"], bucket["state"]) == ("identifier:acme-aws", 5, "open")


async def test_one_lease_holder_at_a_time_and_a_new_holder_increments_the_epoch(
        fleet: Fleet) -> None:
    a, b, _ = fleet
    first = await a.acquire_lease()
    assert first is not None
    assert await b.acquire_lease() is None
    assert await a.renew_lease()
    await a.release_lease()
    second = await b.acquire_lease()
    assert second == first + 1
    assert [(m["member_id"], m["leader"]) for m in await a.members()] == [("member-a", False), ("member-b", True)]


async def expire_lease(url: str) -> None:
    """The leader stops renewing (paused, partitioned) and its TTL runs out."""
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("UPDATE lease SET expires_at = now() - interval '1 second'")


async def test_a_deposed_leader_changes_nothing(pg_url: str, fleet: Fleet) -> None:
    """Leader A claims records, pauses past its lease; B takes over. A's late answer is refused, and
    the records A had in flight are resent byte for byte by B, as possibly received."""
    a, b, clock = fleet
    await a.ship("file-a", [d(1, raw=3), d(2, customer="identifier:cust-b", raw=4)])
    await a.acquire_lease()
    clock.set(SEALED)
    await a.prepare_flush(now=clock.now())
    claimed = await a.claim(now=clock.now(), limit=25)
    assert len(claimed) == 2
    await expire_lease(pg_url)
    assert await b.acquire_lease() is not None
    with pytest.raises(LeaseLost):
        await a.settle([Settlement(record=r.id, outcome="sent", status="Success") for r in claimed], now=clock.now())
    with pytest.raises(LeaseLost):
        await a.prepare_flush(now=clock.now())
    assert not await a.renew_lease()
    again = await b.claim(now=clock.now(), limit=25)
    assert {r.id: (r.payload, r.maybe_received) for r in again} == {r.id: (r.payload, True) for r in claimed}


async def test_a_takeover_waits_for_the_leaders_transaction(pg_url: str, tmp_path: Path,
                                                            fleet: Fleet) -> None:
    """The fence holds the lease row for the whole leader transaction: a lease that expires while
    the leader is inside one cannot be taken until that transaction ends."""
    _, b, clock = fleet
    short = await FleetStore.open(pg_url, settings=settings(tmp_path, lease_s=1.0), clock=clock, member_id="short")
    try:
        await short.acquire_lease()
        async with short.pool.connection() as conn, conn.transaction():
            await short._fence(conn)
            await asyncio.sleep(1.2)  # the lease has expired on PostgreSQL's clock
            taker = asyncio.create_task(b.acquire_lease())
            await asyncio.sleep(0.5)
            assert not taker.done()  # blocked on the lease row the leader's transaction holds
        assert await taker is not None
    finally:
        await short.close()


async def test_settling_every_outcome(fleet: Fleet) -> None:
    a, _, clock = fleet
    await a.ship("file-a", [d(1, customer=f"identifier:c{i}") for i in range(4)])
    await a.acquire_lease()
    clock.set(SEALED)
    await a.prepare_flush(now=clock.now())
    batch = await a.claim(now=clock.now(), limit=25)
    outcomes = ["sent", "conflict", "rejected", "retry"]
    await a.settle([Settlement(record=r.id, outcome=o, status="X", error="e", next_attempt_at=clock.now())  # type: ignore[arg-type]
                    for r, o in zip(batch, outcomes, strict=True)], now=clock.now())
    states = sorted(r["state"] for r in await a.buckets())
    assert states == ["conflict", "pending", "rejected", "sent"]
    assert await a.pending_summary() == (1, clock.now())


async def test_the_window_rule_carries_or_marks_unknown(fleet: Fleet) -> None:
    a, _, clock = fleet
    await a.ship("file-a", [d(1, raw=3), d(2, customer="identifier:cust-b", raw=4)])
    await a.acquire_lease()
    clock.set(SEALED)
    await a.prepare_flush(now=clock.now())
    batch = await a.claim(now=clock.now(), limit=25)
    await a.settle([Settlement(record=batch[0].id, outcome="retry", maybe_received=True),
                    Settlement(record=batch[1].id, outcome="retry", maybe_received=False)], now=clock.now())
    clock.set(H09 + 24 * HOUR_S)
    _, closed = await a.prepare_flush(now=clock.now())
    assert closed == {"unknown": 1, "carried": 1}


async def test_a_fleet_born_now_does_not_report_its_birth_hour(pg_url: str, tmp_path: Path) -> None:
    """Moving to fleet mode at 10:02: single-file tasks may have sent 10:00 already, so the new
    fleet's 10:00 usage goes into 11:00 (carried), as a single-file store's birth does."""
    clock = ManualClock(T0)
    a = await FleetStore.open(pg_url, settings=settings(tmp_path, birth_hour="defer"), clock=clock, member_id="a")
    try:
        await a.ship("file-a", [d(1, hour=H10, raw=3)])
        (b,) = await a.buckets()
        assert (b["hour"], b["raw"], b["carried_in"]) == (H10 + HOUR_S, 3, 3)
        b2 = await FleetStore.open(pg_url, settings=settings(tmp_path, birth_hour="defer"), clock=clock,
                                   member_id="b")  # a second member joining does not move the fleet's clock
        clock.set(T0 + 2 * HOUR_S)
        await b2.close()
        async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as conn:
            cur = await conn.execute("SELECT value FROM meta WHERE key = 'sealed_before'")
            assert (await cur.fetchone()) == (H10 + HOUR_S,)
    finally:
        await a.close()


async def test_guardrails_hold_a_record_until_an_operator_releases_it(pg_url: str, tmp_path: Path) -> None:
    """The single-file guardrails at freezing, fleet-wide: over the ceiling, held (never claimed);
    released, it is sent; discarded, it never is."""
    from sidecar.config import DEFAULT_DIMENSIONS, Dimension

    capped = (DEFAULT_DIMENSIONS[0], Dimension(name="tokens-processed", source="total_tokens", unit=1000,
                                               max_quantity=5))
    clock = ManualClock(T0)
    a = await FleetStore.open(pg_url, settings=settings(tmp_path, dimensions=capped), clock=clock, member_id="a")
    try:
        await a.ship("f", [d(1, raw=9000, tokens=True), d(2, customer="identifier:cust-b", raw=9000, tokens=True)])
        await a.acquire_lease()
        clock.set(SEALED)
        await a.prepare_flush(now=clock.now())
        assert {r["state"] for r in await a.buckets()} == {"held"}
        assert await a.claim(now=clock.now(), limit=25) == []
        assert await a.release_held(customer="cust-a") == 1
        assert await a.release_held(customer="cust-b", discard=True) == 1
        assert [r.payload["Quantity"] for r in await a.claim(now=clock.now(), limit=25)] == [9]
        assert {r["customer"]: r["state"] for r in await a.buckets()} == {
            "identifier:cust-a": "pending", "identifier:cust-b": "discarded"}
    finally:
        await a.close()


async def test_a_final_seal_settles_remainders(fleet: Fleet) -> None:
    """flush --once --final: the open hour is sealed and each remainder settled half up."""
    a, _, _ = fleet
    await a.ship("f", [d(1, hour=H10, raw=1600, tokens=True),
                       d(2, customer="identifier:cust-b", hour=H10, raw=1400, tokens=True)])
    await a.acquire_lease()
    assert await a.seal_through(H10 + HOUR_S, final=True) == 2
    got = {r["customer"]: (r["quantity"], r["remainder"]) for r in await a.buckets()}
    assert got == {"identifier:cust-a": (2, 0), "identifier:cust-b": (1, 400)}


async def test_members_that_disagree_on_a_unit_never_mix_it(fleet: Fleet) -> None:
    """A rolling deployment changed tokens-processed from 1,000 to 100 tokens per unit: the old
    release's member ships 1,500 tokens measured at 1,000, the new one 700 at 100. The bucket keeps
    one unit; the other usage is parked (visible, never sent) and shipping never gets stuck."""
    a, b, _clock = fleet
    old = ShippedDelta(seq=1, customer=A, dimension="tokens-processed", hour=H10, unit=1000, raw=1500, events=1,
                       first_event_at=H10)
    new = ShippedDelta(seq=1, customer=A, dimension="tokens-processed", hour=H10, unit=100, raw=700, events=1,
                       first_event_at=H10)
    assert await a.ship("old-file", [old]) == 1
    assert await b.ship("new-file", [new]) == 1
    (bucket,) = await a.buckets()
    assert (bucket["unit"], bucket["raw"]) == (1000, 1500)
    figures = await a.figures()
    assert figures["unconfigured_raw_by_dimension"] == {"tokens-processed": 700}
    assert await b.ship("new-file", [new, replace(new, seq=2, raw=5)]) == 1  # later shipments go through
    assert (await a.figures())["unconfigured_raw_by_dimension"] == {"tokens-processed": 705}
