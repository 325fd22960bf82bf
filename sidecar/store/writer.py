"""The writer: one thread owns the only write connection and runs every write transaction.

Concurrent ingest requests are merged into one transaction (group commit) so a burst costs one
fsync, not one per request; each request runs in its own savepoint so a bad one cannot fail its
neighbours. Reads use their own connections (WAL lets them run beside the writer). What happens
inside the transactions (the bucket rules) is `buckets.Buckets`; this module runs them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import structlog

from sidecar.clock import Clock
from sidecar.config import Settings
from sidecar.errors import StoreBusy, StoreClosed, StoreLocked
from sidecar.events import UsageEvent
from sidecar.model import CustomerRef
from sidecar.store import lifecycle, outbox, queries, records
from sidecar.store.buckets import Buckets, IngestResult, _dimension_source, _stranded_tenants
from sidecar.store.db import _unavailable, check_integrity, connect, migrate
from sidecar.subscriptions import Notice

LOCAL_OWNER = "local"  # the claim owner of a single-file store: the process holding its lock

log = structlog.get_logger("sidecar.store")

T = TypeVar("T")
MAX_GROUP_EVENTS = 20_000  # cap on events merged into one group commit


@dataclass(slots=True)
class _Job:
    """Work for the writer: `fn` in its own transaction, or (fn=None) events for a group commit.

    Its caller waits either on a concurrent future (threads) or on an asyncio future of `loop`;
    asyncio futures of one group are settled with a single wake-up of their loop.
    """

    fn: Callable[[sqlite3.Connection], Any] | None
    events: Sequence[UsageEvent] = field(default_factory=tuple)
    future: concurrent.futures.Future[Any] | None = None
    afuture: asyncio.Future[Any] | None = None
    loop: asyncio.AbstractEventLoop | None = None

    def wanted(self) -> bool:
        """False when the caller gave up before the work started (nothing is done then)."""
        if self.future is not None:
            return self.future.set_running_or_notify_cancel()
        return self.afuture is not None and not self.afuture.cancelled()


Outcome = tuple[_Job, Any, BaseException | None]


def _settle(outcomes: list[Outcome]) -> None:
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for job, value, exc in outcomes:
        if job.future is not None:
            if exc is not None:
                job.future.set_exception(exc)
            else:
                job.future.set_result(value)
        elif job.loop is not None:
            by_loop.setdefault(job.loop, []).append((job, value, exc))
    for loop, items in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle_async, items)


def _settle_async(items: list[Outcome]) -> None:
    for job, value, exc in items:
        fut = job.afuture
        if fut is None or fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(value)


class Store:
    """Owner of the write connection. Use `open()`; call `close()` when done."""

    def __init__(self, path: Path, *, settings: Settings, clock: Clock) -> None:
        self.path = path
        self.settings = settings
        self.clock = clock
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self.rules = Buckets(settings=settings, clock=clock)  # the domain; this class runs its transactions
        self.view = queries.UsageView(path)  # reads, beside the writer
        self._lock_file: IO[bytes] | None = None  # held while this process owns the file (serve, flush)
        self._queued_events = 0  # events handed to the writer and not yet committed or failed
        self._queued_lock = threading.Lock()
        self.on_group: Callable[[int], None] | None = None  # told each group commit's request count
        self.origin = ""  # this file's id among a fleet's shipments (outbox.origin)

    @classmethod
    def open(cls, path: Path, *, settings: Settings, clock: Clock, resume: bool = True) -> Store:
        """Check, migrate and open the database, load tenant mappings, start the writer thread.

        `resume` marks sends that were under way when the last process died as possibly received;
        only the process that owns sending (the daemon, or `flush --once`) may do that.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _own(path) if resume else None
        try:
            check_integrity(path)
            migrate(path)
        except BaseException:
            if lock is not None:
                lock.close()
            raise
        store = cls(path, settings=settings, clock=clock)
        store._lock_file = lock
        store._conn = connect(path, synchronous=settings.synchronous)
        store._conn.execute("BEGIN IMMEDIATE")
        try:
            store.rules.load(store._conn, owner=resume)
            store.origin = outbox.origin(store._conn)
            resumed = records.resume_in_flight(store._conn) if resume else 0
            stranded = _stranded_tenants(store._conn) if resume else {}
            store._conn.execute("COMMIT")
        except BaseException:
            store._conn.execute("ROLLBACK")
            store._conn.close()
            raise
        if resumed:
            log.warning("resumed_in_flight_records", records=resumed,
                        note="their earlier send may have reached AWS; they are resent unchanged")
        store._thread = threading.Thread(target=store._writer, name="sidecar-writer", daemon=True)
        store._thread.start()
        if resume:  # the owner only: a CLI command beside the daemon must not change its tenant map
            for tenant, ref in {**stranded, **settings.customers}.items():
                if store.rules._tenants.get(tenant) != ref.key or tenant in stranded:
                    source = "config" if tenant in settings.customers else "api"
                    store.call(functools.partial(store.rules.map_tenant, tenant=tenant, ref=ref, source=source))
        return store

    # ---- the writer thread -------------------------------------------------------------

    def _writer(self) -> None:
        assert self._conn is not None
        conn = self._conn
        while True:
            job = self._queue.get()
            if job is None:
                break
            if job.fn is not None:
                self._run_one(conn, job)
                continue
            group = [job]
            n = len(job.events)
            pending: _Job | bool | None = False
            while n < MAX_GROUP_EVENTS:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None or nxt.fn is not None:
                    pending = nxt
                    break
                group.append(nxt)
                n += len(nxt.events)
            self._run_group(conn, group, queued=n)
            if pending is None:
                break
            if isinstance(pending, _Job):
                self._run_one(conn, pending)
        conn.close()

    def _run_one(self, conn: sqlite3.Connection, job: _Job) -> None:
        if not job.wanted():
            return
        assert job.fn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = job.fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                self.rules.rolled_back()
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            self.rules.committed()  # in-memory state follows the database, never leads it
        except sqlite3.OperationalError as exc:
            _settle([(job, None, _unavailable(exc))])
        except BaseException as exc:
            _settle([(job, None, exc)])
        else:
            _settle([(job, result, None)])

    def _run_group(self, conn: sqlite3.Connection, group: list[_Job], *, queued: int) -> None:
        """Ingest several requests in one transaction; each request in its own savepoint.

        The `queued` events stop counting against backpressure before any caller is answered, so a
        client that retries right after its answer is never refused for its own earlier request.
        """
        group = [j for j in group if j.wanted()]
        if not group:
            self._unqueue(queued)
            return
        started = time.perf_counter()
        results: list[Outcome] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = self.clock.now()
                watermark = self.rules.watermark(now)
                conn.execute("SAVEPOINT grp")
                try:  # fast path: the whole group in one pass
                    for job, res in zip(group, self.rules.ingest(conn, [j.events for j in group], now, watermark),
                                        strict=True):
                        results.append((job, res, None))
                    conn.execute("RELEASE grp")
                except sqlite3.OperationalError:
                    raise
                except Exception:  # find the request that fails and fail only it
                    conn.execute("ROLLBACK TO grp")
                    conn.execute("RELEASE grp")
                    self.rules.rolled_back()
                    results.clear()
                    for job in group:
                        conn.execute("SAVEPOINT job")
                        try:
                            results.append((job, self.rules.ingest(conn, [job.events], now, watermark)[0], None))
                        except sqlite3.OperationalError:
                            raise
                        except Exception as exc:  # one bad request must not fail its neighbours
                            conn.execute("ROLLBACK TO job")
                            results.append((job, None, exc))
                        conn.execute("RELEASE job")
                conn.execute("COMMIT")
                self.rules.committed()
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                self.rules.rolled_back()
                raise
        except sqlite3.OperationalError as exc:
            err = _unavailable(exc)
            log.warning("ingest_commit_failed", error=str(exc), requests=len(group), disk_full=err.disk_full)
            self._unqueue(queued)
            _settle([(job, None, err) for job in group])
            return
        except BaseException as exc:
            self._unqueue(queued)
            _settle([(job, None, exc) for job in group])
            return
        self._unqueue(queued)
        _settle(results)
        if self.on_group is not None:
            self.on_group(len(group))
        log.debug(
            "ingest_committed",
            requests=len(group),
            events=sum(len(j.events) for j in group),
            ms=round((time.perf_counter() - started) * 1000, 2),
        )


    # ---- the SQLite runner (tests and this backend only; the product uses the domain methods) --

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Run `fn(conn)` in one write transaction on the writer thread."""
        if self._closed:
            raise StoreClosed("the store is closed")
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Job(fn=fn, future=fut))
        return fut

    def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Blocking form of `submit`, for start-up and tests."""
        return self.submit(fn).result()

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Awaitable form of `submit`."""
        if self._closed:
            raise StoreClosed("the store is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._queue.put(_Job(fn=fn, afuture=fut, loop=loop))
        return await fut

    def freeze(self, conn: sqlite3.Connection, *, now: float) -> int:
        """Freeze sealed buckets into records (pending, or held by a guardrail)."""
        return self.rules.freeze(conn, now=now)

    def seal_due_sync(self) -> int:
        """Blocking form of `seal_due`."""
        return self.call(self.rules.seal)

    def _unqueue(self, n: int) -> None:
        with self._queued_lock:
            self._queued_events -= n

    def _admit(self, n: int) -> None:
        """Count events into the writer's queue, or refuse them when it is already full (backpressure)."""
        if self._closed:
            raise StoreClosed("the store is closed")
        with self._queued_lock:
            if self._queued_events > 0 and self._queued_events + n > self.settings.max_queued_events:
                raise StoreBusy(f"{self._queued_events} events are waiting for the disk; retry shortly")
            self._queued_events += n

    # ---- ingest and mapping (protocol.MeteringStore) ----------------------------------------------

    def ingest_future(self, events: Sequence[UsageEvent]) -> concurrent.futures.Future[IngestResult]:
        """Queue validated events for the next group commit (for a caller without an event loop)."""
        self._admit(len(events))
        fut: concurrent.futures.Future[IngestResult] = concurrent.futures.Future()
        self._queue.put(_Job(fn=None, future=fut, events=events))
        return fut

    async def ingest(self, events: Sequence[UsageEvent]) -> IngestResult:
        """Store events durably (dedup by event_id, buckets updated in the same transaction)."""
        self._admit(len(events))
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[IngestResult] = loop.create_future()
        self._queue.put(_Job(fn=None, events=events, afuture=fut, loop=loop))
        return await fut

    async def check_writable(self, now: float) -> None:
        """A tiny write transaction: raises StoreUnavailable/StoreClosed when the database cannot commit."""
        await self.run(functools.partial(_stamp_health, now=now))

    async def map_tenant(self, tenant: str, ref: CustomerRef, *, source: str = "api",
                         aws_account_id: str | None = None) -> int:
        """Map a tenant to a customer; returns how many unmapped buckets joined its buckets."""
        return await self.run(lambda conn: self.rules.map_tenant(conn, tenant, ref, source,
                                                                 aws_account_id=aws_account_id))

    # ---- sending (protocol.SendingStore) --------------------------------------------------------

    async def prepare_flush(self, *, now: float) -> tuple[int, dict[str, int]]:
        """Seal due hours, freeze sealed buckets, close expired windows: one transaction."""

        def run(conn: sqlite3.Connection) -> tuple[int, dict[str, int]]:
            self.rules.seal(conn)
            frozen = self.rules.freeze(conn, now=now)
            return frozen, records.close_windows(conn, self.rules, now=now)

        return await self.run(run)

    async def claim(self, *, now: float, limit: int, owner: str = LOCAL_OWNER) -> list[records.DueRecord]:
        """The oldest due records of one scheme and product, marked in flight for `owner`."""
        return await self.run(functools.partial(records.claim, now=now, limit=limit, owner=owner))

    async def peek_due(self, *, now: float, limit: int) -> list[records.DueRecord]:
        """Due records without claiming them (dry run)."""
        return await self.run(functools.partial(records.peek_due, now=now, limit=limit))

    async def settle(self, settlements: Sequence[records.Settlement], *, now: float) -> None:
        """Write the outcomes of one call in one transaction."""
        await self.run(functools.partial(records.settle, settlements=settlements, now=now))

    async def close_records(self, ids: Sequence[int], *, now: float, reason: str) -> list[str]:
        """The window rule for records AWS refused for their timestamp (carry, expire or unknown)."""
        return await self.run(lambda conn: [records.close_window(conn, self.rules, rid, now=now, reason=reason)
                                            for rid in ids])

    async def due_now(self, *, held_until: float, now: float) -> int:
        """Records waiting until `held_until` or earlier become due now."""
        return await self.run(functools.partial(records.due_now, held_until=held_until, now=now))

    async def pending_summary(self) -> tuple[int, float | None]:
        """How many records are pending, and the earliest time one is due again."""
        return await self.run(records.pending_summary)

    async def apply_notice(self, notice: Notice, *, now: float) -> lifecycle.NoticeResult:
        """Apply a subscription notification in one transaction (see `Buckets.apply_notice`)."""
        return await self.run(lambda conn: self.rules.apply_notice(conn, notice, now=now))

    # ---- the hour lifecycle and housekeeping -----------------------------------------------------

    async def seal_due(self) -> int:
        """Seal every open bucket whose hour ended more than the grace period ago."""
        return await self.run(self.rules.seal)

    async def seal_through(self, before: int, *, final: bool = False) -> int:
        """Seal every open bucket of hours starting before `before` (used at shutdown); `final` also
        settles remainders by `settle_remainders` and reports the usage left behind."""
        return await self.run(lambda conn: self.rules.seal(conn, through=before, final=final))

    async def prune(self, *, batch: int = 1000, max_batches: int = 20) -> int:
        """Prune old event rows in small transactions, off the hot path; returns rows deleted."""
        total = 0
        for _ in range(max_batches):
            n = await self.run(lambda conn: self.rules.prune(conn, limit=batch))
            total += n
            if n < batch:
                break
        if total:
            log.info("events_pruned", rows=total)
        return total

    # ---- fleet mode: the outbox ------------------------------------------------------------------

    async def outbox_batch(self, *, limit: int = 5000) -> list[outbox.ShippedDelta]:
        """The oldest unshipped usage deltas, in order: read on a connection of its own (WAL lets it
        run beside the writer), so shipping never holds up ingest's group commits."""
        return await asyncio.to_thread(self._read, functools.partial(outbox.batch, limit=limit))

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        with queries.reader(self.path) as conn:
            return fn(conn)

    async def mark_shipped(self, through: int) -> None:
        """The fleet's PostgreSQL committed every delta up to seq `through`."""
        await self.run(functools.partial(outbox.mark_shipped, through=through))

    async def hand_over(self) -> dict[str, int]:
        """Fleet mode, once per file: move what a single-file store left into the outbox (see
        Buckets.hand_over); records already frozen stay and finish here."""
        return await self.run(lambda conn: self.rules.hand_over(conn, now=self.clock.now()))

    async def outbox_backlog(self) -> tuple[int, float | None]:
        """Unshipped deltas and when the oldest was committed (read beside the writer)."""
        return await asyncio.to_thread(self._read, outbox.backlog)

    # ---- operator decisions ---------------------------------------------------------------------

    async def check_rename(self, rename: Mapping[str, str]) -> None:
        """Raise ValueError unless every OLD=NEW names a configured NEW that measures what OLD did."""
        for old, new in rename.items():
            dim = self.rules.dimension(new)
            if dim is None:
                raise ValueError(f"--dimension: {new!r} is not a configured dimension "
                                 f"(configured: {', '.join(d.name for d in self.settings.dimensions)})")
            known = await self.run(functools.partial(_dimension_source, name=old))
            if known is not None and known != dim.source:
                raise ValueError(f"--dimension: {old!r} measured {known}, {new!r} measures "
                                 f"{dim.source}; usage cannot change what it measures")

    async def replay(self, *, states: Sequence[str], customer: str | None = None,
                     rename: Mapping[str, str] | None = None) -> dict[str, int]:
        """Re-drive rejected, conflict or expired records (see records.replay); returns counts."""
        await self.check_rename(rename or {})
        return await self.run(lambda conn: records.replay(
            conn, self.rules, states=states, now=self.clock.now(), customer=customer_clause(customer),
            rename=rename or {}))

    async def release_held(self, *, customer: str | None = None, dimension: str | None = None,
                           record_id: int | None = None, discard: bool = False) -> int:
        """Send (or discard) records a guardrail held; returns how many."""
        return await self.run(lambda conn: records.release_held(
            conn, customer=customer_clause(customer), dimension=dimension, record_id=record_id, discard=discard,
            now=self.clock.now()))

    async def discard_unmapped(self, *, customer: str) -> int:
        """Give up the unmapped usage of the tenant(s) `customer` names; returns buckets discarded."""
        clause = customer_clause(customer)
        assert clause is not None
        return await self.run(lambda conn: records.discard_unmapped(conn, customer=clause, now=self.clock.now()))

    async def release_parked(self, *, rename: Mapping[str, str], customer: str | None = None) -> int:
        """Move parked (`unconfigured`) usage into configured dimensions (OLD=NEW); returns rows moved."""
        await self.check_rename(rename)

        def run(conn: sqlite3.Connection) -> int:
            now = self.clock.now()
            into = {old: self.rules.dimension(new) for old, new in rename.items()}
            return sum(records.release_parked(conn, self.rules, dimension=old, into=dim,
                                              customer=customer_clause(customer), now=now)
                       for old, dim in into.items() if dim is not None)

        return await self.run(run)

    def close(self) -> None:
        """Finish queued work, then close the write connection."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join()
        if self._lock_file is not None:
            self._lock_file.close()  # releases the flock


def customer_clause(text: str | None) -> tuple[str, list[Any]] | None:
    """The exact-match SQL condition on `customer` for an operator's --customer value (None: any)."""
    return None if text is None else queries.customer_clause(text, "customer")


def _own(path: Path) -> IO[bytes]:
    """Take the exclusive lock that makes this process the file's only owner (a `.lock` beside it).

    Two owners (a daemon and `flush --once --final` on the same file, or two daemons on one EFS
    directory) would seal with different watermarks and send the same hours. The lock goes with the
    process, so a SIGKILLed owner never leaves it behind.
    """
    import fcntl

    handle = open(f"{path}.lock", "ab")  # noqa: SIM115  (held open for the store's lifetime)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise StoreLocked(f"{path}: another sidecar process (serve or flush) owns this database;"
                          " stop it first") from None
    return handle


def _stamp_health(conn: sqlite3.Connection, *, now: float) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES ('healthz_at', ?)"
                 " ON CONFLICT (key) DO UPDATE SET value = excluded.value", (str(int(now)),))
