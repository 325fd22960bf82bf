"""/metrics exposes the counters operators alarm on; retention keeps the database bounded."""

from __future__ import annotations

import sqlite3
from typing import Any

from aiohttp.test_utils import TestClient
from helpers import T0, client_store, event

from sidecar.clock import HOUR_S, ManualClock
from sidecar.config import Settings
from sidecar.events import validate_event
from sidecar.store import Store


def metric(text: str, name: str) -> float:
    """The value of one sample line in Prometheus text format."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


async def test_metrics_count_events_and_states(client: TestClient[Any, Any]) -> None:
    """Accepted, duplicate and rejected events, latency, group commits and bucket states are exported."""
    await client.post("/v1/events", json=[event(1), event(2), event(1), {"event_id": "x"}])
    await client.post("/v1/events", data=b"{", headers={"Content-Type": "application/json"})
    resp = await client.get("/metrics")
    assert resp.status == 200
    text = await resp.text()
    assert metric(text, 'sidecar_events_total{result="accepted"}') == 2
    assert metric(text, 'sidecar_events_total{result="duplicate"}') == 1
    assert metric(text, 'sidecar_events_total{result="rejected"}') == 1
    assert metric(text, 'sidecar_events_rejected_total{field="time"}') == 1
    assert metric(text, 'sidecar_ingest_refused_total{status="400"}') == 1
    assert metric(text, "sidecar_ingest_latency_seconds_count") == 2
    assert metric(text, "sidecar_group_commit_requests_count") >= 1
    assert metric(text, 'sidecar_buckets{state="open"}') == 2
    assert metric(text, "sidecar_oldest_pending_age_seconds") == 0
    assert metric(text, "sidecar_db_size_bytes") > 0


async def test_spool_replay_header_is_counted(client: TestClient[Any, Any]) -> None:
    """Events a reporter replays from its spool are counted separately."""
    await client.post("/v1/events", json=[event(1)], headers={"X-Spool-Replay": "1"})
    text = await (await client.get("/metrics")).text()
    assert metric(text, 'sidecar_spool_replay_events_total{result="accepted"}') == 1


async def test_oldest_pending_age(client: TestClient[Any, Any], clock: ManualClock) -> None:
    """Once an hour is sealed and unsent, its age shows in /metrics and /healthz."""
    await client.post("/v1/events", json=[event(1, when=T0 - 120)])
    clock.advance(2 * HOUR_S)
    await client_store(client).seal_due()
    text = await (await client.get("/metrics")).text()
    age = metric(text, "sidecar_oldest_pending_age_seconds")
    assert age == T0 + 2 * HOUR_S - (T0 - T0 % HOUR_S)
    health = await (await client.get("/healthz")).json()
    assert health["oldest_pending_age_s"] == int(age)


async def test_retention_prunes_only_what_cannot_matter(tmp_path: Any) -> None:
    """Rows are pruned only when old enough, past the dedup horizon, and their bucket is final."""
    clock = ManualClock(T0)
    s = Settings(db_path=tmp_path / "r.db", birth_hour="report", retention_s=3600, max_event_age_s=7200)
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        evs = [validate_event(event(i, when=T0 - 60), now=T0, max_age_s=7200, max_future_s=300) for i in range(50)]
        await store.ingest(evs)
        clock.advance(3 * HOUR_S)
        assert await store.prune() == 0, "the bucket is sealed but unsent: keep the rows"
        await store.run(lambda c: c.execute("UPDATE buckets SET state = 'sent'"))
        clock.set(T0 + 1800)
        assert await store.prune() == 0, "too recent"
        clock.set(T0 + 3 * HOUR_S)
        assert await store.prune(batch=20) == 50
        conn = sqlite3.connect(s.db_path)
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
        assert conn.execute("SELECT sum(raw) FROM buckets WHERE dimension = 'inference-requests'").fetchone()[0] == 50
        conn.close()
        # A repost of a pruned event is now too old to be accepted, so it cannot be counted twice.
        try:
            validate_event(event(1, when=T0 - 60), now=clock.now(), max_age_s=7200, max_future_s=300)
            raise AssertionError("should have been rejected for age")
        except Exception as exc:
            assert "older than" in str(exc)
    finally:
        store.close()
