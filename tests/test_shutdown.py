"""SIGTERM: stop taking events, seal the open hour, flush within the deadline, exit 0."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import pytest
from procs import SidecarProcess

from sidecar.simulator import Simulator, SimulatorConfig, start


@pytest.mark.slow
async def test_sigterm_seals_open_hour_and_flushes(tmp_path: Path) -> None:
    """Events of the current hour are billed during shutdown; the process exits 0 in time."""
    sim = Simulator(SimulatorConfig(subscribe_all=True, product_code="prod-x"))
    runner, url = await start(sim)
    proc = SidecarProcess(tmp_path / "sidecar.db", env={
        "AWS_ENDPOINT_URL_MARKETPLACE_METERING": url, "SIDECAR_PRODUCT_CODE": "prod-x",
        "SIDECAR_FLUSH_INTERVAL_S": "3600", "SIDECAR_SHUTDOWN_DEADLINE_S": "10"})
    try:
        await asyncio.to_thread(proc.start)
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        events = [{"event_id": f"e{i}", "time": now, "customer": {"customer_identifier": f"c{i % 3}"},
                   "prompt_tokens": 400, "completion_tokens": 200} for i in range(30)]
        status, body = await asyncio.to_thread(proc.post, "/v1/events", events)
        assert (status, body["accepted"]) == (200, 30)
        started = asyncio.get_running_loop().time()
        code = await asyncio.to_thread(proc.terminate, 30.0)
        elapsed = asyncio.get_running_loop().time() - started
        assert code == 0, proc.log()
        assert elapsed < 10 + 3
        billed = {(k.customer, k.dimension): int(v.quantity) for k, v in sim.billed.items()}
        assert billed[("c0", "inference-requests")] == 10
        assert billed[("c0", "tokens-processed")] == 6  # 10 x 600 tokens = 6 units of 1,000
        conn = sqlite3.connect(proc.db)
        states = {s for (s,) in conn.execute("SELECT state FROM records")}
        conn.close()
        assert states == {"sent"}
        assert sim.counters.conflicts == 0
    finally:
        if proc.proc and proc.proc.poll() is None:
            proc.kill()
        await runner.cleanup()
