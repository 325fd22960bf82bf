"""Reporter against a real local aiohttp server standing in for the sidecar."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from vllm_metering.reporter import Reporter
from vllm_metering.settings import MeteringSettings
from vllm_metering.testing import FakeSidecar, ManualClock, no_sleep, run_until_idle

TOKEN = "s3cret-token-0123456789"


def _event(i: int, tenant: str = "acme", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": f"chatcmpl-{i}~0000000000000000",
        "time": "2026-01-01T00:00:00.000+00:00",
        "customer": {"tenant": tenant},
        "prompt_tokens": i,
        "completion_tokens": 1,
        **extra,
    }


def _reporter(settings: MeteringSettings, clock: ManualClock) -> Reporter:
    return Reporter(settings, clock=clock, sleep=no_sleep, rng=random.Random(1))


def _spooled_ids(settings: MeteringSettings) -> list[str]:
    lines: list[str] = []
    for path in (settings.spool_path.with_name(settings.spool_path.name + ".replaying"), settings.spool_path):
        if path.exists():
            lines += [json.loads(line)["event_id"] for line in path.read_text().splitlines() if line]
    return lines


async def test_batches_respect_the_event_and_byte_limits(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar, clock: ManualClock
) -> None:
    """1,200 events go out as batches of at most 500 events, and smaller when the byte cap bites."""
    reporter = _reporter(make_settings(sidecar_url=sidecar.url), clock)
    for i in range(1200):
        reporter.enqueue(_event(i))
    await run_until_idle(reporter, clock)
    assert sidecar.batches == [500, 500, 200]
    assert len(sidecar.events) == 1200 and reporter.stats.accepted == 1200

    small = _reporter(make_settings(sidecar_url=sidecar.url, batch_max_bytes=2000), clock)
    for i in range(2000, 2030):
        small.enqueue(_event(i))
    await run_until_idle(small, clock)
    assert max(sidecar.batches[3:]) < 30 and sum(sidecar.batches[3:]) == 30
    await reporter.close()
    await small.close()


async def test_sidecar_down_then_up_replays_the_spool_once(
    make_settings: Callable[..., MeteringSettings], clock: ManualClock, free_port: int
) -> None:
    """Connection refused → events spooled → sidecar starts → spool replayed in order, each event counted once."""
    settings = make_settings(sidecar_url=f"http://127.0.0.1:{free_port}")
    reporter = _reporter(settings, clock)
    for i in range(30):
        reporter.enqueue(_event(i))
    await run_until_idle(reporter, clock, max_waits=2)
    assert _spooled_ids(settings) == [_event(i)["event_id"] for i in range(30)]
    for i in range(30, 40):  # arriving while the sidecar is away: spooled too, after the first ones
        reporter.enqueue(_event(i))
    await run_until_idle(reporter, clock, max_waits=1)
    assert len(_spooled_ids(settings)) == 40

    sidecar = FakeSidecar()
    await sidecar.start(port=free_port)
    try:
        await run_until_idle(reporter, clock)
        assert list(sidecar.events) == [_event(i)["event_id"] for i in range(40)]
        assert sidecar.duplicates == 0
        assert not reporter.spool.has_data()
        assert reporter.stats.replayed == 40 and reporter.stats.dropped == 0
    finally:
        await reporter.close()
        await sidecar.stop()


async def test_unavailable_sidecar_is_retried_then_spooled(
    make_settings: Callable[..., MeteringSettings],
    sidecar: FakeSidecar,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """503 answers are retried METERING_RETRY_ATTEMPTS times, then the batch is spooled and probed later."""
    sidecar.mode = "unavailable"
    reporter = _reporter(make_settings(sidecar_url=sidecar.url, retry_attempts=3), clock)
    reporter.enqueue(_event(1))
    with caplog.at_level(logging.WARNING, logger="vllm.metering"):
        await run_until_idle(reporter, clock, max_waits=3)
    assert reporter.stats.posted_batches == 3 + 3  # three tries, then three probes after backoff
    assert reporter.spool.has_data()
    assert "sidecar_unavailable" in caplog.text
    sidecar.mode = "up"
    await run_until_idle(reporter, clock)
    assert list(sidecar.events) == [_event(1)["event_id"]]
    await reporter.close()


async def test_crash_during_replay_resends_and_the_sidecar_dedups(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar, clock: ManualClock
) -> None:
    """A replay interrupted after the sidecar stored a batch is sent again by the next process; nothing counts twice."""
    settings = make_settings(sidecar_url=sidecar.url, batch_max_events=10)
    first = _reporter(settings, clock)
    first.spool.append([json.dumps(_event(i)).encode() for i in range(25)])
    batch = first.spool.next_batch(max_events=10, max_bytes=10**6)
    assert batch is not None
    await first._deliver(batch.lines, attempts=1)  # delivered, but the process dies before commit
    first.spool.release()
    await first.close()
    assert len(sidecar.events) == 10

    second = _reporter(settings, clock)
    await run_until_idle(second, clock)
    assert len(sidecar.events) == 25
    assert sidecar.duplicates == 10
    assert sum(e["prompt_tokens"] for e in sidecar.events.values()) == sum(range(25))
    assert not second.spool.has_data()
    await second.close()


async def test_full_queue_overflows_into_the_spool(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar, clock: ManualClock
) -> None:
    """Events that find the queue full go to the spool at once and are delivered later."""
    settings = make_settings(sidecar_url=sidecar.url, queue_size=5)
    reporter = _reporter(settings, clock)
    for i in range(9):
        reporter.enqueue(_event(i))
    await reporter.flush_overflow()
    assert reporter.queued == 5
    assert len(_spooled_ids(settings)) == 4
    await run_until_idle(reporter, clock)
    assert len(sidecar.events) == 9 and reporter.stats.dropped == 0
    await reporter.close()


async def test_full_spool_drops_loudly_and_never_raises(
    make_settings: Callable[..., MeteringSettings],
    clock: ManualClock,
    free_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the sidecar away and the spool at its cap, extra events are dropped with an ERROR naming the count."""
    settings = make_settings(sidecar_url=f"http://127.0.0.1:{free_port}", spool_max_bytes=1000)
    reporter = _reporter(settings, clock)
    with caplog.at_level(logging.ERROR, logger="vllm.metering"):
        for i in range(20):
            reporter.enqueue(_event(i))
        await run_until_idle(reporter, clock, max_waits=1)
    kept = len(_spooled_ids(settings))
    assert 0 < kept < 20
    assert reporter.spool.size_bytes() <= 1000
    assert reporter.stats.dropped == 20 - kept
    dropped = [r for r in caplog.records if "usage_events_dropped" in r.getMessage()]
    assert dropped and dropped[0].levelno == logging.ERROR
    assert dropped[0].metering["dropped"] == 20 - kept  # type: ignore[attr-defined]
    await reporter.close()


async def test_shutdown_drains_to_the_sidecar(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar
) -> None:
    """close() delivers everything still queued when the sidecar is up (real background task)."""
    reporter = Reporter(make_settings(sidecar_url=sidecar.url))
    reporter.start()
    for i in range(700):
        reporter.enqueue(_event(i))
    await reporter.close(timeout_s=5)
    assert len(sidecar.events) == 700
    assert not reporter.spool.has_data()


async def test_shutdown_with_the_sidecar_away_spools_everything(
    make_settings: Callable[..., MeteringSettings], free_port: int
) -> None:
    """close() with no sidecar puts every queued event in the spool within the timeout."""
    settings = make_settings(sidecar_url=f"http://127.0.0.1:{free_port}")
    reporter = Reporter(settings)
    reporter.start()
    for i in range(50):
        reporter.enqueue(_event(i))
    await reporter.close(timeout_s=1)
    assert sorted(_spooled_ids(settings)) == sorted(_event(i)["event_id"] for i in range(50))
    reporter.enqueue(_event(99))  # a straggler after shutdown is spooled, not lost
    assert _event(99)["event_id"] in _spooled_ids(settings)


async def test_unauthorized_is_logged_spooled_and_replayed_once_fixed(
    make_settings: Callable[..., MeteringSettings], clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A 401 logs an error with a hint (never the token), keeps the events, and replays them once accepted."""
    sidecar = FakeSidecar(token=TOKEN)
    await sidecar.start()
    wrong = "wrong-token-abcdefghijklmn"
    reporter = _reporter(make_settings(sidecar_url=sidecar.url, sidecar_token=wrong), clock)
    try:
        for i in range(3):
            reporter.enqueue(_event(i))
        with caplog.at_level(logging.DEBUG, logger="vllm.metering"):
            await run_until_idle(reporter, clock, max_waits=2)
        refused = [r for r in caplog.records if "sidecar_refused" in r.getMessage()]
        assert len(refused) == 1 and refused[0].levelno == logging.ERROR
        assert "SIDECAR_TOKEN" in refused[0].getMessage()
        assert wrong not in caplog.text and TOKEN not in caplog.text
        assert reporter.stats.posted_batches == 3  # one try (no quick retries on 401), then two probes
        assert len(reporter.spool.next_batch(max_events=10, max_bytes=10**6).lines) == 3  # type: ignore[union-attr]
        reporter.spool.release()
        sidecar.token = wrong  # the operator fixes the sidecar's token
        await run_until_idle(reporter, clock)
        assert len(sidecar.events) == 3
    finally:
        await reporter.close()
        await sidecar.stop()


async def test_rejected_events_are_logged_kept_and_not_retried(
    make_settings: Callable[..., MeteringSettings],
    sidecar: FakeSidecar,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Per-event rejections (200 with rejected, or 422) are warnings, kept in .rejected, never resent."""
    settings = make_settings(sidecar_url=sidecar.url)
    sidecar.bad_ids = {_event(1)["event_id"], _event(5)["event_id"]}
    reporter = _reporter(settings, clock)
    for i in range(3):
        reporter.enqueue(_event(i))
    with caplog.at_level(logging.WARNING, logger="vllm.metering"):
        await run_until_idle(reporter, clock)
        reporter.enqueue(_event(5))  # a batch of one bad event: the sidecar answers 422
        await run_until_idle(reporter, clock)
    assert set(sidecar.events) == {_event(0)["event_id"], _event(2)["event_id"]}
    assert reporter.stats.rejected == 2 and sidecar.batches == [3, 1]
    assert sum("event_rejected" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING) == 2
    kept = [json.loads(line) for line in reporter.spool.rejected_path.read_text().splitlines()]
    assert [k["event"]["event_id"] for k in kept] == [_event(1)["event_id"], _event(5)["event_id"]]
    assert not reporter.spool.has_data()
    await reporter.close()


async def test_malformed_batch_is_split_to_isolate_the_bad_event(
    make_settings: Callable[..., MeteringSettings],
    sidecar: FakeSidecar,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 400 for a batch splits it in halves until the one bad event is isolated and set aside."""
    sidecar.malformed_ids = {_event(6)["event_id"]}
    reporter = _reporter(make_settings(sidecar_url=sidecar.url), clock)
    for i in range(8):
        reporter.enqueue(_event(i))
    with caplog.at_level(logging.ERROR, logger="vllm.metering"):
        await run_until_idle(reporter, clock)
    assert len(sidecar.events) == 7 and _event(6)["event_id"] not in sidecar.events
    assert reporter.stats.rejected == 1
    assert "event_rejected" in caplog.text
    await reporter.close()


async def test_enqueue_never_raises_even_for_unserialisable_events(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar, clock: ManualClock
) -> None:
    """A broken event makes the reporter log, not raise, and the others still go through."""
    reporter = _reporter(make_settings(sidecar_url=sidecar.url), clock)
    reporter.enqueue(_event(1))
    reporter.enqueue({"event_id": object()})  # not JSON-serialisable
    reporter.enqueue(_event(2))
    await run_until_idle(reporter, clock)
    assert len(sidecar.events) == 2
    await reporter.close()


def test_backoff_is_full_jitter_below_the_exponential_ceiling(make_settings: Callable[..., MeteringSettings]) -> None:
    """Every backoff lies in [0, min(max, base * 2**attempt)]."""
    reporter = Reporter(make_settings(backoff_base_s=0.5, backoff_max_s=8.0), rng=random.Random(3))
    for attempt in range(12):
        ceiling = min(8.0, 0.5 * 2**attempt)
        samples = [reporter._backoff_s(attempt) for _ in range(50)]
        assert all(0.0 <= s <= ceiling for s in samples)
        assert max(samples) > ceiling / 2


async def test_replay_alternates_with_fresh_events(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar, clock: ManualClock
) -> None:
    """A spool left by an earlier run is replayed batch by batch, interleaved with new events, not starved."""
    settings = make_settings(sidecar_url=sidecar.url, batch_max_events=5)
    reporter = _reporter(settings, clock)
    reporter.spool.append([json.dumps(_event(i)).encode() for i in range(10)])
    for i in range(100, 110):
        reporter.enqueue(_event(i))
    await run_until_idle(reporter, clock)
    order = [int(event_id.split("-")[1].split("~")[0]) for event_id in sidecar.events]
    assert order == [0, 1, 2, 3, 4, 100, 101, 102, 103, 104, 5, 6, 7, 8, 9, 105, 106, 107, 108, 109]
    await reporter.close()


async def test_interpreter_exit_without_close_spools_what_is_in_memory(
    make_settings: Callable[..., MeteringSettings], free_port: int
) -> None:
    """If the process exits without lifespan shutdown, the atexit hook writes queued events to the spool."""
    settings = make_settings(sidecar_url=f"http://127.0.0.1:{free_port}")
    reporter = Reporter(settings)
    for i in range(4):
        reporter.enqueue(_event(i))
    reporter._at_exit()
    assert _spooled_ids(settings) == [_event(i)["event_id"] for i in range(4)]


async def test_events_linger_to_form_one_batch(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar, clock: ManualClock
) -> None:
    """With a linger, events arriving close together go out in one POST; a full batch does not wait."""
    reporter = _reporter(make_settings(sidecar_url=sidecar.url, batch_linger_s=0.05, batch_max_events=4), clock)
    reporter.enqueue(_event(1))
    assert await reporter.step() is None  # nothing spooled from earlier: the replay check finds nothing
    wait = await reporter.step()
    assert wait == pytest.approx(0.05)
    clock.advance(0.02)
    reporter.enqueue(_event(2))
    assert await reporter.step() == pytest.approx(0.03)
    clock.advance(0.03)
    assert await reporter.step() is None
    assert sidecar.batches == [2]
    for i in range(3, 7):
        reporter.enqueue(_event(i))
    assert await reporter.step() is None  # four queued = a full batch: sent without lingering
    assert sidecar.batches == [2, 4]
    await reporter.close()
