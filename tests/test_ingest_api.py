"""POST /v1/events over the real app: formats, refusals, auth, and counting each event once."""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
from dataclasses import replace
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from helpers import ACCOUNT, T0, event, ndjson

from sidecar.app import create_app
from sidecar.clock import ManualClock
from sidecar.config import Settings


def stored(settings: Settings) -> tuple[int, dict[tuple[str, str], int]]:
    """Event rows and per (customer, dimension) raw sums, read straight from the file."""
    conn = sqlite3.connect(settings.db_path)
    try:
        n = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        sums = {(c, d): r for c, d, r in conn.execute(
            "SELECT customer, dimension, sum(raw) FROM buckets GROUP BY customer, dimension")}
        return n, sums
    finally:
        conn.close()


async def test_single_event_is_stored_and_counted(client: TestClient[Any, Any], settings: Settings) -> None:
    """One JSON object is accepted, stored, and aggregated into all default dimensions."""
    resp = await client.post("/v1/events", json=event(1, gpu_seconds=1.5))
    assert resp.status == 200
    assert await resp.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    n, sums = stored(settings)
    assert n == 1
    assert sums == {("identifier:cust-a", "inference-requests"): 1,
                    ("identifier:cust-a", "tokens-processed"): 15}
    # gpu-hours (fair_share) is measured from the engine interval when its hour seals.
    conn = sqlite3.connect(settings.db_path)
    try:
        (start, end), = conn.execute("SELECT start_us, end_us FROM engine_intervals").fetchall()
    finally:
        conn.close()
    assert end - start == 1_500_000


async def test_array_and_ndjson_bodies(client: TestClient[Any, Any], settings: Settings) -> None:
    """A JSON array and an NDJSON body are both accepted, event by event."""
    resp = await client.post("/v1/events", json=[event(i) for i in range(5)])
    assert (await resp.json())["accepted"] == 5
    resp = await client.post("/v1/events", data=ndjson([event(i) for i in range(3, 8)]),
                             headers={"Content-Type": "application/x-ndjson"})
    assert await resp.json() == {"accepted": 3, "duplicates": 2, "rejected": []}
    assert stored(settings)[0] == 8


async def test_bad_event_does_not_poison_neighbours(client: TestClient[Any, Any], settings: Settings) -> None:
    """An invalid event is rejected by index with the field named; the others are stored."""
    bad = event(2)
    del bad["prompt_tokens"]
    resp = await client.post("/v1/events", json=[event(1), bad, event(3)])
    body = await resp.json()
    assert resp.status == 200
    assert body["accepted"] == 2
    assert body["rejected"] == [{"index": 1, "error": "prompt_tokens: is required"}]
    assert stored(settings)[0] == 2


async def test_bad_ndjson_line_is_rejected_alone(client: TestClient[Any, Any], settings: Settings) -> None:
    """A line that is not JSON is rejected by index; the other lines are stored."""
    body = ndjson([event(1)]) + b"{not json\n" + ndjson([event(2)])
    resp = await client.post("/v1/events", data=body, headers={"Content-Type": "application/x-ndjson"})
    out = await resp.json()
    assert out["accepted"] == 2
    assert out["rejected"][0]["index"] == 1
    assert "not valid JSON" in out["rejected"][0]["error"]


async def test_all_rejected_is_422(client: TestClient[Any, Any], settings: Settings) -> None:
    """When every event is invalid the answer is 422 and nothing is stored."""
    resp = await client.post("/v1/events", json=[{"event_id": "x"}])
    assert resp.status == 422
    assert (await resp.json())["rejected"][0]["error"] == "time: is required"
    assert stored(settings)[0] == 0


async def test_unparseable_body_is_400(client: TestClient[Any, Any], settings: Settings) -> None:
    """A JSON body that does not parse is refused with 400 and a JSON error."""
    for body in (b"{", b"[1,", b"\xff\xfe", b'{"a": NaN}', b'"just a string"', b"[" * 100_000):
        resp = await client.post("/v1/events", data=body, headers={"Content-Type": "application/json"})
        assert resp.status == 400, body[:10]
        assert "error" in await resp.json()
    assert stored(settings)[0] == 0


async def test_duplicate_keys_are_refused(client: TestClient[Any, Any], settings: Settings) -> None:
    """An object with a key twice is ambiguous, so it is refused rather than guessed."""
    body = b'{"event_id": "a", "event_id": "b"}'
    resp = await client.post("/v1/events", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "duplicate key" in (await resp.json())["error"]


async def test_wrong_content_type_is_415(client: TestClient[Any, Any], settings: Settings) -> None:
    """Only JSON and NDJSON are accepted."""
    resp = await client.post("/v1/events", data=json.dumps(event(1)), headers={"Content-Type": "text/plain"})
    assert resp.status == 415
    assert "content type" in (await resp.json())["error"]
    assert stored(settings)[0] == 0


async def test_body_over_limit_is_413(settings: Settings, clock: ManualClock) -> None:
    """A body larger than the limit is refused with 413 whether or not it declares its length."""
    small = replace(settings, max_body_bytes=2000)
    async with TestClient(TestServer(create_app(small, clock=clock, background=False))) as c:
        big = json.dumps([event(i) for i in range(50)]).encode()
        resp = await c.post("/v1/events", data=big, headers={"Content-Type": "application/json"})
        assert resp.status == 413
        assert "larger than 2000" in (await resp.json())["error"]

        async def chunks() -> Any:
            for i in range(0, len(big), 500):
                yield big[i:i + 500]

        resp = await c.post("/v1/events", data=chunks(), headers={"Content-Type": "application/json"})
        assert resp.status == 413
    assert stored(small)[0] == 0


async def test_token_required_when_set(settings: Settings, clock: ManualClock) -> None:
    """With SIDECAR_TOKEN set, requests without the bearer token get 401; health stays open."""
    secured = replace(settings, token="s3cret-token-0123456789")
    async with TestClient(TestServer(create_app(secured, clock=clock, background=False))) as c:
        resp = await c.post("/v1/events", json=event(1))
        assert resp.status == 401
        resp = await c.post("/v1/events", json=event(1), headers={"Authorization": "Bearer wrong"})
        assert resp.status == 401
        resp = await c.get("/usage")
        assert resp.status == 401
        assert (await c.get("/healthz")).status == 200
        resp = await c.post("/v1/events", json=event(1),
                            headers={"Authorization": "Bearer s3cret-token-0123456789"})
        assert resp.status == 200
    assert stored(secured)[0] == 1


async def test_same_events_three_times_concurrently(client: TestClient[Any, Any], settings: Settings) -> None:
    """10,000 events posted three times, concurrently, give the sums of one copy."""
    events = [event(i, prompt=i % 97, completion=i % 13,
                    customer={"customer_identifier": f"cust-{i % 7}"}) for i in range(10_000)]
    batches = [events[i:i + 250] for i in range(0, len(events), 250)]
    jobs = [client.post("/v1/events", json=b) for _ in range(3) for b in batches]
    # Interleave copies so duplicates race each other rather than arriving one copy after another.
    jobs = jobs[0::3] + jobs[1::3] + jobs[2::3]
    results = await asyncio.gather(*jobs)
    bodies = [await r.json() for r in results]
    assert all(r.status == 200 for r in results)
    assert sum(b["accepted"] for b in bodies) == 10_000
    assert sum(b["duplicates"] for b in bodies) == 20_000
    n, sums = stored(settings)
    assert n == 10_000
    for c in range(7):
        mine = [e for e in events if e["customer"]["customer_identifier"] == f"cust-{c}"]
        assert sums[(f"identifier:cust-{c}", "inference-requests")] == len(mine)
        assert sums[(f"identifier:cust-{c}", "tokens-processed")] == sum(
            e["prompt_tokens"] + e["completion_tokens"] for e in mine)


async def test_concurrent_single_posts_share_commits(client: TestClient[Any, Any], settings: Settings) -> None:
    """Many concurrent single-event requests are group-committed and each is acknowledged."""
    results = await asyncio.gather(*[client.post("/v1/events", json=event(i)) for i in range(300)])
    assert all(r.status == 200 for r in results)
    assert stored(settings)[0] == 300


async def test_account_customer_and_usage_endpoint(client: TestClient[Any, Any]) -> None:
    """Events for an account + licence customer show up in /usage rows and totals."""
    await client.post("/v1/events", json=[event(1, customer=ACCOUNT, prompt=1500, completion=600),
                                          event(2, customer=ACCOUNT)])
    usage = await (await client.get("/usage", params={"dimension": "tokens-processed"})).json()
    [row] = usage["rows"]
    assert row["customer"].startswith("account:123456789012/arn:aws:license-manager")
    assert row["raw"] == 2115
    assert row["state"] == "open"
    assert row["hour"] == "2026-11-28T10:00:00Z"
    [total] = usage["totals"]
    assert total["open_raw"] == 2115
    resp = await client.get("/usage", params={"from": "not a time"})
    assert resp.status == 400


async def test_healthz_reports_writable(client: TestClient[Any, Any]) -> None:
    """/healthz answers 200 with db_writable when the database accepts writes."""
    resp = await client.get("/healthz")
    body = await resp.json()
    assert resp.status == 200
    assert body["db_writable"] is True
    assert body["oldest_unsent_age_s"] is None


async def test_future_and_stale_events_rejected(client: TestClient[Any, Any], settings: Settings) -> None:
    """Events more than 5 minutes ahead, or older than the dedup horizon, are rejected by name."""
    resp = await client.post("/v1/events", json=[event(1, when=T0 + 600), event(2, when=T0 - 3 * 86400)])
    body = await resp.json()
    assert resp.status == 422
    assert "in the future" in body["rejected"][0]["error"]
    assert "older than" in body["rejected"][1]["error"]
    assert stored(settings)[0] == 0


async def test_usage_page_for_browsers(client: TestClient[Any, Any]) -> None:
    """A browser asking for HTML gets the self-contained operator page; ?format=json forces JSON."""
    await client.post("/v1/events", json=[event(1, customer={"customer_identifier": "<script>x</script>"})])
    resp = await client.get("/usage", headers={"Accept": "text/html,application/xhtml+xml"})
    assert resp.status == 200
    assert resp.content_type == "text/html"
    assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
    html = await resp.text()
    assert "&lt;script&gt;x&lt;/script&gt;" in html and "<script>x" not in html
    resp = await client.get("/usage", params={"format": "json"}, headers={"Accept": "text/html"})
    assert resp.content_type == "application/json"


async def test_backpressure_when_the_disk_falls_behind(settings: Settings, clock: ManualClock) -> None:
    """When too many events wait for the writer, new requests get 503 + Retry-After, then recover."""
    import threading

    from helpers import client_store

    small = replace(settings, max_queued_events=10)
    async with TestClient(TestServer(create_app(small, clock=clock, background=False))) as c:
        store = client_store(c)
        gate = threading.Event()
        blocker = store.submit(lambda conn: gate.wait(10))  # the writer is stuck, as on a slow disk
        first = asyncio.ensure_future(c.post("/v1/events", json=[event(i) for i in range(8)]))
        for _ in range(100):
            if store._queued_events == 8:
                break
            await asyncio.sleep(0.01)
        refused = await c.post("/v1/events", json=[event(100 + i) for i in range(5)])
        assert refused.status == 503
        assert refused.headers["Retry-After"] == "1"
        assert (await refused.json())["stored"] == 0
        gate.set()
        blocker.result(timeout=10)
        assert (await (await first).json())["accepted"] == 8
        again = await c.post("/v1/events", json=[event(100 + i) for i in range(5)])
        assert (await again.json())["accepted"] == 5
    assert stored(small)[0] == 13


async def test_hostile_bodies(client: TestClient[Any, Any], settings: Settings) -> None:
    """10 MB bodies, 5,000-digit numbers and overflowing floats are refused with JSON errors; nothing stored."""
    ten_mb = b"[" + b'{"event_id": "x"},' * (10 * 1024 * 1024 // 18) + b"{}]"
    resp = await client.post("/v1/events", data=io.BytesIO(ten_mb), headers={"Content-Type": "application/json"})
    assert resp.status == 413
    assert "larger than" in (await resp.json())["error"]
    huge_int = b'{"event_id": "h", "time": "2026-11-28T10:01:00Z", "customer": {"tenant": "t"},' \
               b' "prompt_tokens": ' + b"9" * 5000 + b', "completion_tokens": 0}'
    resp = await client.post("/v1/events", data=huge_int, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "error" in await resp.json()
    overflow = event("o", gpu_seconds=1.0)
    body = json.dumps(overflow).replace('"gpu_seconds": 1.0', '"gpu_seconds": 1e400').encode()
    resp = await client.post("/v1/events", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 422
    assert (await resp.json())["rejected"][0]["error"].startswith("gpu_seconds: must be a finite number")
    assert stored(settings)[0] == 0
    assert (await client.get("/healthz")).status == 200  # the daemon is still up
