"""Regressions from an independent review of the billing fixes: a guardrail that must not turn itself
off, a change of GPU mode between releases, carries above one unit at a final seal, CLI commands that
must not move the daemon's clocks, and dedicated time after SIGTERM's seal."""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from flushkit import H09, H10, Kit, make_kit
from helpers import event
from test_gpu_time import gpu_buckets, gpu_dims, ingest, timed

from sidecar.clock import HOUR_S, ManualClock
from sidecar.config import CustomerRef, Dimension, Settings
from sidecar.store import Store

CUST = {"customer_identifier": "cust-a"}


def tokens_billed(kit: Kit) -> dict[int, int]:
    """tokens-processed billed to cust-a, by hour."""
    return {k.hour_start: int(v.quantity) for k, v in kit.sim.billed.items()
            if k.customer == "cust-a" and k.dimension == "tokens-processed"}


def rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    """Rows of a query on the database file."""
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.fixture
async def spiked(tmp_path: Path):  # type: ignore[no-untyped-def]
    """500 token units billed at 09:00; a runaway 20,000 at 10:00 is held by the spike rule."""
    k = await make_kit(tmp_path)
    try:
        k.clock.set(H09 + 1800)
        k.ingest(event("h1", when=H09 + 1800, customer=CUST, prompt=500_000, completion=0))
        k.clock.set(H10 + 360)
        await k.flusher.flush_once()
        k.clock.set(H10 + 1800)
        k.ingest(event("spike", when=H10 + 1800, customer=CUST, prompt=20_000_000, completion=0))
        k.clock.set(H10 + HOUR_S + 360)
        await k.flusher.flush_once()
        assert {r["quantity"]: r["state"] for r in k.records() if r["dimension"] == "tokens-processed"} == {
            500: "sent", 20_000: "held"}
        yield k
    finally:
        await k.close()


async def test_a_held_spike_carried_by_the_window_is_held_again(spiked: Kit) -> None:
    """Nobody releases it: carried into the open hour with 300 real units, the 20,300 record is held
    again (history counts only billed records), never sent on its own."""
    later = H10 + 24 * HOUR_S
    spiked.clock.set(later + 10)
    await spiked.flusher.flush_once()
    spiked.clock.set(later + 700)
    spiked.ingest(event("legit", when=later + 700, customer=CUST, prompt=300_000, completion=0))
    spiked.clock.set(later + HOUR_S + 360)
    await spiked.flusher.flush_once()
    assert tokens_billed(spiked) == {H09: 500}
    assert [r["quantity"] for r in spiked.records() if r["state"] == "held"] == [20_300]


async def test_a_discarded_record_stays_discarded(spiked: Kit) -> None:
    """Discarded: its own state, never replayed as `expired`, never the baseline of the spike rule."""
    assert spiked.store.release_held_sync(discard=True) == 1
    out = await spiked.store.replay(states=["expired"])
    assert out == {"resent": 0, "rebuilt": 0, "carried": 0, "unknown": 0}
    later = H10 + 48 * HOUR_S
    spiked.clock.set(later + 600)
    spiked.ingest(event("spike2", when=later + 600, customer=CUST, prompt=20_000_000, completion=0))
    spiked.clock.set(later + HOUR_S + 360)
    await spiked.flusher.flush_once()
    assert tokens_billed(spiked) == {H09: 500}
    states = sorted(r["state"] for r in spiked.records() if r["dimension"] == "tokens-processed")
    assert states == ["discarded", "held", "sent"]


@pytest.mark.parametrize(("before", "after"), [("engine_time", "fair_share"), ("fair_share", "engine_time")])
def test_a_change_of_gpu_mode_bills_the_open_hour_once(tmp_path: Path, before: str, after: str) -> None:
    """A release switches gpu-hours between engine_time and fair_share mid-hour: the request that ran
    600 s alone before the restart is billed 600 s, not twice and not never."""
    clock = ManualClock(H10 + 1200)
    s = Settings(db_path=tmp_path / "m.db", birth_hour="report", dimensions=gpu_dims(before))
    store = Store.open(s.db_path, settings=s, clock=clock)
    ingest(store, clock, timed("r1", "cust-a", H10 + 300, H10 + 900))
    store.seal_due_sync()
    store.close()
    s2 = replace(s, dimensions=gpu_dims(after))
    store = Store.open(s2.db_path, settings=s2, clock=clock)
    try:
        clock.set(H10 + HOUR_S + 400)
        store.seal_due_sync()
    finally:
        store.close()
    assert gpu_buckets(s.db_path) == {("identifier:cust-a", H10): 600_000_000}


@pytest.mark.parametrize(("policy", "units"), [("half_up", 10), ("up", 10), ("down", 9)])
def test_a_carry_of_several_units_is_billed_whole_at_the_final_seal(tmp_path: Path, policy: str,
                                                                      units: int) -> None:
    """Release N (1,000 tokens a unit) leaves 950 tokens carried; release N+1 bills per 100 tokens and
    stops: 9 whole units are billed first, the policy decides only the last 50 tokens."""
    clock = ManualClock(H09 + 60)
    per_1000 = (Dimension(name="tokens-processed", source="total_tokens", unit=1000),)
    s = Settings(db_path=tmp_path / "c.db", birth_hour="report", dimensions=per_1000, settle_remainders="keep")
    store = Store.open(s.db_path, settings=s, clock=clock)
    ingest(store, clock, event("a", when=H09 + 30, customer=CUST, prompt=1950, completion=0))
    clock.set(H10 + 400)
    store.seal_due_sync()
    store.close()
    per_100 = (Dimension(name="tokens-processed", source="total_tokens", unit=100),)
    s2 = replace(s, dimensions=per_100, settle_remainders=policy)  # type: ignore[arg-type]
    store = Store.open(s2.db_path, settings=s2, clock=clock)
    try:
        store.call(lambda conn: store._seal(conn, through=H10 + HOUR_S, final=True))
    finally:
        store.close()
    # The 09:00 bucket is sealed and not frozen yet: it takes the units (1 from release N, plus these).
    assert rows(s.db_path, "SELECT hour, quantity FROM buckets") == [(H09, 1 + units)]
    assert rows(s.db_path, "SELECT raw FROM carries") == [(0,)]


def test_a_cli_command_beside_the_daemon_moves_none_of_its_clocks(tmp_path: Path) -> None:
    """`sidecar replay`/`release` open the store without owning it: no birth, no dedicated reset."""
    clock = ManualClock(H10)
    dims = gpu_dims("dedicated", customer=CustomerRef(customer_identifier="acme"))
    s = Settings(db_path=tmp_path / "d.db", birth_hour="report", dimensions=dims)
    daemon = Store.open(s.db_path, settings=s, clock=clock)
    try:
        clock.set(H10 + 600)
        daemon.seal_due_sync()
        before = rows(s.db_path, "SELECT key, value FROM meta ORDER BY key")
        clock.set(H10 + 900)
        cli = Store.open(s.db_path, settings=replace(s, birth_hour="defer"), clock=clock, resume=False)
        cli.close()
        assert rows(s.db_path, "SELECT key, value FROM meta ORDER BY key") == before
        clock.set(H10 + 1200)
        daemon.seal_due_sync()
        assert gpu_buckets(s.db_path) == {("identifier:acme", H10): 1200_000_000}
    finally:
        daemon.close()


def test_dedicated_time_stops_at_the_final_seal(tmp_path: Path) -> None:
    """After SIGTERM's seal the shutdown drain's passes add no time to an hour nobody would seal."""
    clock = ManualClock(H10)
    dims = gpu_dims("dedicated", customer=CustomerRef(customer_identifier="acme"))
    s = Settings(db_path=tmp_path / "f.db", birth_hour="report", dimensions=dims)
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        clock.set(H10 + 1800)
        store.call(lambda conn: store._seal(conn, through=H10 + HOUR_S, final=True))
        clock.set(H10 + 1810)
        store.seal_due_sync()
        assert rows(s.db_path, "SELECT count(*) FROM buckets WHERE state = 'open'") == [(0,)]
        assert gpu_buckets(s.db_path) == {("identifier:acme", H10): 1800_000_000}
    finally:
        store.close()
