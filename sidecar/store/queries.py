"""Read-only queries for /usage, /healthz and the CLI; each opens its own short connection."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.config import Settings
from sidecar.model import OPEN_BUCKET_STATES, Scheme
from sidecar.store import lifecycle
from sidecar.store.db import connect


@contextlib.contextmanager
def reader(path: Path) -> Iterator[sqlite3.Connection]:
    """A short-lived read-only connection (works while the daemon is down, too)."""
    if not path.exists():
        raise FileNotFoundError(f"no database at {path}")
    conn = connect(path, readonly=True)
    try:
        yield conn
    finally:
        conn.close()


@dataclass(frozen=True, kw_only=True)
class UsageFilter:
    """Filters for usage queries; None means any. `customer` matches exactly (see customer_clause)."""

    customer: str | None = None
    dimension: str | None = None
    state: str | None = None
    since: int | None = None  # hour >= since
    until: int | None = None  # hour < until

    def __post_init__(self) -> None:
        if self.customer is not None:
            customer_clause(self.customer, "customer")  # refuses an empty value now, not mid-query


ACCOUNT_ID = re.compile(r"[0-9]{12}")


def customer_clause(text: str, column: str) -> tuple[str, list[Any]]:
    """An SQL condition on `column` (a customer key column) matching exactly the customer `text` names.

    `text` is a stored customer key (`identifier:ID`, `account:ACCOUNT/LICENSE_ARN`, `tenant:NAME`),
    a bare 12-digit AWS account id (every `account:<id>/...` key, and `identifier:<id>`), or a bare
    customer identifier (`identifier:<text>`). Never a pattern: `_` and `%` are plain characters.
    Raises ValueError when `text` is empty or blank.
    """
    if not text.strip():
        raise ValueError(
            "customer: must not be empty; give a customer key (identifier:ID, account:ACCOUNT/LICENSE_ARN,"
            " tenant:NAME), a 12-digit AWS account id, or a customer identifier"
        )
    if text.startswith(tuple(Scheme)):
        return f"{column} = ?", [text]
    if ACCOUNT_ID.fullmatch(text):
        return (
            f"({column} IN (SELECT customers.customer FROM customers WHERE customers.aws_account_id = ?)"
            f" OR {column} = ?)",
            [text, f"identifier:{text}"],
        )
    return f"{column} = ?", [f"identifier:{text}"]


def _who(f: UsageFilter, alias: str) -> tuple[list[str], list[Any]]:
    """The filter's customer and dimension conditions on a table with those two columns."""
    clauses: list[str] = []
    args: list[Any] = []
    if f.customer is not None:
        clause, values = customer_clause(f.customer, f"{alias}.customer")
        clauses.append(clause)
        args += values
    if f.dimension is not None:
        clauses.append(f"{alias}.dimension = ?")
        args.append(f.dimension)
    return clauses, args


def where_sql(f: UsageFilter, *, alias: str = "b", who_only: bool = False,
              placeholder: str = "?") -> tuple[str, list[Any]]:
    """The filter as a WHERE clause on `alias` (buckets; `who_only`: just customer and dimension, for
    carries), with the backend's parameter placeholder."""
    if who_only:
        clauses, args = _who(f, alias)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    else:
        where, args = _where(f, alias)
    return where.replace("?", placeholder), args


def _where(f: UsageFilter, alias: str = "b") -> tuple[str, list[Any]]:
    clauses, args = _who(f, alias)
    if f.state is not None:
        clauses.append(f"{alias}.state = ?")
        args.append(f.state)
    if f.since is not None:
        clauses.append(f"{alias}.hour >= ?")
        args.append(f.since)
    if f.until is not None:
        clauses.append(f"{alias}.hour < ?")
        args.append(f.until)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def usage_rows(conn: sqlite3.Connection, f: UsageFilter, *, limit: int = 5000) -> list[dict[str, Any]]:
    """Bucket rows, newest hour first, with their record's delivery details when one exists."""
    where, args = _where(f)
    sql = (
        "SELECT b.*, r.id AS record_id, r.timestamp AS record_timestamp, r.attempts, r.aws_status,"
        " r.metering_record_id, r.last_error, r.sent_at, h.rule AS hold_rule"
        " FROM buckets b LEFT JOIN records r"
        " ON r.customer = b.customer AND r.dimension = b.dimension AND r.hour = b.hour"
        " LEFT JOIN holds h ON h.record_id = r.id AND r.state = 'held'"
        f"{where} ORDER BY b.hour DESC, b.customer, b.dimension LIMIT ?"
    )
    return [dict(r) for r in conn.execute(sql, [*args, limit])]


def usage_totals(conn: sqlite3.Connection, f: UsageFilter) -> list[dict[str, Any]]:
    """Per customer and dimension: raw usage still open, whole units by state, and the carry."""
    where, args = _where(f)
    grouped = conn.execute(
        "SELECT b.customer, b.dimension, b.state, sum(b.raw) AS raw, sum(b.quantity) AS quantity,"
        " sum(b.events) AS events, max(b.unit) AS unit"
        f" FROM buckets b{where} GROUP BY b.customer, b.dimension, b.state", args).fetchall()
    clauses, carry_args = _who(f, "c")
    carry_where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    carries = {(r["customer"], r["dimension"]): r["raw"]
               for r in conn.execute(f"SELECT c.customer, c.dimension, c.raw FROM carries c{carry_where}", carry_args)}
    return totals_from(grouped, carries)


def totals_from(grouped: Iterable[Mapping[str, Any]], carries: Mapping[tuple[str, str], int]) -> list[dict[str, Any]]:
    """Totals per customer and dimension from bucket sums grouped by state, and the carries (any backend)."""
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for r in grouped:
        t = totals.setdefault(
            (r["customer"], r["dimension"]),
            {"customer": r["customer"], "dimension": r["dimension"], "unit_raw": r["unit"],
             "open_raw": 0, "events": 0, "quantity_by_state": {}, "carry_raw": 0},
        )
        t["events"] += r["events"]
        if r["state"] in OPEN_BUCKET_STATES:
            t["open_raw"] += r["raw"]
            t["quantity_by_state"][r["state"]] = 0
        else:
            t["quantity_by_state"][r["state"]] = r["quantity"] or 0
    for (customer, dimension), raw in carries.items():
        found = totals.get((customer, dimension))
        if found is None and raw:
            # A remainder whose buckets are gone from the view (e.g. a renamed or dropped dimension)
            found = totals[(customer, dimension)] = {
                "customer": customer, "dimension": dimension, "unit_raw": None, "open_raw": 0,
                "events": 0, "quantity_by_state": {}, "carry_raw": 0}
        if found is not None:
            found["carry_raw"] = raw
    return list(totals.values())


def parked_rows(conn: sqlite3.Connection, f: UsageFilter) -> list[dict[str, Any]]:
    """Usage parked, never sent: the running configuration cannot bill it (state `unconfigured`), or
    the customer's subscription had ended (state `ended`)."""
    clauses, args = _who(f, "p")
    sql = "SELECT * FROM parked p WHERE " + " AND ".join(["p.state IN ('unconfigured', 'ended')", *clauses])
    return [dict(r) for r in conn.execute(sql + " ORDER BY p.id", args)]


def health(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """Facts for /healthz: the oldest unsent hour and pending age, held records, parked and unmapped usage."""
    row = conn.execute(
        "SELECT min(hour) AS h FROM buckets WHERE state IN ('sealed', 'pending', 'held')"
    ).fetchone()
    oldest = row["h"] if row and row["h"] is not None else None
    pending_age = oldest_pending_age_s(conn, now)
    held = conn.execute("SELECT count(*) FROM records WHERE state = 'held'").fetchone()[0]
    return {
        "oldest_unsent_hour": oldest,
        "oldest_unsent_age_s": (int(now) - (oldest + 3600)) if oldest is not None else None,
        "oldest_pending_age_s": None if pending_age is None else int(pending_age),
        "held_records": held,
        "unconfigured": unconfigured_summary(conn),
        "unmapped": unmapped_summary(conn, now),
        "lifecycle": lifecycle.summary(conn, now=now),
    }


def unconfigured_summary(conn: sqlite3.Connection) -> dict[str, Any] | None:
    """Parked usage: how many rows and the raw amount per dimension (None when there is none)."""
    rows = conn.execute("SELECT dimension, count(*) AS n, sum(raw) AS raw FROM parked"
                        " WHERE state = 'unconfigured' GROUP BY dimension ORDER BY dimension").fetchall()
    if not rows:
        return None
    return {"rows": sum(r["n"] for r in rows), "raw_by_dimension": {r["dimension"]: r["raw"] for r in rows}}


def unmapped_summary(conn: sqlite3.Connection, now: float) -> dict[str, Any] | None:
    """Usage of tenants with no customer mapping: tenants, events, raw per dimension, the oldest's age."""
    rows = conn.execute(
        "SELECT c.tenant, b.dimension, sum(b.raw) AS raw, min(b.first_event_at) AS first"
        " FROM buckets b JOIN customers c ON c.customer = b.customer WHERE b.state = 'unmapped'"
        " GROUP BY c.tenant, b.dimension").fetchall()
    if not rows:
        return None
    raw: dict[str, int] = {}
    for r in rows:
        raw[r["dimension"]] = raw.get(r["dimension"], 0) + r["raw"]
    # Events are counted, and aged, from the event rows themselves (kept while their bucket is unmapped).
    ev = conn.execute(
        "SELECT count(*), min(e.time) FROM events e WHERE substr(e.customer, 1, 7) = 'tenant:' AND EXISTS"
        " (SELECT 1 FROM buckets b WHERE b.customer = e.customer AND b.hour = e.hour AND b.state = 'unmapped')"
    ).fetchone()
    first = ev[1] if ev[1] is not None else min(r["first"] for r in rows)
    return {"tenants": sorted({r["tenant"] for r in rows}), "events": ev[0], "raw_by_dimension": raw,
            "oldest_event_at": first, "oldest_age_s": max(0, int(now) - first)}


def open_bucket_count(conn: sqlite3.Connection) -> int:
    """Buckets of hours still open (usage not sealed yet)."""
    return int(conn.execute("SELECT count(*) FROM buckets WHERE state = 'open'").fetchone()[0])


def left_behind(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """What a stopping sidecar leaves unsent in its database (logged at SIGTERM)."""
    open_rows = conn.execute("SELECT count(*) AS n, coalesce(sum(events), 0) AS e FROM buckets"
                             " WHERE state = 'open'").fetchone()
    owed = conn.execute("SELECT state, count(*) AS n FROM records WHERE state IN ('pending', 'held')"
                        " GROUP BY state").fetchall()
    carries = conn.execute("SELECT count(*) FROM carries WHERE raw > 0").fetchone()[0]
    out: dict[str, Any] = {
        "open_buckets": open_rows["n"], "records": {r["state"]: r["n"] for r in owed},
        "remainders": carries, "unmapped": unmapped_summary(conn, now), "unconfigured": unconfigured_summary(conn),
    }
    return {k: v for k, v in out.items() if v}


def gpu_time(conn: sqlite3.Connection, *, before_hour: int) -> dict[str, list[dict[str, Any]]]:
    """GPU wall time the task had and GPU time it billed (µs), per GPU dimension: in total, and in
    the last hour that started before `before_hour` and has figures."""
    total = [dict(r) for r in conn.execute(
        "SELECT dimension, sum(wall_us) AS wall_us, sum(billed_us) AS billed_us FROM gpu_time GROUP BY dimension")]
    last = [dict(r) for r in conn.execute(
        "SELECT g.dimension, g.hour, g.wall_us, g.billed_us FROM gpu_time g WHERE g.hour = (SELECT max(hour)"
        " FROM gpu_time h WHERE h.dimension = g.dimension AND h.hour < ?)", (before_hour,))]
    return {"total": total, "last_hour": last}


def settlements(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Remainders settled at final seals, per customer and dimension: raw rounded up and given up."""
    return [dict(r) for r in conn.execute(
        "SELECT customer, dimension, sum(max(units_added * unit - raw, 0)) AS rounded_up,"
        " sum(max(raw - units_added * unit, 0)) AS given_up"
        " FROM settlements GROUP BY customer, dimension ORDER BY customer, dimension")]


def state_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Buckets and records by state, for metrics."""
    buckets = {r["state"]: r["n"] for r in conn.execute("SELECT state, count(*) AS n FROM buckets GROUP BY state")}
    recs = {r["state"]: r["n"] for r in conn.execute("SELECT state, count(*) AS n FROM records GROUP BY state")}
    return {"buckets": buckets, "records": recs}


def oldest_pending_age_s(conn: sqlite3.Connection, now: float) -> float | None:
    """Age of the oldest record still owed to AWS (the alarm signal before its window closes)."""
    row = conn.execute(
        "SELECT min(timestamp) AS t FROM records WHERE state IN ('pending', 'held')"
    ).fetchone()
    sealed = conn.execute("SELECT min(hour) AS h FROM buckets WHERE state = 'sealed'").fetchone()
    candidates = [v for v in (row["t"], sealed["h"]) if v is not None]
    return max(0.0, now - min(candidates)) if candidates else None


def db_size_bytes(path: Path) -> int:
    """The database file plus its WAL."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        p = Path(f"{path}{suffix}")
        if p.exists():
            total += p.stat().st_size
    return total


class UsageView:
    """Read-only views of one store's database, each read on its own short connection, so they
    work beside the writer and with the daemon down. The app, metrics and the CLI read through
    this; none of them knows where or how the data is kept."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @classmethod
    def of(cls, settings: Settings) -> UsageView:
        """The view of the store `settings` name (its `db_path`)."""
        return cls(settings.db_path)

    def exists(self) -> bool:
        """Whether there is a database to read yet."""
        return self._path.exists()

    def usage(self, f: UsageFilter, *, limit: int = 5000, health_at: float | None = None) -> dict[str, Any]:
        """Bucket rows, per-customer totals and parked usage; with `health_at`, the health figures too."""
        with reader(self._path) as conn:
            data: dict[str, Any] = {"rows": usage_rows(conn, f, limit=limit), "totals": usage_totals(conn, f),
                                    "parked": parked_rows(conn, f), "subscriptions": lifecycle.rows(conn)}
            if health_at is not None:
                data["health"] = health(conn, health_at)
            return data

    def health(self, now: float) -> dict[str, Any]:
        """The figures /healthz reports."""
        with reader(self._path) as conn:
            return health(conn, now)

    def left_behind(self, now: float) -> dict[str, Any]:
        """What the database still holds unsent (see `left_behind`)."""
        with reader(self._path) as conn:
            return left_behind(conn, now)

    def open_buckets(self) -> int:
        """Buckets of hours still open."""
        with reader(self._path) as conn:
            return open_bucket_count(conn)

    def figures(self, now: float) -> dict[str, Any] | None:
        """Everything /metrics reads at a scrape; None before the database exists."""
        if not self._path.exists():
            return None
        with reader(self._path) as conn:
            return {"counts": state_counts(conn), "oldest_pending_age_s": oldest_pending_age_s(conn, now),
                    "unmapped": unmapped_summary(conn, now), "unconfigured": unconfigured_summary(conn),
                    "settlements": settlements(conn), "lifecycle": lifecycle.summary(conn, now=now),
                    "gpu": gpu_time(conn, before_hour=int(now) // 3600 * 3600),
                    "size_bytes": db_size_bytes(self._path)}
