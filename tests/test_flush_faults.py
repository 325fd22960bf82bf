"""Fault injection: random throttling, 5xx, unprocessed records, lost answers and kills, then recovery.

After recovery every bucket's quantity is billed exactly once, no DuplicateRecord is ever provoked
by a conflicting quantity, and usage is conserved for every customer and dimension.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flushkit import H09, PRODUCT, Kit, make_kit
from helpers import accounted_usage, event
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.clock import HOUR_S
from sidecar.marketplace import CallResult, MeteringClient
from sidecar.simulator import DedupKey


class SimulatedKill(BaseException):
    """The process dies here (raised through the flusher like a SIGKILL would end it)."""


class KillingApi:
    """Calls the real client, but sometimes 'dies' just before or just after the call."""

    def __init__(self, inner: MeteringClient) -> None:
        self.inner = inner
        self.rng = random.Random(0)
        self.kill_rate = 0.0

    def batch_meter_usage(self, records: Sequence[Mapping[str, Any]], product_code: str | None) -> CallResult:
        roll = self.rng.random()
        if roll < self.kill_rate / 2:
            raise SimulatedKill("before the request left")
        result = self.inner.batch_meter_usage(records, product_code)
        if roll < self.kill_rate:
            raise SimulatedKill("after AWS answered, before the outcome was stored")
        return result


phase = st.fixed_dictionaries({
    "throttle_rate": st.sampled_from([0.0, 0.3, 0.9]),
    "error_5xx_rate": st.sampled_from([0.0, 0.3]),
    "unprocessed_rate": st.sampled_from([0.0, 0.3]),
    "lose_response_rate": st.sampled_from([0.0, 0.3]),
    "kill_rate": st.sampled_from([0.0, 0.2, 0.5]),
})


async def scenario(tmp: Path, seed: int, customers: int, phases: list[dict[str, float]]) -> None:
    k: Kit = await make_kit(tmp, api=KillingApi, max_backoff_s=60.0)
    api: KillingApi = k.flusher.api  # type: ignore[assignment]
    api.rng.seed(seed)
    k.sim.configure(seed=seed)
    try:
        expected: dict[tuple[str, str], int] = defaultdict(int)
        for h in range(3):
            evs = [event(f"{h}-{c}-{i}", when=H09 + h * HOUR_S + 30 * i + c,
                         customer={"customer_identifier": f"c{c}"}, prompt=300 + 7 * i, completion=211)
                   for c in range(customers) for i in range(4)]
            k.clock.set(H09 + h * HOUR_S + 200)
            k.ingest(*evs, *evs[:3])  # some duplicates on purpose
            for e in evs:
                expected[(f"identifier:c{e['customer']['customer_identifier'][1:]}", "inference-requests")] += 1
                expected[(f"identifier:{e['customer']['customer_identifier']}", "tokens-processed")] += (
                    e["prompt_tokens"] + e["completion_tokens"])
        k.clock.set(H09 + 3 * HOUR_S + 400)
        for p in phases:
            k.sim.configure(**{n: v for n, v in p.items() if n != "kill_rate"})
            api.kill_rate = p["kill_rate"]
            for _ in range(3):
                try:
                    await k.flusher.flush_once()
                except SimulatedKill:
                    k.reopen()
                    api = k.flusher.api  # type: ignore[assignment]
                k.clock.advance(61)
        # Recovery: faults gone; everything pending drains.
        k.sim.configure(throttle_rate=0.0, error_5xx_rate=0.0, unprocessed_rate=0.0, lose_response_rate=0.0)
        api.kill_rate = 0.0
        for _ in range(20):
            s = await k.flusher.flush_once()
            if not s.pending:
                break
            k.clock.advance(61)
        rows = k.records()
        assert {r["state"] for r in rows} == {"sent"}, {r["state"] for r in rows}
        assert k.sim.counters.conflicts == 0
        for r in rows:
            key = DedupKey(r["customer_identifier"], PRODUCT, r["dimension"], r["hour"])
            assert k.sim.billed_quantity(key) == r["quantity"]
        assert len(k.sim.billed) == len(rows)
        # Conservation in raw units: sent quantity x unit + carried remainder + open usage = ingested.
        got = accounted_usage(k.store.path)
        assert dict(got) == dict(expected)
    finally:
        await k.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), customers=st.integers(1, 20), phases=st.lists(phase, min_size=1, max_size=3))
def test_faults_then_recovery_bill_each_bucket_once(seed: int, customers: int, phases: list[dict[str, float]]) -> None:
    """Whatever faults and kills happen, recovery bills every bucket exactly once and conserves usage."""
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(scenario(Path(tmp), seed, customers, phases))
