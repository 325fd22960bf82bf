"""Hourly buckets: sealing, late usage, unit remainders, unmapped tenants, and conservation."""

from __future__ import annotations

import sqlite3
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from helpers import T0, accounted_usage, event
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import DEFAULT_DIMENSIONS, CustomerRef, Dimension, Settings
from sidecar.events import UsageEvent, validate_event
from sidecar.store import Store

H10 = hour_start(T0)  # 10:00, the hour T0 lies in
H09 = H10 - HOUR_S


def ev(obj: dict[str, Any], now: float) -> UsageEvent:
    """Validate an event dict as the API would at `now`."""
    return validate_event(obj, now=now, max_age_s=48 * 3600, max_future_s=300)


def ingest(store: Store, *objs: dict[str, Any]) -> None:
    """Ingest events synchronously at the store clock's now."""
    now = store.clock.now()
    store.ingest_future([ev(o, now) for o in objs]).result()


def buckets(store: Store) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every bucket row keyed by (customer, dimension, hour)."""
    conn = sqlite3.connect(store.path)
    conn.row_factory = sqlite3.Row
    try:
        return {(r["customer"], r["dimension"], r["hour"]): dict(r) for r in conn.execute("SELECT * FROM buckets")}
    finally:
        conn.close()


def carries(store: Store) -> dict[tuple[str, str], int]:
    """The carried remainders keyed by (customer, dimension)."""
    conn = sqlite3.connect(store.path)
    try:
        return {(c, d): r for c, d, r in conn.execute("SELECT customer, dimension, raw FROM carries")}
    finally:
        conn.close()


def test_hour_not_sealed_within_grace(store: Store, clock: ManualClock) -> None:
    """A bucket stays open until its hour ended more than the grace period ago."""
    ingest(store, event(1, when=H10 + 60))
    clock.set(H10 + HOUR_S + 299)
    assert store.seal_due_sync() == 0
    clock.set(H10 + HOUR_S + 300)
    assert store.seal_due_sync() == 2  # no gpu_seconds in the event, so no gpu-hours bucket
    states = {k[1]: b["state"] for k, b in buckets(store).items()}
    assert states == {"inference-requests": "sealed", "tokens-processed": "sealed"}


def test_sealed_bucket_never_changes_late_usage_goes_to_open_hour(store: Store, clock: ManualClock) -> None:
    """Usage for a sealed hour lands in the current open hour as carried_in; the sealed row is untouched."""
    ingest(store, event(1, when=H09 + 10, prompt=700, completion=800))
    clock.set(H10 + 400)  # 09:00 ended 400 s ago: past the grace
    store.seal_due_sync()
    before = buckets(store)[("identifier:cust-a", "tokens-processed", H09)]
    assert before["state"] == "sealed" and before["quantity"] == 1 and before["remainder"] == 500
    ingest(store, event(2, when=H09 + 20, prompt=1000, completion=0))
    after = buckets(store)
    assert after[("identifier:cust-a", "tokens-processed", H09)] == before
    late = after[("identifier:cust-a", "tokens-processed", H10)]
    assert (late["raw"], late["carried_in"], late["state"]) == (1000, 1000, "open")


def test_event_in_unsealed_previous_hour_stays_there(store: Store, clock: ManualClock) -> None:
    """Within the grace period, an event for the previous hour still goes to that hour."""
    clock.set(H10 + 100)
    ingest(store, event(1, when=H09 + 3000))
    assert ("identifier:cust-a", "inference-requests", H09) in buckets(store)


def test_remainder_carried_to_next_hour(store: Store, clock: ManualClock) -> None:
    """Sub-unit remainders move to the customer's next sealed hour; nothing is rounded away."""
    ingest(store, event(1, when=H09 + 10, prompt=1499, completion=0))
    clock.set(H10 + 400)
    store.seal_due_sync()
    ingest(store, event(2, when=H10 + 500, prompt=600, completion=0))
    clock.set(H10 + 2 * HOUR_S + 400)
    store.seal_due_sync()
    b = buckets(store)
    first = b[("identifier:cust-a", "tokens-processed", H09)]
    second = b[("identifier:cust-a", "tokens-processed", H10)]
    assert (first["quantity"], first["remainder"]) == (1, 499)
    assert (second["remainder_in"], second["quantity"], second["remainder"]) == (499, 1, 99)
    assert carries(store)[("identifier:cust-a", "tokens-processed")] == 99
    from sidecar.store import UsageFilter, reader, usage_totals

    with reader(store.path) as conn:
        [total] = usage_totals(conn, UsageFilter(dimension="tokens-processed"))
    assert (total["carry_raw"], total["quantity_by_state"], total["open_raw"]) == (99, {"sealed": 2}, 0)


def test_clock_going_back_does_not_reopen_hours(store: Store, clock: ManualClock) -> None:
    """After sealing, a clock that jumps back still treats the sealed hour as sealed."""
    ingest(store, event(1, when=H09 + 10))
    clock.set(H10 + 400)
    store.seal_due_sync()
    clock.set(H10 + 100)
    ingest(store, event(2, when=H09 + 20))
    b = buckets(store)
    assert b[("identifier:cust-a", "inference-requests", H09)]["raw"] == 1
    assert b[("identifier:cust-a", "inference-requests", H10)]["carried_in"] == 1


def test_unmapped_tenant_joins_customer_when_mapped(store: Store, clock: ManualClock) -> None:
    """Usage of an unknown tenant is kept as unmapped, then joins the customer once mapped."""
    ingest(store, event(1, when=H09 + 10, customer={"tenant": "acme"}, prompt=2000, completion=0),
           event(2, when=H10 + 10, customer={"tenant": "acme"}, prompt=1000, completion=0))
    clock.set(H10 + 400)
    store.seal_due_sync()
    b = buckets(store)
    assert b[("tenant:acme", "tokens-processed", H09)]["state"] == "unmapped"
    ref = CustomerRef(customer_identifier="acme-aws")
    moved = store.call(lambda conn: store.rules.map_tenant(conn, "acme", ref, "api"))
    assert moved == 4
    b = buckets(store)
    assert not [k for k in b if k[0] == "tenant:acme"]
    # 09:00 is sealed, so its unmapped usage joins the open 10:00 bucket as carried_in.
    assert b[("identifier:acme-aws", "tokens-processed", H10)]["raw"] == 3000
    assert b[("identifier:acme-aws", "tokens-processed", H10)]["carried_in"] == 2000
    ingest(store, event(3, when=H10 + 20, customer={"tenant": "acme"}, prompt=5, completion=0))
    assert buckets(store)[("identifier:acme-aws", "tokens-processed", H10)]["raw"] == 3005


def test_config_customers_are_applied_at_start(tmp_path: Path, clock: ManualClock) -> None:
    """Tenant mappings from the TOML file are loaded when the store opens."""
    s = Settings(db_path=tmp_path / "db", birth_hour="report",
                 customers={"acme": CustomerRef(customer_identifier="acme-aws")})
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        ingest(store, event(1, customer={"tenant": "acme"}))
        assert ("identifier:acme-aws", "inference-requests", H10) in buckets(store)
    finally:
        store.close()


# ---- the conservation property -------------------------------------------------------------

ENGINE_TIME_DIMENSIONS = (*DEFAULT_DIMENSIONS[:2], Dimension(name="gpu-hours", source="gpu_seconds", unit=3600,
                                                                mode="engine_time"))
CUSTOMERS = [{"customer_identifier": "c1"}, {"customer_identifier": "c2"}, {"tenant": "t1"}, {"tenant": "t2"}]
step = st.one_of(
    st.tuples(st.just("event"), st.integers(0, 40), st.sampled_from(range(len(CUSTOMERS))),
              st.integers(-3 * HOUR_S, 200), st.integers(0, 3000), st.integers(0, 3000),
              st.none() | st.floats(0, 7200, allow_nan=False)),
    st.tuples(st.just("advance"), st.integers(0, 2 * HOUR_S)),
    st.tuples(st.just("seal")),
    st.tuples(st.just("map"), st.sampled_from(["t1", "t2"])),
)


@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(step, min_size=1, max_size=40))
def test_conservation_property(steps: list[tuple[Any, ...]]) -> None:
    """For any events (duplicates, late, several customers), bucket units × unit + remainders = usage."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = ManualClock(T0)
        # engine_time: each event's own GPU time is summed (test_gpu_time.py covers fair_share).
        s = Settings(db_path=Path(tmp) / "db", birth_hour="report", dimensions=ENGINE_TIME_DIMENSIONS)
        store = Store.open(s.db_path, settings=s, clock=clock)
        expected: dict[tuple[str, str], int] = defaultdict(int)
        seen: dict[str, tuple[dict[str, Any], float]] = {}
        mapped: dict[str, str] = {}
        try:
            for st_ in steps:
                if st_[0] == "event":
                    _, n, ci, offset, p, c, gpu = st_
                    obj = event(n, when=clock.now() + offset, customer=CUSTOMERS[ci], prompt=p,
                                completion=c, **({"gpu_seconds": gpu} if gpu is not None else {}))
                    ingest(store, obj)
                    seen.setdefault(obj["event_id"], (obj, clock.now()))
                elif st_[0] == "advance":
                    clock.advance(st_[1])
                elif st_[0] == "seal":
                    store.seal_due_sync()
                else:
                    tenant = st_[1]
                    ref = CustomerRef(customer_identifier=f"aws-{tenant}")
                    store.call(lambda conn, t=tenant, r=ref: store.rules.map_tenant(conn, t, r, "api"))
                    mapped[tenant] = ref.key
            for obj, at in seen.values():
                cust = obj["customer"]
                if "tenant" in cust:
                    key = mapped.get(cust["tenant"], f"tenant:{cust['tenant']}")
                else:
                    key = f"identifier:{cust['customer_identifier']}"
                e = ev(obj, at)
                for dim in s.dimensions:
                    expected[(key, dim.name)] += e.source_amount(dim.source)
            got = accounted_usage(store.path)
            assert {k: v for k, v in got.items() if v} == {k: v for k, v in expected.items() if v}
        finally:
            store.close()


def test_heartbeats_fill_idle_hours(tmp_path: Path, clock: ManualClock) -> None:
    """With heartbeats on, an idle hour of a recently active customer gets zero-quantity buckets."""
    s = Settings(db_path=tmp_path / "hb.db", birth_hour="report", heartbeats=True, heartbeat_hours=2)
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        ingest(store, event(1, when=H09 + 10))
        clock.set(H10 + 400)
        store.seal_due_sync()
        clock.set(H10 + 4 * HOUR_S + 400)  # 10:00 .. 13:00 are idle and sealed now
        store.seal_due_sync()
        b = buckets(store)
        hb = sorted({h for (c, d, h) in b if h > H09})
        assert hb == [H10, H10 + HOUR_S]  # only within heartbeat_hours of the last activity
        zero = b[("identifier:cust-a", "tokens-processed", H10)]
        assert (zero["state"], zero["raw"], zero["quantity"]) == ("sealed", 0, 0)
        assert ("identifier:cust-a", "gpu-hours", H10) in b
    finally:
        store.close()


def test_failed_mapping_leaves_no_trace_in_memory(store: Store, clock: ManualClock) -> None:
    """If the transaction that maps a tenant fails, the writer's in-memory map does not keep the mapping."""
    import pytest

    def map_then_fail(conn: sqlite3.Connection) -> None:
        store.rules.map_tenant(conn, "acme", CustomerRef(customer_identifier="acme-aws"), "api")
        raise RuntimeError("the commit never happens")

    with pytest.raises(RuntimeError):
        store.call(map_then_fail)
    ingest(store, event(1, customer={"tenant": "acme"}))
    assert ("tenant:acme", "inference-requests", H10) in buckets(store)
    assert not [k for k in buckets(store) if k[0] == "identifier:acme-aws"]
