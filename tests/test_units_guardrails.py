"""No made-up units, and quantity guardrails: usage keeps its unit through carries, tenant mappings
and releases; what the running configuration cannot bill is parked; absurd records are held."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from flushkit import H09, PRODUCT, Kit, make_kit
from helpers import event

from sidecar.app import create_app
from sidecar.cli import main
from sidecar.clock import HOUR_S, hour_start
from sidecar.config import DEFAULT_DIMENSIONS, Dimension
from sidecar.simulator import SimulatorConfig

SEALED = H09 + HOUR_S + 400  # 09:00 is past its grace
CUSTOMER = {"customer_identifier": "cust-gpu"}
# Each request's own engine time, so one event's 2 GPU-hours land in its hour (test_gpu_time.py covers
# fair_share); the unit rules are the same in every mode.
DIMENSIONS = (*DEFAULT_DIMENSIONS[:2], Dimension(name="gpu-hours", source="gpu_seconds", unit=3600, mode="engine_time"))
NEXT_RELEASE = (
    Dimension(name="inference-requests", source="count", unit=1),
    Dimension(name="tokens-1k", source="total_tokens", unit=1000),
)  # drops gpu-hours, renames tokens-processed


def billed(kit: Kit, dimension: str) -> dict[int, int]:
    """What the simulator billed cust-gpu for one dimension, by hour."""
    return {k.hour_start: int(v.quantity) for k, v in kit.sim.billed.items()
            if k.customer == "cust-gpu" and k.dimension == dimension}


def rows(db: Path, sql: str, *args: Any) -> list[dict[str, Any]]:
    """Rows of a query on the database file."""
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def new_release(kit: Kit, dimensions: tuple[Dimension, ...]) -> None:
    """Restart the sidecar with another configuration, as a new release does."""
    kit.settings = replace(kit.settings, dimensions=dimensions)
    kit.reopen()


async def app_view(kit: Kit) -> tuple[dict[str, Any], dict[str, Any], str]:
    """/usage, /healthz and /metrics of the real app on the kit's database (the kit's store is closed meanwhile)."""
    kit.store.close()
    app = create_app(kit.settings, clock=kit.clock, background=False)
    async with TestClient(TestServer(app)) as c:
        usage = await (await c.get("/usage")).json()
        health = await (await c.get("/healthz")).json()
        metrics = await (await c.get("/metrics")).text()
    kit.reopen()
    return usage, health, metrics


async def drain_hours(kit: Kit, *, hours: int = 2) -> None:
    """Let the open hours seal and go out."""
    kit.clock.set(hour_start(kit.clock.now()) + hours * HOUR_S + 400)
    await kit.flusher.flush_once()


@pytest.fixture
async def outage_then_new_release(tmp_path: Path):  # type: ignore[no-untyped-def]
    """2 GPU-hours and 13,000 tokens stay pending through an AWS outage; the next release drops
    gpu-hours and renames tokens-processed; the records' window closes."""
    listing = frozenset({"inference-requests", "tokens-processed", "gpu-hours", "tokens-1k"})
    k = await make_kit(tmp_path, dimensions=DIMENSIONS, sim_config=SimulatorConfig(
        subscribe_all=True, product_code=PRODUCT, allowed_dimensions=listing))
    try:
        k.ingest(event("g1", when=H09 + 60, customer=CUSTOMER, prompt=8000, completion=5000, gpu_seconds=7200.0))
        k.clock.set(SEALED)
        k.sim.configure(outage=True, outage_mode="aws503")
        await k.flusher.flush_once()
        assert k.states() == {"pending": 3}
        new_release(k, NEXT_RELEASE)
        k.sim.configure(outage=False)
        k.clock.set(H09 + 24 * HOUR_S)  # past the window (24 h minus the 30 min margin)
        await k.flusher.flush_once()
        yield k
    finally:
        await k.close()


async def test_carried_usage_of_a_dropped_dimension_is_parked_not_billed(outage_then_new_release: Kit) -> None:
    """The carried gpu-hours and tokens-processed are parked with their units; AWS gets none of it."""
    k = outage_then_new_release
    await drain_hours(k)
    assert billed(k, "gpu-hours") == {}
    assert billed(k, "tokens-processed") == {}
    assert sum(billed(k, "inference-requests").values()) == 1  # carried, configured: billed
    parked = {p["dimension"]: p for p in rows(k.settings.db_path, "SELECT * FROM parked")}
    assert parked["gpu-hours"]["raw"] == 7_200_000_000 and parked["gpu-hours"]["unit"] == 3_600_000_000
    assert parked["tokens-processed"]["raw"] == 13_000 and parked["tokens-processed"]["unit"] == 1000
    assert {p["state"] for p in parked.values()} == {"unconfigured"}
    usage, health, metrics = await app_view(k)
    assert {(p["dimension"], p["raw"]) for p in usage["parked"]} == {("gpu-hours", 7_200_000_000),
                                                                       ("tokens-processed", 13_000)}
    assert health["unconfigured"]["rows"] == 2
    assert health["status"] == "degraded"
    assert 'sidecar_unconfigured_usage_raw{dimension="gpu-hours"} 7.2e+09' in metrics


async def test_parked_usage_is_released_into_a_configured_dimension_with_its_unit(
        outage_then_new_release: Kit) -> None:
    """The operator releases tokens-processed into tokens-1k: 13 units billed; gpu-hours cannot become requests."""
    k = outage_then_new_release
    k.store.close()
    env = {"SIDECAR_DB": str(k.settings.db_path)}
    toml = k.settings.db_path.parent / "sidecar.toml"
    toml.write_text('[[dimensions]]\nname = "inference-requests"\nsource = "count"\n\n'
                    '[[dimensions]]\nname = "tokens-1k"\nsource = "total_tokens"\nunit = 1000\n')
    env["SIDECAR_CONFIG"] = str(toml)
    assert main(["release", "--state", "unconfigured", "--dimension", "gpu-hours=inference-requests"], env=env) == 2
    assert main(["release", "--state", "unconfigured", "--dimension", "tokens-processed=tokens-1k"], env=env) == 0
    k.clock.set(time.time())  # the CLI ran on the real clock: the released usage is in a real hour
    k.reopen()
    await drain_hours(k, hours=3)
    assert sum(billed(k, "tokens-1k").values()) == 13
    assert billed(k, "gpu-hours") == {}
    assert k.sim.counters.conflicts == 0


async def test_unmapped_usage_of_a_dropped_dimension_is_parked_when_mapped(tmp_path: Path) -> None:
    """A tenant mapped in a release that dropped gpu-hours: its GPU time is parked, not billed as raw µs."""
    k = await make_kit(tmp_path, dimensions=DIMENSIONS)
    try:
        k.ingest(event("t1", when=k.clock.now() - 30, customer={"tenant": "acme"}, gpu_seconds=5400.0))
        new_release(k, NEXT_RELEASE)
        from sidecar.config import CustomerRef

        await k.store.map_tenant("acme", CustomerRef(customer_identifier="cust-gpu"))
        await drain_hours(k)
        assert billed(k, "gpu-hours") == {}
        assert sum(billed(k, "inference-requests").values()) == 1
        parked = rows(k.settings.db_path, "SELECT * FROM parked")
        assert {(p["dimension"], p["raw"], p["unit"]) for p in parked} == {
            ("gpu-hours", 5_400_000_000, 3_600_000_000), ("tokens-processed", 15, 1000)}
    finally:
        await k.close()


async def test_open_bucket_of_a_dropped_dimension_is_parked_at_sealing(tmp_path: Path) -> None:
    """A release that drops a dimension mid-hour: the open bucket is parked when the hour seals."""
    k = await make_kit(tmp_path, dimensions=DIMENSIONS)
    try:
        k.ingest(event("o1", when=k.clock.now() - 30, customer=CUSTOMER, gpu_seconds=60.0))
        new_release(k, NEXT_RELEASE)
        await drain_hours(k)
        assert billed(k, "gpu-hours") == {}
        parked = {p["dimension"] for p in rows(k.settings.db_path, "SELECT * FROM parked")}
        assert parked == {"gpu-hours", "tokens-processed"}  # tokens-processed was renamed: parked too
    finally:
        await k.close()


# ---- guardrails --------------------------------------------------------------------------


async def test_the_unit_bug_would_end_held(tmp_path: Path) -> None:
    """With section 1's unit bug reintroduced (raw GPU µs in a unit-1 bucket, 13,000 tokens as units),
    the records are held by the ceiling and the spike rule: nothing absurd reaches AWS."""
    k = await make_kit(tmp_path, dimensions=DIMENSIONS)
    try:
        # History: an hour earlier the customer used 13 token units and 2 GPU-hours, billed.
        k.clock.set(H09 - HOUR_S + 120)
        k.ingest(event("h1", when=H09 - HOUR_S + 60, customer=CUSTOMER, prompt=8000, completion=5000,
                       gpu_seconds=7200.0))
        k.clock.set(SEALED - HOUR_S)
        await k.flusher.flush_once()
        assert sum(billed(k, "tokens-processed").values()) == 13
        # The bug: carried usage lands in buckets with unit 1 (crafted directly in the database).
        conn = sqlite3.connect(k.settings.db_path)
        conn.executemany(
            "INSERT INTO buckets (customer, dimension, hour, state, raw, events, carried_in, first_event_at, unit)"
            " VALUES ('identifier:cust-gpu', ?, ?, 'open', ?, 0, ?, ?, 1)",
            [("gpu-hours", H09, 7_200_000_000, 7_200_000_000, H09),
             ("tokens-processed", H09, 13_000, 13_000, H09)])
        conn.commit()
        conn.close()
        k.reopen()
        k.store.rules.unbillable = lambda dimension, raw_unit: None  # type: ignore[method-assign]
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        held = {r["dimension"]: r for r in k.records() if r["state"] == "held"}
        assert set(held) == {"gpu-hours", "tokens-processed"}
        assert held["gpu-hours"]["quantity"] == 2_147_483_647
        assert H09 not in billed(k, "gpu-hours") and H09 not in billed(k, "tokens-processed")
        holds = {h["record_id"]: h["rule"] for h in rows(k.settings.db_path, "SELECT * FROM holds")}
        assert holds[held["gpu-hours"]["id"]].startswith("ceiling")
        assert holds[held["tokens-processed"]["id"]].startswith("spike")
    finally:
        await k.close()


@pytest.fixture
async def held(tmp_path: Path):  # type: ignore[no-untyped-def]
    """7 requests against a ceiling of 5: the 09:00 record is frozen as held."""
    dims = (Dimension(name="inference-requests", source="count", unit=1, max_quantity=5),)
    k = await make_kit(tmp_path, dimensions=dims)
    try:
        k.ingest(*[event(f"r{i}", when=H09 + 60, customer=CUSTOMER) for i in range(7)])
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        yield k
    finally:
        await k.close()


async def test_held_record_is_visible_and_sent_only_after_release(held: Kit) -> None:
    """A record over its dimension's ceiling is held: /usage, /healthz and /metrics show it; `sidecar
    release --state held` sends it."""
    k = held
    assert k.states() == {"held": 1}
    assert billed(k, "inference-requests") == {}
    usage, health, metrics = await app_view(k)
    assert [r["state"] for r in usage["rows"]] == ["held"]
    assert usage["rows"][0]["hold_rule"].startswith("ceiling: quantity 7")
    assert health["held_records"] == 1 and health["status"] == "degraded"
    assert health["oldest_pending_age_s"] is not None
    assert 'sidecar_records{state="held"} 1.0' in metrics
    await k.flusher.flush_once()
    assert billed(k, "inference-requests") == {}  # still held
    k.store.close()
    assert main(["release", "--state", "held", "--customer", "cust-gpu"],
                env={"SIDECAR_DB": str(k.settings.db_path)}) == 0
    k.reopen()
    await k.flusher.flush_once()
    assert billed(k, "inference-requests") == {H09: 7}
    assert k.states() == {"sent": 1}


async def test_held_record_can_be_discarded(held: Kit) -> None:
    """`sidecar release --state held --discard` ends the record `discarded`: visible, never billed."""
    held.store.close()
    assert main(["release", "--state", "held", "--discard"], env={"SIDECAR_DB": str(held.settings.db_path)}) == 0
    held.reopen()
    await held.flusher.flush_once()
    assert held.states() == {"discarded": 1}
    assert billed(held, "inference-requests") == {}


async def test_held_record_is_carried_by_the_window_rule(held: Kit) -> None:
    """Nobody releases a held record: at window close it is carried like any never-sent record."""
    held.clock.set(H09 + 24 * HOUR_S)
    await held.flusher.flush_once()
    assert held.states()["carried"] == 1


def test_spike_rule_compares_with_the_customers_history() -> None:
    """10x the customer's largest hour of the last 7 days, above the floor, is held; below either is not."""
    from sidecar.usage import guardrail

    assert (guardrail(500, ceiling=1000, floor=100, spike_factor=10, history_max=40) or "").startswith("spike")
    assert guardrail(400, ceiling=1000, floor=100, spike_factor=10, history_max=40) is None
    assert guardrail(90, ceiling=1000, floor=100, spike_factor=10, history_max=1) is None  # under the floor
    assert guardrail(500, ceiling=1000, floor=100, spike_factor=10, history_max=None) is None  # no history
    assert guardrail(500, ceiling=1000, floor=100, spike_factor=0, history_max=1) is None  # rule off
    assert (guardrail(1001, ceiling=1000, floor=100, spike_factor=0, history_max=None) or "").startswith("ceiling")


def test_default_ceilings_are_documented_values() -> None:
    """The default dimensions' ceilings and floors are the values the README states."""
    got = {d.name: (d.ceiling, d.floor) for d in DEFAULT_DIMENSIONS}
    assert got == {"inference-requests": (1_000_000, 1_000), "tokens-processed": (2_000_000, 1_000),
                   "gpu-hours": (100, 1)}


def test_no_code_path_has_a_default_unit() -> None:
    """A delta cannot be made without its unit."""
    from sidecar.usage import Delta

    with pytest.raises(TypeError):
        Delta(raw=1)  # type: ignore[call-arg]
