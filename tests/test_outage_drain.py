"""After an AWS outage the backlog drains at once in full batches: one sender-wide backoff, one probe call."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from flushkit import H09, H10, ClockedApi, Kit, RecordingApi, customer_events, make_kit
from helpers import event

from sidecar.flush import FlushSummary
from sidecar.simulator import DedupKey, SimulatorConfig, start

SEALED = H10 + 400  # 09:00 is past its grace: 24 customers x 2 dimensions = 48 records due
MAX_BACKOFF_S = 20.0


async def outage_kit(tmp_path: Path, **changes: Any) -> tuple[Kit, ClockedApi]:
    """A kit with 48 records due at SEALED, AWS's cap on the sender's backoff at 20 s, calls logged."""
    k = await make_kit(tmp_path, max_backoff_s=MAX_BACKOFF_S, **changes)
    api = ClockedApi(k.client, k.clock)
    k.flusher.api = api
    k.ingest(*customer_events(24))
    k.clock.set(SEALED)
    return k, api


class Outage:
    """Starts and ends one kind of outage: nothing listening, AWS's typed 503, or dropped connections."""

    def __init__(self, k: Kit, mode: str) -> None:
        self.k = k
        self.mode = mode
        self.port = urlsplit(k.url).port

    async def begin(self) -> None:
        if self.mode == "refused":
            await self.k.runner.cleanup()
        else:
            self.k.sim.configure(outage=True, outage_mode=self.mode)

    async def end(self) -> None:
        if self.mode == "refused":
            self.k.runner, _ = await start(self.k.sim, port=self.port or 0)
        else:
            self.k.sim.configure(outage=False)


async def one_pass(k: Kit) -> FlushSummary:
    """A pass of the maintenance loop: flush, then move the clock by exactly the delay the loop waits."""
    summary = await k.flusher.flush_once()
    k.clock.advance(k.flusher.next_pass_delay_s(summary))
    return summary


@pytest.mark.parametrize("mode", ["refused", "aws503", "close"])
@pytest.mark.parametrize("outage_s", [2 * 3600, 200])
async def test_backlog_drains_in_full_batches_after_outage(tmp_path: Path, mode: str, outage_s: int) -> None:
    """Whatever the outage's length, the backlog leaves within 30 s of AWS's return, in calls of 25 and 23."""
    k, api = await outage_kit(tmp_path)
    outage = Outage(k, mode)
    try:
        await outage.begin()
        returns_at = SEALED + outage_s
        restarted = False
        outage_passes: list[FlushSummary] = []
        while k.clock.now() < returns_at:
            if not restarted and k.clock.now() >= SEALED + outage_s / 2:
                k.reopen()  # the sidecar restarts mid-outage
                k.flusher.api = api
                restarted = True
            outage_passes.append(await one_pass(k))
        await outage.end()
        for _ in range(10):
            if not (await one_pass(k)).pending:
                break

        during = [c for c in api.calls if c.at < returns_at]
        after = [c for c in api.calls if c.at >= returns_at]
        print(f"{mode} outage of {outage_s} s: {len(during)} probes during it, then calls of "
              f"{[c.records for c in after]} at +{[round(c.at - returns_at, 1) for c in after]} s")
        assert restarted
        assert all(s.calls <= 1 for s in outage_passes), "one probe per pass while AWS is away"
        assert {c.kind for c in during} == {"retry"}
        assert all(c.records == 25 for c in during), "each probe carries the 25 oldest records"
        gaps = [b.at - a.at for a, b in itertools.pairwise(during)]
        assert max(gaps) <= MAX_BACKOFF_S + 1e-6, "a probe at least every max_backoff_s"
        assert after[0].at - returns_at <= 30
        assert [c.records for c in after] == [25, 23]
        assert {c.kind for c in after} == {"answered"}
        assert after[1].at - after[0].at < 1, "the rest goes out right after the first answer"
        rows = k.records()
        assert k.states() == {"sent": 48}
        for r in rows:
            key = DedupKey(r["customer_identifier"], r["product_code"], r["dimension"], r["hour"])
            assert k.sim.billed_quantity(key) == r["quantity"]
        assert k.sim.counters.billed == 48
        assert k.sim.counters.duplicates_same_quantity == 0
        assert k.sim.counters.conflicts == 0
        # Dropped after the request left, a probe may have landed; refused ones cannot have.
        maybe = sum(r["maybe_received"] for r in rows)
        assert maybe == (25 if mode == "close" else 0)
        assert k.flusher.paused_until is None and k.flusher.consecutive_failures == 0
    finally:
        await k.close()


async def test_mid_outage_pass_sends_one_probe(tmp_path: Path) -> None:
    """While AWS refuses, a pass makes one call, the same 25 oldest records wait for the next probe."""
    k, api = await outage_kit(tmp_path)
    try:
        k.sim.configure(outage=True, outage_mode="aws503")
        s = await k.flusher.flush_once()
        assert s.calls == 1 and [c.records for c in api.calls] == [25]
        paused_until = k.flusher.paused_until
        assert paused_until is not None and k.clock.now() < paused_until <= k.clock.now() + MAX_BACKOFF_S
        assert k.flusher.next_pass_at(s) == paused_until
        probed = {r["id"] for r in k.records() if r["next_attempt_at"] == paused_until}
        assert len(probed) == 25
        assert all(r["attempts"] == 0 for r in k.records() if r["id"] not in probed), "the rest was not claimed"

        s = await k.flusher.flush_once()  # still paused: nothing is sent
        assert s.calls == 0 and len(api.calls) == 1

        for n in range(2, 6):
            k.clock.set(paused_until)
            s = await k.flusher.flush_once()
            assert s.calls == 1 and len(api.calls) == n, "one probe, not one call per record"
            assert {r["id"] for r in k.records() if r["attempts"] > 0} == probed, "the same oldest records"
            assert k.flusher.consecutive_failures == n
            assert k.flusher.paused_until is not None
            paused_until = k.flusher.paused_until

        k.sim.configure(outage=False)
        k.clock.set(paused_until)
        s = await k.flusher.flush_once()
        assert s.calls == 2 and [c.records for c in api.calls[-2:]] == [25, 23]
        assert k.states() == {"sent": 48}
        assert k.flusher.next_pass_at(s) is None
    finally:
        await k.close()


async def test_loop_waits_for_the_probe_not_the_interval(tmp_path: Path) -> None:
    """The loop's delay is the time to the probe while paused (at least 0.5 s), else the flush interval."""
    k, _ = await outage_kit(tmp_path, flush_interval_s=60.0)
    try:
        idle = FlushSummary()
        assert k.flusher.next_pass_delay_s(idle) == 60.0
        k.sim.configure(outage=True, outage_mode="aws503")
        s = await k.flusher.flush_once()
        assert k.flusher.paused_until is not None
        assert k.flusher.next_pass_delay_s(s) == max(0.5, k.flusher.paused_until - k.clock.now())
        k.clock.set(k.flusher.paused_until + 5)  # the probe is overdue: run soon, but never spin
        assert k.flusher.next_pass_delay_s(s) == 0.5
        k.flusher.api = None  # dry run: records stay pending forever, the loop keeps its interval
        assert k.flusher.next_pass_delay_s(s) == 60.0
    finally:
        await k.close()


async def test_drain_honours_the_pause(tmp_path: Path) -> None:
    """A drain (shutdown) during the sender's pause makes no call before the pause ends."""
    k, api = await outage_kit(tmp_path)
    try:
        k.sim.configure(outage=True, outage_mode="aws503")
        await k.flusher.flush_once()
        assert k.flusher.paused()
        total = await k.flusher.drain(deadline_s=0.3)
        assert len(api.calls) == 1
        assert total.pending == 48
    finally:
        await k.close()


async def test_unprocessed_records_do_not_pause_the_sender(tmp_path: Path) -> None:
    """UnprocessedRecords is AWS speaking about those records: they back off alone; the pass goes on."""
    k, api = await outage_kit(tmp_path)
    try:
        k.sim.configure(unprocessed_rate=1.0)
        s = await k.flusher.flush_once()
        assert [c.records for c in api.calls] == [25, 23]
        assert s.outcomes["retry"] == 48
        assert k.flusher.paused_until is None and not k.flusher.paused()
        assert len({r["next_attempt_at"] for r in k.records()}) > 1, "each record has its own backoff"
    finally:
        await k.close()


async def test_rejected_record_keeps_aws_error_code(tmp_path: Path) -> None:
    """A record isolated by bisection for an Invalid* refusal stores the error code as its aws_status."""
    k = await make_kit(tmp_path, max_backoff_s=MAX_BACKOFF_S, sim_config=SimulatorConfig(
        subscribe_all=True, product_code="prod-test-1",
        allowed_dimensions=frozenset({"inference-requests", "tokens-processed"})))
    try:
        k.ingest(event("g", when=H09 + 60, customer={"customer_identifier": "c1"}, gpu_seconds=7200.0))
        k.clock.set(SEALED)
        await k.flusher.flush_once()
        [bad] = [r for r in k.records() if r["state"] == "rejected"]
        assert bad["aws_status"] == "InvalidUsageDimensionException"
        assert bad["last_error"].startswith("InvalidUsageDimensionException")
        assert k.flusher.paused_until is None, "a refusal for content is an answer, not an outage"
    finally:
        await k.close()


async def test_failure_during_bisection_holds_the_other_half(tmp_path: Path) -> None:
    """A request-level failure while bisecting pauses the sender: the other half waits for the probe, uncalled."""
    calls = {"n": 0}

    def make_api(client: Any) -> RecordingApi:
        def hook(records: object) -> None:
            calls["n"] += 1
            k.sim.configure(throttle_rate=1.0 if calls["n"] == 2 else 0.0)  # the first half is throttled

        return RecordingApi(client, hook)

    k = await make_kit(tmp_path, api=make_api, max_backoff_s=MAX_BACKOFF_S, sim_config=SimulatorConfig(
        subscribe_all=True, product_code="prod-test-1",
        allowed_dimensions=frozenset({"inference-requests", "tokens-processed"})))
    try:
        k.ingest(*[event(f"g{i}", when=H09 + 60, customer={"customer_identifier": f"c{i}"}, gpu_seconds=7200.0)
                   for i in range(5)])
        k.clock.set(SEALED)
        s = await k.flusher.flush_once()
        assert [n for _, n in k.flusher.api.calls] == [15, 7]  # type: ignore[union-attr]
        assert s.calls == 2 and k.states() == {"pending": 15}
        resume_at = k.flusher.paused_until
        assert resume_at is not None
        rows = k.records()
        assert {r["next_attempt_at"] for r in rows} == {resume_at}
        assert {r["maybe_received"] for r in rows} == {0}
        assert all(r["last_error"].startswith("ThrottlingException") for r in rows)
        k.clock.set(resume_at)
        await k.flusher.flush_once()
        by_dim: dict[str, set[str]] = {}
        for r in k.records():
            by_dim.setdefault(r["dimension"], set()).add(r["state"])
        assert by_dim == {"gpu-hours": {"rejected"}, "inference-requests": {"sent"}, "tokens-processed": {"sent"}}
        assert k.sim.counters.conflicts == 0
    finally:
        await k.close()
