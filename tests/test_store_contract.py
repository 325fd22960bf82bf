"""The store contract: what any backend must do, through its domain methods only (no SQL, no
connection). Parametrised by backend so fleet mode's PostgreSQL store runs the same tests; only
the single-file SQLite store exists today."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from helpers import T0, event

from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import CustomerRef, Settings
from sidecar.events import validate_event
from sidecar.store import Store, UsageFilter
from sidecar.store.protocol import SendingStore
from sidecar.store.records import DueRecord, Settlement

H10 = hour_start(T0)
H09 = H10 - HOUR_S
SEALED = H10 + 400  # 09:00 is past its grace

def sqlite_store(settings: Settings, clock: ManualClock) -> Store:
    """The single-file backend."""
    return Store.open(settings.db_path, settings=settings, clock=clock)


BACKENDS = {"sqlite": sqlite_store}


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Any, ManualClock]]:
    """A fresh store of each backend on a manual clock at 10:02 (09:00 still within its grace)."""
    clock = ManualClock(T0)
    settings = Settings(db_path=tmp_path / "c.db", birth_hour="report", product_code="prod-c")
    store = BACKENDS[request.param](settings, clock)
    try:
        yield store, clock
    finally:
        store.close()


async def ingest(store: Any, clock: ManualClock, *objs: dict[str, Any]) -> tuple[int, int]:
    """Ingest events at the clock's now; (accepted, duplicates)."""
    res = await store.ingest([validate_event(o, now=clock.now(), max_age_s=172800, max_future_s=300) for o in objs])
    return res.accepted, res.duplicates


def rows(store: Any, **filters: Any) -> list[dict[str, Any]]:
    """Bucket rows through the store's read view."""
    return list(store.view.usage(UsageFilter(**filters))["rows"])


async def test_the_sqlite_store_is_a_sending_store(backend: tuple[Any, ManualClock]) -> None:
    """Every backend implements the flusher's protocol."""
    store, _ = backend
    sending: SendingStore = store
    assert sending is store


async def test_ingest_dedups_by_event_id(backend: tuple[Any, ManualClock]) -> None:
    """The same event three times counts once; its usage lands in its hour's bucket."""
    store, clock = backend
    assert await ingest(store, clock, event(1, when=H10 + 30)) == (1, 0)
    assert await ingest(store, clock, event(1, when=H10 + 30), event(1, when=H10 + 30)) == (0, 2)
    got = {(r["dimension"], r["raw"]) for r in rows(store)}
    assert got == {("inference-requests", 1), ("tokens-processed", 15)}


async def test_sealing_freezing_and_late_usage(backend: tuple[Any, ManualClock]) -> None:
    """A pass seals 09:00 and freezes one record per bucket; a late 09:00 event goes to the open hour."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H09 + 60, prompt=1500, completion=0))
    clock.set(SEALED)
    frozen, closed = await store.prepare_flush(now=clock.now())
    assert (frozen, closed) == (2, {})
    await ingest(store, clock, event(2, when=H09 + 120))
    late = [r for r in rows(store) if r["hour"] == H10]
    assert {(r["dimension"], r["carried_in"]) for r in late} == {("inference-requests", 1),
                                                                   ("tokens-processed", 15)}
    sealed = {r["dimension"]: r for r in rows(store) if r["hour"] == H09}
    assert (sealed["tokens-processed"]["quantity"], sealed["tokens-processed"]["remainder"]) == (1, 500)


async def test_tenant_mapping_moves_unmapped_usage(backend: tuple[Any, ManualClock]) -> None:
    """Unmapped usage joins the customer's buckets when the tenant is mapped."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30, customer={"tenant": "acme"}))
    assert {r["state"] for r in rows(store)} == {"unmapped"}
    assert await store.map_tenant("acme", CustomerRef(customer_identifier="acme-aws")) == 2
    assert {(r["customer"], r["state"]) for r in rows(store)} == {("identifier:acme-aws", "open")}


async def claimed(store: Any, clock: ManualClock) -> list[DueRecord]:
    """Seal and freeze 09:00's two records, then claim them."""
    await ingest(store, clock, event(1, when=H09 + 60))
    clock.set(SEALED)
    await store.prepare_flush(now=clock.now())
    return list(await store.claim(now=clock.now(), limit=25))


@pytest.mark.parametrize(("outcome", "state"), [("sent", "sent"), ("conflict", "conflict"),
                                                ("rejected", "rejected"), ("retry", "pending")])
async def test_settling_every_outcome(backend: tuple[Any, ManualClock], outcome: str, state: str) -> None:
    """Claimed records are in flight (claimed once); an answer settles them into their state."""
    store, clock = backend
    batch = await claimed(store, clock)
    assert len(batch) == 2
    assert await store.claim(now=clock.now(), limit=25) == []  # in flight: not claimed twice
    await store.settle([Settlement(record=r.id, outcome=outcome, status="X", error="e", next_attempt_at=clock.now())
                        for r in batch], now=clock.now())
    assert {r["state"] for r in rows(store, since=H09, until=H10)} == {state}
    pending, _ = await store.pending_summary()
    assert pending == (2 if outcome == "retry" else 0)


async def test_payload_is_frozen_and_resent_identically(backend: tuple[Any, ManualClock]) -> None:
    """A record retried is claimed again with the very same payload."""
    store, clock = backend
    first = {r.id: dict(r.payload) for r in await claimed(store, clock)}
    await store.settle([Settlement(record=rid, outcome="retry", maybe_received=True, next_attempt_at=clock.now())
                        for rid in first], now=clock.now())
    again = {r.id: (dict(r.payload), r.maybe_received) for r in await store.claim(now=clock.now(), limit=25)}
    assert again == {rid: (payload, True) for rid, payload in first.items()}


async def test_window_closing_carries_or_marks_unknown(backend: tuple[Any, ManualClock]) -> None:
    """Past the window a never-received record is carried; a maybe-received one ends unknown."""
    store, clock = backend
    batch = await claimed(store, clock)
    await store.settle([Settlement(record=batch[0].id, outcome="retry", maybe_received=True),
                        Settlement(record=batch[1].id, outcome="retry", maybe_received=False)], now=clock.now())
    clock.set(H09 + 24 * HOUR_S)
    _, closed = await store.prepare_flush(now=clock.now())
    assert closed == {"unknown": 1, "carried": 1}


async def test_timestamp_refusals_close_records(backend: tuple[Any, ManualClock]) -> None:
    """close_records applies the window rule to records AWS refused for their timestamp."""
    store, clock = backend
    batch = await claimed(store, clock)
    assert await store.close_records([r.id for r in batch], now=clock.now(), reason="TimestampOutOfBounds") == [
        "carried", "carried"]


async def test_replay_carries_a_conflict(backend: tuple[Any, ManualClock]) -> None:
    """replay --state conflict carries the usage into the open hour."""
    store, clock = backend
    batch = await claimed(store, clock)
    await store.settle([Settlement(record=r.id, outcome="conflict", status="DuplicateRecord") for r in batch],
                       now=clock.now())
    out = await store.replay(states=["conflict"])
    assert out == {"resent": 0, "rebuilt": 0, "carried": 2, "unknown": 0}


async def test_due_now_and_peek(backend: tuple[Any, ManualClock]) -> None:
    """Records held for a later retry become due at once with due_now; peek_due claims nothing."""
    store, clock = backend
    batch = await claimed(store, clock)
    later = clock.now() + 600
    await store.settle([Settlement(record=r.id, outcome="retry", next_attempt_at=later) for r in batch],
                       now=clock.now())
    assert await store.peek_due(now=clock.now(), limit=25) == []
    assert await store.due_now(held_until=later, now=clock.now()) == 2
    assert len(await store.peek_due(now=clock.now(), limit=25)) == 2
    assert len(await store.claim(now=clock.now(), limit=25)) == 2


async def test_health_and_left_behind(backend: tuple[Any, ManualClock]) -> None:
    """The read view reports what is owed and what a stopping store leaves behind."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30, customer={"tenant": "acme"}))
    await store.check_writable(clock.now())
    health = store.view.health(clock.now())
    assert health["unmapped"]["tenants"] == ["acme"]
    assert store.view.left_behind(clock.now())["unmapped"]["events"] == 1
