"""What a GPU-hour means: fair_share splits the task's real GPU wall time among the requests running
at each moment (never more than passed), engine_time sums each request's own engine time, and
dedicated bills the whole task's wall time to one customer, hour by hour."""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import T0, event, rfc3339
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from sidecar.app import STORE, create_app
from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import DEFAULT_DIMENSIONS, CustomerRef, Dimension, Settings
from sidecar.events import validate_event
from sidecar.store import Store
from sidecar.usage import fair_shares, uncovered_us

H10 = hour_start(T0)
US = 1_000_000


def gpu_dims(mode: str, **extra: Any) -> tuple[Dimension, ...]:
    """The default dimensions with gpu-hours in `mode`."""
    return (*DEFAULT_DIMENSIONS[:2], Dimension(name="gpu-hours", source="gpu_seconds", unit=3600, mode=mode,
                                               **extra))


def timed(n: str, customer: str, start_s: float, end_s: float) -> dict[str, Any]:
    """An event whose request ran in the engine from start_s to end_s (epoch seconds)."""
    return event(n, when=end_s, customer={"customer_identifier": customer}, gpu_seconds=end_s - start_s,
                 engine_start=rfc3339(start_s), engine_end=rfc3339(end_s))


def gpu_buckets(db: Path) -> dict[tuple[str, int], int]:
    """gpu-hours raw µs per (customer, hour)."""
    conn = sqlite3.connect(db)
    try:
        return {(c, h): raw for c, h, raw in conn.execute(
            "SELECT customer, hour, raw FROM buckets WHERE dimension = 'gpu-hours'")}
    finally:
        conn.close()


def ingest(store: Store, clock: ManualClock, *objs: dict[str, Any]) -> None:
    """Validate and store events at the clock's now."""
    store.ingest_future([validate_event(o, now=clock.now(), max_age_s=172800, max_future_s=300)
                         for o in objs]).result()


# ---- the pure rule ---------------------------------------------------------------------------


def test_fair_shares_worked_example() -> None:
    """A 0-60 s, B 30-90 s, C 30-120 s: 120 s of GPU wall time split 40 / 25 / 55 (README example)."""
    shares, total = fair_shares([("A", 0, 60 * US), ("B", 30 * US, 90 * US), ("C", 30 * US, 120 * US)], gpus=1)
    assert total == 120 * US
    assert shares == {"A": 40 * US, "B": 25 * US, "C": 55 * US}
    shares2, total2 = fair_shares([("A", 0, 60 * US)], gpus=4)
    assert (shares2, total2) == ({"A": 240 * US}, 240 * US)


spans = st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 10_000), st.integers(0, 5_000)),
                 min_size=1, max_size=30)


@given(spans, st.integers(1, 8))
def test_fair_shares_never_exceed_the_wall_time(items: list[tuple[str, int, int]], gpus: int) -> None:
    """Shares add up exactly to the union of the intervals x GPUs; none exceeds its own time x GPUs."""
    intervals = [(k, a, a + d) for k, a, d in items]
    shares, total = fair_shares(intervals, gpus=gpus)
    covered = 10_000 + 5_000 - uncovered_us(0, 15_000, [(a, b) for _, a, b in intervals])
    assert total == covered * gpus
    assert sum(shares.values()) == total
    for k, share in shares.items():
        own = sum(b - a for kk, a, b in intervals if kk == k)
        assert 0 <= share <= own * gpus + 1


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=8), st.integers(0, 50),
       st.integers(0, 50))
def test_uncovered_time_matches_counting(covered: list[tuple[int, int]], a: int, length: int) -> None:
    """uncovered_us equals counting the free microseconds one by one."""
    b = a + length
    free = sum(1 for t in range(a, b) if not any(x <= t < y for x, y in covered))
    assert uncovered_us(a, b, covered) == free


# ---- fair_share end to end --------------------------------------------------------------------


@pytest.fixture
async def fair_client(tmp_path: Path, clock: ManualClock):  # type: ignore[no-untyped-def]
    """The real app with gpu-hours in fair_share mode on 2 GPUs."""
    settings = Settings(db_path=tmp_path / "g.db", birth_hour="report", gpus=2, dimensions=gpu_dims("fair_share"))
    async with TestClient(TestServer(create_app(settings, clock=clock, background=False))) as c:
        yield c


async def test_concurrent_requests_share_the_gpu_wall_time(fair_client: TestClient[Any, Any],
                                                          clock: ManualClock) -> None:
    """Three customers' overlapping requests: their GPU-seconds for the hour add up to the task's GPU
    wall time (x 2 GPUs), split evenly at each moment; the metric shows wall = billed."""
    events = [timed("a", "cust-a", H10, H10 + 60), timed("b", "cust-b", H10 + 30, H10 + 90),
              timed("c", "cust-c", H10 + 30, H10 + 120)]
    resp = await fair_client.post("/v1/events", json=events)
    assert resp.status == 200
    store = fair_client.app[STORE]
    clock.set(H10 + HOUR_S + 400)
    await store.seal_due()
    got = gpu_buckets(store.path)
    assert got == {("identifier:cust-a", H10): 80 * US, ("identifier:cust-b", H10): 50 * US,
                   ("identifier:cust-c", H10): 110 * US}
    assert sum(got.values()) == 2 * 120 * US  # the GPU wall time while requests ran, x 2 GPUs
    metrics = await (await fair_client.get("/metrics")).text()
    assert 'sidecar_gpu_seconds_total{dimension="gpu-hours",kind="wall"} 240.0' in metrics
    assert 'sidecar_gpu_seconds_total{dimension="gpu-hours",kind="billed"} 240.0' in metrics
    assert 'sidecar_gpu_last_hour_seconds{dimension="gpu-hours",kind="billed"} 240.0' in metrics
    hour_line = next(ln for ln in metrics.splitlines() if ln.startswith('sidecar_gpu_last_hour{'))
    assert float(hour_line.split()[-1]) == H10


def test_engine_time_mode_sums_each_requests_time(tmp_path: Path, clock: ManualClock) -> None:
    """engine_time bills each request's own engine time: 60 + 60 + 90 s for 120 s of wall time,
    and the gpu_time row shows the excess."""
    s = Settings(db_path=tmp_path / "e.db", birth_hour="report", dimensions=gpu_dims("engine_time"))
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        ingest(store, clock, timed("a", "cust-a", H10, H10 + 60), timed("b", "cust-b", H10 + 30, H10 + 90),
               timed("c", "cust-c", H10 + 30, H10 + 120))
        clock.set(H10 + HOUR_S + 400)
        store.seal_due_sync()
        assert sum(gpu_buckets(s.db_path).values()) == 210 * US
        conn = sqlite3.connect(s.db_path)
        row = conn.execute("SELECT wall_us, billed_us FROM gpu_time WHERE hour = ?", (H10,)).fetchone()
        conn.close()
        assert row == (120 * US, 210 * US)
    finally:
        store.close()


def test_a_request_across_an_hour_boundary_is_split(tmp_path: Path) -> None:
    """09:59-10:01 is one minute of 09:00 and one of 10:00."""
    clock = ManualClock(H10 + 90)
    s = Settings(db_path=tmp_path / "x.db", birth_hour="report")
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        ingest(store, clock, timed("x", "cust-a", H10 - 60, H10 + 60))
        clock.set(H10 + HOUR_S + 400)
        store.seal_due_sync()
        assert gpu_buckets(s.db_path) == {("identifier:cust-a", H10 - HOUR_S): 60 * US,
                                          ("identifier:cust-a", H10): 60 * US}
    finally:
        store.close()


def test_late_and_birth_hour_usage_bills_only_time_nobody_covered(tmp_path: Path) -> None:
    """A store born at 10:21 (defer): its 10:xx requests are billed in 11:00 as the GPU time not
    already covered, so overlapping requests never add up to more than the wall time."""
    clock = ManualClock(H10 + 21 * 60)
    s = Settings(db_path=tmp_path / "b.db")
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        clock.set(H10 + 25 * 60)
        ingest(store, clock, timed("a", "cust-a", H10 + 21 * 60, H10 + 23 * 60),
               timed("b", "cust-b", H10 + 22 * 60, H10 + 24 * 60))
        clock.set(H10 + 2 * HOUR_S + 400)
        store.seal_due_sync()
        got = gpu_buckets(s.db_path)
        assert got == {("identifier:cust-a", H10 + HOUR_S): 120 * US, ("identifier:cust-b", H10 + HOUR_S): 60 * US}
    finally:
        store.close()


steps = st.lists(st.one_of(
    st.tuples(st.just("event"), st.integers(0, 40), st.sampled_from(["c1", "c2", "c3"]),
              st.integers(0, 3 * HOUR_S), st.integers(1, 2 * HOUR_S)),
    st.tuples(st.just("advance"), st.integers(60, 2 * HOUR_S)),
    st.tuples(st.just("seal")),
), min_size=1, max_size=30)


@hsettings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps, st.sampled_from(["defer", "report"]))
def test_fair_share_conservation(plan: list[tuple[Any, ...]], birth: str) -> None:
    """Any events (duplicates, late ones, a deferred birth hour), any sealing: once every hour is
    sealed, the GPU time accounted to all customers is exactly the union of the intervals."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = ManualClock(H10)
        s = Settings(db_path=Path(tmp) / "db", birth_hour=birth)  # type: ignore[arg-type]
        store = Store.open(s.db_path, settings=s, clock=clock)
        spans: dict[str, tuple[int, int]] = {}
        try:
            for step in plan:
                if step[0] == "event":
                    _, n, cust, offset, length = step
                    end = min(H10 + offset, clock.now())
                    start = end - length
                    if f"e{n}" not in spans:
                        spans[f"e{n}"] = (start * US, end * US)
                    ingest(store, clock, timed(f"e{n}", cust, *(v / US for v in spans[f"e{n}"])))
                elif step[0] == "advance":
                    clock.advance(step[1])
                else:
                    store.seal_due_sync()
            clock.advance(3 * HOUR_S)
            store.call(lambda conn: store.rules.seal(conn, through=hour_start(clock.now()) + HOUR_S))
            accounted = sum(gpu_buckets(s.db_path).values())
            first = min([a for a, _ in spans.values()], default=0)
            last = max([b for _, b in spans.values()], default=0)
            union = (last - first) - uncovered_us(first, last, list(spans.values()))
            assert accounted == union
        finally:
            store.close()


# ---- dedicated ---------------------------------------------------------------------------------


def test_dedicated_bills_idle_hours_and_never_twice_across_a_restart(tmp_path: Path) -> None:
    """A dedicated endpoint on 2 GPUs: an idle hour is billed in full to its customer; an hour split
    by a restart (10:30-10:40 down) bills only the time the task ran, never more than the hour."""
    clock = ManualClock(H10)
    dims = gpu_dims("dedicated", customer=CustomerRef(customer_identifier="acme"))
    s = Settings(db_path=tmp_path / "d.db", birth_hour="report", gpus=2, dimensions=dims)
    store = Store.open(s.db_path, settings=s, clock=clock)
    for minute in range(5, 31, 5):
        clock.set(H10 + minute * 60)
        store.seal_due_sync()
    store.close()
    clock.set(H10 + 40 * 60)
    store = Store.open(s.db_path, settings=s, clock=clock)
    try:
        for minute in range(45, 3 * 60, 5):
            clock.set(H10 + minute * 60)
            store.seal_due_sync()
        got = gpu_buckets(s.db_path)
        assert got[("identifier:acme", H10)] == 2 * 50 * 60 * US  # 10:00-10:30 and 10:40-11:00, x 2 GPUs
        assert got[("identifier:acme", H10 + HOUR_S)] == 2 * HOUR_S * US  # idle, billed in full
        conn = sqlite3.connect(s.db_path)
        quantity = conn.execute("SELECT quantity FROM buckets WHERE hour = ? AND dimension = 'gpu-hours'",
                                (H10 + HOUR_S,)).fetchone()[0]
        conn.close()
        assert quantity == 2  # two GPU-hours
    finally:
        store.close()


def test_dedicated_needs_a_customer() -> None:
    """TOML: mode = "dedicated" without a customer is refused by name; a mode on a token dimension too."""
    from sidecar.config import _parse_dimensions
    from sidecar.errors import ConfigError

    with pytest.raises(ConfigError, match=r"dimensions\[0\]\.customer"):
        _parse_dimensions([{"name": "gpu-hours", "source": "gpu_seconds", "unit": 3600, "mode": "dedicated"}])
    with pytest.raises(ConfigError, match=r"dimensions\[0\]\.mode"):
        _parse_dimensions([{"name": "t", "source": "total_tokens", "mode": "fair_share"}])
    dims = _parse_dimensions([{"name": "gpu-hours", "source": "gpu_seconds", "unit": 3600, "mode": "dedicated",
                               "customer": "acme"}])
    assert dims[0].customer == "acme"
    assert DEFAULT_DIMENSIONS[2].gpu_mode == "fair_share"


@hsettings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(st.tuples(st.just("advance"), st.integers(1, 3 * HOUR_S)),
                          st.tuples(st.just("seal")), st.tuples(st.just("restart"), st.integers(0, HOUR_S))),
                max_size=25), st.integers(1, 4))
def test_dedicated_conservation(plan: list[tuple[Any, ...]], gpus: int) -> None:
    """Any run of passes, restarts and downtime: the dedicated customer's GPU time is exactly the time
    sidecar processes ran up to their last pass (x GPUs), never downtime, never an hour twice."""
    with tempfile.TemporaryDirectory() as tmp:
        clock = ManualClock(H10 + 17)
        dims = gpu_dims("dedicated", customer=CustomerRef(customer_identifier="acme"))
        s = Settings(db_path=Path(tmp) / "d.db", birth_hour="report", gpus=gpus, dimensions=dims)
        store = Store.open(s.db_path, settings=s, clock=clock)
        ran = 0.0
        last_pass = clock.now()
        try:
            for step in plan:
                if step[0] == "advance":
                    clock.advance(step[1])
                elif step[0] == "seal":
                    store.seal_due_sync()
                    ran += clock.now() - last_pass
                    last_pass = clock.now()
                else:
                    store.close()  # a crash: the time since the last pass is not billed
                    clock.advance(step[1])
                    store = Store.open(s.db_path, settings=s, clock=clock)
                    last_pass = clock.now()
            store.seal_due_sync()
            ran += clock.now() - last_pass
            store.call(lambda conn: store.rules.seal(conn, through=hour_start(clock.now()) + HOUR_S))
        finally:
            store.close()
        assert sum(gpu_buckets(s.db_path).values()) == round(ran * US) * gpus
