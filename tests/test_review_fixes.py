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
    assert await spiked.store.release_held(discard=True) == 1
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
        store.call(lambda conn: store.rules.seal(conn, through=H10 + HOUR_S, final=True))
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
        store.call(lambda conn: store.rules.seal(conn, through=H10 + HOUR_S, final=True))
        clock.set(H10 + 1810)
        store.seal_due_sync()
        assert rows(s.db_path, "SELECT count(*) FROM buckets WHERE state = 'open'") == [(0,)]
        assert gpu_buckets(s.db_path) == {("identifier:acme", H10): 1800_000_000}
    finally:
        store.close()


# ---- the second review -------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["unit", "dropped"])
async def test_a_sealed_bucket_frozen_under_a_new_configuration_is_parked(tmp_path: Path, change: str) -> None:
    """Sealed while SIDECAR_PRODUCT_CODE was missing, frozen after a release changed its unit (or
    dropped its dimension): its 13 units of 1,000 tokens are parked as 13,000 tokens, never sent as
    13 units of the new unit, and never stuck `sealed`."""
    k = await make_kit(tmp_path, product_code=None)
    try:
        k.ingest(event("t", when=H09 + 60, customer=CUST, prompt=13_000, completion=0))
        k.clock.set(H10 + 400)
        await k.flusher.flush_once()
        assert k.records() == []
        dims = (Dimension(name="inference-requests", source="count", unit=1),) + (
            (Dimension(name="tokens-processed", source="total_tokens", unit=1_000_000),) if change == "unit" else ())
        k.settings = replace(k.settings, product_code="prod-test-1", dimensions=dims)
        k.reopen()
        await k.flusher.flush_once()
        assert tokens_billed(k) == {}
        assert rows(k.settings.db_path, "SELECT dimension, raw, unit FROM parked") == [("tokens-processed", 13_000,
                                                                                       1000)]
        assert rows(k.settings.db_path, "SELECT count(*) FROM buckets WHERE state = 'sealed'") == [(0,)]
    finally:
        await k.close()


async def test_a_cli_command_does_not_map_tenants_behind_the_daemon(tmp_path: Path) -> None:
    """A CLI command whose config maps a tenant leaves the mapping to the daemon; and a daemon that
    finds a mapped tenant with unmapped usage (mapped by someone else) moves that usage at start."""
    k = await make_kit(tmp_path)
    try:
        k.ingest(event("t1", when=k.clock.now() - 60, customer={"tenant": "acme"}))
        acme = CustomerRef(customer_identifier="CUST-ACME")
        cli = Store.open(k.settings.db_path, settings=replace(k.settings, customers={"acme": acme}), clock=k.clock,
                         resume=False)
        cli.close()
        assert rows(k.settings.db_path, "SELECT count(*) FROM tenants") == [(0,)]
        # Someone else's writer mapped acme while this daemon's map did not know: usage stranded.
        k.store.close()
        conn = sqlite3.connect(k.settings.db_path)
        conn.execute("INSERT INTO customers (customer, customer_identifier)"
                     " VALUES ('identifier:CUST-ACME', 'CUST-ACME')")
        conn.execute("INSERT INTO tenants (tenant, customer, source, updated_at) VALUES ('acme',"
                     " 'identifier:CUST-ACME', 'api', 0)")
        conn.commit()
        conn.close()
        k.reopen()
        assert rows(k.settings.db_path, "SELECT count(*) FROM buckets WHERE state = 'unmapped'") == [(0,)]
        k.clock.set(H10 + HOUR_S + 400)
        await k.flusher.flush_once()
        assert {(key.customer, key.dimension) for key in k.sim.billed} >= {("CUST-ACME", "inference-requests")}
    finally:
        await k.close()


async def test_sigterm_while_the_sender_is_paused_still_probes(tmp_path: Path) -> None:
    """The shutdown drain's deadline comes before the pause ends: it probes once instead of giving up,
    so the final hour goes out if AWS is back."""
    from flushkit import customer_events

    k = await make_kit(tmp_path, max_backoff_s=300.0)
    try:
        k.ingest(*customer_events(3))
        k.clock.set(H10 + 400)
        k.sim.configure(throttle_rate=1.0)
        await k.flusher.flush_once()
        assert k.flusher.paused()
        k.sim.configure(throttle_rate=0.0)
        k.flusher.paused_until = k.clock.now() + 200  # far beyond the drain's deadline
        s = await k.flusher.drain(deadline_s=5.0)
        assert s.calls >= 1
    finally:
        await k.close()


async def test_a_rename_moves_the_carried_remainder_with_the_usage(tmp_path: Path) -> None:
    """13,800 tokens under a typo'd dimension, rebuilt as tokens-1k: the 800-token remainder follows
    into tokens-1k and the final seal bills it (half_up), instead of stranding it under the old name."""
    from test_rebuild import LISTING, TYPO

    from sidecar.simulator import SimulatorConfig

    k = await make_kit(tmp_path, dimensions=TYPO, sim_config=SimulatorConfig(
        subscribe_all=True, product_code="prod-test-1", allowed_dimensions=LISTING))
    try:
        k.ingest(event("e1", when=H09 + 60, customer={"customer_identifier": "cust-0"}, prompt=13_000, completion=800))
        k.clock.set(H10 + 400)
        await k.flusher.flush_once()
        k.settings = replace(k.settings, dimensions=(TYPO[0], Dimension(name="tokens-1k", source="total_tokens",
                                                                          unit=1000)))
        k.reopen()
        await k.store.replay(states=["rejected"], rename={"tokens-processed": "tokens-1k"})
        await k.store.seal_through(H10 + HOUR_S, final=True)
        await k.flusher.drain(deadline_s=5)
        billed = [int(v.quantity) for key, v in k.sim.billed.items() if key.dimension == "tokens-1k"]
        assert sorted(billed) == [1, 13]  # 13 rebuilt at 09:00, and 1 for the 800-token remainder
        assert rows(k.settings.db_path, "SELECT dimension, raw FROM carries WHERE raw > 0") == []
    finally:
        await k.close()


async def test_unmapped_events_are_counted_once(tmp_path: Path) -> None:
    """One unmapped request that spans an hour boundary is one event, aged from its own time."""
    from test_gpu_time import timed as gpu_timed

    from sidecar.store import queries

    clock = ManualClock(H10 + 120)
    s = Settings(db_path=tmp_path / "u.db", birth_hour="report")
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        obj = gpu_timed("x", "ignored", H10 - 40, H10 + 20)
        obj["customer"] = {"tenant": "acme"}
        ingest(store, clock, obj)
        clock.set(H10 + HOUR_S + 400)
        store.seal_due_sync()
        with queries.reader(s.db_path) as conn:
            summary = queries.unmapped_summary(conn, clock.now())
        assert summary is not None
        assert summary["events"] == 1
        assert summary["oldest_event_at"] == H10 + 20
    finally:
        store.close()


# ---- the operator's review -------------------------------------------------------------------


def test_one_owner_per_database_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """While a daemon owns the file, `flush --once --final` on it is refused (exit 2, one line) instead
    of sealing the daemon's open hour behind its back; once the daemon is gone it runs."""
    from sidecar.cli import main
    from sidecar.errors import StoreLocked

    db = tmp_path / "o.db"
    s = Settings(db_path=db, birth_hour="report")
    daemon = Store.open(db, settings=s, clock=ManualClock(H10))
    try:
        with pytest.raises(StoreLocked):
            Store.open(db, settings=s, clock=ManualClock(H10))
        capsys.readouterr()
        env = {"SIDECAR_DB": str(db), "AWS_REGION": "us-east-1", "SIDECAR_DRY_RUN": "true"}
        assert main(["flush", "--once", "--final", "--dry-run"], env=env) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "owns this database" in err[0]
        Store.open(db, settings=s, clock=ManualClock(H10), resume=False).close()  # readers/CLI beside it: fine
    finally:
        daemon.close()
    Store.open(db, settings=s, clock=ManualClock(H10)).close()


async def test_flush_final_fails_while_the_file_still_holds_usage(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """`flush --once --final` on a file with unmapped usage exits 1 and lists it, so nobody deletes
    the volume believing it was emptied."""
    import asyncio
    import json
    import time

    from sidecar.cli import main
    from sidecar.simulator import Simulator, SimulatorConfig, start

    sim = Simulator(SimulatorConfig(subscribe_all=True, product_code="prod-test-1"))
    runner, url = await start(sim)
    try:
        db = tmp_path / "dead.db"
        now = time.time()
        store = Store.open(db, settings=Settings(db_path=db, birth_hour="report"), clock=ManualClock(now))
        ingest(store, ManualClock(now), event("u", when=now - 5, customer={"tenant": "acme"}),
               event("c", when=now - 5))
        store.close()
        env = {"AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
               "AWS_ENDPOINT_URL_MARKETPLACE_METERING": url, "SIDECAR_PRODUCT_CODE": "prod-test-1",
               "SIDECAR_DB": str(db)}
        capsys.readouterr()
        assert await asyncio.to_thread(main, ["flush", "--once", "--final", "--timeout", "5"], env) == 1
        out = json.loads(capsys.readouterr().out)
        assert out["left_behind"]["unmapped"]["tenants"] == ["acme"]
    finally:
        await runner.cleanup()


async def test_unmapped_usage_nobody_pays_for_can_be_discarded(tmp_path: Path) -> None:
    """`release --state unmapped --customer tenant:NAME --discard`: the usage ends discarded, the alarm clears."""
    from aiohttp.test_utils import TestClient, TestServer

    from sidecar.app import create_app
    from sidecar.cli import main

    clock = ManualClock(H10 + 120)
    s = Settings(db_path=tmp_path / "n.db", birth_hour="report")
    store = Store.open(s.db_path, settings=s, clock=clock)
    ingest(store, clock, event("x", when=H10 + 60, customer={"tenant": "unattributed"}))
    store.close()
    env = {"SIDECAR_DB": str(s.db_path)}
    assert main(["release", "--state", "unmapped", "--customer", "unattributed"], env=env) == 2
    assert main(["release", "--state", "unmapped", "--customer", "tenant:unattributed", "--discard"], env=env) == 0
    async with TestClient(TestServer(create_app(s, clock=clock, background=False))) as c:
        health = await (await c.get("/healthz")).json()
    assert health["unmapped"] is None and health["status"] == "ok"
    assert rows(s.db_path, "SELECT DISTINCT state FROM buckets") == [("discarded",)]


def test_operator_input_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """A malformed OLD=NEW and out-of-range settings are refused by name, never a traceback."""
    from sidecar.cli import main
    from sidecar.config import load_settings
    from sidecar.errors import ConfigError

    assert main(["release", "--state", "unconfigured", "--dimension", "=prompt-tokens"], env={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--dimension" in err[0]
    with pytest.raises(ConfigError, match="SIDECAR_SPIKE_FACTOR: must be a finite number"):
        load_settings({"SIDECAR_SPIKE_FACTOR": "nan"})
    with pytest.raises(ConfigError, match="SIDECAR_GPUS: must be at most 1024"):
        load_settings({"SIDECAR_GPUS": "1000000000000"})
    from sidecar.config import _parse_dimensions

    with pytest.raises(ConfigError, match=r"dimensions\[0\]\.customer"):
        _parse_dimensions([{"name": "r", "source": "count", "customer": "acme"}])


async def test_a_failed_request_leaves_no_customer_marked_as_written(tmp_path: Path) -> None:
    """A request that fails after writing its new customer's row is rolled back whole; the writer's
    cache must not remember that row, or the customer's next usage would have no row to be billed to."""
    from flushkit import make_kit as kit_for

    k = await kit_for(tmp_path)
    try:
        real = k.store.rules._record_intervals

        def failing(conn: Any, intervals: Any, **kw: Any) -> None:
            if any(iv[0] == "chatcmpl-bad" for iv in intervals):
                raise RuntimeError("this request fails after its customer row was written")
            real(conn, intervals, **kw)

        k.store.rules._record_intervals = failing  # type: ignore[method-assign]
        with pytest.raises(RuntimeError):
            k.ingest(event("bad", when=H09 + 60, customer={"customer_identifier": "new-cust"}, gpu_seconds=1.0))
        k.ingest(event("good", when=H09 + 60, customer={"customer_identifier": "new-cust"}))
        k.clock.set(H10 + 400)
        await k.flusher.flush_once()
        assert {("new-cust", key.dimension) for key in k.sim.billed} >= {("new-cust", "inference-requests")}
    finally:
        await k.close()
