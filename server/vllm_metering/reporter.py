"""Delivers usage events from the vLLM process to the sidecar: batched, retried, spooled, replayed.

One `Reporter` per process. `enqueue(event)` is synchronous and never raises or blocks: it appends
to a bounded in-memory queue. One background task (`start()`) posts batches (JSON arrays of at most
METERING_BATCH_MAX_EVENTS events / METERING_BATCH_MAX_BYTES bytes) to `POST {sidecar}/v1/events`,
waiting up to METERING_BATCH_LINGER_S after the first queued event so that a batch can gather (a
full batch goes at once), which keeps the cost to one POST per linger instead of one per request.

Sidecar answers and what happens:

- 200, or 422 (every event rejected), with `{"accepted", "duplicates", "rejected": [{"index",
  "error"}]}`: done. Rejected events are logged at warning level and kept in `<spool>.rejected`,
  never retried.
- 400 / 413 / 415 (the batch itself is malformed): a batch of several is split in halves and each
  half sent on its own; a single event that is still refused is logged as an error and kept in
  `<spool>.rejected`.
- 401 / 403 / other 4xx (misconfiguration: wrong token or URL): error log; the batch is spooled and
  retried with backoff, so fixing the sidecar side loses nothing.
- 429, 5xx (503 overloaded, 507 disk full), timeouts and connection errors: retried up to
  METERING_RETRY_ATTEMPTS times with exponential backoff and full jitter, then spooled.

While the sidecar is unavailable every event goes to the spool (see `vllm_metering.spool`), and a
probe (the oldest spooled batch) is sent after each backoff; once the sidecar answers, the spool is
replayed in order, and a spool line is removed only after the sidecar acknowledged it. When the queue
is full, further events go straight to the spool. When the spool is full, events are dropped with a
loud structured error naming how many. `close()` drains to the sidecar, or else to the spool.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import enum
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from vllm_metering.settings import MeteringSettings
from vllm_metering.spool import Spool, event_id_of

logger = logging.getLogger("vllm.metering")

_MAX_REPLY_BYTES = 1024 * 1024


def log_event(level: int, event: str, **fields: Any) -> None:
    """One structured log line: `vllm_metering <event> key=value ...` (fields also in `extra`)."""
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    logger.log(level, "vllm_metering %s %s", event, text, extra={"metering": {"event": event, **fields}})


@dataclass(slots=True)
class ReporterStats:
    """Running counts of what the reporter did with events (a line is one event)."""

    enqueued: int = 0
    posted_batches: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    spooled: int = 0
    replayed: int = 0
    dropped: int = 0
    corrupt_spool_lines: int = 0


class _Outcome(enum.Enum):
    ACKNOWLEDGED = "acknowledged"  # 200/422: every event accepted, duplicate or rejected for good
    MALFORMED = "malformed"  # 400/413/415: the batch as a whole was refused
    REFUSED = "refused"  # 401/403/404...: misconfiguration; keep the events, retry later
    UNAVAILABLE = "unavailable"  # 429/5xx/timeout/connection error: retry


@dataclass(frozen=True, slots=True)
class _Reply:
    outcome: _Outcome
    status: int | None
    detail: str
    body: Any = None


def _encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _classify(status: int) -> _Outcome:
    if status in (200, 201, 202, 207, 422):
        return _Outcome.ACKNOWLEDGED
    if status in (400, 413, 415):
        return _Outcome.MALFORMED
    if status == 429 or status >= 500 or status == 408:
        return _Outcome.UNAVAILABLE
    return _Outcome.REFUSED


class Reporter:
    """Queue, deliver, spool and replay usage events; see the module docstring for the contract.

    `clock` (monotonic seconds), `sleep` and `rng` are injectable so tests drive backoff without
    waiting; tests may also call `step()` directly instead of `start()`.
    """

    def __init__(
        self,
        settings: MeteringSettings,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.stats = ReporterStats()
        self.spool = Spool(settings.spool_path, max_bytes=settings.spool_max_bytes)
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._queue: deque[bytes] = deque()  # events, already encoded as one JSON line each
        self._overflow: list[bytes] = []
        self._overflow_task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._spool_lock = asyncio.Lock()
        self._spool_pending = True  # a previous run may have left a spool; the first step looks
        self._spool_turn = True
        self._oldest_queued_at = 0.0
        self._inflight: list[bytes] | None = None
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._down_until: float | None = None
        self._down_attempts = 0
        self._last_failure: str | None = None
        self._closing = False
        self._closed = False
        self._atexit_registered = False

    # -- the request path ---------------------------------------------------------------------

    def enqueue(self, event: dict[str, Any]) -> None:
        """Hand over one event; never blocks the loop on I/O and never raises."""
        try:
            self.stats.enqueued += 1
            try:
                line = _encode(event)
            except (TypeError, ValueError) as exc:
                self._dropped(1, reason=f"not_json_serialisable: {exc}")
                return
            if self._closed:
                self._spool_now([line])
            elif len(self._queue) < self.settings.queue_size:
                self._queue.append(line)
                if len(self._queue) == 1:
                    self._oldest_queued_at = self._clock()
                    self._wake.set()
                elif len(self._queue) == self.settings.batch_max_events:
                    self._wake.set()  # a full batch need not wait for the linger
            else:
                self._overflow_event(line)
        except Exception:
            logger.exception("vllm_metering could not enqueue a usage event")

    def _overflow_event(self, line: bytes) -> None:
        if len(self._overflow) >= self.settings.queue_size:
            self._dropped(1, reason="queue_and_overflow_full")
            return
        self._overflow.append(line)
        if self._overflow_task is None or self._overflow_task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self._spool_now(self._take_overflow())
                return
            self._overflow_task = loop.create_task(self._flush_overflow())

    def _take_overflow(self) -> list[bytes]:
        events, self._overflow = self._overflow, []
        return events

    async def _flush_overflow(self) -> None:
        while self._overflow:
            await self._spool_append(self._take_overflow(), reason="queue_full")

    async def flush_overflow(self) -> None:
        """Wait until events that found the queue full are in the spool (for tests and shutdown)."""
        task = self._overflow_task
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def queued(self) -> int:
        """Events waiting in memory."""
        return len(self._queue) + len(self._overflow)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the background task on the running loop (idempotent)."""
        if self._closed or self._closing or (self._task is not None and not self._task.done()):
            return
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._queue:
            self._wake.set()
        self._task = loop.create_task(self._run(), name="vllm-metering-reporter")
        if not self._atexit_registered:
            atexit.register(self._at_exit)
            self._atexit_registered = True

    async def close(self, *, timeout_s: float | None = None) -> None:
        """Deliver what is queued within `timeout_s` (default METERING_SHUTDOWN_TIMEOUT_S), spool the rest."""
        if self._closed or self._closing:
            return
        timeout = self.settings.shutdown_timeout_s if timeout_s is None else timeout_s
        self._closing = True
        try:
            if self._task is None and self._queue:
                self._task = asyncio.get_running_loop().create_task(self._run())
            self._wake.set()
            if self._task is not None and not self._task.done():
                try:
                    await asyncio.wait_for(asyncio.shield(self._task), timeout)
                except TimeoutError:
                    self._task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._task
                except Exception:
                    logger.exception("vllm_metering reporter failed while draining")
            await self.flush_overflow()
            leftover = [*(self._inflight or ()), *self._queue, *self._take_overflow()]
            self._queue.clear()
            self._inflight = None
            if leftover:
                await self._spool_append(leftover, reason="shutdown")
            log_event(
                logging.INFO,
                "reporter_closed",
                accepted=self.stats.accepted,
                duplicates=self.stats.duplicates,
                rejected=self.stats.rejected,
                spooled=self.stats.spooled,
                dropped=self.stats.dropped,
                spool_bytes=self.spool.size_bytes(),
            )
        finally:
            self._closed = True
            self.spool.release()
            if self._session is not None:
                await self._session.close()
                self._session = None
            if self._atexit_registered:
                atexit.unregister(self._at_exit)
                self._atexit_registered = False

    def _at_exit(self) -> None:
        """Interpreter exit without close(): keep whatever is still in memory in the spool."""
        if self._closed:
            return
        lines = [*(self._inflight or ()), *self._queue, *self._take_overflow()]
        self._queue.clear()
        self._inflight = None
        self._closed = True
        self._spool_now(lines)

    # -- the background task ----------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                wait = await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("vllm_metering reporter step failed; continuing")
                wait = 1.0
                lines, self._inflight = self._inflight, None
                if lines:  # the batch being handled must not vanish with the bug
                    try:
                        await self._spool_append(lines, reason="reporter_error")
                    except Exception:
                        self._dropped(len(lines), reason="reporter_error")
            if wait is None:
                continue
            if self._closing:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), None if math.isinf(wait) else wait)

    async def step(self) -> float | None:
        """Do one unit of work. None: call again; otherwise seconds until there may be work (inf: idle)."""
        self._wake.clear()
        if self._down_until is not None:
            if self._queue:
                # The sidecar is away: keep events on disk, not only in memory.
                self._inflight = list(self._queue)
                self._queue.clear()
                await self._spool_append(self._inflight, reason="sidecar_unavailable")
                self._inflight = None
                return None
            if self._closing:
                return math.inf
            remaining = self._down_until - self._clock()
            if remaining > 0:
                return remaining
            replayed = await self._replay_one()
            if replayed is False:
                self._mark_down()
            else:
                self._mark_up()
            return None
        if self._spool_pending and not self._closing and (self._spool_turn or not self._queue):
            # Alternate with fresh events so a steady load cannot starve the replay.
            self._spool_turn = False
            if await self._replay_one() is False:
                self._mark_down()
            return None
        if self._queue:
            linger = self.settings.batch_linger_s
            if linger > 0 and not self._closing and len(self._queue) < self.settings.batch_max_events:
                waited = self._clock() - self._oldest_queued_at
                if waited < linger - 1e-6:
                    return linger - waited  # let a batch gather: one POST per linger, not per request
            self._spool_turn = True
            lines = self._take_batch()
            self._inflight = lines
            attempts = 1 if self._closing else self.settings.retry_attempts
            remaining_lines = await self._deliver(lines, attempts=attempts)
            if remaining_lines:
                await self._spool_append(remaining_lines, reason="sidecar_unavailable")
                self._mark_down()
            self._inflight = None
            return None
        return math.inf

    def _take_batch(self) -> list[bytes]:
        lines: list[bytes] = []
        size = 2
        while self._queue and len(lines) < self.settings.batch_max_events:
            line = self._queue[0]
            if lines and size + len(line) + 1 > self.settings.batch_max_bytes:
                break
            self._queue.popleft()
            lines.append(line)
            size += len(line) + 1
        return lines

    def _backoff_s(self, attempt: int) -> float:
        """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * (2 ** min(attempt, 62)))
        return self._rng.uniform(0.0, ceiling)

    def _mark_down(self) -> None:
        self._down_attempts += 1
        delay = self._backoff_s(self._down_attempts)
        self._down_until = self._clock() + delay
        if self._down_attempts == 1:
            log_event(
                logging.WARNING,
                "sidecar_unavailable",
                url=self.settings.events_url,
                reason=self._last_failure,
                spool=self.spool.path,
                retry_in_s=round(delay, 3),
            )

    def _mark_up(self) -> None:
        if self._down_until is not None:
            log_event(logging.INFO, "sidecar_available", after_attempts=self._down_attempts)
        self._down_until = None
        self._down_attempts = 0
        self._last_failure = None

    # -- talking to the sidecar -------------------------------------------------------------------

    def _session_for_loop(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.settings.request_timeout_s),
                connector=aiohttp.TCPConnector(limit=2),
            )
        return self._session

    async def _post(self, lines: Sequence[bytes], *, replay: bool = False) -> _Reply:
        body = b"[" + b",".join(lines) + b"]"
        headers = {"Content-Type": "application/json"}
        if replay:
            headers["X-Spool-Replay"] = "1"  # the sidecar counts replayed events separately
        if self.settings.sidecar_token:
            headers["Authorization"] = f"Bearer {self.settings.sidecar_token}"
        self.stats.posted_batches += 1
        try:
            session = self._session_for_loop()
            async with session.post(self.settings.events_url, data=body, headers=headers) as resp:
                status = resp.status
                raw = await resp.content.read(_MAX_REPLY_BYTES)
        except asyncio.CancelledError:
            raise
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            return _Reply(_Outcome.UNAVAILABLE, None, f"{type(exc).__name__}: {exc}")
        outcome = _classify(status)
        parsed: Any = None
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            parsed = json.loads(raw) if raw else None
        detail = f"HTTP {status}"
        if outcome is not _Outcome.ACKNOWLEDGED and isinstance(parsed, dict):
            error = parsed.get("error") or parsed.get("message")
            if isinstance(error, str):
                detail += f": {error[:300]}"
        return _Reply(outcome, status, detail, parsed)

    async def _deliver(self, lines: list[bytes], *, attempts: int, replay: bool = False) -> list[bytes]:
        """Post `lines`, retrying unavailability; returns the lines still undelivered."""
        for attempt in range(attempts):
            reply = await self._post(lines, replay=replay)
            if reply.outcome is _Outcome.ACKNOWLEDGED:
                await self._acknowledged(lines, reply)
                return []
            if reply.outcome is _Outcome.MALFORMED:
                if len(lines) == 1:
                    await self._reject([(lines[0], reply.detail)], level=logging.ERROR)
                    return []
                half = len(lines) // 2
                first = await self._deliver(lines[:half], attempts=1, replay=replay)
                return first + await self._deliver(lines[half:], attempts=1, replay=replay)
            self._failure(reply)
            if reply.outcome is _Outcome.REFUSED:
                return lines  # retrying at once cannot help; the backoff loop will
            if attempt + 1 < attempts and not self._closing:
                await self._sleep(self._backoff_s(attempt))
        return lines

    def _failure(self, reply: _Reply) -> None:
        changed = reply.detail != self._last_failure
        self._last_failure = reply.detail
        if reply.outcome is _Outcome.REFUSED and changed:
            hint = (
                "METERING_SIDECAR_TOKEN must equal the sidecar's SIDECAR_TOKEN"
                if reply.status in (401, 403)
                else "check METERING_SIDECAR_URL"
            )
            log_event(
                logging.ERROR,
                "sidecar_refused",
                url=self.settings.events_url,
                status=reply.status,
                detail=repr(reply.detail),
                hint=repr(hint),
                action="events are spooled and retried",
            )
        else:
            logger.debug("vllm_metering post failed: %s", reply.detail)

    async def _acknowledged(self, lines: list[bytes], reply: _Reply) -> None:
        body = reply.body if isinstance(reply.body, dict) else {}
        accepted, duplicates = body.get("accepted"), body.get("duplicates")
        raw_rejected = body.get("rejected")
        rejected = raw_rejected if isinstance(raw_rejected, list) else []
        refused: list[tuple[bytes, str]] = []
        for item in rejected:
            if isinstance(item, dict) and isinstance(item.get("index"), int):
                index = item["index"]
                if 0 <= index < len(lines):
                    refused.append((lines[index], str(item.get("error", "rejected"))[:500]))
        if reply.status == 422 and not refused:
            refused = [(line, reply.detail) for line in lines]
        self.stats.accepted += accepted if isinstance(accepted, int) else len(lines) - len(refused)
        self.stats.duplicates += duplicates if isinstance(duplicates, int) else 0
        if not isinstance(reply.body, dict):
            log_event(logging.WARNING, "sidecar_reply_unreadable", status=reply.status, events=len(lines))
        if refused:
            await self._reject(refused, level=logging.WARNING)

    async def _reject(self, refused: list[tuple[bytes, str]], *, level: int) -> None:
        self.stats.rejected += len(refused)
        for line, reason in refused:
            log_event(level, "event_rejected", event_id=event_id_of(line), error=repr(reason))
        try:
            async with self._spool_lock:
                lost = await asyncio.to_thread(self.spool.append_rejected, refused)
        except OSError as exc:
            lost = len(refused)
            logger.error("vllm_metering cannot write %s: %s", self.spool.rejected_path, exc)
        if lost:
            log_event(logging.ERROR, "rejected_file_full", not_kept=lost, path=self.spool.rejected_path)

    # -- the spool --------------------------------------------------------------------------------

    async def _spool_append(self, lines: list[bytes], *, reason: str) -> None:
        if not lines:
            return
        try:
            async with self._spool_lock:
                result = await asyncio.to_thread(self.spool.append, lines)
        except OSError as exc:
            self._dropped(len(lines), reason=f"spool_write_failed: {exc}")
            return
        self._spooled(result.written, result.dropped, result.size_bytes, reason)

    def _spool_now(self, lines: list[bytes]) -> None:
        """Blocking spool write, for the paths with no running loop (after close, at exit)."""
        if not lines:
            return
        try:
            result = self.spool.append(lines)
        except OSError as exc:
            self._dropped(len(lines), reason=f"spool_write_failed: {exc}")
            return
        self._spooled(result.written, result.dropped, result.size_bytes, "after_close")

    def _spooled(self, written: int, dropped: int, size_bytes: int, reason: str) -> None:
        self.stats.spooled += written
        if written:
            self._spool_pending = True
            logger.debug("vllm_metering spooled %d events (%s)", written, reason)
        if dropped:
            self._dropped(dropped, reason="spool_full", spool_bytes=size_bytes)

    def _dropped(self, count: int, *, reason: str, **fields: Any) -> None:
        self.stats.dropped += count
        log_event(
            logging.ERROR,
            "usage_events_dropped",
            dropped=count,
            dropped_total=self.stats.dropped,
            reason=repr(reason),
            spool=self.spool.path,
            spool_max_bytes=self.settings.spool_max_bytes,
            **fields,
            impact="usage_not_billed",
        )

    async def _replay_one(self) -> bool | None:
        """Send the oldest spooled batch. True: acknowledged; False: sidecar failing; None: nothing."""
        try:
            async with self._spool_lock:
                batch = await asyncio.to_thread(
                    self.spool.next_batch,
                    max_events=self.settings.batch_max_events,
                    max_bytes=self.settings.batch_max_bytes,
                )
        except OSError as exc:
            logger.error("vllm_metering cannot read the spool %s: %s", self.spool.path, exc)
            self._spool_pending = False
            return None
        if batch is None:
            self._spool_pending = False
            return None
        if batch.corrupt:
            self.stats.corrupt_spool_lines += batch.corrupt
            log_event(logging.WARNING, "spool_lines_unreadable", skipped=batch.corrupt, spool=self.spool.path)
        if batch.lines and await self._deliver(batch.lines, attempts=1, replay=True):
            return False
        async with self._spool_lock:
            await asyncio.to_thread(self.spool.commit, batch)
        self.stats.replayed += len(batch.lines)
        return True
