"""Fleet mode's benchmark rows, measured in the same run as the rest (see bench/run.py).

- ingest on one member in fleet mode vs the single-file sidecar, same load generator, same run;
- shipping throughput: deltas per second N simulated members commit into PostgreSQL;
- a leader pass (seal + freeze) over 100,000 due buckets;
- failover: from the leader's last renewal to another member holding the lease.

PostgreSQL runs on this same machine: `SIDECAR_TEST_PG_URL` when set, else a throwaway server from
the `pgserver` wheel (the test extra installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.loadgen import run_batch_load
from bench.procs import free_port, sidecar_env, start, stop, wait_http
from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Dimension, Settings
from sidecar.store.outbox import ShippedDelta
from sidecar.store.pg import FleetStore

DIMENSIONS = (Dimension(name="inference-requests", source="count", unit=1),
              Dimension(name="tokens-processed", source="total_tokens", unit=1000))


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """An admin URL of a PostgreSQL on this machine."""
    given = os.environ.get("SIDECAR_TEST_PG_URL")
    if given:
        yield given
        return
    where = tempfile.mkdtemp(prefix="sidecar-bench-pg-")
    os.chmod(where, 0o755)  # noqa: S103  (the server runs as its own user and must reach its data directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        srv: Any = pgserver.get_server(where, cleanup_mode="stop")
    try:
        yield str(srv.get_uri())
    finally:
        srv.cleanup()
        shutil.rmtree(where, ignore_errors=True)


@contextlib.contextmanager
def database(admin_url: str) -> Iterator[str]:
    import psycopg
    from psycopg.conninfo import make_conninfo

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_conninfo(admin_url, dbname=name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def settings(lease_s: float = 15.0) -> Settings:
    return Settings(db_path=Path("unused.db"), product_code="prod-bench", fleet_url="unused", dimensions=DIMENSIONS,
                    birth_hour="report", lease_s=lease_s, spike_factor=0.0)


async def shipping(url: str, *, members: int, seconds: float) -> dict[str, Any]:
    """`members` members ship batches of 5,000 deltas (1,000 customers x 2 dimensions, a few hours)
    as fast as PostgreSQL commits them; deltas per second."""
    clock = ManualClock(time.time())
    stores = [await FleetStore.open(url, settings=settings(), clock=clock, member_id=f"bench-{i}")
              for i in range(members)]
    counts = [0] * members
    hour = hour_start(clock.now())

    async def member(i: int) -> None:
        seq = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            batch = []
            for _ in range(5000):
                seq += 1
                c = f"identifier:c{seq % 1000}"
                batch.append(ShippedDelta(seq=seq, customer=c, dimension="inference-requests", hour=hour, unit=1,
                                          raw=1, events=1, first_event_at=hour))
            counts[i] += await stores[i].ship(f"bench-file-{i}", batch)

    started = time.monotonic()
    await asyncio.gather(*(member(i) for i in range(members)))
    elapsed = time.monotonic() - started
    for s in stores:
        await s.close()
    return {"members": members, "deltas": sum(counts), "seconds": elapsed, "deltas_per_s": sum(counts) / elapsed}


async def leader_pass(url: str, *, buckets: int) -> dict[str, Any]:
    """Ship `buckets` buckets of one past hour, then time the pass that seals and freezes them."""
    now = time.time()
    hour = hour_start(now) - 2 * HOUR_S
    clock = ManualClock(hour + 600)
    store = await FleetStore.open(url, settings=settings(), clock=clock, member_id="bench-leader")
    try:
        customers = buckets // 2
        seq = 0
        for start in range(0, customers, 5000):
            batch = []
            for c in range(start, min(customers, start + 5000)):
                for dim, unit, raw in (("inference-requests", 1, 7), ("tokens-processed", 1000, 12_345)):
                    seq += 1
                    batch.append(ShippedDelta(seq=seq, customer=f"identifier:c{c}", dimension=dim, hour=hour,
                                              unit=unit, raw=raw, events=7, first_event_at=hour + 60))
            await store.ship("bench-leader-file", batch)
        assert await store.acquire_lease() is not None
        clock.set(now)
        started = time.monotonic()
        frozen, _ = await store.prepare_flush(now=clock.now())
        elapsed = time.monotonic() - started
        return {"buckets": buckets, "frozen": frozen, "seconds": elapsed}
    finally:
        await store.close()


async def failover(url: str, *, lease_s: float) -> dict[str, Any]:
    """The leader renews, then dies (SIGKILL: it simply stops); another member tries every third of
    the TTL, as the member's leading loop does. Seconds from the last renewal to the takeover."""
    clock = ManualClock(time.time())
    a = await FleetStore.open(url, settings=settings(lease_s), clock=clock, member_id="bench-a")
    b = await FleetStore.open(url, settings=settings(lease_s), clock=clock, member_id="bench-b")
    try:
        assert await a.acquire_lease() is not None
        await asyncio.sleep(lease_s / 2)
        assert await a.renew_lease()
        died = time.monotonic()
        while await b.acquire_lease() is None:  # noqa: ASYNC110  (polling PostgreSQL, as a member does)
            await asyncio.sleep(lease_s / 3)
        return {"lease_s": lease_s, "seconds": time.monotonic() - died}
    finally:
        await a.close()
        await b.close()


def ingest_ratio(url: str, tmp: Path, *, seconds: float) -> dict[str, Any]:
    """The same batch load (100-event JSON bodies, 4 posters) on a single-file sidecar and on one
    fleet member shipping every second, alternated twice; events per second of each."""
    out: dict[str, list[float]] = {"single": [], "fleet": []}
    for round_ in range(2):
        for mode in ("single", "fleet"):
            port = free_port()
            extra = {"SIDECAR_FLEET_URL": url, "SIDECAR_MEMBER_ID": f"bench-{round_}",
                     "SIDECAR_CONFIG": str(_dimensions_toml(tmp))} if mode == "fleet" else {}
            proc = start([sys.executable, "-m", "sidecar", "serve"],
                         sidecar_env(tmp / f"{mode}-{round_}.db", port, extra))
            try:
                wait_http(f"http://127.0.0.1:{port}/healthz")
                n, secs, _ = run_batch_load(f"http://127.0.0.1:{port}/v1/events", batch=100, ndjson=False,
                                            posters=4, seconds=seconds, prefix=f"{mode}{round_}")
                out[mode].append(n / secs)
            finally:
                stop(proc)
    single, fleet = max(out["single"]), max(out["fleet"])
    return {"single_events_per_s": single, "fleet_events_per_s": fleet, "ratio": fleet / single}


def _dimensions_toml(tmp: Path) -> Path:
    path = tmp / "fleet-dimensions.toml"
    path.write_text('[[dimensions]]\nname = "inference-requests"\nsource = "count"\nunit = 1\n\n'
                    '[[dimensions]]\nname = "tokens-processed"\nsource = "total_tokens"\nunit = 1000\n')
    return path


def bench_fleet(args: Any, tmp: Path) -> dict[str, Any]:
    """Every fleet row, on one PostgreSQL started for the run."""
    with postgres() as admin:
        with database(admin) as url:
            ingest = ingest_ratio(url, tmp, seconds=args.seconds)
        with database(admin) as url:
            ship = asyncio.run(shipping(url, members=4, seconds=max(1.0, args.seconds / 2)))
        with database(admin) as url:
            lead = asyncio.run(leader_pass(url, buckets=2_000 if args.smoke else 100_000))
        with database(admin) as url:
            fail = asyncio.run(failover(url, lease_s=3.0))
    return {"ingest": ingest, "shipping": ship, "leader_pass": lead, "failover": fail}

