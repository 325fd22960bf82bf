"""The flusher: seal, freeze, and send frozen records with BatchMeterUsage, oldest first.

One serial submitter (as AWS's own reference pipeline does) paced to the configured calls/s.
Per-record outcomes and request-level errors follow DESIGN.md: identical resends only, bisection
for batches refused for their content, window expiry by policy, and `unknown` (never carried)
for any record whose send may have reached AWS without an answer.

A request-level failure (throttling, 5xx, timeout, connection trouble) says nothing about the
records in the call, only about AWS: the whole sender backs off once, then probes with a single
call; the first answer makes every waiting record due at once, so a backlog leaves in full batches.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

import structlog

from sidecar.clock import Clock
from sidecar.config import Settings
from sidecar.marketplace import CallResult
from sidecar.model import NEEDS_OPERATOR, Outcome
from sidecar.store.protocol import SendingStore
from sidecar.store.records import DueRecord, Settlement, aws_accepts

log = structlog.get_logger("sidecar.flush")

MAX_RECORDS_PER_CALL = 25
MAX_REQUEST_BYTES = 1_000_000
BASE_BACKOFF_S = 2.0


class MeteringApi(Protocol):
    """What the flusher needs from the Marketplace client (blocking; run in a thread)."""

    def batch_meter_usage(self, records: Sequence[Mapping[str, Any]], product_code: str | None) -> CallResult: ...


class Pacer:
    """Spaces call starts at least 1/rate seconds apart (AWS's quota: 10 calls/s per account)."""

    def __init__(self, calls_per_s: float, *, monotonic: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.interval = 1.0 / calls_per_s
        self._next = 0.0
        self._monotonic = monotonic
        self._sleep = sleep

    async def wait(self) -> None:
        """Return when the next call may start (event loops may wake early, so re-check)."""
        now = self._monotonic()
        while now < self._next:
            await self._sleep(self._next - now)
            now = self._monotonic()
        self._next = now + self.interval


def backoff_s(attempts: int, *, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with full jitter."""
    return rng.uniform(0, min(cap_s, BASE_BACKOFF_S * 2 ** max(attempts - 1, 0)))


def split_batches(records: Sequence[DueRecord]) -> list[list[DueRecord]]:
    """Keep each call under AWS's request size limit (25 small records never come close)."""
    batches: list[list[DueRecord]] = [[]]
    size = 0
    for r in records:
        n = len(json.dumps(r.payload)) + 2
        if batches[-1] and (len(batches[-1]) >= MAX_RECORDS_PER_CALL or size + n > MAX_REQUEST_BYTES - 1000):
            batches.append([])
            size = 0
        batches[-1].append(r)
        size += n
    return [b for b in batches if b]


def result_key(scheme: str, usage_record: Mapping[str, Any]) -> tuple[str, str, str, int]:
    """Match key of an echoed UsageRecord (botocore parses its Timestamp into a datetime)."""
    ts = usage_record.get("Timestamp")
    epoch = int(ts.timestamp()) if isinstance(ts, datetime) else int(ts or 0)
    who = usage_record.get("CustomerIdentifier") or (
        f"{usage_record.get('CustomerAWSAccountId')}/{usage_record.get('LicenseArn')}")
    return (scheme, str(who), str(usage_record.get("Dimension")), epoch)


def record_outcome(status: str, *, maybe_received: bool) -> Outcome:
    """What a per-record Status means for a record: sent, conflict, rejected, or retry.

    DuplicateRecord means billed when an earlier send of this same frozen record may have landed;
    otherwise AWS holds someone else's record for the key.
    """
    if status == "Success" or (status == "DuplicateRecord" and maybe_received):
        return Outcome.SENT
    if status == "DuplicateRecord":
        return Outcome.CONFLICT
    if status == "CustomerNotSubscribed":
        return Outcome.REJECTED
    return Outcome.RETRY


@dataclass
class FlushSummary:
    """What one flush pass did."""

    frozen: int = 0
    calls: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    pending: int = 0
    next_attempt_at: float | None = None  # earliest retry among pending records

    @property
    def failed(self) -> bool:
        """Anything left unsent or ended in a state an operator must look at."""
        bad = NEEDS_OPERATOR
        return self.pending > 0 or any(self.outcomes[s] for s in bad)

    def as_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen, "calls": self.calls, "outcomes": dict(self.outcomes),
                "pending": self.pending}


class Flusher:
    """Sends what is owed. One instance per store; never run two at once."""

    def __init__(self, store: SendingStore, api: MeteringApi | None, settings: Settings, clock: Clock, *,
                 rng: random.Random | None = None, pacer: Pacer | None = None) -> None:
        self.store = store
        self.api = api
        self.settings = settings
        self.clock = clock
        self.rng = rng or random.Random()
        self.pacer = pacer or Pacer(settings.calls_per_s)
        self.calls_by_outcome: Counter[str] = Counter()
        self.records_by_outcome: Counter[str] = Counter()
        # Sender-wide pause after request-level failures: clock seconds until the next probe call
        # (None: not paused), and how many calls in a row have failed at the request level.
        self.paused_until: float | None = None
        self.consecutive_failures = 0
        self._pause_error = ""
        self._lock = asyncio.Lock()
        self._unsettled: dict[int, bool] = {}  # record id -> maybe received, for answers not stored

    async def prepare(self, summary: FlushSummary | None = None) -> int:
        """Seal due hours, freeze sealed buckets, close expired windows (one transaction); returns
        records frozen."""
        frozen, closed = await self.store.prepare_flush(now=self.clock.now())
        for state, n in closed.items():
            self.records_by_outcome[state] += n
            if summary is not None:
                summary.outcomes[state] += n
        return frozen

    async def flush_once(self, *, max_calls: int | None = None) -> FlushSummary:
        """One pass: prepare, then send every due record (records backing off wait for the next pass);
        with `max_calls`, stop after that many calls (the rest waits for the next pass).

        While the sender is paused nothing is sent; the first pass after the pause sends one call
        (the probe) and, if AWS answers it, goes on in full batches.
        """
        async with self._lock:
            await self._release_unsettled()
            summary = FlushSummary()
            summary.frozen = await self.prepare(summary)
            if self.settings.dry_run or self.api is None:
                await self._dry_run(summary)
            else:
                while not self.paused() and (max_calls is None or summary.calls < max_calls):
                    now = self.clock.now()
                    batch = await self.store.claim(now=now, limit=MAX_RECORDS_PER_CALL)
                    if not batch:
                        break
                    for part in split_batches(batch):
                        await self._send(part, summary)
            summary.pending, summary.next_attempt_at = await self.store.pending_summary()
            if summary.calls or summary.frozen:
                log.info("flush_done", **summary.as_dict())
            return summary

    def paused(self) -> bool:
        """Whether the sender is backing off after a request-level failure."""
        return self.paused_until is not None and self.clock.now() < self.paused_until

    def next_pass_at(self, summary: FlushSummary) -> float | None:
        """When (clock seconds) a pass next has something to send: the end of the sender's pause,
        else the earliest retry among pending records; None when nothing is owed or nothing is sent."""
        if self.settings.dry_run or self.api is None or not summary.pending:
            return None
        if self.paused():
            return self.paused_until
        return summary.next_attempt_at

    def next_pass_delay_s(self, summary: FlushSummary) -> float:
        """How long the maintenance loop waits after a pass: the flush interval at most, less when a
        probe or a retry is due sooner (never under 0.5 s, so a stuck record cannot spin the loop)."""
        interval = self.settings.flush_interval_s
        due = self.next_pass_at(summary)
        if due is None:
            return interval
        return min(interval, max(0.5, due - self.clock.now()))

    async def drain(self, *, deadline_s: float) -> FlushSummary:
        """Flush repeatedly until nothing is pending or the deadline passes (sleeping out backoffs
        and the sender's pause)."""
        end = time.monotonic() + deadline_s
        total = FlushSummary()
        probed = False
        while True:
            s = await self.flush_once()
            total.frozen += s.frozen
            total.calls += s.calls
            total.outcomes.update(s.outcomes)
            total.pending = s.pending
            if not s.pending or self.settings.dry_run or self.api is None:
                return total
            wait = max(0.0, (self.next_pass_at(s) or 0) - self.clock.now())
            if time.monotonic() + wait >= end:
                if self.paused() and not probed and time.monotonic() + 1.0 < end:
                    # The deadline (SIGTERM) comes before the pause ends: AWS may be back, and what
                    # is not sent now may die with the task. Probe once instead of giving up.
                    probed = True
                    held_until, now = self.paused_until or 0.0, self.clock.now()
                    self.paused_until = now
                    await self.store.due_now(held_until=held_until, now=now)
                    continue
                return total
            await asyncio.sleep(max(wait, 0.05))

    async def _dry_run(self, summary: FlushSummary) -> None:
        now = self.clock.now()
        due = await self.store.peek_due(now=now, limit=10_000)
        for part in split_batches(due):
            request: dict[str, Any] = {"UsageRecords": [r.payload for r in part]}
            if part[0].product_code:
                request["ProductCode"] = part[0].product_code
            log.info("dry_run_request", operation="BatchMeterUsage", request=request)
            summary.outcomes["dry_run"] += len(part)

    async def _call(self, batch: Sequence[DueRecord]) -> CallResult:
        assert self.api is not None
        await self.pacer.wait()
        result = await asyncio.to_thread(
            self.api.batch_meter_usage, [r.payload for r in batch], batch[0].product_code)
        self.calls_by_outcome[result.error.split(":")[0] if result.error else result.kind] += 1
        return result

    async def _send(self, batch: list[DueRecord], summary: FlushSummary) -> None:
        # If the call or the writing of its answer is cut short (crash, cancellation, disk full),
        # the records stay marked in flight in the database. The next pass of this process puts
        # them back (a restart does the same through resume_in_flight), possibly received unless
        # AWS refused the call.
        maybe = True
        try:
            if self.paused():
                # An earlier call of this pass failed at the request level (a bisected half, or the
                # rest of a split): hold these records for the probe instead of calling.
                maybe = False
                await self._retry(batch, self._pause_error, False, summary, at=self.paused_until)
                return
            result = await self._call(batch)
            maybe = result.maybe_received or result.kind == "answered"
            summary.calls += 1
            await self._settle(batch, result, summary)
        except BaseException:
            for r in batch:
                self._unsettled[r.id] = self._unsettled.get(r.id, False) or maybe
            raise

    def forget_unsettled(self) -> None:
        """A new sender lease: the store already marked every record left in flight as possibly
        received, so answers this flusher failed to store are no longer its to write."""
        self._unsettled.clear()

    async def _release_unsettled(self) -> None:
        """Return records whose outcome could not be stored to pending (they are still in flight)."""
        if not self._unsettled:
            return
        now = self.clock.now()
        await self.store.settle([Settlement(record=rid, outcome=Outcome.RETRY,
                                            error="outcome could not be stored; resending",
                                            maybe_received=maybe, next_attempt_at=now)
                                 for rid, maybe in self._unsettled.items()], now=now)
        self._unsettled.clear()

    async def _settle(self, batch: list[DueRecord], result: CallResult, summary: FlushSummary) -> None:
        """Act on one call's result: record outcomes, retry, close windows, or bisect."""
        now = self.clock.now()
        if result.kind == "retry":
            await self._pause(batch, result, summary)
            return
        # AWS answered (per-record results, or a refusal of the batch's content): it is reachable.
        self.consecutive_failures = 0
        self.paused_until = None
        if result.kind == "answered":
            await self._apply_answer(batch, result, now, summary)
        elif result.kind == "timestamp":
            outside = [r for r in batch if not aws_accepts(r.timestamp, now=now, window_s=self.settings.window_s)]
            if outside:
                await self._close(outside, summary, reason=result.error or "TimestampOutOfBounds")
                rest = [r for r in batch if r not in outside]
                if rest:
                    await self._send(rest, summary)
            elif len(batch) > 1:
                await self._bisect(batch, summary)
            else:
                # Our clock says AWS should accept it: clock skew. Retry; the window rule ends it.
                await self._retry(batch, result.error or "TimestampOutOfBounds", False, summary)
        elif len(batch) > 1:  # invalid: find the records AWS objects to, send the rest
            await self._bisect(batch, summary)
        else:
            code = result.error.split(":")[0] if result.error else None
            await self._terminal(batch[0], Outcome.REJECTED, code, result.error or "invalid", summary)

    async def _bisect(self, batch: list[DueRecord], summary: FlushSummary) -> None:
        mid = len(batch) // 2
        await self._send(batch[:mid], summary)
        await self._send(batch[mid:], summary)

    async def _apply_answer(self, batch: list[DueRecord], result: CallResult, now: float,
                            summary: FlushSummary) -> None:
        by_key = {r.match_key: r for r in batch}
        seen: set[int] = set()
        done: list[tuple[DueRecord, Outcome, str, str | None]] = []  # record, outcome, status, record id
        for res in result.results:
            r = by_key.get(result_key(batch[0].scheme, res.get("UsageRecord", {})))
            if r is None or r.id in seen:
                log.error("unmatched_result", result=str(res)[:300])
                continue
            seen.add(r.id)
            status = str(res.get("Status"))
            done.append((r, record_outcome(status, maybe_received=r.maybe_received), status,
                         res.get("MeteringRecordId")))
        unprocessed = []
        for u in result.unprocessed:
            r = by_key.get(result_key(batch[0].scheme, u))
            if r is not None and r.id not in seen:
                seen.add(r.id)
                unprocessed.append(r)
        missing = [r for r in batch if r.id not in seen]

        errors = {Outcome.SENT: "",
                  Outcome.CONFLICT: "AWS already holds a different record for this customer, dimension and"
                                    " hour (another sender?)",
                  Outcome.REJECTED: "customer not subscribed; replay after they subscribe"}
        settlements = [
            Settlement(record=r.id, outcome=outcome, status=status, metering_record_id=mrid,
                       error=errors.get(outcome, f"unexpected status {status!r}"), maybe_received=True,
                       next_attempt_at=now + self._backoff(r))
            for r, outcome, status, mrid in done]
        retries = [(unprocessed, "UnprocessedRecords", False),
                   (missing, "no result for this record in the answer", True)]
        for group, error, maybe in retries:
            settlements += [Settlement(record=r.id, outcome=Outcome.RETRY, error=error, maybe_received=maybe,
                                       next_attempt_at=now + self._backoff(r)) for r in group]
        await self.store.settle(settlements, now=now)  # one transaction for the whole answer
        for r, outcome, _, _ in done:
            summary.outcomes[outcome] += 1
            self.records_by_outcome[outcome] += 1
            if outcome == Outcome.CONFLICT:
                log.error("record_conflict", record=r.id, payload=r.payload)
        for group, error, maybe in retries:
            if group:
                self._count_retry(len(group), error, maybe, summary)

    def _backoff(self, r: DueRecord) -> float:
        return backoff_s(r.attempts, cap_s=self.settings.max_backoff_s, rng=self.rng)

    async def _pause(self, batch: list[DueRecord], result: CallResult, summary: FlushSummary) -> None:
        """A request-level failure: back the whole sender off once (exponential, full jitter) and
        hold the batch, unchanged, for the probe that ends the pause."""
        failures = self.consecutive_failures + 1
        resume_at = self.clock.now() + backoff_s(failures, cap_s=self.settings.max_backoff_s, rng=self.rng)
        error = result.error or "retry"
        await self._retry(batch, error, result.maybe_received, summary, at=resume_at)
        # Set only once the batch's outcome is stored: if storing failed, the next pass resends at once.
        self.consecutive_failures = failures
        self.paused_until = resume_at
        self._pause_error = error
        log.warning("sender_paused", failures=failures, resume_in_s=round(resume_at - self.clock.now(), 3),
                    error=error)

    async def _retry(self, batch: Sequence[DueRecord], error: str, maybe_received: bool,
                     summary: FlushSummary, *, at: float | None = None) -> None:
        """Back to pending: due at `at` (the sender's pause), else after each record's own backoff."""
        now = self.clock.now()
        await self.store.settle([Settlement(record=r.id, outcome=Outcome.RETRY, error=error,
                                            maybe_received=maybe_received,
                                            next_attempt_at=now + self._backoff(r) if at is None else at)
                                 for r in batch], now=now)
        self._count_retry(len(batch), error, maybe_received, summary)

    def _count_retry(self, n: int, error: str, maybe_received: bool, summary: FlushSummary) -> None:
        summary.outcomes[Outcome.RETRY] += n
        self.records_by_outcome[Outcome.RETRY] += n
        log.warning("send_retry", records=n, error=error, maybe_received=maybe_received)

    async def _terminal(self, r: DueRecord, state: Outcome, status: str | None, error: str,
                        summary: FlushSummary) -> None:
        await self.store.settle([Settlement(record=r.id, outcome=state, status=status, error=error)],
                                now=self.clock.now())
        summary.outcomes[state] += 1
        self.records_by_outcome[state] += 1
        log.error("record_rejected", record=r.id, error=error, payload=r.payload)

    async def _close(self, batch: Sequence[DueRecord], summary: FlushSummary, *, reason: str) -> None:
        for state in await self.store.close_records([r.id for r in batch], now=self.clock.now(), reason=reason):
            summary.outcomes[state] += 1
            self.records_by_outcome[state] += 1
