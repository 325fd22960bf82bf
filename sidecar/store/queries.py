"""Read-only queries for /usage, /healthz and the CLI; each opens its own short connection."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.store.db import connect

OPEN_STATES = ("open", "unmapped")


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
    """Filters for usage queries; None means any."""

    customer: str | None = None
    dimension: str | None = None
    state: str | None = None
    since: int | None = None  # hour >= since
    until: int | None = None  # hour < until


def _where(f: UsageFilter, alias: str = "b") -> tuple[str, list[Any]]:
    clauses: list[str] = []
    args: list[Any] = []
    if f.customer is not None:
        clauses.append(f"({alias}.customer = ? OR {alias}.customer LIKE ?)")
        args += [f.customer, f"%:{f.customer}%"]
    if f.dimension is not None:
        clauses.append(f"{alias}.dimension = ?")
        args.append(f.dimension)
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
        "SELECT b.*, r.timestamp AS record_timestamp, r.attempts, r.aws_status,"
        " r.metering_record_id, r.last_error, r.sent_at"
        " FROM buckets b LEFT JOIN records r"
        " ON r.customer = b.customer AND r.dimension = b.dimension AND r.hour = b.hour"
        f"{where} ORDER BY b.hour DESC, b.customer, b.dimension LIMIT ?"
    )
    return [dict(r) for r in conn.execute(sql, [*args, limit])]


def usage_totals(conn: sqlite3.Connection, f: UsageFilter) -> list[dict[str, Any]]:
    """Per customer and dimension: raw usage still open, whole units by state, and the carry."""
    where, args = _where(f)
    totals: dict[tuple[str, str], dict[str, Any]] = {}
    for r in conn.execute(
        "SELECT b.customer, b.dimension, b.state, sum(b.raw) AS raw, sum(b.quantity) AS quantity,"
        " sum(b.events) AS events, max(b.unit) AS unit"
        f" FROM buckets b{where} GROUP BY b.customer, b.dimension, b.state",
        args,
    ):
        t = totals.setdefault(
            (r["customer"], r["dimension"]),
            {"customer": r["customer"], "dimension": r["dimension"], "unit_raw": r["unit"],
             "open_raw": 0, "events": 0, "quantity_by_state": {}, "carry_raw": 0},
        )
        t["events"] += r["events"]
        if r["state"] in OPEN_STATES:
            t["open_raw"] += r["raw"]
            t["quantity_by_state"][r["state"]] = 0
        else:
            t["quantity_by_state"][r["state"]] = r["quantity"] or 0
    for r in conn.execute("SELECT customer, dimension, raw FROM carries"):
        found = totals.get((r["customer"], r["dimension"]))
        if found is not None:
            found["carry_raw"] = r["raw"]
    return list(totals.values())


def health(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """Facts for /healthz: the oldest sealed-but-unsent hour, and the oldest pending record's age."""
    row = conn.execute(
        "SELECT min(hour) AS h FROM buckets WHERE state IN ('sealed', 'pending')"
    ).fetchone()
    oldest = row["h"] if row and row["h"] is not None else None
    pending_age = oldest_pending_age_s(conn, now)
    return {
        "oldest_unsent_hour": oldest,
        "oldest_unsent_age_s": (int(now) - (oldest + 3600)) if oldest is not None else None,
        "oldest_pending_age_s": None if pending_age is None else int(pending_age),
    }


def state_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Buckets and records by state, for metrics."""
    buckets = {r["state"]: r["n"] for r in conn.execute("SELECT state, count(*) AS n FROM buckets GROUP BY state")}
    recs = {r["state"]: r["n"] for r in conn.execute("SELECT state, count(*) AS n FROM records GROUP BY state")}
    return {"buckets": buckets, "records": recs}


def oldest_pending_age_s(conn: sqlite3.Connection, now: float) -> float | None:
    """Age of the oldest record still owed to AWS (the alarm signal before its window closes)."""
    row = conn.execute(
        "SELECT min(timestamp) AS t FROM records WHERE state = 'pending'"
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
