"""Flushing over real HTTP with botocore to the local simulator: batching, outcomes, errors, window."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from flushkit import H09, H10, PRODUCT, Kit, RecordingApi, customer_events, make_kit
from helpers import event

from sidecar.clock import HOUR_S
from sidecar.flush import Pacer
from sidecar.simulator import DedupKey, SimulatorConfig
from sidecar.store import records as rec

SEALED = H10 + 400  # 09:00 is past its grace here


@pytest.fixture
async def kit(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A kit whose simulator subscribes everyone."""
    k = await make_kit(tmp_path)
    yield k
    await k.close()


def another_senders_record(kit: Kit) -> None:
    """Someone else bills cust-000's 09:00 inference-requests with a different quantity first."""
    kit.sim.batch_meter_usage({"ProductCode": PRODUCT, "UsageRecords": [
        {"CustomerIdentifier": "cust-000", "Dimension": "inference-requests", "Quantity": 99,
         "Timestamp": H09 + 5}]})


def billed(kit: Kit, customer: str, dimension: str, hour: int) -> int | None:
    """What the simulator billed for one key."""
    q = kit.sim.billed_quantity(DedupKey(customer, PRODUCT, dimension, hour))
    return None if q is None else int(q)


async def test_sixty_records_three_calls(kit: Kit) -> None:
    """60 records go out in 3 calls of at most 25, oldest first, each billed once."""
    kit.ingest(*customer_events(60))
    kit.clock.set(SEALED)
    summary = await kit.flusher.flush_once()
    # 60 customers x 2 dimensions (no gpu_seconds) = 120 records -> 5 calls.
    assert summary.frozen == 120
    assert [c.records for c in kit.sim.calls] == [25, 25, 25, 25, 20]
    assert kit.states() == {"sent": 120}
    assert billed(kit, "cust-007", "tokens-processed", H09) == 1
    assert billed(kit, "cust-007", "inference-requests", H09) == 1
    rows = kit.records()
    assert all(r["metering_record_id"] for r in rows)
    assert kit.sim.counters.conflicts == 0


async def test_batches_of_sixty_records(tmp_path: Path) -> None:
    """Exactly 60 records (one dimension) go out as 25 + 25 + 10."""
    from sidecar.config import Dimension

    k = await make_kit(tmp_path, dimensions=(Dimension(name="inference-requests", source="count", unit=1),))
    try:
        k.ingest(*customer_events(60))
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        assert [c.records for c in k.sim.calls] == [25, 25, 10]
        assert k.states() == {"sent": 60}
    finally:
        await k.close()


async def test_rate_limit_spaces_calls(tmp_path: Path) -> None:
    """With 10 calls/s the calls start at least 0.1 s apart."""
    k = await make_kit(tmp_path, api=RecordingApi)
    k.flusher.pacer = Pacer(10.0)
    try:
        k.ingest(*customer_events(60))
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        starts = [t for t, _ in k.flusher.api.calls]  # type: ignore[union-attr]
        assert len(starts) == 5
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        # Thread start-up jitter can shift one call by a few ms; the rate over the run is what counts.
        assert min(gaps) >= 0.09
        assert starts[-1] - starts[0] >= 0.4 - 0.005
    finally:
        await k.close()


async def test_pacer_math() -> None:
    """The pacer sleeps exactly the remainder of the interval."""
    now = [0.0]
    slept: list[float] = []

    async def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    p = Pacer(4.0, monotonic=lambda: now[0], sleep=sleep)
    for _ in range(3):
        await p.wait()
    assert slept == [0.25, 0.25]


async def test_not_subscribed_is_rejected_then_replayed(tmp_path: Path) -> None:
    """CustomerNotSubscribed → rejected (terminal, visible); replay after subscribing → sent."""
    k = await make_kit(tmp_path, sim_config=SimulatorConfig(product_code=PRODUCT, subscribed=frozenset({"cust-000"})))
    try:
        k.ingest(*customer_events(2))
        k.clock.set(SEALED)
        s = await k.flusher.flush_once()
        assert k.states() == {"sent": 2, "rejected": 2}
        assert s.failed
        rejected = [r for r in k.records() if r["state"] == "rejected"]
        assert {r["aws_status"] for r in rejected} == {"CustomerNotSubscribed"}
        k.sim.configure(subscribe_all=True)
        out = await k.store.replay(states=["rejected"])
        assert out == {"resent": 2, "rebuilt": 0, "carried": 0, "unknown": 0}
        await k.flusher.flush_once()
        assert k.states() == {"sent": 4}
    finally:
        await k.close()


async def test_unexplained_duplicate_is_conflict(kit: Kit) -> None:
    """A DuplicateRecord we cannot explain (someone else sent that key) ends as conflict."""
    kit.ingest(*customer_events(1))
    kit.clock.set(SEALED)
    another_senders_record(kit)
    await kit.flusher.flush_once()
    by_dim = {r["dimension"]: r for r in kit.records()}
    assert by_dim["inference-requests"]["state"] == "conflict"
    assert by_dim["inference-requests"]["aws_status"] == "DuplicateRecord"
    assert by_dim["tokens-processed"]["state"] == "sent"


async def test_lost_response_then_duplicate_is_sent(kit: Kit) -> None:
    """A send whose answer was lost is resent identically; AWS's DuplicateRecord then means billed."""
    kit.ingest(*customer_events(1))
    kit.clock.set(SEALED)
    kit.sim.configure(lose_response_rate=1.0)
    await kit.flusher.flush_once()
    assert kit.states() == {"pending": 2}
    assert all(r["maybe_received"] == 1 for r in kit.records())
    kit.sim.configure(lose_response_rate=0.0)
    kit.clock.advance(600)
    await kit.flusher.flush_once()
    rows = kit.records()
    assert {r["state"] for r in rows} == {"sent"}
    assert {r["aws_status"] for r in rows} == {"DuplicateRecord"}
    assert kit.sim.counters.conflicts == 0
    assert billed(kit, "cust-000", "tokens-processed", H09) == 1


async def test_unprocessed_records_stay_pending_and_are_resent(kit: Kit) -> None:
    """UnprocessedRecords are retried after a backoff and then accepted."""
    kit.ingest(*customer_events(3))
    kit.clock.set(SEALED)
    kit.sim.configure(unprocessed_rate=1.0)
    await kit.flusher.flush_once()
    assert kit.states() == {"pending": 6}
    assert all(r["maybe_received"] == 0 and r["last_error"] == "UnprocessedRecords" for r in kit.records())
    kit.sim.configure(unprocessed_rate=0.0)
    kit.clock.advance(600)
    await kit.flusher.flush_once()
    assert kit.states() == {"sent": 6}
    assert {r["aws_status"] for r in kit.records()} == {"Success"}


@pytest.mark.parametrize(("fault", "maybe"), [
    ({"throttle_rate": 1.0}, 0),
    ({"error_5xx_rate": 1.0}, 1),
    ({"outage": True, "outage_mode": "aws503"}, 0),  # AWS's own typed 503: refused before processing
    ({"outage": True}, 1),  # a plain 503 from something in between: it may have been processed
    ({"outage": True, "outage_mode": "close"}, 1),  # connection dropped after the request left
])
async def test_request_level_errors_retry(tmp_path: Path, fault: dict[str, object], maybe: int) -> None:
    """Throttling, 5xx and outages keep records pending; a 500 or a dropped connection may hide a success."""
    k = await make_kit(tmp_path)
    try:
        k.ingest(*customer_events(2))
        k.clock.set(SEALED)
        k.sim.configure(**fault)
        s = await k.flusher.flush_once()
        assert k.states() == {"pending": 4}
        assert s.pending == 4
        assert {r["maybe_received"] for r in k.records()} == {maybe}
        assert all(r["next_attempt_at"] > k.clock.now() - 1 for r in k.records())
        # Nothing is due again until its backoff passes.
        calls = len(k.sim.calls)
        await k.flusher.flush_once()
        assert len(k.sim.calls) == calls or k.states() == {"pending": 4}
        k.sim.configure(throttle_rate=0.0, error_5xx_rate=0.0, outage=False)
        k.clock.advance(600)
        await k.flusher.flush_once()
        assert k.states() == {"sent": 4}
        assert k.sim.counters.conflicts == 0
    finally:
        await k.close()


async def test_connection_refused_is_not_maybe_received(tmp_path: Path) -> None:
    """When nothing listens, the request never left: records stay pending and not maybe-received."""
    k = await make_kit(tmp_path)
    try:
        k.ingest(*customer_events(1))
        k.clock.set(SEALED)
        await k.runner.cleanup()
        await k.flusher.flush_once()
        assert k.states() == {"pending": 2}
        assert {r["maybe_received"] for r in k.records()} == {0}
        assert all(r["last_error"].startswith("connect:") for r in k.records())
    finally:
        k.store.close()


async def test_read_timeout_is_maybe_received(tmp_path: Path) -> None:
    """A timeout after the request left marks the record maybe-received (invariant 5)."""
    k = await make_kit(tmp_path, read_timeout_s=0.3)
    try:
        k.ingest(*customer_events(1))
        k.clock.set(SEALED)
        k.sim.configure(latency_s=1.0)
        await k.flusher.flush_once()
        assert k.states() == {"pending": 2}
        assert {r["maybe_received"] for r in k.records()} == {1}
        await asyncio.sleep(1.0)  # let the simulator finish the slow call it already billed
        k.sim.configure(latency_s=0.0)
        k.clock.advance(600)
        await k.flusher.flush_once()
        assert k.states() == {"sent": 2}
        assert k.sim.counters.conflicts == 0
    finally:
        await k.close()


async def test_invalid_dimension_is_bisected(tmp_path: Path) -> None:
    """A record AWS refuses for its content is isolated by bisection; the rest of the batch is sent."""
    k = await make_kit(tmp_path, sim_config=SimulatorConfig(
        subscribe_all=True, product_code=PRODUCT, allowed_dimensions=frozenset({"inference-requests",
                                                                                 "tokens-processed"})))
    try:
        k.ingest(*[event(f"g{i}", when=H09 + 60, customer={"customer_identifier": f"c{i}"}, gpu_seconds=7200.0)
                   for i in range(5)])
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        by_dim: dict[str, set[str]] = {}
        for r in k.records():
            by_dim.setdefault(r["dimension"], set()).add(r["state"])
        assert by_dim == {"gpu-hours": {"rejected"}, "inference-requests": {"sent"}, "tokens-processed": {"sent"}}
        rejected = [r for r in k.records() if r["state"] == "rejected"]
        assert all("InvalidUsageDimensionException" in r["last_error"] for r in rejected)
    finally:
        await k.close()


async def test_timestamp_out_of_bounds_drops_old_record_and_sends_rest(tmp_path: Path) -> None:
    """If AWS refuses the batch for a timestamp, out-of-window records are closed and the rest resent."""
    state = {"armed": True}

    def make_api(client):  # type: ignore[no-untyped-def]
        def hook(records: object) -> None:
            if state["armed"]:
                state["armed"] = False
                k.clock.set(H09 + 60 + 86400 + 10)  # the 09:00 record's window closed during the call

        return RecordingApi(client, hook)

    k = await make_kit(tmp_path, api=make_api, window_margin_s=0)
    try:
        k.ingest(event("old", when=H09 + 60))
        k.clock.set(H09 + 86400 - 120)  # 09:00 tomorrow minus 2 min: the old record is still in its window
        k.ingest(event("new", when=k.clock.now() - 60, customer={"customer_identifier": "other"}))
        await k.store.seal_through(H09 + 86400)  # seal both hours now, as a shutdown would
        await k.flusher.flush_once()
        states = {(r["customer"], r["dimension"]): r["state"] for r in k.records()}
        assert states[("identifier:cust-a", "inference-requests")] == "carried"
        assert states[("identifier:other", "inference-requests")] == "sent"
    finally:
        await k.close()


async def test_window_closes_carry_expire_unknown(tmp_path: Path) -> None:
    """A never-received record is carried (or expired by policy); a maybe-received one ends unknown."""
    for policy in ("carry", "expire"):
        k = await make_kit(tmp_path / policy, expired_policy=policy)
        try:
            k.ingest(*customer_events(1))
            k.clock.set(SEALED)
            k.sim.configure(throttle_rate=1.0)
            await k.flusher.flush_once()
            k.clock.set(H09 + 60 + 86400 - 1800)  # window minus the default margin
            await k.flusher.flush_once()
            expected = "carried" if policy == "carry" else "expired"
            assert {r["state"] for r in k.records() if r["hour"] == H09} == {expected}
            if policy == "carry":
                # The quantity moved into the current open hour as carried_in (1 request + 1,000 tokens).
                from sidecar.store import reader

                with reader(k.store.path) as conn:
                    carried = conn.execute("SELECT sum(carried_in) FROM buckets WHERE state = 'open'").fetchone()
                    assert carried[0] == 1 + 1000
        finally:
            await k.close()
    k = await make_kit(tmp_path / "unknown")
    try:
        k.ingest(*customer_events(1))
        k.clock.set(SEALED)
        k.sim.configure(error_5xx_rate=1.0)
        await k.flusher.flush_once()
        k.clock.set(H09 + 60 + 86400)
        s = await k.flusher.flush_once()
        assert {r["state"] for r in k.records()} == {"unknown"}
        assert s.failed
    finally:
        await k.close()


def test_month_end_cutoff() -> None:
    """A record from the previous month closes at 06:00 UTC on the 1st, before its 24 h are up."""
    ts = int(datetime(2026, 11, 30, 23, 0, tzinfo=UTC).timestamp())
    closes = rec.window_closes_at(ts, window_s=86400, margin_s=1800)
    assert closes == int(datetime(2026, 12, 1, 5, 30, tzinfo=UTC).timestamp())
    ts = int(datetime(2026, 12, 31, 22, 0, tzinfo=UTC).timestamp())
    assert rec.window_closes_at(ts, window_s=86400, margin_s=0) == int(
        datetime(2027, 1, 1, 6, 0, tzinfo=UTC).timestamp())
    mid = int(datetime(2026, 11, 15, 10, 0, tzinfo=UTC).timestamp())
    assert rec.window_closes_at(mid, window_s=86400, margin_s=0) == mid + 86400


async def test_month_end_record_is_carried_after_cutoff(tmp_path: Path) -> None:
    """Throttled across 06:00 UTC on the 1st, a last-month record is carried into the open hour."""
    nov30 = datetime(2026, 11, 30, 23, 10, tzinfo=UTC).timestamp()
    k = await make_kit(tmp_path)
    try:
        k.clock.set(nov30 + 60)
        k.ingest(event("m", when=nov30))
        k.sim.configure(throttle_rate=1.0)
        k.clock.set(nov30 + 3600)  # Dec 1 00:10: the 23:00 hour is sealed
        await k.flusher.flush_once()
        assert k.states() == {"pending": 2}
        k.clock.set(datetime(2026, 12, 1, 5, 29, tzinfo=UTC).timestamp())
        await k.flusher.flush_once()
        assert k.states() == {"pending": 2}  # still inside cut-off minus margin
        k.clock.set(datetime(2026, 12, 1, 5, 31, tzinfo=UTC).timestamp())
        s = await k.flusher.flush_once()
        assert k.states() == {"carried": 2}
        assert s.outcomes["carried"] == 2
    finally:
        await k.close()


async def test_restart_mid_flight_resends_identically(kit: Kit) -> None:
    """A process that died after AWS billed a batch but before recording it resends the same bytes on restart."""
    kit.ingest(*customer_events(2))
    kit.clock.set(SEALED)
    await kit.flusher.prepare()
    now = kit.clock.now()
    claimed = await kit.store.run(lambda c: rec.claim(c, now=now, limit=25, owner="test"))
    # The call reaches AWS and is billed, then the process dies before writing the outcome.
    kit.client.batch_meter_usage([r.payload for r in claimed], PRODUCT)
    payloads_before = {r["id"]: r["payload"] for r in kit.records()}
    kit.reopen()
    assert all(r["maybe_received"] == 1 and r["in_flight"] == 0 for r in kit.records())
    await kit.flusher.flush_once()
    rows = kit.records()
    assert {r["state"] for r in rows} == {"sent"}
    assert {r["id"]: r["payload"] for r in rows} == payloads_before
    assert kit.sim.counters.conflicts == 0
    assert kit.sim.counters.billed == 4


async def test_dry_run_sends_and_marks_nothing(tmp_path: Path) -> None:
    """Dry run logs the exact requests; no call is made and records stay pending."""
    from structlog.testing import capture_logs

    k = await make_kit(tmp_path)
    k.flusher.api = None
    try:
        k.ingest(*customer_events(1))
        k.clock.set(SEALED)
        with capture_logs() as logs:
            s = await k.flusher.flush_once()
        assert k.sim.counters.calls == 0
        assert k.states() == {"pending": 2}
        assert s.outcomes["dry_run"] == 2
        [req] = [entry["request"] for entry in logs if entry["event"] == "dry_run_request"]
        assert req["ProductCode"] == PRODUCT
        assert {r["Dimension"] for r in req["UsageRecords"]} == {"inference-requests", "tokens-processed"}
    finally:
        await k.close()


async def test_frozen_record_payload(kit: Kit) -> None:
    """The record is frozen with the later of hour start and first event, and the customer fields."""
    kit.ingest(event("a", when=H09 + 125.7, prompt=1500, completion=0),
               event("b", when=H09 + 3000, prompt=10, completion=0))
    kit.clock.set(SEALED)
    await kit.flusher.prepare()
    by_dim = {r["dimension"]: r for r in kit.records()}
    tok = json.loads(by_dim["tokens-processed"]["payload"])
    assert tok == {"CustomerIdentifier": "cust-a", "Dimension": "tokens-processed", "Quantity": 1,
                   "Timestamp": H09 + 125}
    assert by_dim["tokens-processed"]["product_code"] == PRODUCT
    assert by_dim["tokens-processed"]["timestamp"] - H09 < HOUR_S


async def test_replay_conflict_carries_forward(kit: Kit) -> None:
    """Replaying a conflict moves its quantity into the open hour instead of meeting DuplicateRecord again."""
    kit.ingest(*customer_events(1))
    kit.clock.set(SEALED)
    another_senders_record(kit)
    await kit.flusher.flush_once()
    out = await kit.store.replay(states=["conflict"])
    assert out == {"resent": 0, "rebuilt": 0, "carried": 1, "unknown": 0}
    by_dim = {r["dimension"]: r["state"] for r in kit.records()}
    assert by_dim["inference-requests"] == "carried"
    kit.clock.set(H10 + HOUR_S + 400)
    await kit.flusher.flush_once()
    carried = [r for r in kit.records() if r["hour"] == H10 and r["dimension"] == "inference-requests"]
    assert [(r["quantity"], r["state"]) for r in carried] == [(1, "sent")]


async def test_replay_never_carries_a_maybe_received_record(kit: Kit) -> None:
    """A rejected record whose earlier send may have landed becomes unknown on replay past its window."""
    kit.ingest(*customer_events(1))
    kit.clock.set(SEALED)
    kit.sim.configure(lose_response_rate=1.0)  # billed, answer lost: maybe received
    await kit.flusher.flush_once()
    kit.sim.configure(lose_response_rate=0.0, api_disabled=True)
    kit.clock.advance(600)
    await kit.flusher.flush_once()
    assert {r["state"] for r in kit.records()} == {"rejected"}
    kit.clock.set(H09 + 86400 + 60)
    out = await kit.store.replay(states=["rejected"])
    assert out == {"resent": 0, "rebuilt": 0, "carried": 0, "unknown": 2}
    assert {r["state"] for r in kit.records()} == {"unknown"}


async def test_unstored_outcome_is_released_next_pass(kit: Kit) -> None:
    """If the answer to a call cannot be written, the records are not stuck in flight: the next pass resends."""
    from sidecar.errors import StoreUnavailable

    kit.ingest(*customer_events(1))
    kit.clock.set(SEALED)
    kit.sim.configure(throttle_rate=1.0)
    real_retry = kit.flusher._retry
    calls = {"n": 0}

    async def failing_retry(*args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailable("database or disk is full", disk_full=True)
        await real_retry(*args, **kwargs)  # type: ignore[arg-type]

    kit.flusher._retry = failing_retry  # type: ignore[method-assign]
    with pytest.raises(StoreUnavailable):
        await kit.flusher.flush_once()
    assert all(r["in_flight"] == 1 for r in kit.records())
    kit.sim.configure(throttle_rate=0.0)
    await kit.flusher.flush_once()
    rows = kit.records()
    assert {r["state"] for r in rows} == {"sent"}
    assert {r["maybe_received"] for r in rows} == {0}, "a throttled call was refused, not maybe received"
