"""The crash suite: the real daemon under load and mid-flush, SIGKILLed again and again.

After every restart: each acknowledged event is stored exactly once, no sealed bucket has changed,
and the simulator has never answered DuplicateRecord to a conflicting quantity. At the end every
record is billed exactly once. CRASH_KILLS sets the number of kills (50 by default; e.g. 500 for
the long mode described in the README).
"""

from __future__ import annotations

import asyncio
import os
import random
import sqlite3
import threading
import time
import urllib.error
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from helpers import event
from procs import SidecarProcess, stored_ids

from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Settings
from sidecar.events import validate_event
from sidecar.simulator import DedupKey, Simulator, SimulatorConfig, start
from sidecar.store import Store

PRODUCT = "prod-crash"
KILLS = int(os.environ.get("CRASH_KILLS", "50"))


def sealed_snapshot(db: Path) -> dict[tuple[str, str, int], tuple[Any, ...]]:
    """The frozen fields of every sealed (or later) bucket."""
    conn = sqlite3.connect(db)
    try:
        return {(c, d, h): rest for c, d, h, *rest in conn.execute(
            "SELECT customer, dimension, hour, raw, events, remainder_in, quantity, remainder, first_event_at"
            " FROM buckets WHERE state NOT IN ('open', 'unmapped')")}
    finally:
        conn.close()



def backlog(db: Path, customers: int) -> int:
    """Sealed-hour usage for many customers, written two hours in the past; returns the hour."""
    then = time.time() - 2 * HOUR_S
    store = Store.open(db, settings=Settings(db_path=db, birth_hour="report"), clock=ManualClock(then))
    evs = [validate_event(event(f"old-{c}", when=then - 30, customer={"customer_identifier": f"c{c}"},
                                prompt=700 + c, completion=300), now=then, max_age_s=86400, max_future_s=300)
           for c in range(customers)]
    store.ingest_future(evs).result()
    store.close()
    return hour_start(then - 30)


@pytest.mark.slow
async def test_crash_suite(tmp_path: Path) -> None:
    """SIGKILL at random moments under ingest load and mid-flush; nothing lost, nothing billed twice."""
    db = tmp_path / "sidecar.db"
    backlog(db, customers=1500)
    sim = Simulator(SimulatorConfig(subscribe_all=True, product_code=PRODUCT, latency_s=0.03,
                                    lose_response_rate=0.05, seed=11))
    runner, url = await start(sim)
    env = {"AWS_ENDPOINT_URL_MARKETPLACE_METERING": url, "SIDECAR_PRODUCT_CODE": PRODUCT,
           "SIDECAR_FLUSH_INTERVAL_S": "0.2", "SIDECAR_CALLS_PER_S": "20", "SIDECAR_MAX_BACKOFF_S": "1",
           "SIDECAR_READ_TIMEOUT_S": "2"}
    rng = random.Random(5)
    acked: set[str] = set()
    lock = threading.Lock()
    before = sealed_snapshot(db)
    try:
        for kill in range(KILLS):
            proc = SidecarProcess(db, env=env)
            await asyncio.to_thread(proc.start)
            stop = threading.Event()

            def post(proc: SidecarProcess = proc, stop: threading.Event = stop, kill: int = kill) -> None:
                n = 0
                while not stop.is_set():
                    now = datetime.now(UTC).timestamp()
                    batch = [event(f"k{kill}-{n}-{i}", when=now, customer={"customer_identifier": f"live{i % 4}"})
                             for i in range(10)]
                    n += 1
                    try:
                        status, _ = proc.post("/v1/events", batch, timeout_s=5)
                    except (urllib.error.URLError, OSError):
                        return
                    if status == 200:
                        with lock:
                            acked.update(e["event_id"] for e in batch)

            poster = threading.Thread(target=post)
            poster.start()
            await asyncio.sleep(rng.uniform(0.05, 0.6))
            proc.kill()
            stop.set()
            await asyncio.to_thread(poster.join)
            missing = acked - stored_ids(db)
            assert not missing, f"kill {kill}: {len(missing)} acknowledged events lost"
            after = sealed_snapshot(db)
            changed = [k for k, v in before.items() if after.get(k) != v]
            assert not changed, f"kill {kill}: sealed buckets changed: {changed[:3]}"
            before = after
            assert sim.counters.conflicts == 0, f"kill {kill}: a conflicting DuplicateRecord was provoked"
        # Recovery: one clean run drains everything owed.
        sim.configure(lose_response_rate=0.0, latency_s=0.0)
        proc = SidecarProcess(db, env=env)
        await asyncio.to_thread(proc.start)
        try:
            for _ in range(300):
                conn = sqlite3.connect(db)
                pending = conn.execute("SELECT count(*) FROM records WHERE state = 'pending'").fetchone()[0]
                conn.close()
                if pending == 0:
                    break
                await asyncio.sleep(0.2)
        finally:
            assert await asyncio.to_thread(proc.terminate) == 0
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT customer_identifier, dimension, hour, quantity, state, last_error"
                            " FROM records").fetchall()
        counted = conn.execute("SELECT sum(raw) FROM buckets WHERE dimension = 'inference-requests'").fetchone()[0]
        n_events = conn.execute("SELECT count(*) FROM events").fetchone()[0]
        conn.close()
        assert counted == n_events, "each stored event is counted exactly once"
        assert {r[4] for r in rows} == {"sent"}, {r[4] for r in rows}
        for ident, dim, hour, quantity, _, _ in rows:
            assert sim.billed_quantity(DedupKey(ident, PRODUCT, dim, hour)) == quantity
        assert len(sim.billed) == len(rows)
        assert sim.counters.conflicts == 0
        crashed_in_flight = sum(1 for r in rows if r[5] and "process stopped during a send" in r[5])
        print(f"crash suite: {KILLS} kills, {len(acked)} events acknowledged, {len(rows)} records billed once, "
              f"{crashed_in_flight} records were in flight at a kill, "
              f"{sim.counters.duplicates_same_quantity} identical resends")
        assert crashed_in_flight > 0, "no kill landed mid-send; the suite did not test what it claims"
    finally:
        await runner.cleanup()
