"""Bucket rules: what happens to usage inside one write transaction.

Every method of `Buckets` runs inside a transaction that its caller (the writer thread of
`writer.Store`) has begun and will commit or roll back; none commits. In-memory caches (tenant
map, sealing watermark, known customer rows) change only through `_on_commit`, applied after the
commit, so they never run ahead of the database. The rules: ingest (dedup, hourly buckets,
engine intervals), parking what the configuration cannot bill, sealing (remainders carried,
heartbeats, GPU time shared, final settlement), a store's birth, tenant mapping, pruning.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import structlog

from sidecar import subscriptions
from sidecar.clock import HOUR_S, Clock, hour_start
from sidecar.config import MAX_QUANTITY, Dimension, Settings
from sidecar.events import UsageEvent
from sidecar.model import BucketState, CustomerRef, is_tenant_key, tenant_key
from sidecar.store import lifecycle, outbox, records
from sidecar.subscriptions import Notice, SubscriptionState
from sidecar.usage import (
    BucketKey,
    Delta,
    add_event,
    engine_interval,
    fair_shares,
    hour_pieces,
    sealing_watermark,
    settle_remainder,
    target_hour,
    uncovered_us,
    whole_units,
)

log = structlog.get_logger("sidecar.store")

WATERMARK_KEY = "sealed_before"
ALIVE_KEY = "alive_at"  # last time a process owned this file (updated at every sealing pass)
FIRST_HOUR_KEY = "first_hour"  # the earliest hour this store may start a new bucket in
DEDICATED_KEY = "dedicated_from_us"  # dedicated GPU time is billed up to here
GPU_SHARED_KEY = "gpu_shared_until"  # fair_share GPU time was shared out up to here (epoch s)
PRUNE_MARGIN_S = 3600


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one ingest call did: events newly stored and events already known."""

    accepted: int
    duplicates: int


class Buckets:
    """The bucket rules and the in-memory state they keep in step with the database."""

    def __init__(self, *, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self._dims = {d.name: d for d in settings.dimensions}
        self._gpu_dims = [d for d in settings.dimensions if d.gpu_mode is not None]
        self._fair_dims = [d for d in self._gpu_dims if d.gpu_mode == "fair_share"]
        self._dedicated_dims = [d for d in self._gpu_dims if d.gpu_mode == "dedicated"]
        self._tenants: dict[str, str] = {}
        self._watermark = 0
        self._final_sealed = False  # set by a final seal: the store is stopping
        self._on_commit: list[Callable[[], object]] = []  # in-memory updates to apply once committed
        self._known_customers: set[str] = set()  # customer rows known to be committed
        self._pending_customers: set[str] = set()  # written in the transaction under way
        self._floors: dict[str, int] = {}  # customer -> its hours before this are sealed (an ending agreement)
        self._ending: dict[str, int] = {}  # subscriber -> when its agreement began to end: usage sealed early
        self._gpu_shared_until = 0  # fair_share GPU time is shared out up to here (an ending customer's seal)
        self._ended: set[str] = set()  # subscribers whose subscription ended: their usage is parked
        self._accounts: dict[str, str] = {}  # identifier customer -> its AWS account (ResolveCustomer)

    def load(self, conn: sqlite3.Connection, *, owner: bool) -> None:
        """Read the tenant map and the watermark; the owner (serve, flush) also decides a birth."""
        self._tenants = {r["tenant"]: r["customer"] for r in conn.execute("SELECT tenant, customer FROM tenants")}
        # Only the process that owns sending decides a birth and the dedicated clock; a CLI
        # command beside the daemon (replay, release) must not move either.
        self._watermark = self._birth(conn) if owner else (_meta_int(conn, WATERMARK_KEY) or 0)
        self._record_dimensions(conn)
        self._floors = {r[0]: r[1] for r in conn.execute("SELECT customer, sealed_before FROM customer_floors")}
        self._ending = lifecycle.ending(conn)
        self._gpu_shared_until = _meta_int(conn, GPU_SHARED_KEY) or 0
        self._ended = lifecycle.by_state(conn, SubscriptionState.ENDED)
        self._accounts = dict(conn.execute("SELECT customer, aws_account_id FROM customer_accounts").fetchall())

    def committed(self) -> None:
        """Apply the in-memory updates of the transaction that just committed."""
        for apply in self._on_commit:
            apply()
        self._on_commit.clear()
        self._known_customers |= self._pending_customers
        self._pending_customers.clear()

    def rolled_back(self) -> None:
        """Forget the in-memory updates of a transaction that did not commit."""
        self._on_commit.clear()
        self._pending_customers.clear()

    def _birth(self, conn: sqlite3.Connection) -> int:
        """The sealing watermark at open; a store born now (or reopened after a gap) skips this hour.

        A fresh file (a replacement task) or one no process owned since before the current hour
        began cannot know whether another sidecar already reported this hour for its customers:
        AWS keeps the first record per key. With `birth_hour = "defer"` its usage of this hour goes
        into the next hour's record (`carried_in`), so it never sends a key a predecessor may have.
        """
        now = self.clock.now()
        stored = _meta_int(conn, WATERMARK_KEY) or 0
        alive = _meta_int(conn, ALIVE_KEY)
        if alive is None:
            alive = conn.execute("SELECT max(received_at) FROM events").fetchone()[0]
        watermark = stored
        if self.settings.birth_hour == "defer" and (alive is None or alive < hour_start(now)):
            first = hour_start(now) + HOUR_S
            watermark = max(stored, first)
            _set_meta(conn, FIRST_HOUR_KEY, max(_meta_int(conn, FIRST_HOUR_KEY) or 0, first))
            _set_meta(conn, WATERMARK_KEY, watermark)
            log.info("store_birth", last_alive_at=alive, reports_from_hour=first,
                     note="usage of the current hour goes into the next hour's record")
        _set_meta(conn, ALIVE_KEY, int(now))
        _set_meta(conn, DEDICATED_KEY, round(now * 1_000_000))  # a dedicated task bills from its start
        return watermark

    def _record_dimensions(self, conn: sqlite3.Connection) -> None:
        """Remember what each configured dimension's raw usage means, for usage a later release parks."""
        now = int(self.clock.now())
        conn.executemany(
            "INSERT INTO dimensions (name, source, unit, raw_unit, updated_at) VALUES (?,?,?,?,?)"
            " ON CONFLICT (name) DO UPDATE SET source = excluded.source, unit = excluded.unit,"
            " raw_unit = excluded.raw_unit, updated_at = excluded.updated_at",
            [(d.name, d.source, d.unit, d.raw_unit, now) for d in self.settings.dimensions],
        )

    def ingest(
        self, conn: sqlite3.Connection, batches: Sequence[Sequence[UsageEvent]], now: float, watermark: int
    ) -> list[IngestResult]:
        """Store the events not seen before and add their usage to buckets (we hold the write lock).

        Duplicates are found with one lookup for all batches (and among them: first one wins); new
        rows go in with one executemany. A row and its usage are written together or not at all.
        """
        known = {r[0] for r in conn.execute(
            "SELECT event_id FROM events WHERE event_id IN (SELECT value FROM json_each(?))",
            (json.dumps(list({e.event_id for b in batches for e in b})),))}
        deltas: dict[BucketKey, Delta] = {}
        shipping: dict[BucketKey, Delta] | None = {} if self.settings.fleet else None  # fleet mode's outbox
        now_s = int(now)
        new_customers: dict[str, CustomerRef | str] = {}
        rows = []
        results = []
        intervals: list[tuple[str, str, int, int, int]] = []  # event id, customer, start µs, end µs, time s
        for events in batches:
            accepted = 0
            for ev in events:
                if ev.event_id in known:
                    continue
                known.add(ev.event_id)
                accepted += 1
                if ev.customer is not None:
                    customer = ev.customer.key
                    new_customers.setdefault(customer, ev.customer)
                else:
                    assert ev.tenant is not None
                    mapped = self._tenants.get(ev.tenant)
                    customer = mapped if mapped is not None else tenant_key(ev.tenant)
                    if mapped is None:
                        new_customers.setdefault(customer, ev.tenant)
                hour, late = target_hour(ev.time, now=now, watermark=max(watermark, self._floors.get(customer, 0)))
                rows.append((ev.event_id, int(ev.time), now_s, customer, ev.tenant, hour, ev.model,
                             ev.prompt_tokens, ev.completion_tokens, ev.cached_tokens, ev.gpu_micros, ev.finish))
                if shipping is None:
                    add_event(deltas, ev, customer=customer, hour=hour, late=late,
                              dimensions=self.settings.dimensions)
                else:  # fleet mode: the fleet's store keeps the buckets and decides what is late
                    add_event(shipping, ev, customer=customer, hour=hour_start(ev.time), late=False,
                              dimensions=self.settings.dimensions)
                if self._gpu_dims:
                    span = engine_interval(ev)
                    if span is not None:
                        intervals.append((ev.event_id, customer, span[0], span[1], int(ev.time)))
            results.append(IngestResult(accepted=accepted, duplicates=len(events) - accepted))
        conn.executemany(
            "INSERT INTO events (event_id, time, received_at, customer, tenant, hour, model,"
            " prompt_tokens, completion_tokens, cached_tokens, gpu_micros, finish)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        self._ensure_customers(conn, new_customers)
        self.apply_deltas(conn, deltas)
        if shipping:
            outbox.add(conn, shipping, now=now)
        if intervals:
            self._record_intervals(conn, intervals, now=now, watermark=watermark)
        # Only once every write of this request succeeded: a request rolled back to its savepoint
        # must not leave a customer marked as written.
        self._pending_customers.update(new_customers)
        return results

    def _ensure_customers(self, conn: sqlite3.Connection, customers: dict[str, CustomerRef | str]) -> None:
        """Customer rows for keys this writer has not written yet (the set is a cache, not the truth)."""
        for key, who in customers.items():
            if key in self._known_customers:
                continue
            if isinstance(who, CustomerRef):
                conn.execute(
                    "INSERT INTO customers (customer, aws_account_id, license_arn, customer_identifier)"
                    " VALUES (?,?,?,?) ON CONFLICT DO NOTHING",
                    (key, who.aws_account_id, who.license_arn, who.customer_identifier),
                )
            else:
                conn.execute(
                    "INSERT INTO customers (customer, tenant) VALUES (?,?) ON CONFLICT DO NOTHING",
                    (key, who),
                )

    def apply_deltas(self, conn: sqlite3.Connection, deltas: dict[BucketKey, Delta]) -> None:
        """Add deltas to open buckets. A sealed bucket is never touched: that would be a bug.

        Usage keeps its unit: a delta whose dimension the running configuration lacks, or has with
        another unit, is parked (never sent) instead of being billed with a unit it was not
        measured in.
        """
        if not deltas:
            return
        rows = []
        now = int(self.clock.now())
        for (c, d, h), dl in deltas.items():
            if self._ended and self._ended_customer(c):  # AWS would refuse it: kept, never sent
                records.park_ended(conn, customer=c, dimension=d, hour=h, unit=dl.unit, raw=dl.raw,
                                   events=dl.events, first_event_at=dl.first_event_at, now=now)
                continue
            problem = self.unbillable(d, dl.unit)
            if problem is not None:
                records.park(conn, customer=c, dimension=d, hour=h, unit=dl.unit, raw=dl.raw, events=dl.events,
                             first_event_at=dl.first_event_at, reason=problem, now=now)
                continue
            floor = self._floors.get(c, 0)
            if h < floor:  # the customer's final usage was sealed up to `floor`: this goes into a later hour
                h, dl.carried_in = floor, dl.raw
            rows.append((c, d, h, BucketState.UNMAPPED if is_tenant_key(c) else BucketState.OPEN, dl.raw, dl.events,
                         dl.carried_in, dl.first_event_at, dl.unit))
        if not rows:
            return
        cur = conn.executemany(
            "INSERT INTO buckets (customer, dimension, hour, state, raw, events, carried_in,"
            " first_event_at, unit) VALUES (?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (customer, dimension, hour) DO UPDATE SET"
            " raw = raw + excluded.raw, events = events + excluded.events,"
            " carried_in = carried_in + excluded.carried_in,"
            " first_event_at = min(first_event_at, excluded.first_event_at)"
            " WHERE state IN ('open', 'unmapped')",
            rows,
        )
        if cur.rowcount != len(rows):
            raise RuntimeError("refusing to add usage to a sealed bucket")

    def _ended_customer(self, customer: str) -> bool:
        """Whether a subscription `customer` follows has ended."""
        return any(s in self._ended for s in lifecycle.subscribers_of(customer, self._accounts.get(customer)))

    def unbillable(self, dimension: str, raw_unit: int) -> str | None:
        """Why usage of `dimension` measured in `raw_unit` cannot be billed now, or None."""
        dim = self._dims.get(dimension)
        if dim is None:
            return f"dimension {dimension!r} is not in the running configuration"
        if dim.raw_unit != raw_unit:
            return (f"dimension {dimension!r} is configured with {dim.raw_unit} raw units per unit;"
                    f" this usage was measured with {raw_unit}")
        return None

    def watermark(self, now: float) -> int:
        """Hours starting before this are sealed or due to be (never moves back)."""
        return sealing_watermark(now, self.settings.hour_grace_s, self._watermark)

    def open_hour(self, now: float) -> int:
        """The hour that usage moved out of a record goes into: the earliest one not yet sealed."""
        return max(hour_start(now), self.watermark(now))

    def window_closes_at(self, timestamp: int) -> int:
        """When a record with this timestamp stops being worth a send (AWS's window, less a margin)."""
        return records.window_closes_at(timestamp, window_s=self.settings.window_s,
                                        margin_s=self.settings.window_margin_s)

    def dimension(self, name: str) -> Dimension | None:
        """The configured dimension called `name`, if any."""
        return self._dims.get(name)

    def seal(self, conn: sqlite3.Connection, *, through: int | None = None, final: bool = False) -> int:
        """Seal due hours; `through` also seals hours starting before it (shutdown seals the open hour).

        `final` (SIGTERM, `flush --once --final`) also settles remainders by `settle_remainders`.
        """
        now = self.clock.now()
        # The stored watermark too: it never moves back, whatever this process last saw.
        watermark = max(self.watermark(now), through or 0, _meta_int(conn, WATERMARK_KEY) or 0)
        if self.settings.heartbeats:
            self._add_heartbeats(conn, sealed_before=self._watermark, watermark=watermark, now=now)
        if self._gpu_dims:
            self._share_gpu_time(conn, watermark=watermark)
            if not self._final_sealed:  # after SIGTERM's seal, time would land in an hour nobody seals
                self._tick_dedicated(conn, now=now)
        rows = conn.execute(
            "SELECT customer, dimension, hour, raw, unit, events, first_event_at FROM buckets"
            " WHERE state = 'open' AND hour < ? ORDER BY hour, customer, dimension",
            (watermark,),
        ).fetchall()
        sealed = self._seal_rows(conn, rows, now=now)
        _set_meta(conn, WATERMARK_KEY, watermark)
        _set_meta(conn, ALIVE_KEY, int(now))
        if final:
            self._settle_remainders(conn, sealed_before=watermark, now=int(now))
            self._on_commit.append(functools.partial(setattr, self, "_final_sealed", True))
        self._on_commit.append(functools.partial(setattr, self, "_watermark", watermark))
        if rows:
            log.info("hours_sealed", buckets=sealed, parked=len(rows) - sealed, sealed_before=watermark)
        for who, began in sorted(self._ending.items()):
            before, settle = lifecycle.final_seal(now=now, began=began, final_seal_s=self.settings.final_seal_s)
            sealed += self._seal_ahead(conn, lifecycle.customers_of(conn, who), before=before, now=now, settle=settle)
        return sealed

    def _seal_rows(self, conn: sqlite3.Connection, rows: Sequence[sqlite3.Row], *, now: float,
                   wall: bool = True) -> int:
        """Seal these open buckets (oldest hour first): whole units now, the remainder carried on.
        Returns how many were sealed; the others (a dimension the release dropped) are parked."""
        parked = 0
        engine_hours: set[tuple[int, Dimension]] = set()
        for r in rows:
            problem = self.unbillable(r["dimension"], r["unit"])
            if problem is not None:  # e.g. a release dropped the dimension while its hour was open
                records.park(conn, customer=r["customer"], dimension=r["dimension"], hour=r["hour"],
                             unit=r["unit"], raw=r["raw"], events=r["events"], first_event_at=r["first_event_at"],
                             reason=problem, now=int(now))
                conn.execute("DELETE FROM buckets WHERE customer = ? AND dimension = ? AND hour = ?",
                             (r["customer"], r["dimension"], r["hour"]))
                parked += 1
                continue
            dim = self._dims[r["dimension"]]
            if dim.gpu_mode == "engine_time":
                _add_gpu_time(conn, r["hour"], dim, billed_us=r["raw"])
                engine_hours.add((r["hour"], dim))
            carry_row = conn.execute(
                "SELECT raw FROM carries WHERE customer = ? AND dimension = ?",
                (r["customer"], r["dimension"]),
            ).fetchone()
            carry = carry_row["raw"] if carry_row else 0
            quantity, remainder = whole_units(r["raw"], carry, r["unit"])
            conn.execute(
                "UPDATE buckets SET state = 'sealed', remainder_in = ?, quantity = ?, remainder = ?,"
                " sealed_at = ? WHERE customer = ? AND dimension = ? AND hour = ?",
                (carry, quantity, remainder, int(now), r["customer"], r["dimension"], r["hour"]),
            )
            conn.execute(
                "INSERT INTO carries (customer, dimension, raw) VALUES (?,?,?)"
                " ON CONFLICT (customer, dimension) DO UPDATE SET raw = excluded.raw",
                (r["customer"], r["dimension"], remainder),
            )
        for hour, dim in engine_hours if wall else ():  # beside what engine_time billed: the GPU time that passed
            _add_gpu_time(conn, hour, dim, wall_us=_busy_us(conn, hour) * self.settings.gpus)
        return len(rows) - parked

    def _seal_ahead(self, conn: sqlite3.Connection, customers: list[str], *, before: int, now: float,
                    settle: bool) -> int:
        """Seal the open buckets of these customers (of an ending subscriber) for every hour starting before
        `before` (the current hour included), ahead of the store's watermark: their agreement is
        ending and AWS takes their records for about one hour more. Their later usage goes into a
        later hour (`_floors`), sealed by `lifecycle.final_seal`'s rule. `settle`: a final record,
        whose remainder below one unit is settled by policy (no later record could carry it)."""
        if not customers:
            return 0

        def due() -> list[sqlite3.Row]:
            return conn.execute(
                "SELECT customer, dimension, hour, raw, unit, events, first_event_at FROM buckets"
                " WHERE state = 'open' AND hour < ? AND customer IN (SELECT value FROM json_each(?))"
                " ORDER BY hour, customer, dimension", (before, json.dumps(customers))).fetchall()

        rows = due()
        if rows and self._fair_dims:  # their GPU time up to now, shared out now, so it is in these records
            self._share_gpu_ahead(conn, now=int(now))  # only when records are made: sharing is coarser then
            rows = due()
        # The hour's GPU wall time is recorded once, when the store seals the hour.
        sealed = self._seal_rows(conn, rows, now=now, wall=False)
        if settle:
            self._settle_remainders(conn, sealed_before=before, now=int(now), customers=customers)
        moved = [c for c in customers if self._floors.get(c, 0) < before]
        conn.executemany("INSERT INTO customer_floors (customer, sealed_before) VALUES (?,?) ON CONFLICT (customer)"
                         " DO UPDATE SET sealed_before = max(sealed_before, excluded.sealed_before)",
                         [(c, before) for c in moved])
        self._on_commit.append(functools.partial(self._floors.update, dict.fromkeys(moved, before)))
        if rows:
            log.warning("final_usage_sealed", customers=len(customers), buckets=sealed, sealed_before=before)
        return sealed

    def apply_notice(self, conn: sqlite3.Connection, notice: Notice, *, now: float) -> lifecycle.NoticeResult:
        """Apply one subscription notification: store the subscriber's new state; an agreement
        ending seals that customer's open usage now (frozen, to be sent before anything else); an
        end parks what is still open. A duplicate or an older notification changes nothing."""
        notice, customers = lifecycle.scoped(notice, lifecycle.customers_of(conn, notice.subscriber))
        current = lifecycle.read(conn, notice.subscriber)
        new = subscriptions.apply(current, notice)
        if new is None:
            return lifecycle.NoticeResult(changed=False, state=None if current is None else current.state.value)
        lifecycle.write(conn, new, notice, now)
        who = notice.subscriber
        if not customers:
            log.warning("subscription_notice_matches_no_customer", subscriber=who, kind=notice.kind,
                        note="kept: usage of this subscriber that arrives later follows it")
        ending = new.state == SubscriptionState.PENDING_END
        self._on_commit.append(functools.partial(self._ending.__setitem__, who, new.end_began_at or notice.at)
                               if ending else functools.partial(self._ending.pop, who, None))
        self._on_commit.append(functools.partial(self._ended.add if new.state == SubscriptionState.ENDED
                                                 else self._ended.discard, who))
        sealed = frozen = parked = 0
        step = lifecycle.step(current, new)
        if step == lifecycle.Step.SEAL:
            sealed = self._seal_ahead(conn, customers, before=hour_start(now) + HOUR_S, now=now, settle=True)
            frozen = self.freeze(conn, now=now)
        elif step == lifecycle.Step.PARK:
            parked = self._park_open(conn, customers, now=int(now))
        log.info("subscription_changed", subscriber=who, state=new.state.value, kind=notice.kind,
                 at=notice.at, sealed=sealed, frozen=frozen, parked=parked)
        return lifecycle.NoticeResult(changed=True, state=new.state.value, sealed=sealed, frozen=frozen,
                                      parked=parked)

    def _park_open(self, conn: sqlite3.Connection, customers: list[str], *, now: int) -> int:
        """Park the open usage of these customers, whose subscription ended (AWS no longer accepts it)."""
        rows = conn.execute(
            "SELECT customer, dimension, hour, raw, unit, events, first_event_at FROM buckets"
            " WHERE state = 'open' AND customer IN (SELECT value FROM json_each(?))", (json.dumps(customers),)
        ).fetchall()
        for r in rows:
            records.park_ended(conn, customer=r["customer"], dimension=r["dimension"], hour=r["hour"],
                               unit=r["unit"], raw=r["raw"], events=r["events"],
                               first_event_at=r["first_event_at"], now=now)
            conn.execute("DELETE FROM buckets WHERE customer = ? AND dimension = ? AND hour = ?",
                         (r["customer"], r["dimension"], r["hour"]))
        return len(rows)

    def _record_intervals(self, conn: sqlite3.Connection, intervals: list[tuple[str, str, int, int, int]], *,
                          now: float, watermark: int) -> None:
        """Keep new engine intervals. For `fair_share` the part of one that lies in sealed hours
        (a late event, or the hour a store was born in) is billed at once as the GPU time no stored
        interval covers, in the open hour: time already shared out is never billed again. Without a
        `fair_share` dimension the intervals are kept only as coverage, already accounted (each
        event's own time went into its `engine_time` bucket), so a later release that switches to
        `fair_share` never shares them out a second time."""
        if not self._fair_dims:
            conn.executemany(
                "INSERT INTO engine_intervals (event_id, customer, start_us, end_us, pending_from_us)"
                " VALUES (?,?,?,?,?)", [(e, c, a, b, b) for e, c, a, b, _ in intervals])
            return
        wm_us = max(watermark, self._gpu_shared_until) * 1_000_000  # time before this is shared out
        late = [iv for iv in intervals if iv[2] < wm_us]
        conn.executemany(
            "INSERT INTO engine_intervals (event_id, customer, start_us, end_us, pending_from_us) VALUES (?,?,?,?,?)",
            [(e, c, a, b, a) for e, c, a, b, _ in intervals if a >= wm_us])
        open_hour = max(hour_start(now), watermark)
        deltas: dict[BucketKey, Delta] = {}
        for event_id, customer, a, b, when in late:
            stop = min(b, wm_us)
            covered = conn.execute("SELECT start_us, end_us FROM engine_intervals WHERE end_us > ? AND start_us < ?",
                                   (a, stop)).fetchall()
            free = uncovered_us(a, stop, [(r[0], r[1]) for r in covered]) * self.settings.gpus
            conn.execute("INSERT INTO engine_intervals (event_id, customer, start_us, end_us, pending_from_us)"
                         " VALUES (?,?,?,?,?)", (event_id, customer, a, b, stop))
            if free:
                self._account_gpu(conn, deltas, self._fair_dims, hour=open_hour, total_us=free,
                                  shares={customer: (free, 1)}, late=True, when=when)
        self.apply_deltas(conn, deltas)

    def _share_gpu_ahead(self, conn: sqlite3.Connection, *, now: int) -> None:
        """Share out the GPU time of every request up to `now` (not only of sealed hours): an ending
        customer's records must hold their GPU time. Intervals arriving later for that time are
        late (they add only time nobody covered), as at an hour's seal."""
        if now <= self._gpu_shared_until:
            return
        self._share_gpu_time(conn, watermark=now)
        _set_meta(conn, GPU_SHARED_KEY, now)
        self._on_commit.append(functools.partial(setattr, self, "_gpu_shared_until", now))

    def _share_gpu_time(self, conn: sqlite3.Connection, *, watermark: int) -> None:
        """Share out the GPU wall time of every hour about to be sealed among the requests that ran
        in it (`fair_share`), and record each hour's wall time.

        Intervals still waiting when the running release has no `fair_share` dimension were kept
        by one that had (their events added nothing per event): each is billed as its own engine
        time to the `engine_time` dimensions, so a change of mode neither drops nor doubles them."""
        wm_us = watermark * 1_000_000
        rows = conn.execute(
            "SELECT customer, start_us, end_us, pending_from_us FROM engine_intervals"
            " WHERE pending_from_us < end_us AND pending_from_us < ?", (wm_us,)).fetchall()
        if not rows:
            return
        by_hour: dict[int, list[tuple[str, int, int]]] = {}
        for r in rows:
            for hour, a, b in hour_pieces(r["pending_from_us"], min(r["end_us"], wm_us)):
                by_hour.setdefault(hour, []).append((r["customer"], a, b))
        deltas: dict[BucketKey, Delta] = {}
        engine = [d for d in self._gpu_dims if d.gpu_mode == "engine_time"]
        for hour, pieces in sorted(by_hour.items()):
            counts: dict[str, int] = {}
            for customer, _, _ in pieces:
                counts[customer] = counts.get(customer, 0) + 1
            if self._fair_dims:
                shares, total = fair_shares(pieces, gpus=self.settings.gpus)
            else:  # left waiting by a fair_share release: each request's own time
                shares, total = {}, 0
                for customer, a, b in pieces:
                    shares[customer] = shares.get(customer, 0) + b - a
            self._account_gpu(conn, deltas, self._fair_dims or engine, hour=hour, total_us=total, late=False,
                              when=hour, shares={c: (share, counts[c]) for c, share in shares.items()})
        conn.execute("UPDATE engine_intervals SET pending_from_us = min(end_us, ?)"
                     " WHERE pending_from_us < end_us AND pending_from_us < ?", (wm_us, wm_us))
        self.apply_deltas(conn, deltas)

    def _account_gpu(self, conn: sqlite3.Connection, deltas: dict[BucketKey, Delta], dims: Sequence[Dimension], *,
                     hour: int, total_us: int, shares: Mapping[str, tuple[int, int]], late: bool, when: int) -> None:
        """Add each customer's (µs, requests) to `dims`' buckets of `hour` (carried in when `late`),
        and record `total_us` of GPU wall time beside what was billed."""
        for dim in dims:
            if dim.gpu_mode != "engine_time":  # engine_time's billed time is counted from its buckets at sealing
                _add_gpu_time(conn, hour, dim, wall_us=total_us, billed_us=sum(a for a, _ in shares.values()))
            for customer, (amount, requests) in shares.items():
                d = deltas.setdefault((customer, dim.name, hour), Delta(unit=dim.raw_unit, first_event_at=when))
                d.raw += amount
                d.events += requests
                d.carried_in += amount if late else 0
                d.first_event_at = min(d.first_event_at, when)

    def _tick_dedicated(self, conn: sqlite3.Connection, *, now: float) -> None:
        """Bill a dedicated task's GPU wall time since the last tick to its customer, hour by hour
        (idle time included). Only this process's own run time counts, so a restart never bills an
        hour twice; the time between the last tick and a crash is not billed."""
        if not self._dedicated_dims:
            return
        now_us = round(now * 1_000_000)
        since = _meta_int(conn, DEDICATED_KEY) or now_us
        if since >= now_us:
            return
        open_hour = max(hour_start(now), self.watermark(now))
        deltas: dict[BucketKey, Delta] = {}
        for dim in self._dedicated_dims:
            who = dim.customer
            if isinstance(who, CustomerRef):
                key = who.key
                self._ensure_customers(conn, {key: who})
            else:
                assert who is not None
                key = self._tenants.get(who) or tenant_key(who)
                if is_tenant_key(key):
                    self._ensure_customers(conn, {key: who})
            for hour, a, b in hour_pieces(since, now_us):
                amount = (b - a) * self.settings.gpus
                late = hour < self._watermark
                target = open_hour if late else hour
                d = deltas.setdefault((key, dim.name, target), Delta(unit=dim.raw_unit, first_event_at=a // 1_000_000))
                d.raw += amount
                d.carried_in += amount if late else 0
                _add_gpu_time(conn, target, dim, wall_us=amount, billed_us=amount)
        _set_meta(conn, DEDICATED_KEY, now_us)
        self.apply_deltas(conn, deltas)

    def _settle_remainders(self, conn: sqlite3.Connection, *, sealed_before: int, now: int,
                           customers: Sequence[str] | None = None) -> None:
        """At a final seal: bill or give up each customer's remainder below one unit, by policy.

        The database of a task usually dies with it, and a remainder left in it would never be
        billed. The extra unit goes into the customer's latest bucket sealed (not yet frozen), or a
        new bucket of the last sealed hour when the store may report that hour. Every settlement is
        a row in `settlements` (for /metrics) and a log line.
        """
        policy = self.settings.settle_remainders
        if policy == "keep":
            return
        last_hour = sealed_before - HOUR_S
        first_hour = _meta_int(conn, FIRST_HOUR_KEY) or 0
        only = "" if customers is None else " AND customer IN (SELECT value FROM json_each(?))"
        for c in conn.execute(
            f"SELECT customer, dimension, raw FROM carries WHERE raw > 0 AND customer NOT LIKE 'tenant:%'{only}"
            " ORDER BY customer, dimension", () if customers is None else (json.dumps(list(customers)),)
        ).fetchall():
            dim = self._dims.get(c["dimension"])
            if dim is None:
                log.error("remainder_left_unconfigured", customer=c["customer"], dimension=c["dimension"],
                          raw=c["raw"], note="the dimension is not configured; the remainder stays in the database")
                continue
            units = settle_remainder(c["raw"], dim.raw_unit, policy)
            assert units is not None
            key = (c["customer"], c["dimension"])
            target = conn.execute(
                "SELECT hour, quantity FROM buckets WHERE customer = ? AND dimension = ? AND state = 'sealed'"
                " ORDER BY hour DESC LIMIT 1", key).fetchone()
            units = min(units, MAX_QUANTITY)
            hour: int | None = None
            if units and target is not None and target["quantity"] + units <= MAX_QUANTITY:
                hour = target["hour"]
                conn.execute("UPDATE buckets SET quantity = quantity + ?, remainder = 0"
                             " WHERE customer = ? AND dimension = ? AND hour = ?", (units, *key, hour))
            elif units:
                free = last_hour >= first_hour and conn.execute(
                    "SELECT 1 FROM buckets WHERE customer = ? AND dimension = ? AND hour = ?",
                    (*key, last_hour)).fetchone() is None
                if not free:
                    log.warning("remainder_kept", customer=key[0], dimension=key[1], raw=c["raw"],
                                note="no hour this store may report can take the unit; it stays carried")
                    continue
                hour = last_hour
                conn.execute(
                    "INSERT INTO buckets (customer, dimension, hour, state, raw, events, carried_in, first_event_at,"
                    " unit, remainder_in, quantity, remainder, sealed_at)"
                    " VALUES (?,?,?, 'sealed', 0, 0, 0, ?, ?, ?, ?, 0, ?)",
                    (*key, hour, hour, dim.raw_unit, c["raw"], units, now))
            elif target is not None:
                conn.execute("UPDATE buckets SET remainder = 0 WHERE customer = ? AND dimension = ? AND hour = ?",
                             (*key, target["hour"]))
            conn.execute("UPDATE carries SET raw = 0 WHERE customer = ? AND dimension = ?", key)
            conn.execute(
                "INSERT INTO settlements (customer, dimension, hour, raw, unit, units_added, policy, at)"
                " VALUES (?,?,?,?,?,?,?,?)", (*key, hour, c["raw"], dim.raw_unit, units, policy, now))
            billed = units * dim.raw_unit
            log.warning("remainder_settled", customer=key[0], dimension=key[1], raw=c["raw"], unit=dim.raw_unit,
                        billed_units=units, given_up_raw=max(0, c["raw"] - billed),
                        rounded_up_raw=max(0, billed - c["raw"]), policy=policy)

    def _add_heartbeats(self, conn: sqlite3.Connection, *, sealed_before: int, watermark: int, now: float) -> None:
        """Zero buckets for idle hours of customers active in the last N hours (AWS's recommendation).

        Only hours that are about to be sealed and not in the future; existing buckets are untouched.
        """
        lookback = self.settings.heartbeat_hours * HOUR_S
        first = max(sealed_before, watermark - 7 * 24 * HOUR_S)  # bounded after a long outage
        last = min(watermark, hour_start(now))
        for hour in range(first, last, HOUR_S):
            conn.execute(
                "INSERT INTO buckets (customer, dimension, hour, state, raw, events, carried_in, first_event_at, unit)"
                " SELECT DISTINCT b.customer, d.name, ?, 'open', 0, 0, 0, ?, d.unit"
                " FROM buckets b, (SELECT value ->> '$.name' AS name, value ->> '$.unit' AS unit FROM json_each(?)) d"
                " WHERE b.hour >= ? AND b.hour < ? AND b.events > 0 AND b.customer NOT LIKE 'tenant:%'"
                " ON CONFLICT (customer, dimension, hour) DO NOTHING",
                (hour, hour, json.dumps([{"name": d.name, "unit": d.raw_unit} for d in self.settings.dimensions]),
                 hour - lookback, hour),
            )

    def map_tenant(self, conn: sqlite3.Connection, tenant: str, ref: CustomerRef, source: str, *,
                   aws_account_id: str | None = None) -> int:
        """Map a tenant to a customer and move its unmapped usage into that customer's open buckets.
        `aws_account_id`: an identifier customer's account (kept apart: never part of a record)."""
        now = self.clock.now()
        key = ref.key
        self._ensure_customers(conn, {key: ref})
        if aws_account_id and ref.customer_identifier is not None:
            conn.execute("INSERT INTO customer_accounts (customer, aws_account_id) VALUES (?, ?)"
                         " ON CONFLICT (customer) DO UPDATE SET aws_account_id = excluded.aws_account_id",
                         (key, aws_account_id))
            self._on_commit.append(functools.partial(self._accounts.__setitem__, key, aws_account_id))
        conn.execute(
            "INSERT INTO tenants (tenant, customer, source, updated_at) VALUES (?,?,?,?)"
            " ON CONFLICT (tenant) DO UPDATE SET customer = excluded.customer,"
            " source = excluded.source, updated_at = excluded.updated_at",
            (tenant, key, source, int(now)),
        )
        src = tenant_key(tenant)
        watermark = self.watermark(now)
        current = max(hour_start(now), watermark)
        by_unit: dict[int, dict[BucketKey, Delta]] = {}  # releases' units never mix in one delta
        moved = conn.execute(
            "SELECT dimension, hour, raw, events, carried_in, first_event_at, unit FROM buckets"
            " WHERE customer = ? AND state = 'unmapped' ORDER BY hour",
            (src,),
        ).fetchall()
        for b in moved:
            late = b["hour"] < watermark
            hour = current if late else b["hour"]
            d = by_unit.setdefault(b["unit"], {}).setdefault(
                (key, b["dimension"], hour), Delta(unit=b["unit"], first_event_at=b["first_event_at"]))
            d.raw += b["raw"]
            d.events += b["events"]
            d.carried_in += b["raw"] if late else b["carried_in"]
            d.first_event_at = min(d.first_event_at, b["first_event_at"])
        conn.execute("DELETE FROM buckets WHERE customer = ? AND state = 'unmapped'", (src,))
        conn.execute(
            "UPDATE events SET customer = ?, hour = CASE WHEN hour < ? THEN ? ELSE hour END"
            " WHERE customer = ?",
            (key, watermark, current, src),
        )
        conn.execute("UPDATE engine_intervals SET customer = ? WHERE customer = ?", (key, src))
        for deltas in by_unit.values():
            self.apply_deltas(conn, deltas)
        self._on_commit.append(functools.partial(self._tenants.__setitem__, tenant, key))
        if moved:
            log.info("tenant_usage_mapped", tenant=tenant, buckets=len(moved))
        return len(moved)

    def prune(self, conn: sqlite3.Connection, *, limit: int) -> int:
        """Delete up to `limit` event rows that can no longer matter.

        A row is kept while a duplicate of it could still be accepted (its time is within
        SIDECAR_MAX_EVENT_AGE_S, so a repost is rejected for age rather than re-counted), for at
        least SIDECAR_RETENTION_S after it arrived, and while its bucket is not yet sent or final.
        """
        now = self.clock.now()
        cur = conn.execute(
            "DELETE FROM events WHERE event_id IN ("
            " SELECT e.event_id FROM events e WHERE e.received_at < ? AND e.time < ?"
            " AND NOT EXISTS (SELECT 1 FROM buckets b WHERE b.customer = e.customer AND b.hour = e.hour"
            "   AND b.state IN ('open', 'unmapped', 'sealed', 'pending'))"
            " LIMIT ?)",
            # An hour beyond the age horizon: event times are stored truncated to the second, and an
            # event validated a moment ago may still be queued behind this prune.
            (now - self.settings.retention_s, now - self.settings.max_event_age_s - PRUNE_MARGIN_S, limit),
        )
        conn.execute(
            "DELETE FROM engine_intervals WHERE event_id IN (SELECT event_id FROM engine_intervals"
            " WHERE end_us < ? AND pending_from_us >= end_us LIMIT ?)",
            (round((now - self.settings.max_event_age_s - PRUNE_MARGIN_S) * 1_000_000), limit))
        return cur.rowcount

    def hand_over(self, conn: sqlite3.Connection, *, now: float) -> dict[str, int]:
        """A file joining a fleet (fleet mode on a single-file store's file): records it already
        froze stay here and finish under the single-file rules (the member sends them itself); its
        sealed buckets are frozen now; its open and unmapped usage and its remainders go into the
        outbox, to join the fleet's buckets (the fleet decides which hour is still open)."""
        frozen = self.freeze(conn, now=now)
        moved: dict[BucketKey, Delta] = {}
        rows = conn.execute("SELECT customer, dimension, hour, unit, raw, events, first_event_at FROM buckets"
                            " WHERE state IN ('open', 'unmapped')").fetchall()
        for r in rows:
            moved[(r["customer"], r["dimension"], r["hour"])] = Delta(
                unit=r["unit"], raw=r["raw"], events=r["events"], first_event_at=r["first_event_at"])
        conn.execute("UPDATE buckets SET state = 'handed_over' WHERE state IN ('open', 'unmapped')")
        carried = 0
        for c in conn.execute("SELECT customer, dimension, raw FROM carries WHERE raw > 0").fetchall():
            dim = self._dims.get(c["dimension"])
            if dim is None:
                continue  # its dimension is gone: the remainder stays here, as a dropped dimension's does
            key = (c["customer"], c["dimension"], hour_start(now))
            delta = moved.setdefault(key, Delta(unit=dim.raw_unit, first_event_at=int(now)))
            delta.raw += c["raw"]
            conn.execute("UPDATE carries SET raw = 0 WHERE customer = ? AND dimension = ?",
                         (c["customer"], c["dimension"]))
            carried += 1
        outbox.add(conn, moved, now=now)
        if frozen or rows or carried:
            log.warning("file_handed_over_to_fleet", records_frozen=frozen, buckets=len(rows), remainders=carried,
                        note="records frozen before stay in this file and are sent by this member")
        return {"frozen": frozen, "buckets": len(rows), "remainders": carried}

    @property
    def guard(self) -> records.Guard:
        """The guardrails every record is checked against when it is frozen or rebuilt."""
        return records.Guard(dimensions=self._dims, spike_factor=self.settings.spike_factor,
                             unbillable=self.unbillable)

    def freeze(self, conn: sqlite3.Connection, *, now: float) -> int:
        """Freeze sealed buckets into records (pending, or held by a guardrail)."""
        return records.freeze(conn, now=now, product_code=self.settings.product_code, guard=self.guard)


def _meta_int(conn: sqlite3.Connection, key: str) -> int | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return int(row[0]) if row else None


def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                 (key, str(value)))


def _dimension_source(conn: sqlite3.Connection, *, name: str) -> str | None:
    row = conn.execute("SELECT source FROM dimensions WHERE name = ?", (name,)).fetchone()
    return None if row is None else str(row[0])


def _add_gpu_time(conn: sqlite3.Connection, hour: int, dim: Dimension, *, wall_us: int = 0, billed_us: int = 0) -> None:
    conn.execute(
        "INSERT INTO gpu_time (hour, dimension, mode, wall_us, billed_us) VALUES (?,?,?,?,?)"
        " ON CONFLICT (hour, dimension) DO UPDATE SET wall_us = wall_us + excluded.wall_us,"
        " billed_us = billed_us + excluded.billed_us",
        (hour, dim.name, dim.gpu_mode, wall_us, billed_us))


def _busy_us(conn: sqlite3.Connection, hour: int) -> int:
    """How much of the hour some stored engine interval covers (µs)."""
    lo, hi = hour * 1_000_000, (hour + HOUR_S) * 1_000_000
    spans = conn.execute("SELECT start_us, end_us FROM engine_intervals WHERE end_us > ? AND start_us < ?",
                         (lo, hi)).fetchall()
    return (hi - lo) - uncovered_us(lo, hi, [(r[0], r[1]) for r in spans])


def _stranded_tenants(conn: sqlite3.Connection) -> dict[str, CustomerRef]:
    """Mapped tenants that still have unmapped usage (mapped by a process whose writer did not know)."""
    out: dict[str, CustomerRef] = {}
    for r in conn.execute(
            "SELECT t.tenant, c.aws_account_id, c.license_arn, c.customer_identifier FROM tenants t"
            " JOIN customers c ON c.customer = t.customer WHERE EXISTS (SELECT 1 FROM buckets b"
            " WHERE b.customer = 'tenant:' || t.tenant AND b.state = 'unmapped')"):
        out[r[0]] = CustomerRef(aws_account_id=r[1], license_arn=r[2], customer_identifier=r[3])
    return out
