"""The store contract: what any backend must do, through its domain methods only (no SQL, no
connection). Parametrised by backend: the single-file SQLite store, and fleet mode (a member's file
shipping into a real PostgreSQL, which seals, freezes, holds and settles)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from helpers import ACCOUNT, T0, event
from test_gpu_time import gpu_dims, timed

from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import DEFAULT_DIMENSIONS, CustomerRef, Dimension, Settings
from sidecar.events import validate_event
from sidecar.fleet import ship_outbox
from sidecar.store import MeteringStore, UsageFilter, open_store
from sidecar.store.pg import FleetStore, FleetView
from sidecar.store.protocol import SendingStore
from sidecar.store.records import DueRecord, Settlement
from sidecar.subscriptions import Change, Notice

H10 = hour_start(T0)
H09 = H10 - HOUR_S
SEALED = H10 + 400  # 09:00 is past its grace

async def sqlite_store(settings: Settings, clock: ManualClock, _: pytest.FixtureRequest) -> Any:
    """The single-file backend."""
    return open_store(settings, clock=clock)


class FleetBackend:
    """Fleet mode's store as this contract sees it: a member's file (ingest, dedup, outbox) that
    ships at once into the fleet's PostgreSQL, which holds the buckets and records; the member holds
    the sender lease. Built from the product's parts (store.open_store, fleet.ship_outbox,
    pg.FleetStore, pg.FleetView) on a real PostgreSQL."""

    def __init__(self, local: MeteringStore, fleet: FleetStore, url: str, clock: ManualClock) -> None:
        self.local, self.fleet, self.clock = local, fleet, clock
        self.view = FleetView(url)

    async def ingest(self, events: Any) -> Any:
        result = await self.local.ingest(events)
        await ship_outbox(self.local, self.fleet, self.clock)
        return result

    def __getattr__(self, name: str) -> Any:  # sending, mapping, holds, sealing: the fleet's store
        return getattr(self.fleet, name)

    async def aclose(self) -> None:
        await self.fleet.release_lease()
        await self.fleet.close()
        self.local.close()


async def fleet_store(settings: Settings, clock: ManualClock, request: pytest.FixtureRequest) -> Any:
    """The fleet backend on a real PostgreSQL (a database of its own per test)."""
    url = request.getfixturevalue("pg_url")
    member = replace(settings, fleet_url=url, member_id="contract")
    fleet = await FleetStore.open(url, settings=member, clock=clock, member_id="contract")
    assert await fleet.acquire_lease() is not None
    return FleetBackend(open_store(member, clock=clock), fleet, url, clock)


BACKENDS = {"sqlite": sqlite_store, "postgresql": fleet_store}
# What only the single-file store does so far (fleet mode has no parking, rebuilds, unmapped
# discards, replay or scrape-time figures yet): these run on SQLite alone.
single_file = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


class Opened:
    """A store of one backend on a manual clock; `reopen` restarts it on the same data under new
    settings (a new release of the configuration). Unpacks as (store, clock)."""

    def __init__(self, kind: str, settings: Settings, clock: ManualClock, request: pytest.FixtureRequest) -> None:
        self.kind, self.settings, self.clock, self.request = kind, settings, clock, request
        self.store: Any = None

    async def open(self) -> Any:
        self.store = await BACKENDS[self.kind](self.settings, self.clock, self.request)
        return self.store

    async def close(self) -> None:
        if isinstance(self.store, FleetBackend):
            await self.store.aclose()
        elif self.store is not None:
            self.store.close()

    def __iter__(self) -> Iterator[Any]:
        return iter((self.store, self.clock))

    async def reopen(self, **changes: Any) -> Any:
        await self.close()
        self.settings = replace(self.settings, **changes)
        return await self.open()


@pytest.fixture(params=sorted(BACKENDS))
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opened]:
    """A fresh store of each backend on a manual clock at 10:02 (09:00 still within its grace)."""
    opened = Opened(request.param, Settings(db_path=tmp_path / "c.db", birth_hour="report", product_code="prod-c"),
                    ManualClock(T0), request)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def ingest(store: Any, clock: ManualClock, *objs: dict[str, Any]) -> tuple[int, int]:
    """Ingest events at the clock's now; (accepted, duplicates)."""
    res = await store.ingest([validate_event(o, now=clock.now(), max_age_s=172800, max_future_s=300) for o in objs])
    return res.accepted, res.duplicates


def rows(store: Any, **filters: Any) -> list[dict[str, Any]]:
    """Bucket rows through the store's read view."""
    return list(store.view.usage(UsageFilter(**filters))["rows"])


async def test_the_sqlite_store_is_a_sending_store(backend: Opened) -> None:
    """Every backend implements the flusher's protocol."""
    store, _ = backend
    sending: SendingStore = store
    assert sending is store


async def test_ingest_dedups_by_event_id(backend: Opened) -> None:
    """The same event three times counts once; its usage lands in its hour's bucket."""
    store, clock = backend
    assert await ingest(store, clock, event(1, when=H10 + 30)) == (1, 0)
    assert await ingest(store, clock, event(1, when=H10 + 30), event(1, when=H10 + 30)) == (0, 2)
    got = {(r["dimension"], r["raw"]) for r in rows(store)}
    assert got == {("inference-requests", 1), ("tokens-processed", 15)}


async def test_sealing_freezing_and_late_usage(backend: Opened) -> None:
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


async def test_tenant_mapping_moves_unmapped_usage(backend: Opened) -> None:
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
async def test_settling_every_outcome(backend: Opened, outcome: str, state: str) -> None:
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


async def test_payload_is_frozen_and_resent_identically(backend: Opened) -> None:
    """A record retried is claimed again with the very same payload."""
    store, clock = backend
    first = {r.id: dict(r.payload) for r in await claimed(store, clock)}
    await store.settle([Settlement(record=rid, outcome="retry", maybe_received=True, next_attempt_at=clock.now())
                        for rid in first], now=clock.now())
    again = {r.id: (dict(r.payload), r.maybe_received) for r in await store.claim(now=clock.now(), limit=25)}
    assert again == {rid: (payload, True) for rid, payload in first.items()}


async def test_window_closing_carries_or_marks_unknown(backend: Opened) -> None:
    """Past the window a never-received record is carried; a maybe-received one ends unknown."""
    store, clock = backend
    batch = await claimed(store, clock)
    await store.settle([Settlement(record=batch[0].id, outcome="retry", maybe_received=True),
                        Settlement(record=batch[1].id, outcome="retry", maybe_received=False)], now=clock.now())
    clock.set(H09 + 24 * HOUR_S)
    _, closed = await store.prepare_flush(now=clock.now())
    assert closed == {"unknown": 1, "carried": 1}


async def test_timestamp_refusals_close_records(backend: Opened) -> None:
    """close_records applies the window rule to records AWS refused for their timestamp."""
    store, clock = backend
    batch = await claimed(store, clock)
    assert await store.close_records([r.id for r in batch], now=clock.now(), reason="TimestampOutOfBounds") == [
        "carried", "carried"]


@single_file
async def test_replay_carries_a_conflict(backend: Opened) -> None:
    """replay --state conflict carries the usage into the open hour."""
    store, clock = backend
    batch = await claimed(store, clock)
    await store.settle([Settlement(record=r.id, outcome="conflict", status="DuplicateRecord") for r in batch],
                       now=clock.now())
    out = await store.replay(states=["conflict"])
    assert out == {"resent": 0, "rebuilt": 0, "carried": 2, "unknown": 0}


async def test_due_now_and_peek(backend: Opened) -> None:
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


@single_file
async def test_health_and_left_behind(backend: Opened) -> None:
    """The read view reports what is owed and what a stopping store leaves behind."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30, customer={"tenant": "acme"}))
    await store.check_writable(clock.now())
    health = store.view.health(clock.now())
    assert health["unmapped"]["tenants"] == ["acme"]
    assert store.view.left_behind(clock.now())["unmapped"]["events"] == 1


TOKENS_V2 = Dimension(name="tokens-v2", source="total_tokens", unit=1000)
RENAMED = (DEFAULT_DIMENSIONS[0], TOKENS_V2)  # a release renamed tokens-processed to tokens-v2


def parked(store: Any) -> list[dict[str, Any]]:
    return list(store.view.usage(UsageFilter())["parked"])


async def test_a_record_over_its_ceiling_is_held_then_released(backend: Opened) -> None:
    """A guardrail holds a record at freezing; release sends it, discard ends it."""
    capped = Dimension(name="tokens-processed", source="total_tokens", unit=1000, max_quantity=5)
    store = await backend.reopen(dimensions=(DEFAULT_DIMENSIONS[0], capped))
    clock = backend.clock
    await ingest(store, clock, event(1, when=H09 + 60, prompt=9000, completion=0),
                 event(2, when=H09 + 60, customer={"customer_identifier": "cust-b"}, prompt=9000, completion=0))
    clock.set(SEALED)
    await store.prepare_flush(now=clock.now())
    held = [r for r in rows(store, dimension="tokens-processed")]
    assert {(r["state"], r["quantity"]) for r in held} == {("held", 9)}
    assert store.view.health(clock.now())["held_records"] == 2
    assert {r.payload["Dimension"] for r in await store.claim(now=clock.now(), limit=25)} == {"inference-requests"}
    assert await store.release_held(customer="cust-a") == 1
    assert await store.release_held(customer="cust-b", discard=True) == 1
    assert [r.payload["Quantity"] for r in await store.claim(now=clock.now(), limit=25)] == [9]
    assert {r["customer"]: r["state"] for r in rows(store, dimension="tokens-processed")} == {
        "identifier:cust-a": "pending", "identifier:cust-b": "discarded"}


@single_file
async def test_usage_of_a_dropped_dimension_is_parked_then_released(backend: Opened) -> None:
    """Open usage of a dimension a release dropped is parked at sealing, never sent, and released
    by an operator into a configured dimension of the same source, with that dimension's unit."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H09 + 60, prompt=1500, completion=0))
    store = await backend.reopen(dimensions=RENAMED)
    clock.set(SEALED)
    await store.prepare_flush(now=clock.now())
    assert [(p["dimension"], p["raw"]) for p in parked(store)] == [("tokens-processed", 1500)]
    assert store.view.health(clock.now())["unconfigured"]["raw_by_dimension"] == {"tokens-processed": 1500}
    assert {r.payload["Dimension"] for r in await store.claim(now=clock.now(), limit=25)} == {"inference-requests"}
    with pytest.raises(ValueError, match="measures"):
        await store.release_parked(rename={"tokens-processed": "inference-requests"})
    assert await store.release_parked(rename={"tokens-processed": "tokens-v2"}) == 1
    assert parked(store) == []
    moved = rows(store, dimension="tokens-v2")
    assert [(r["hour"], r["carried_in"], r["state"]) for r in moved] == [(H10, 1500, "open")]


@single_file
async def test_a_certainly_refused_record_is_rebuilt_under_the_new_configuration(backend: Opened) -> None:
    """A record AWS refused for an invalid dimension is rebuilt in place (renamed) while its window
    is open; the record AWS accepted is left alone."""
    store, clock = backend
    batch = await claimed(store, clock)
    by_dim = {r.payload["Dimension"]: r for r in batch}
    await store.settle([
        Settlement(record=by_dim["inference-requests"].id, outcome="sent", status="Success"),
        Settlement(record=by_dim["tokens-processed"].id, outcome="rejected", status="InvalidUsageDimensionException",
                   error="no such dimension")], now=clock.now())
    store = await backend.reopen(dimensions=RENAMED)
    out = await store.replay(states=["rejected"], rename={"tokens-processed": "tokens-v2"})
    assert out == {"resent": 0, "rebuilt": 1, "carried": 0, "unknown": 0}
    again = await store.claim(now=clock.now(), limit=25)
    assert [(r.id, r.payload["Dimension"], r.payload["Quantity"]) for r in again] == [
        (by_dim["tokens-processed"].id, "tokens-v2", 0)]


@single_file
async def test_unmapped_usage_can_be_discarded(backend: Opened) -> None:
    """An operator gives up a tenant's unmapped usage; it is kept, marked discarded, never sent."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30, customer={"tenant": "acme"}))
    assert await store.discard_unmapped(customer="tenant:acme") == 2
    assert {r["state"] for r in rows(store)} == {"discarded"}
    assert store.view.health(clock.now())["unmapped"] is None


async def test_mappings_survive_a_restart(backend: Opened) -> None:
    """A tenant mapped once is billed to its customer after a restart, with no mapping call."""
    store, clock = backend
    await store.map_tenant("acme", CustomerRef(customer_identifier="acme-aws"))
    store = await backend.reopen()
    await ingest(store, clock, event(1, when=H10 + 30, customer={"tenant": "acme"}))
    assert {(r["customer"], r["state"]) for r in rows(store)} == {("identifier:acme-aws", "open")}


@single_file
async def test_a_final_seal_seals_the_open_hour_and_settles_remainders(backend: Opened) -> None:
    """seal_through(final) closes the open hour (shutdown) and settles what is below a unit."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30, prompt=1600, completion=0))
    assert store.view.open_buckets() == 2
    assert await store.seal_through(H10 + HOUR_S, final=True) == 2
    assert store.view.open_buckets() == 0
    sealed = {r["dimension"]: (r["quantity"], r["remainder"]) for r in rows(store)}
    assert sealed == {"inference-requests": (1, 0), "tokens-processed": (2, 0)}  # 1,600 rounds half up
    figures = store.view.figures(clock.now())
    assert figures is not None
    assert [(s["dimension"], s["rounded_up"], s["given_up"]) for s in figures["settlements"]] == [
        ("tokens-processed", 400, 0)]


@single_file
async def test_prune_forgets_only_old_events(backend: Opened) -> None:
    """Event rows past retention go; younger ones (dedup, open hours) stay."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30))
    assert await store.prune() == 0
    clock.set(T0 + backend.settings.retention_s + 2 * HOUR_S + backend.settings.max_event_age_s)
    await store.prepare_flush(now=clock.now())
    assert await store.prune() == 1


@single_file
def test_every_backend_has_the_whole_protocol(backend: Opened) -> None:
    """Each backend's store has every method of MeteringStore (mypy checks the signatures)."""
    wanted = {n for n in dir(MeteringStore) if not n.startswith("_")}
    assert wanted <= set(dir(backend.store))


# ---- the customer lifecycle: an ending agreement's usage sealed at once and sent first, later usage
# into a later hour, usage after the end parked, a re-subscribe resuming, duplicate and older
# notifications changing nothing.

A = {"customer_identifier": "cust-a"}
B = {"customer_identifier": "cust-b"}
KINDS = {Change.SUBSCRIBED: "subscribe-success", Change.END_BEGAN: "unsubscribe-pending",
         Change.ENDED: "unsubscribe-success", Change.FAILED: "subscribe-fail"}


def notice(change: Change, at: float, subscriber: str = "identifier:cust-a") -> Notice:
    """A parsed notification, as the queue's consumer hands it to the store."""
    return Notice(change=change, subscriber=subscriber, product_code="prod-c", at=int(at), kind=KINDS[change],
                  shape="sns", message_id=None)


def by_key(store: Any, customer: str) -> dict[tuple[str, int], dict[str, Any]]:
    """A customer's bucket rows by (dimension, hour)."""
    return {(r["dimension"], r["hour"]): r for r in rows(store, customer=customer)}


async def test_an_ending_agreement_seals_that_customer_now_and_is_claimed_first(backend: Opened) -> None:
    """unsubscribe-pending seals and freezes the customer's open usage, current hour included;
    another customer's hour stays open; the ending customer's records go before older ones."""
    store, clock = backend
    await ingest(store, clock, event("b9", when=H09 + 60, customer=B), event("a10", when=H10 + 30, customer=A),
                 event("b10", when=H10 + 40, customer=B))
    clock.set(SEALED)
    await store.prepare_flush(now=clock.now())  # cust-b's 09:00 is pending: older than anything of cust-a
    result = await store.apply_notice(notice(Change.END_BEGAN, clock.now()), now=clock.now())
    assert (result.changed, result.state, result.sealed, result.frozen) == (True, "pending_end", 2, 2)
    assert {r["state"] for r in by_key(store, "identifier:cust-a").values()} == {"pending"}
    assert {r["state"] for k, r in by_key(store, "identifier:cust-b").items() if k[1] == H10} == {"open"}
    first = await store.claim(now=clock.now(), limit=2)
    assert {r.payload["CustomerIdentifier"] for r in first} == {"cust-a"}
    assert {r.payload["Timestamp"] for r in first} == {H10 + 30}


async def test_usage_after_the_final_seal_goes_into_the_next_hour_sealed_before_the_end_is_final(
        backend: Opened) -> None:
    """AWS keeps one record per customer-hour: later usage of an ending customer is carried into the
    next hour, whose bucket waits until SIDECAR_FINAL_SEAL_S (50 min) after the end began, so that it
    holds as much of the last hour as AWS still takes, then is sealed and sent."""
    store, clock = backend
    clock.set(H10 + 30 * 60)  # the end begins at 10:30: the 11:00 record goes out at 11:20
    await ingest(store, clock, event(1, when=H10 + 30))
    await store.apply_notice(notice(Change.END_BEGAN, clock.now()), now=clock.now())
    await ingest(store, clock, event(2, when=clock.now() - 5))
    later = by_key(store, "identifier:cust-a")[("inference-requests", H10 + HOUR_S)]
    assert (later["state"], later["raw"], later["carried_in"]) == ("open", 1, 1)
    clock.set(H10 + HOUR_S + 10 * 60)
    await ingest(store, clock, event(3, when=clock.now() - 5))  # 11:10: the same 11:00 bucket
    await store.prepare_flush(now=clock.now())
    assert by_key(store, "identifier:cust-a")[("inference-requests", H10 + HOUR_S)]["state"] == "open"
    clock.set(H10 + 30 * 60 + 3000)  # 11:20
    await store.prepare_flush(now=clock.now())
    sealed = by_key(store, "identifier:cust-a")[("inference-requests", H10 + HOUR_S)]
    assert (sealed["state"], sealed["quantity"], sealed["record_timestamp"]) == ("pending", 2, H10 + HOUR_S)


async def test_a_customer_left_ending_is_not_rounded_every_hour(backend: Opened) -> None:
    """Remainders are settled at the end's seals only (within an hour after the deadline); a customer
    whose end never comes carries them on as usual instead of losing up to half a unit each hour."""
    store, clock = backend
    await store.apply_notice(notice(Change.END_BEGAN, clock.now()), now=clock.now())
    for h in range(2, 7):  # long after the deadline: each hour sealed as it begins
        clock.set(H10 + h * HOUR_S + 60)
        await ingest(store, clock, event(f"h{h}", when=clock.now() - 5, prompt=400, completion=0))
        clock.set(H10 + (h + 1) * HOUR_S + 1)
        await store.prepare_flush(now=clock.now())
    totals = {(t["customer"], t["dimension"]): t for t in store.view.usage(UsageFilter())["totals"]}
    tokens = totals[("identifier:cust-a", "tokens-processed")]
    assert sum(tokens["quantity_by_state"].values()) * 1000 + tokens["carry_raw"] == 5 * 400


async def test_a_licences_end_parks_only_that_licence(backend: Opened) -> None:
    """License Deprovisioned names one licence: an account's other licence (a replaced agreement's new
    one) keeps being billed."""
    store, clock = backend
    old = {**ACCOUNT}
    new = {**ACCOUNT, "license_arn": ACCOUNT["license_arn"][:-4] + "beef"}
    await ingest(store, clock, event(1, when=H10 + 30, customer=old), event(2, when=H10 + 30, customer=new))
    ended = Notice(change=Change.ENDED, subscriber="account:123456789012", product_code="prod-c", at=int(clock.now()),
                   kind="License Deprovisioned - Manufacturer", shape="eventbridge", message_id=None,
                   license_arn="arn:aws:license-manager:us-east-1:123456789012:" + old["license_arn"].rsplit(":", 1)[1])
    result = await store.apply_notice(ended, now=clock.now())
    assert (result.state, result.parked) == ("ended", 2)
    await ingest(store, clock, event(3, when=H10 + 60, customer=new), event(4, when=H10 + 60, customer=old))
    assert {r["customer"]: r["raw"] for r in rows(store, dimension="inference-requests")} == \
        {f"account:{new['aws_account_id']}/{new['license_arn']}": 2}


async def test_after_the_end_usage_is_parked_and_a_resubscribe_resumes(backend: Opened) -> None:
    """unsubscribe-success parks the open usage and every later event (stored, visible, never
    sent); a newer subscribe-success meters new usage again."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30))
    result = await store.apply_notice(notice(Change.ENDED, clock.now()), now=clock.now())
    assert (result.state, result.parked) == ("ended", 2)
    assert await ingest(store, clock, event(2, when=H10 + 60)) == (1, 0)
    assert rows(store, customer="identifier:cust-a") == []
    parked = store.view.usage(UsageFilter())["parked"]
    assert {(p["dimension"], p["state"], p["events"]) for p in parked} == {("inference-requests", "ended", 2),
                                                                          ("tokens-processed", "ended", 2)}
    clock.set(SEALED + HOUR_S)
    await store.prepare_flush(now=clock.now())
    assert await store.claim(now=clock.now(), limit=25) == []
    await store.apply_notice(notice(Change.SUBSCRIBED, clock.now()), now=clock.now())
    await ingest(store, clock, event(3, when=clock.now() - 5))
    assert {r["state"] for r in rows(store, customer="identifier:cust-a")} == {"open"}


async def test_duplicates_and_older_notifications_change_nothing(backend: Opened) -> None:
    """The same notification again, or an older one arriving after a newer one, changes nothing."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30))
    ended = notice(Change.ENDED, clock.now())
    assert (await store.apply_notice(ended, now=clock.now())).changed
    again = await store.apply_notice(ended, now=clock.now())
    assert (again.changed, again.state) == (False, "ended")
    older = await store.apply_notice(notice(Change.END_BEGAN, clock.now() - 600), now=clock.now())
    assert older.state == "ended" and older.sealed == 0
    subs = {s["subscriber"]: s for s in store.view.usage(
        UsageFilter())["subscriptions"]}
    assert subs["identifier:cust-a"]["state"] == "ended"
    assert subs["identifier:cust-a"]["end_began_at"] == int(clock.now() - 600)


async def test_an_account_subscriber_covers_its_licence_customer(backend: Opened) -> None:
    """Notifications name an account; the customer keyed by account + licence follows them."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30, customer=ACCOUNT))
    result = await store.apply_notice(notice(Change.END_BEGAN, clock.now(), subscriber="account:123456789012"),
                                      now=clock.now())
    assert result.frozen == 2
    batch = await store.claim(now=clock.now(), limit=25)
    assert {r.payload["CustomerAWSAccountId"] for r in batch} == {"123456789012"}
    await store.settle([Settlement(record=r.id, outcome="sent", status="Success") for r in batch], now=clock.now())
    await store.apply_notice(notice(Change.ENDED, clock.now() + 60, subscriber="account:123456789012"),
                             now=clock.now())
    await ingest(store, clock, event(2, when=clock.now() - 5, customer=ACCOUNT))
    sent = {r["state"] for r in rows(store)}
    assert sent == {"sent"}  # the later event was parked, not added to a bucket


async def test_an_ending_customers_remainder_is_settled_into_the_final_record(backend: Opened) -> None:
    """A remainder below one unit could never be billed after the end: the final seal settles it by
    SIDECAR_SETTLE_REMAINDERS (half_up: 1,500 tokens bill 2 units); other customers keep theirs."""
    store, clock = backend
    await ingest(store, clock, event(1, when=H10 + 30, prompt=1500, completion=0),
                 event(2, when=H10 + 30, prompt=1500, completion=0, customer=B))
    await store.apply_notice(notice(Change.END_BEGAN, clock.now()), now=clock.now())
    tokens = by_key(store, "identifier:cust-a")[("tokens-processed", H10)]
    assert (tokens["state"], tokens["quantity"]) == ("pending", 2)
    totals = {(t["customer"], t["dimension"]): t["carry_raw"] for t in store.view.usage(UsageFilter())["totals"]}
    assert totals[("identifier:cust-a", "tokens-processed")] == 0


@single_file  # fleet mode measures GPU time per request only (fair_share is refused there)
async def test_an_ending_customers_fair_share_gpu_time_is_in_the_final_record(backend: Opened) -> None:
    """fair_share GPU time is shared out when an hour is sealed; an ending customer's is shared out up
    to now at the final seal, so the final record holds it (it would otherwise arrive after the end)."""
    await backend.reopen(dimensions=gpu_dims("fair_share"))
    store, clock = backend
    clock.set(H10 + 30 * 60)
    await ingest(store, clock, timed("g1", "cust-a", H10, H10 + 20 * 60),
                 timed("g2", "cust-a", H10 + 5 * 60, H10 + 29 * 60))
    await store.apply_notice(notice(Change.END_BEGAN, clock.now()), now=clock.now())
    gpu = by_key(store, "identifier:cust-a")[("gpu-hours", H10)]
    assert (gpu["state"], gpu["raw"]) == ("pending", 29 * 60 * 1_000_000)  # the GPU time that passed


async def test_an_identifier_customer_follows_its_accounts_notifications(backend: Opened) -> None:
    """ResolveCustomer gave the identifier customer's account: EventBridge's account-only events reach
    it (sealed at once and first when the agreement ends; parked after), its records still name only
    the identifier."""
    store, clock = backend
    await store.map_tenant("acme", CustomerRef(customer_identifier="cust-a"), source="registration",
                           aws_account_id="123456789012")
    await ingest(store, clock, event(1, when=H10 + 30, customer={"tenant": "acme"}))
    result = await store.apply_notice(notice(Change.END_BEGAN, clock.now(), subscriber="account:123456789012"),
                                      now=clock.now())
    assert result.frozen == 2
    batch = await store.claim(now=clock.now(), limit=25)
    assert {tuple(sorted(r.payload)) for r in batch} == {("CustomerIdentifier", "Dimension", "Quantity", "Timestamp")}
    await store.apply_notice(notice(Change.ENDED, clock.now() + 60, subscriber="account:123456789012"),
                             now=clock.now())
    await ingest(store, clock, event(2, when=clock.now() - 5, customer={"tenant": "acme"}))
    parked = store.view.usage(UsageFilter())["parked"]
    assert {(p["customer"], p["state"]) for p in parked} == {("identifier:cust-a", "ended")}
    subs = {s["subscriber"]: s for s in store.view.usage(UsageFilter())["subscriptions"]}
    assert subs["account:123456789012"]["parked_events"] == 1
