"""Fleet mode's shared store on PostgreSQL: members ship usage deltas into it, one leader sends from it.

Every member keeps its own SQLite file as the first durable stop (ingest never waits on the
network) and ships the deltas of its local outbox here (`ship`). The fleet's hour lifecycle runs
here with the single-file rules: buckets per (customer, dimension, hour) summing every member's
deltas; a delta for an hour already sealed goes to the customer's open hour as `carried_in`;
remainders carried per customer and dimension fleet-wide; one frozen record per bucket.

Only the holder of the `sender` lease seals, freezes, claims and settles. The lease row holds the
holder, an epoch (the fencing token, incremented by every new holder) and an expiry on
PostgreSQL's clock. Every leader transaction first locks the lease row FOR SHARE and checks that
it still holds it at its epoch: a deposed leader (paused, partitioned, its lease expired and
taken) changes nothing, and a takeover waits for a leader transaction under way to finish. A new
leader marks the records its predecessor had in flight as possibly received (resent unchanged).

Each async method is one transaction. Schema: `schema/pg/*.sql`, applied by `migrate` under an
advisory transaction lock so that members starting together are safe.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import AsyncConnection, AsyncCursor
from psycopg.rows import dict_row, tuple_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from sidecar.clock import HOUR_S, Clock, hour_start
from sidecar.config import MAX_QUANTITY, Settings
from sidecar.errors import FleetUnavailable, LeaseLost
from sidecar.model import (
    BucketState,
    CustomerRef,
    HoldOutcome,
    Outcome,
    RecordState,
    Scheme,
    is_tenant_key,
    tenant_key,
)
from sidecar.store import lifecycle, queries, records
from sidecar.store.db import schema_dir
from sidecar.store.outbox import ShippedDelta
from sidecar.store.queries import UsageFilter
from sidecar.store.records import DueRecord, Settlement
from sidecar.subscriptions import Notice, apply
from sidecar.usage import guardrail, record_timestamp, sealing_watermark, settle_remainder

log = structlog.get_logger("sidecar.fleet")

MIGRATION_LOCK = 0x51DECA4  # the advisory lock id members take while migrating
LEASE = "sender"


UnitKey = tuple[str, str, int, int]  # customer, dimension, hour, raw units per billed unit
Sums = dict[UnitKey, list[int]]  # -> [raw, events, carried_in, first_event_at]


def _add(sums: Sums, key: UnitKey, *, raw: int, events: int, carried_in: int, first_event_at: int) -> None:
    s = sums.setdefault(key, [0, 0, 0, first_event_at])
    s[0] += raw
    s[1] += events
    s[2] += carried_in
    s[3] = min(s[3], first_event_at)


def pg_schema_files() -> list[Path]:
    return sorted((schema_dir() / "pg").glob("[0-9][0-9][0-9]_*.sql"))


async def migrate(conn: AsyncConnection[Any]) -> list[str]:
    """Apply pending PostgreSQL migrations in one transaction under an advisory lock; names applied."""
    applied: list[str] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        await conn.execute("CREATE TABLE IF NOT EXISTS fleet_migrations (name TEXT PRIMARY KEY,"
                           " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())")
        cur = conn.cursor(row_factory=tuple_row)
        done = {r[0] for r in await (await cur.execute("SELECT name FROM fleet_migrations")).fetchall()}
        for path in pg_schema_files():
            if path.stem in done:
                continue
            await conn.execute(path.read_text(encoding="utf-8").encode())
            await conn.execute("INSERT INTO fleet_migrations (name) VALUES (%s)", (path.stem,))
            applied.append(path.stem)
    return applied


async def _first(cur: AsyncCursor[Any]) -> dict[str, Any]:
    row = await cur.fetchone()
    if row is None:
        raise RuntimeError("the fleet schema is missing a row it creates (run the migrations)")
    return dict(row)


class FleetStore:
    """The PostgreSQL store of one fleet, as one member sees it. Use `open()`; `close()` when done."""

    def __init__(self, pool: AsyncConnectionPool[Any], *, settings: Settings, clock: Clock, member_id: str) -> None:
        self.pool = pool
        self.settings = settings
        self.clock = clock
        self.member_id = member_id
        self.epoch: int | None = None  # the lease epoch while this member leads
        self._ready = False
        self._dims = {d.name: d for d in settings.dimensions}

    @classmethod
    async def open(cls, url: str, *, settings: Settings, clock: Clock, member_id: str,
                   max_size: int = 4, wait: bool = True) -> FleetStore:
        """Connect, migrate (under the lock), register this member and store the TOML mappings.

        With `wait=False` (a member starting while PostgreSQL is down) the pool connects in the
        background and `ready()` is retried by the member's loops until it succeeds.
        """
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            url, min_size=1, max_size=max_size, open=False, timeout=5,
            kwargs={"autocommit": True, "row_factory": dict_row, "connect_timeout": 5})
        await pool.open(wait=False)
        store = cls(pool, settings=settings, clock=clock, member_id=member_id)
        if wait:
            try:
                await store.ready()
            except BaseException:
                await pool.close()
                raise
        return store

    async def ready(self) -> None:
        """Migrate, join the fleet and store the configured mappings, once; raises while unreachable."""
        if self._ready:
            return
        async with self.pool.connection() as conn:
            applied = await migrate(conn)
            if applied:
                log.info("fleet_schema_migrated", applied=applied)
        await self.join()
        await self._birth()
        for tenant, ref in self.settings.customers.items():
            await self.map_tenant(tenant, ref, source="config")
        self._ready = True

    async def close(self) -> None:
        await self.pool.close()

    async def _birth(self) -> None:
        """A fleet born now (its first member on a fresh database) does not report the hour it was
        born in under `birth_hour = "defer"`: single-file tasks of the same product may already have
        sent that hour (a deployment moving to fleet mode). Its usage goes into the next hour."""
        if self.settings.birth_hour != "defer":
            return
        first = hour_start(self.clock.now()) + HOUR_S
        async with self.pool.connection() as conn:
            cur = await conn.execute("UPDATE meta SET value = %s WHERE key = 'sealed_before' AND value = 0"
                                     " RETURNING value", (first,))
            if await cur.fetchone() is not None:
                log.info("fleet_birth", reports_from_hour=first,
                         note="usage of the current hour goes into the next hour's record")

    # ---- members ------------------------------------------------------------------------------

    async def join(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute(
                "INSERT INTO members (member_id) VALUES (%s) ON CONFLICT (member_id) DO UPDATE SET"
                " started_at = now(), heartbeat_at = now(), stopped_at = NULL", (self.member_id,))

    async def heartbeat(self, *, backlog: int, backlog_since: float | None) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE members SET heartbeat_at = now(), backlog = %s, backlog_since = %s"
                               " WHERE member_id = %s", (backlog, backlog_since, self.member_id))

    async def leave(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE members SET stopped_at = now(), heartbeat_at = now() WHERE member_id = %s",
                               (self.member_id,))

    async def members(self) -> list[dict[str, Any]]:
        """Every member with its heartbeat age (s, on PostgreSQL's clock) and unshipped backlog."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT m.member_id, extract(epoch FROM now() - m.heartbeat_at)::float AS heartbeat_age_s,"
                " m.backlog, m.backlog_since, m.stopped_at IS NOT NULL AS stopped,"
                " (l.holder = m.member_id AND l.expires_at > now()) AS leader"
                " FROM members m CROSS JOIN lease l WHERE l.name = %s ORDER BY m.member_id", (LEASE,))
            return list(await cur.fetchall())

    # ---- shipping -----------------------------------------------------------------------------

    async def ship(self, origin: str, deltas: Sequence[ShippedDelta]) -> int:
        """Apply a member file's deltas once each, in one transaction; returns how many were new.

        Deltas come in seq order (the outbox's); those at or below the origin's `shipped_through`
        were applied by an earlier shipment whose answer the member did not see. Customer keys
        carry who they are (identifier, account + licence, or a tenant resolved here)."""
        if not deltas:
            return 0
        now = self.clock.now()
        async with self.pool.connection() as conn, conn.transaction():
            # Sealing holds this row FOR UPDATE: a shipment sees the watermark it works with stay put.
            cur = await conn.execute("SELECT value FROM meta WHERE key = 'sealed_before' FOR SHARE")
            stored = int((await _first(cur))["value"])
            await conn.execute("INSERT INTO origins (origin, member_id) VALUES (%s, %s)"
                               " ON CONFLICT (origin) DO NOTHING", (origin, self.member_id))
            cur = await conn.execute("SELECT shipped_through FROM origins WHERE origin = %s FOR UPDATE", (origin,))
            through = int((await _first(cur))["shipped_through"])
            fresh = {d.seq for d in deltas if d.seq > through}
            if not fresh:
                return 0
            await conn.execute("UPDATE origins SET shipped_through = %s, shipped_at = now(), member_id = %s"
                               " WHERE origin = %s", (max(fresh), self.member_id, origin))
            tenants = await self._tenant_map(conn, {d.customer for d in deltas if is_tenant_key(d.customer)})
            open_hour = max(hour_start(now), stored)
            sums: Sums = {}
            for d in deltas:
                if d.seq in fresh:
                    late = d.hour < stored
                    key = (tenants.get(d.customer, d.customer), d.dimension, open_hour if late else d.hour, d.unit)
                    _add(sums, key, raw=d.raw, events=d.events, carried_in=d.raw if late else 0,
                         first_event_at=d.first_event_at)
            await self._add_to_open(conn, sums, now=now)
        return len(fresh)

    async def _add_to_open(self, conn: AsyncConnection[Any], sums: Sums, *, now: float) -> None:
        """Add usage to open (or unmapped) buckets: the one way usage enters the fleet's buckets
        (shipments, tenant mappings, records carried into the open hour). Raises rather than add to
        a sealed bucket; usage whose unit disagrees with its bucket's is parked, never mixed."""
        if not sums:
            return
        await self._ensure_customers(conn, {k[0] for k in sums})
        sums = await self._follow_lifecycle(conn, sums, now=now)
        keep, park = await self._one_unit_per_bucket(conn, sums)
        rows = [(c, dim, h, unit, BucketState.UNMAPPED if is_tenant_key(c) else BucketState.OPEN, *sums[k])
                for k in keep for (c, dim, h, unit) in [k]]
        async with conn.cursor() as wcur:
            await wcur.executemany(
                "INSERT INTO buckets (customer, dimension, hour, unit, state, raw, events, carried_in,"
                " first_event_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s)"
                " ON CONFLICT (customer, dimension, hour) DO UPDATE SET raw = buckets.raw + excluded.raw,"
                " events = buckets.events + excluded.events,"
                " carried_in = buckets.carried_in + excluded.carried_in,"
                " first_event_at = least(buckets.first_event_at, excluded.first_event_at)"
                " WHERE buckets.state IN ('open', 'unmapped') AND buckets.unit = excluded.unit", rows)
            if wcur.rowcount != len(rows):  # an upsert that changed nothing would lose usage silently
                raise RuntimeError("refusing to add usage to a sealed bucket")
            await wcur.executemany(
                "INSERT INTO parked (customer, dimension, hour, unit, raw, events, first_event_at, reason,"
                " parked_at, state) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,'unconfigured')",
                [(*k, *sums[k][:2], sums[k][3], why, int(now)) for k, why in park.items()])
        for (c, dim, h, unit), why in park.items():
            log.error("usage_parked", customer=c, dimension=dim, hour=h, unit=unit, raw=sums[(c, dim, h, unit)][0],
                      reason=why, hint="the fleet's members disagree on this dimension's unit; finish the rollout")

    async def _follow_lifecycle(self, conn: AsyncConnection[Any], sums: Sums, *, now: float) -> Sums:
        """Usage of a customer whose subscription ended is parked (never sent); usage of a customer
        whose final usage was sealed ahead of the fleet's watermark goes into a later hour."""
        customers = sorted({k[0] for k in sums})
        cur = await conn.execute(
            "SELECT u.customer, f.sealed_before, s.state FROM unnest(%s::text[]) AS u(customer)"
            " LEFT JOIN customer_floors f ON f.customer = u.customer"
            " LEFT JOIN subscriptions s ON s.state = 'ended'"
            f"   AND s.subscriber IN ({lifecycle.subscribers_sql('u.customer', pg=True)})", (customers,))
        found = {r["customer"]: r for r in await cur.fetchall()}
        if not any(r["sealed_before"] is not None or r["state"] is not None for r in found.values()):
            return sums
        out: Sums = {}
        for (c, dim, h, unit), (raw, events, carried_in, first) in sums.items():
            row = found[c]
            if row["state"] is not None:
                await self._park_ended(conn, (c, dim, h, unit), raw=raw, events=events, first_event_at=first,
                                       now=now)
                continue
            floor = int(row["sealed_before"] or 0)
            late = h < floor  # the customer's final usage was sealed up to `floor`
            _add(out, (c, dim, floor if late else h, unit), raw=raw, events=events,
                 carried_in=raw if late else carried_in, first_event_at=first)
        return out

    async def _park_ended(self, conn: AsyncConnection[Any], key: UnitKey, *, raw: int, events: int,
                          first_event_at: int, now: float) -> None:
        """Keep usage of a customer whose subscription ended, one row per bucket key and unit."""
        cur = await conn.execute(
            "UPDATE parked SET raw = raw + %s, events = events + %s, first_event_at = least(first_event_at, %s),"
            " parked_at = %s WHERE (customer, dimension, hour, unit) = (%s, %s, %s, %s) AND state = 'ended'",
            (raw, events, first_event_at, int(now), *key))
        if cur.rowcount:
            return
        await conn.execute(
            "INSERT INTO parked (customer, dimension, hour, unit, raw, events, first_event_at, reason, parked_at,"
            " state) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,'ended')",
            (*key, raw, events, first_event_at, records.ENDED_REASON, int(now)))
        log.warning("usage_parked_after_end", customer=key[0], dimension=key[1], hour=key[2], raw=raw,
                    note="the customer's subscription ended; AWS no longer accepts their records")

    async def _one_unit_per_bucket(self, conn: AsyncConnection[Any], sums: Sums
                                   ) -> tuple[list[UnitKey], dict[UnitKey, str]]:
        """Which new sums go into buckets and which are parked: a bucket keeps the unit it has (or,
        new, the unit this member configures, else the first seen); usage measured with another
        unit (members of two releases that disagree on a dimension's unit) is parked, never mixed."""
        keys = sorted(sums)
        cur = await conn.execute(
            "SELECT customer, dimension, hour, unit FROM buckets WHERE (customer, dimension, hour) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[]))",
            ([k[0] for k in keys], [k[1] for k in keys], [k[2] for k in keys]))
        unit_of = {(r["customer"], r["dimension"], int(r["hour"])): int(r["unit"]) for r in await cur.fetchall()}
        offered: dict[tuple[str, str, int], set[int]] = {}
        for c, dim, h, unit in keys:
            offered.setdefault((c, dim, h), set()).add(unit)
        for (c, dim, h), units in offered.items():
            if (c, dim, h) not in unit_of:  # a new bucket: this release's unit if offered, else the smallest
                mine = self._dims.get(dim)
                unit_of[(c, dim, h)] = mine.raw_unit if mine is not None and mine.raw_unit in units else min(units)
        keep: list[UnitKey] = []
        park: dict[UnitKey, str] = {}
        for c, dim, h, unit in keys:
            if unit_of[(c, dim, h)] == unit:
                keep.append((c, dim, h, unit))
            else:
                park[(c, dim, h, unit)] = (f"dimension {dim!r}: this usage was measured with {unit} raw units per"
                                           f" unit; its bucket has {unit_of[(c, dim, h)]}")
        return keep, park

    async def _tenant_map(self, conn: AsyncConnection[Any], keys: Iterable[str]) -> dict[str, str]:
        names = [k.removeprefix(Scheme.TENANT) for k in keys]
        if not names:
            return {}
        cur = await conn.execute("SELECT tenant, customer FROM tenants WHERE tenant = ANY(%s)", (names,))
        return {tenant_key(r["tenant"]): r["customer"] for r in await cur.fetchall()}

    async def _ensure_customers(self, conn: AsyncConnection[Any], keys: Iterable[str]) -> None:
        rows: list[tuple[str, str | None, str | None, str | None, str | None]] = []
        for key in sorted(keys):
            if is_tenant_key(key):
                rows.append((key, None, None, None, key.removeprefix(Scheme.TENANT)))
            else:
                ref = CustomerRef.from_key(key)
                rows.append((key, ref.aws_account_id, ref.license_arn, ref.customer_identifier, None))
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO customers (customer, aws_account_id, license_arn, customer_identifier, tenant)"
                " VALUES (%s,%s,%s,%s,%s) ON CONFLICT (customer) DO NOTHING", rows)

    # ---- tenant mapping -----------------------------------------------------------------------

    async def map_tenant(self, tenant: str, ref: CustomerRef, *, source: str = "api",
                         aws_account_id: str | None = None) -> int:
        """Map a tenant fleet-wide; its unmapped buckets join the customer's. Returns buckets moved.
        Raises FleetUnavailable when PostgreSQL cannot be reached (nothing was mapped)."""
        try:
            return await self._map_tenant(tenant, ref, source, aws_account_id)
        except (psycopg.Error, PoolTimeout) as exc:
            raise FleetUnavailable(f"the fleet's database: {exc}") from exc

    async def _map_tenant(self, tenant: str, ref: CustomerRef, source: str, aws_account_id: str | None) -> int:
        now = self.clock.now()
        async with self.pool.connection() as conn, conn.transaction():
            await conn.execute("SELECT value FROM meta WHERE key = 'sealed_before' FOR SHARE")
            await self._ensure_customers(conn, [ref.key])
            if aws_account_id and ref.customer_identifier is not None:
                await conn.execute("INSERT INTO customer_accounts (customer, aws_account_id) VALUES (%s, %s)"
                                   " ON CONFLICT (customer) DO UPDATE SET aws_account_id = excluded.aws_account_id",
                                   (ref.key, aws_account_id))
            await conn.execute(
                "INSERT INTO tenants (tenant, customer, source, mapped_at) VALUES (%s,%s,%s,%s)"
                " ON CONFLICT (tenant) DO UPDATE SET customer = excluded.customer, source = excluded.source,"
                " mapped_at = excluded.mapped_at", (tenant, ref.key, source, int(now)))
            cur = await conn.execute(
                "DELETE FROM buckets WHERE customer = %s AND state = 'unmapped'"
                " RETURNING dimension, hour, unit, raw, events, carried_in, first_event_at", (tenant_key(tenant),))
            moved = await cur.fetchall()
            stored = await self._watermark(conn)
            open_hour = max(hour_start(now), stored)
            sums: Sums = {}
            for b in moved:
                late = b["hour"] < stored
                _add(sums, (ref.key, b["dimension"], open_hour if late else int(b["hour"]), int(b["unit"])),
                     raw=int(b["raw"]), events=int(b["events"]),
                     carried_in=int(b["carried_in"]) + (int(b["raw"]) if late else 0),
                     first_event_at=int(b["first_event_at"]))
            await self._add_to_open(conn, sums, now=now)
        return len(moved)

    # ---- the lease ----------------------------------------------------------------------------

    async def acquire_lease(self) -> int | None:
        """Take the sender lease if it is free or expired; the new epoch, or None when another holds it.

        The taker marks records its predecessor had in flight as possibly received: their send may
        have reached AWS, so they are resent byte for byte, never re-stamped.
        """
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE lease SET holder = %s, epoch = epoch + 1,"
                " expires_at = now() + make_interval(secs => %s)"
                " WHERE name = %s AND (expires_at <= now() OR holder IS NULL) RETURNING epoch",
                (self.member_id, self.settings.lease_s, LEASE))
            row = await cur.fetchone()
            if row is None:
                return None
            cur = await conn.execute(
                "UPDATE records SET in_flight = false, maybe_received = true,"
                " last_error = coalesce(last_error || '; ', '') || 'the sender changed during a send; outcome unknown'"
                " WHERE in_flight RETURNING id")
            resumed = len(await cur.fetchall())
        self.epoch = int(row["epoch"])
        log.info("lease_acquired", member=self.member_id, epoch=self.epoch, resumed_in_flight=resumed)
        return self.epoch

    async def renew_lease(self) -> bool:
        """Extend the lease while it is still ours; False (and no longer leading) when it is not."""
        if self.epoch is None:
            return False
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE lease SET expires_at = now() + make_interval(secs => %s)"
                " WHERE name = %s AND holder = %s AND epoch = %s AND expires_at > now() RETURNING epoch",
                (self.settings.lease_s, LEASE, self.member_id, self.epoch))
            if await cur.fetchone() is None:
                log.warning("lease_lost", member=self.member_id, epoch=self.epoch)
                self.epoch = None
                return False
        return True

    async def release_lease(self) -> None:
        """Give the lease up at once (shutdown), so another member takes over without waiting."""
        if self.epoch is None:
            return
        async with self.pool.connection() as conn:
            await conn.execute("UPDATE lease SET expires_at = '-infinity' WHERE name = %s AND holder = %s"
                               " AND epoch = %s", (LEASE, self.member_id, self.epoch))
        log.info("lease_released", member=self.member_id, epoch=self.epoch)
        self.epoch = None

    async def _fence(self, conn: AsyncConnection[Any]) -> int:
        """Inside a leader transaction: hold the lease row and check it is still ours at our epoch."""
        if self.epoch is None:
            raise LeaseLost(f"{self.member_id} does not hold the sender lease")
        cur = await conn.execute(
            "SELECT epoch FROM lease WHERE name = %s AND holder = %s AND epoch = %s AND expires_at > now()"
            " FOR SHARE", (LEASE, self.member_id, self.epoch))
        if await cur.fetchone() is None:
            epoch, self.epoch = self.epoch, None
            raise LeaseLost(f"{self.member_id}: the sender lease of epoch {epoch} expired or was taken")
        return self.epoch

    # ---- the hour lifecycle (leader only) --------------------------------------------------------

    async def _watermark(self, conn: AsyncConnection[Any]) -> int:
        cur = await conn.execute("SELECT value FROM meta WHERE key = 'sealed_before'")
        return int((await _first(cur))["value"])

    async def _seal(self, conn: AsyncConnection[Any], *, through: int | None = None) -> int:
        """Seal due hours, set-based: one statement per hour (oldest first, since an hour's remainder
        is the next hour's `remainder_in`) seals every open bucket of it and carries its remainders."""
        now = self.clock.now()
        cur = await conn.execute("SELECT value FROM meta WHERE key = 'sealed_before' FOR UPDATE")
        stored = int((await _first(cur))["value"])
        watermark = max(sealing_watermark(now, self.settings.hour_grace_s, stored), through or 0)
        cur = await conn.execute("SELECT DISTINCT hour FROM buckets WHERE state = 'open' AND hour < %s ORDER BY hour",
                                 (watermark,))
        sealed = 0
        for hour in [int(r["hour"]) for r in await cur.fetchall()]:
            sealed += await self._seal_hour(conn, hour, now=now)
        await conn.execute("UPDATE meta SET value = %s WHERE key = 'sealed_before'", (watermark,))
        if sealed:
            log.info("fleet_hours_sealed", buckets=sealed, sealed_before=watermark)
        cur = await conn.execute("SELECT subscriber, coalesce(end_began_at, state_at) AS began FROM subscriptions"
                                 " WHERE state = 'pending_end' ORDER BY subscriber")
        for r in await cur.fetchall():
            before, settle = lifecycle.final_seal(now=now, began=int(r["began"]),
                                                  final_seal_s=self.settings.final_seal_s)
            sealed += await self._seal_ahead(conn, await self._customers_of(conn, [r["subscriber"]]), before=before,
                                             now=now, settle=settle)
        return sealed

    async def _seal_hour(self, conn: AsyncConnection[Any], hour: int, *, now: float,
                         customers: list[str] | None = None) -> int:
        """Seal the open buckets of one hour (of these customers only, if given) in two statements."""
        only = "" if customers is None else " AND b.customer = ANY(%(c)s)"
        # Each bucket's carry joins by primary key (no self-join: linear in the hour's buckets);
        # the sealing UPDATE then reads that remainder_in as the row's old value.
        await conn.execute(
            "UPDATE buckets b SET remainder_in = c.raw FROM carries c WHERE b.state = 'open' AND b.hour = %(h)s"
            f" AND (c.customer, c.dimension) = (b.customer, b.dimension){only}", {"h": hour, "c": customers})
        cur = await conn.execute(
            "WITH done AS (UPDATE buckets b SET state = 'sealed', remainder_in = coalesce(remainder_in, 0),"
            "   quantity = least((raw + coalesce(remainder_in, 0)) / unit, %(max)s),"
            "   remainder = raw + coalesce(remainder_in, 0) - least((raw + coalesce(remainder_in, 0)) / unit,"
            f"   %(max)s) * unit, sealed_at = %(now)s WHERE state = 'open' AND hour = %(h)s{only}"
            "   RETURNING customer, dimension, remainder)"
            " INSERT INTO carries (customer, dimension, raw) SELECT customer, dimension, remainder FROM done"
            " ON CONFLICT (customer, dimension) DO UPDATE SET raw = excluded.raw",
            {"h": hour, "max": MAX_QUANTITY, "now": int(now), "c": customers})
        return cur.rowcount

    async def _customers_of(self, conn: AsyncConnection[Any], subscribers: Iterable[str]) -> list[str]:
        """The fleet's customer keys these subscribers name (an account may hold several licences)."""
        out: set[str] = set()
        for s in subscribers:
            if "/" in s:  # one licence's customer (after that licence's end)
                cur = await conn.execute("SELECT customer FROM customers WHERE customer = %s", (s,))
            elif s.startswith(Scheme.ACCOUNT):  # every licence of the account, and its identifier customers
                cur = await conn.execute("SELECT customer FROM customers WHERE starts_with(customer, %s)"
                                         " UNION SELECT customer FROM customer_accounts WHERE aws_account_id = %s",
                                         (s + "/", s.removeprefix(Scheme.ACCOUNT)))
            else:
                cur = await conn.execute("SELECT customer FROM customers WHERE customer = %s", (s,))
            out |= {r["customer"] for r in await cur.fetchall()}
        return sorted(out)

    async def _seal_ahead(self, conn: AsyncConnection[Any], customers: list[str], *, before: int,
                          now: float, settle: bool) -> int:
        """Seal these customers' open buckets of every hour starting before `before` (the current
        hour included): their agreement is ending (see `Buckets._seal_ahead`)."""
        if not customers:
            return 0
        cur = await conn.execute("SELECT DISTINCT hour FROM buckets WHERE state = 'open' AND hour < %s"
                                 " AND customer = ANY(%s) ORDER BY hour", (before, customers))
        sealed = 0
        for hour in [int(r["hour"]) for r in await cur.fetchall()]:
            sealed += await self._seal_hour(conn, hour, now=now, customers=customers)
        if settle:  # a final record: a remainder below one unit would never be billed after the end
            await self._settle_remainders(conn, customers=customers, sealed_before=before)
        await conn.execute(
            "INSERT INTO customer_floors (customer, sealed_before) SELECT unnest(%s::text[]), %s"
            " ON CONFLICT (customer) DO UPDATE SET sealed_before = greatest(customer_floors.sealed_before,"
            " excluded.sealed_before)", (customers, before))
        if sealed:
            log.warning("final_usage_sealed", customers=len(customers), buckets=sealed, sealed_before=before)
        return sealed

    async def apply_notice(self, notice: Notice, *, now: float) -> lifecycle.NoticeResult:
        """Apply a subscription notification fleet-wide (the leader only; see `Buckets.apply_notice`)."""
        async with self.pool.connection() as conn, conn.transaction():
            await self._fence(conn)
            # As sealing does: shipments wait, so none adds to a bucket this seals or parks.
            await conn.execute("SELECT value FROM meta WHERE key = 'sealed_before' FOR UPDATE")
            notice, customers = lifecycle.scoped(notice, await self._customers_of(conn, [notice.subscriber]))
            cur = await conn.execute("SELECT * FROM subscriptions WHERE subscriber = %s FOR UPDATE",
                                     (notice.subscriber,))
            row = await cur.fetchone()
            current = None if row is None else lifecycle.from_row(row)
            new = apply(current, notice)
            if new is None:
                return lifecycle.NoticeResult(changed=False, state=None if current is None else current.state.value)
            await conn.execute(lifecycle.UPSERT.format(p="%s"), lifecycle.row_values(new, notice, now))
            sealed = frozen = parked = 0
            who = notice.subscriber
            if not customers:
                log.warning("subscription_notice_matches_no_customer", subscriber=who, kind=notice.kind,
                            note="kept: usage of this subscriber that arrives later follows it")
            step = lifecycle.step(current, new)
            if step == lifecycle.Step.SEAL:
                sealed = await self._seal_ahead(conn, customers, before=hour_start(now) + HOUR_S, now=now, settle=True)
                frozen = await self._freeze(conn, now=now)
            elif step == lifecycle.Step.PARK:
                parked = await self._park_open(conn, customers, now=now)
        log.info("subscription_changed", subscriber=who, state=new.state.value, kind=notice.kind, at=notice.at,
                 sealed=sealed, frozen=frozen, parked=parked)
        return lifecycle.NoticeResult(changed=True, state=new.state.value, sealed=sealed, frozen=frozen,
                                      parked=parked)

    async def _park_open(self, conn: AsyncConnection[Any], customers: list[str], *, now: float) -> int:
        """Park the open usage of these customers, whose subscription ended."""
        cur = await conn.execute(
            "DELETE FROM buckets WHERE state = 'open' AND customer = ANY(%s)"
            " RETURNING customer, dimension, hour, unit, raw, events, first_event_at", (customers,))
        rows = await cur.fetchall()
        for r in rows:
            await self._park_ended(conn, (r["customer"], r["dimension"], int(r["hour"]), int(r["unit"])),
                                   raw=int(r["raw"]), events=int(r["events"]),
                                   first_event_at=int(r["first_event_at"]), now=now)
        return len(rows)

    async def _freeze(self, conn: AsyncConnection[Any], *, now: float) -> int:
        """Freeze every sealed bucket into one record (pending, or held by a guardrail), in bulk."""
        cur = await conn.execute(
            "SELECT b.customer, b.dimension, b.hour, b.quantity, b.unit, b.first_event_at, c.aws_account_id,"
            " c.license_arn, c.customer_identifier,"
            " (SELECT max(r.quantity) FROM records r WHERE (r.customer, r.dimension) = (b.customer, b.dimension)"
            "   AND r.hour >= b.hour - %s AND r.hour < b.hour AND r.state = 'sent') AS history"
            " FROM buckets b JOIN customers c ON c.customer = b.customer"
            " WHERE b.state = 'sealed' ORDER BY b.hour, b.customer, b.dimension FOR UPDATE OF b",
            (records.HISTORY_S,))
        rows: list[tuple[Any, ...]] = []
        held: list[tuple[str, str, int, int, str]] = []
        for r in await cur.fetchall():
            ts = record_timestamp(int(r["hour"]), int(r["first_event_at"]))
            built = records.build_payload(r, dimension=r["dimension"], quantity=int(r["quantity"]), timestamp=ts,
                                          product_code=self.settings.product_code)
            if built is None:
                log.error("product_code_missing", customer=r["customer"],
                          hint="set SIDECAR_PRODUCT_CODE to send CustomerIdentifier records")
                continue
            payload, code = built
            rule = self._guardrail(r["dimension"], int(r["quantity"]), unit=int(r["unit"]),
                                   history=None if r["history"] is None else int(r["history"]))
            state = RecordState.PENDING if rule is None else RecordState.HELD
            rows.append((r["customer"], r["dimension"], r["hour"], ts, r["quantity"], r["customer_identifier"], code,
                         records.payload_json(payload), state, int(now)))
            if rule is not None:
                held.append((r["customer"], r["dimension"], int(r["hour"]), int(r["quantity"]), rule))
        if not rows:
            return 0
        async with conn.cursor() as wcur:
            await wcur.executemany(
                "INSERT INTO records (customer, dimension, hour, timestamp, quantity, customer_identifier,"
                " product_code, payload, state, created_at) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)", rows)
        await conn.execute(
            "UPDATE buckets b SET state = r.state FROM records r WHERE b.state = 'sealed'"
            " AND (r.customer, r.dimension, r.hour) = (b.customer, b.dimension, b.hour)")
        for customer, dimension, hour, quantity, rule in held:
            cur = await conn.execute(
                "INSERT INTO holds (record_id, rule, held_at) SELECT id, %s, %s FROM records"
                " WHERE (customer, dimension, hour) = (%s, %s, %s) RETURNING record_id",
                (rule, int(now), customer, dimension, hour))
            record_id = (await _first(cur))["record_id"]
            log.error("record_held", record=record_id, customer=customer, dimension=dimension, hour=hour,
                      quantity=quantity, rule=rule,
                      hint="check it, then `sidecar release --state held` (with SIDECAR_FLEET_URL)")
        return len(rows)

    def _guardrail(self, dimension: str, quantity: int, *, unit: int, history: int | None) -> str | None:
        """Why a record must be held (the single-file rules: ceiling, spike against the most the
        customer was billed in an hour of the last 7 days, `history`), or None. Usage of a dimension
        this release does not configure, or configures with another unit, is held too (fleet mode
        has no parking)."""
        dim = self._dims.get(dimension)
        if dim is None:
            return f"unconfigured: dimension {dimension!r} is not in the running configuration"
        if dim.raw_unit != unit:
            return f"unconfigured: {dimension!r} is configured with {dim.raw_unit} raw units per unit, not {unit}"
        return guardrail(quantity, ceiling=dim.ceiling, floor=dim.floor, spike_factor=self.settings.spike_factor,
                         history_max=history)

    async def seal_through(self, before: int, *, final: bool = False) -> int:
        """Seal every open bucket of hours starting before `before`; `final` (`flush --once --final`:
        the whole service is stopping for good) also settles remainders by SIDECAR_SETTLE_REMAINDERS."""
        async with self.pool.connection() as conn, conn.transaction():
            await self._fence(conn)
            n = await self._seal(conn, through=before)
            if final:
                await self._settle_remainders(conn)
            return n

    async def _settle_remainders(self, conn: AsyncConnection[Any], *, customers: list[str] | None = None,
                                 sealed_before: int | None = None) -> None:
        """Bill or give up each customer's remainder below one unit (of these customers only, if
        given), by policy (the single-file rule): the unit goes into the customer's latest sealed
        bucket, or a new bucket of the last sealed hour."""
        policy = self.settings.settle_remainders
        if policy == "keep":
            return
        now = int(self.clock.now())
        last_hour = (sealed_before or await self._watermark(conn)) - HOUR_S
        cur = await conn.execute("SELECT customer, dimension, raw FROM carries WHERE raw > 0"
                                 " AND customer NOT LIKE 'tenant:%%' AND (%s::text[] IS NULL OR customer = ANY(%s))"
                                 " ORDER BY customer, dimension", (customers, customers))
        for c in await cur.fetchall():
            dim = self._dims.get(c["dimension"])
            if dim is None:
                log.error("remainder_left_unconfigured", customer=c["customer"], dimension=c["dimension"], raw=c["raw"])
                continue
            raw = int(c["raw"])
            units = min(settle_remainder(raw, dim.raw_unit, policy) or 0, MAX_QUANTITY)
            key = (c["customer"], c["dimension"])
            cur = await conn.execute("SELECT hour, quantity FROM buckets WHERE customer = %s AND dimension = %s"
                                     " AND state = 'sealed' ORDER BY hour DESC LIMIT 1", key)
            target = await cur.fetchone()
            hour: int | None = None
            if units and target is not None and int(target["quantity"]) + units <= MAX_QUANTITY:
                hour = int(target["hour"])
                await conn.execute("UPDATE buckets SET quantity = quantity + %s, remainder = 0 WHERE customer = %s"
                                   " AND dimension = %s AND hour = %s", (units, *key, hour))
            elif units:
                cur = await conn.execute("SELECT 1 FROM buckets WHERE customer = %s AND dimension = %s AND hour = %s",
                                         (*key, last_hour))
                if await cur.fetchone() is not None:
                    log.warning("remainder_kept", customer=key[0], dimension=key[1], raw=raw)
                    continue
                hour = last_hour
                await conn.execute(
                    "INSERT INTO buckets (customer, dimension, hour, unit, state, raw, events, carried_in,"
                    " first_event_at, remainder_in, quantity, remainder, sealed_at)"
                    " VALUES (%s,%s,%s,%s,'sealed',0,0,0,%s,%s,%s,0,%s)",
                    (*key, hour, dim.raw_unit, hour, raw, units, now))
            await conn.execute("UPDATE carries SET raw = 0 WHERE customer = %s AND dimension = %s", key)
            await conn.execute("INSERT INTO settlements (customer, dimension, hour, raw, unit, units_added, policy, at)"
                               " VALUES (%s,%s,%s,%s,%s,%s,%s,%s)", (*key, hour, raw, dim.raw_unit, units, policy, now))
            log.warning("remainder_settled", customer=key[0], dimension=key[1], raw=raw, unit=dim.raw_unit,
                        billed_units=units, policy=policy)

    async def release_held(self, *, customer: str | None = None, dimension: str | None = None,
                           record_id: int | None = None, discard: bool = False) -> int:
        """Send (or discard) records a guardrail held; returns how many (an operator's decision)."""
        f = queries.UsageFilter(customer=customer, dimension=dimension)
        where, args = queries.where_sql(f, alias="r", who_only=True, placeholder="%s")
        where += (" AND " if where else " WHERE ") + "r.state = 'held'"
        if record_id is not None:
            where += " AND r.id = %s"
            args.append(record_id)
        now = int(self.clock.now())
        async with self.pool.connection() as conn, conn.transaction():
            cur = await conn.execute(f"SELECT r.id, r.customer, r.dimension, r.hour, r.quantity FROM records r{where}"
                                     " ORDER BY r.id FOR UPDATE", args)
            rows = await cur.fetchall()
            for r in rows:
                if discard:
                    await self._set_state(conn, int(r["id"]), RecordState.DISCARDED,
                                          last_error="held by a guardrail; discarded by operator")
                else:
                    await self._set_state(conn, int(r["id"]), RecordState.PENDING, next_attempt_at=0,
                                          last_error="released by operator")
                await conn.execute("UPDATE holds SET released_at = %s, outcome = %s WHERE record_id = %s",
                                   (now, HoldOutcome.DISCARDED if discard else HoldOutcome.RELEASED, r["id"]))
                log.warning("held_record_discarded" if discard else "held_record_released", record=r["id"],
                            customer=r["customer"], dimension=r["dimension"], hour=r["hour"], quantity=r["quantity"])
        return len(rows)

    # ---- sending (protocol.SendingStore; leader only, fenced) ------------------------------------

    async def prepare_flush(self, *, now: float) -> tuple[int, dict[str, int]]:
        async with self.pool.connection() as conn, conn.transaction():
            await self._fence(conn)
            await self._seal(conn)
            frozen = await self._freeze(conn, now=now)
            closed: dict[str, int] = {}
            cur = await conn.execute("SELECT id, timestamp FROM records WHERE state = 'pending' AND NOT in_flight")
            for r in await cur.fetchall():
                if now >= self._window_closes_at(int(r["timestamp"])):
                    state = await self._close(conn, int(r["id"]), now=now,
                                              reason="window closed before AWS accepted it")
                    closed[state] = closed.get(state, 0) + 1
        return frozen, closed

    def _window_closes_at(self, timestamp: int) -> int:
        return records.window_closes_at(timestamp, window_s=self.settings.window_s,
                                        margin_s=self.settings.window_margin_s)

    async def _close(self, conn: AsyncConnection[Any], record: int, *, now: float, reason: str) -> str:
        """The window rule: unknown if AWS may have it, else carried into the open hour or expired."""
        cur = await conn.execute(
            "SELECT r.maybe_received, r.customer, r.dimension, r.quantity, b.unit FROM records r JOIN buckets b"
            " ON (b.customer, b.dimension, b.hour) = (r.customer, r.dimension, r.hour) WHERE r.id = %s", (record,))
        row = await _first(cur)
        if row["maybe_received"]:
            state: str = RecordState.UNKNOWN
            error = f"{reason}; an earlier send may have been billed"
        elif self.settings.expired_policy == "carry":
            state, error = RecordState.CARRIED, reason
            raw = int(row["quantity"]) * int(row["unit"])
            hour = max(hour_start(now), await self._watermark(conn))
            if raw:
                sums: Sums = {}
                _add(sums, (row["customer"], row["dimension"], hour, int(row["unit"])), raw=raw, events=0,
                     carried_in=raw, first_event_at=int(now))
                await self._add_to_open(conn, sums, now=now)
        else:
            state, error = RecordState.EXPIRED, reason
        await self._set_state(conn, record, state, last_error=error)
        log.warning("record_window_closed", record=record, state=state, customer=row["customer"],
                    dimension=row["dimension"], quantity=row["quantity"])
        return state

    async def _set_state(self, conn: AsyncConnection[Any], record: int, state: str, **fields: Any) -> None:
        cols = "".join(f", {k} = %s" for k in fields)
        await conn.execute(f"UPDATE records SET state = %s, in_flight = false{cols} WHERE id = %s",
                           (state, *fields.values(), record))
        await conn.execute("UPDATE buckets SET state = %s WHERE (customer, dimension, hour) ="
                           " (SELECT customer, dimension, hour FROM records WHERE id = %s)", (state, record))

    async def _due(self, conn: AsyncConnection[Any], now: float, limit: int, *, lock: bool) -> list[DueRecord]:
        """Due records in send order: an ending agreement's final usage first, then the oldest."""
        due = ("SELECT id, payload, product_code, timestamp, maybe_received, attempts, customer_identifier"
               " FROM records WHERE state = 'pending' AND NOT in_flight AND next_attempt_at <= %s")
        tail = f" ORDER BY timestamp, id LIMIT %s{' FOR UPDATE' if lock else ''}"
        cur = await conn.execute(
            due + " AND EXISTS (SELECT 1 FROM subscriptions s WHERE s.state = 'pending_end'"
            f" AND s.subscriber IN ({lifecycle.subscribers_sql('records.customer', pg=True)}))" + tail,
            (now, limit * 4))
        rows = await cur.fetchall()
        seen = {r["id"] for r in rows}
        cur = await conn.execute(due + tail, (now, limit * 4))
        rows += [r for r in await cur.fetchall() if r["id"] not in seen]
        return records.pick_due(rows, limit)

    async def claim(self, *, now: float, limit: int, owner: str = "") -> list[DueRecord]:
        async with self.pool.connection() as conn, conn.transaction():
            epoch = await self._fence(conn)
            picked = await self._due(conn, now, limit, lock=True)
            if picked:
                await conn.execute(
                    "UPDATE records SET in_flight = true, attempts = attempts + 1, claimed_by = %s,"
                    " claim_epoch = %s WHERE id = ANY(%s)", (owner or self.member_id, epoch, [r.id for r in picked]))
        return picked

    async def peek_due(self, *, now: float, limit: int) -> list[DueRecord]:
        async with self.pool.connection() as conn:
            return await self._due(conn, now, limit, lock=False)

    async def settle(self, settlements: Sequence[Settlement], *, now: float) -> None:
        async with self.pool.connection() as conn, conn.transaction():
            await self._fence(conn)
            for s in settlements:
                if s.outcome == Outcome.SENT:
                    await self._set_state(conn, s.record, RecordState.SENT, aws_status=s.status or "Success",
                                          metering_record_id=s.metering_record_id, sent_at=int(now))
                elif s.outcome in (Outcome.CONFLICT, Outcome.REJECTED):
                    await self._set_state(conn, s.record, s.outcome, aws_status=s.status, last_error=s.error)
                elif s.outcome == Outcome.RETRY:
                    await conn.execute(
                        "UPDATE records SET in_flight = false, last_error = %s, next_attempt_at = %s,"
                        " maybe_received = maybe_received OR %s WHERE id = %s AND in_flight",
                        (s.error, s.next_attempt_at, s.maybe_received, s.record))
                else:
                    raise ValueError(f"unknown outcome {s.outcome!r}")

    async def close_records(self, ids: Sequence[int], *, now: float, reason: str) -> list[str]:
        async with self.pool.connection() as conn, conn.transaction():
            await self._fence(conn)
            return [await self._close(conn, rid, now=now, reason=reason) for rid in ids]

    async def due_now(self, *, held_until: float, now: float) -> int:
        async with self.pool.connection() as conn, conn.transaction():
            await self._fence(conn)
            cur = await conn.execute(
                "UPDATE records SET next_attempt_at = %s WHERE state = 'pending' AND NOT in_flight"
                " AND next_attempt_at <= %s", (now, held_until))
            return int(cur.rowcount)

    async def pending_summary(self) -> tuple[int, float | None]:
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) AS n, min(next_attempt_at) AS at FROM records"
                                     " WHERE state = 'pending'")
            row = await _first(cur)
            return int(row["n"]), None if row["at"] is None else float(row["at"])

    # ---- reads ------------------------------------------------------------------------------

    async def buckets(self) -> list[dict[str, Any]]:
        """Every bucket with its record's fields (for tests and tools)."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT b.*, r.id AS record_id, r.payload, r.attempts, r.aws_status FROM buckets b"
                " LEFT JOIN records r ON (r.customer, r.dimension, r.hour) = (b.customer, b.dimension, b.hour)"
                " ORDER BY b.hour, b.customer, b.dimension")
            rows = await cur.fetchall()
        for r in rows:
            if r["payload"] is not None:
                r["payload"] = json.loads(r["payload"])
        return list(rows)

    async def figures(self) -> dict[str, Any]:
        """The fleet-wide alarms every member shows: held records, parked usage, the oldest usage
        still owed to AWS, and records an operator must look at."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT state, count(*) AS n FROM records WHERE state IN"
                                     " ('held', 'rejected', 'conflict', 'unknown', 'expired') GROUP BY state")
            attention = {r["state"]: int(r["n"]) for r in await cur.fetchall()}
            cur = await conn.execute("SELECT dimension, sum(raw)::bigint AS raw FROM parked"
                                     " WHERE state = 'unconfigured' GROUP BY dimension ORDER BY dimension")
            parked = {r["dimension"]: int(r["raw"]) for r in await cur.fetchall()}
            cur = await conn.execute("SELECT min(hour) AS h FROM buckets WHERE state IN ('sealed', 'pending', 'held')")
            oldest = (await _first(cur))["h"]
            cur = await conn.execute(lifecycle.rows_sql(pg=True))
            subscriptions = list(await cur.fetchall())
            cur = await conn.execute(lifecycle.PARKED_AFTER_END_SQL)
            parked_after_end = await _first(cur)
        now = self.clock.now()
        return {"held_records": attention.pop("held", 0), "needs_operator": attention,
                "unconfigured_raw_by_dimension": parked,
                "oldest_pending_age_s": None if oldest is None else max(0.0, now - (int(oldest) + HOUR_S)),
                "lifecycle": lifecycle.summarize(subscriptions, parked_after_end, now=now)}

    async def left_behind(self, *, final: bool) -> dict[str, Any]:
        """What the fleet still owes: open or unmapped buckets (with `final`), records not yet
        accepted (pending, held) and records an operator must look at; empty when nothing."""
        async with self.pool.connection() as conn:
            cur = await conn.execute("SELECT state, count(*) AS n FROM buckets WHERE state IN ('open', 'unmapped')"
                                     " GROUP BY state")
            buckets = {r["state"]: int(r["n"]) for r in await cur.fetchall()}
            cur = await conn.execute("SELECT state, count(*) AS n FROM records WHERE state IN"
                                     " ('pending', 'held', 'rejected', 'conflict', 'unknown') GROUP BY state")
            owed = {r["state"]: int(r["n"]) for r in await cur.fetchall()}
        out: dict[str, Any] = {}
        if final and buckets:
            out["open_buckets"] = buckets
        if owed:
            out["records"] = owed
        return out


Query = tuple[Any, list[Any]]


def _usage_queries(f: UsageFilter, limit: int) -> tuple[Query, Query, Query]:
    """The three reads behind a usage view: bucket rows with their records, sums by state, carries."""
    where, args = queries.where_sql(f, placeholder="%s")
    carry_where, carry_args = queries.where_sql(f, alias="c", who_only=True, placeholder="%s")
    rows = ("SELECT b.*, r.id AS record_id, r.timestamp AS record_timestamp, r.attempts, r.aws_status,"
            " r.metering_record_id, r.last_error, r.sent_at, h.rule AS hold_rule FROM buckets b"
            " LEFT JOIN records r ON (r.customer, r.dimension, r.hour) = (b.customer, b.dimension, b.hour)"
            " LEFT JOIN holds h ON h.record_id = r.id AND r.state = 'held'"
            f"{where} ORDER BY b.hour DESC, b.customer, b.dimension LIMIT %s", [*args, limit])
    totals = ("SELECT b.customer, b.dimension, b.state, sum(b.raw)::bigint AS raw, sum(b.quantity)::bigint AS quantity,"
              f" sum(b.events)::bigint AS events, max(b.unit) AS unit FROM buckets b{where}"
              " GROUP BY b.customer, b.dimension, b.state", args)
    carries = (f"SELECT c.customer, c.dimension, c.raw FROM carries c{carry_where}", carry_args)
    return rows, totals, carries


class FleetView:
    """Read-only figures of a fleet's PostgreSQL (`UsageReader`), on a short connection per read, for
    the CLI (`sidecar usage` with SIDECAR_FLEET_URL) and any tool that reads while the fleet runs."""

    def __init__(self, url: str) -> None:
        self._url = url

    def _connect(self) -> psycopg.Connection[dict[str, Any]]:
        return psycopg.connect(self._url, autocommit=True, row_factory=dict_row, connect_timeout=5)

    def exists(self) -> bool:
        return True

    def usage(self, f: UsageFilter, *, limit: int = 5000, health_at: float | None = None) -> dict[str, Any]:
        rows_q, totals_q, carries_q = _usage_queries(f, limit)
        with self._connect() as conn:
            rows = [dict(r) for r in conn.execute(*rows_q).fetchall()]
            grouped = conn.execute(*totals_q).fetchall()
            carries = {(r["customer"], r["dimension"]): int(r["raw"]) for r in conn.execute(*carries_q).fetchall()}
            parked_where, parked_args = queries.where_sql(f, alias="p", who_only=True, placeholder="%s")
            parked = conn.execute(
                f"SELECT * FROM parked p{parked_where}{' AND' if parked_where else ' WHERE'}"
                " p.state IN ('unconfigured', 'ended') ORDER BY p.id", parked_args).fetchall()
            subscriptions = conn.execute(lifecycle.rows_sql(pg=True)).fetchall()
            data: dict[str, Any] = {"rows": rows, "totals": queries.totals_from(grouped, carries),
                                    "parked": [dict(r) for r in parked],
                                    "subscriptions": [dict(r) for r in subscriptions]}
        if health_at is not None:
            data["health"] = self.health(health_at)
        return data

    def health(self, now: float) -> dict[str, Any]:
        with self._connect() as conn:
            held = conn.execute("SELECT count(*) AS n FROM records WHERE state = 'held'").fetchone()
            oldest = conn.execute("SELECT min(hour) AS h FROM buckets WHERE state IN ('sealed', 'pending', 'held')"
                                  ).fetchone()
            members = conn.execute(
                "SELECT member_id, extract(epoch FROM now() - heartbeat_at)::float AS heartbeat_age_s, backlog,"
                " stopped_at IS NOT NULL AS stopped FROM members ORDER BY member_id").fetchall()
            parked = conn.execute("SELECT dimension, count(*) AS n, sum(raw)::bigint AS raw FROM parked"
                                  " WHERE state = 'unconfigured' GROUP BY dimension ORDER BY dimension").fetchall()
            subscriptions = conn.execute(lifecycle.rows_sql(pg=True)).fetchall()
            parked_after_end = conn.execute(lifecycle.PARKED_AFTER_END_SQL).fetchone()
        h = None if oldest is None else oldest["h"]
        unconfigured = {"rows": sum(int(r["n"]) for r in parked),
                        "raw_by_dimension": {r["dimension"]: int(r["raw"]) for r in parked}} if parked else None
        return {"held_records": int(held["n"]) if held else 0,
                "oldest_pending_age_s": None if h is None else max(0.0, now - (int(h) + HOUR_S)),
                "unconfigured": unconfigured, "unmapped": None, "members": [dict(m) for m in members],
                "lifecycle": lifecycle.summarize([dict(r) for r in subscriptions], dict(parked_after_end or {}),
                                                 now=now)}

    def left_behind(self, now: float) -> dict[str, Any]:
        with self._connect() as conn:
            owed = conn.execute("SELECT state, count(*) AS n FROM records WHERE state IN"
                                " ('pending', 'held', 'rejected', 'conflict', 'unknown') GROUP BY state").fetchall()
        return {"records": {r["state"]: int(r["n"]) for r in owed}} if owed else {}

    def open_buckets(self) -> int:
        with self._connect() as conn:
            row = conn.execute("SELECT count(*) AS n FROM buckets WHERE state = 'open'").fetchone()
        return int(row["n"]) if row else 0

    def figures(self, now: float) -> dict[str, Any] | None:
        return None
