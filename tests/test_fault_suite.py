"""Fault suite: outages longer than the window, clock skew, latency; states end as DESIGN.md promises
and usage is conserved for every customer and dimension."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from flushkit import H09, H10, Kit, customer_events, make_kit
from helpers import accounted_usage, event

from sidecar.clock import HOUR_S


def conserved(k: Kit, ingested: dict[tuple[str, str], int]) -> None:
    """Σ open raw + Σ units × unit of every non-carried sealed bucket + carries = Σ ingested raw."""
    got = accounted_usage(k.store.path)
    assert {k_: v for k_, v in got.items() if v} == {k_: v for k_, v in ingested.items() if v}


def ingested_of(events: list[dict[str, object]]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = defaultdict(int)
    for e in events:
        cust = f"identifier:{e['customer']['customer_identifier']}"  # type: ignore[index]
        out[(cust, "inference-requests")] += 1
        out[(cust, "tokens-processed")] += int(e["prompt_tokens"]) + int(e["completion_tokens"])  # type: ignore[call-overload]
    return out


async def test_outage_longer_than_window_carries_then_bills(tmp_path: Path) -> None:
    """AWS refuses everything (its typed 503) for 25 h: records are carried forward, then billed on return."""
    k = await make_kit(tmp_path)
    try:
        evs = customer_events(3)
        k.ingest(*evs)
        k.sim.configure(outage=True, outage_mode="aws503")
        for hours in range(1, 26):
            k.clock.set(H10 + 400 + hours * HOUR_S - HOUR_S)
            await k.flusher.flush_once()
            conserved(k, ingested_of(evs))
        states = k.states()
        assert states.get("carried") == 6 and not states.get("unknown")
        k.sim.configure(outage=False)
        k.clock.advance(HOUR_S)
        for _ in range(5):
            await k.flusher.flush_once()
            k.clock.advance(600)
        conserved(k, ingested_of(evs))
        sent = [r for r in k.records() if r["state"] == "sent"]
        assert sum(r["quantity"] for r in sent if r["dimension"] == "inference-requests") == 3
        assert k.sim.counters.conflicts == 0
    finally:
        await k.close()


async def test_outage_with_unknown_outcomes_ends_unknown(tmp_path: Path) -> None:
    """If the outage drops connections after the request left, the records end unknown, never carried."""
    k = await make_kit(tmp_path)
    try:
        evs = customer_events(2)
        k.ingest(*evs)
        k.clock.set(H10 + 400)
        k.sim.configure(outage=True, outage_mode="close")
        await k.flusher.flush_once()
        k.clock.set(H09 + 60 + 86400)
        s = await k.flusher.flush_once()
        assert k.states() == {"unknown": 4}
        assert s.failed
        conserved(k, ingested_of(evs))  # unknown quantities still count as reported, not lost or doubled
    finally:
        await k.close()


async def test_sidecar_clock_ahead_of_aws(tmp_path: Path) -> None:
    """With the sidecar 10 min ahead, AWS first refuses the timestamp; the record is retried, not dropped."""
    k = await make_kit(tmp_path)
    try:
        k.sim.configure(clock_offset_s=-600)
        k.ingest(event("late-in-hour", when=H09 + 3590))
        k.clock.set(H10 + 310)
        await k.flusher.flush_once()
        rows = k.records()
        assert {r["state"] for r in rows} == {"pending"}
        assert all("TimestampOutOfBounds" in r["last_error"] for r in rows)
        k.clock.advance(700)
        await k.flusher.flush_once()
        assert k.states() == {"sent": 2}
    finally:
        await k.close()


async def test_slow_aws_within_timeout(tmp_path: Path) -> None:
    """Latency below the read timeout only slows sending; everything is sent once."""
    k = await make_kit(tmp_path, read_timeout_s=2.0)
    try:
        evs = customer_events(30)
        k.ingest(*evs)
        k.clock.set(H10 + 400)
        k.sim.configure(latency_s=0.2)
        await k.flusher.flush_once()
        assert k.states() == {"sent": 60}
        conserved(k, ingested_of(evs))
    finally:
        await k.close()
