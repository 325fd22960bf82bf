"""Fleet mode's local outbox: usage deltas a member has committed and not yet shipped to PostgreSQL.

`add` runs inside the ingest transaction (the writer thread's), so an acknowledged event's usage is
in the outbox or already shipped. `batch`, `mark_shipped` and `backlog` run in transactions of their
own. Shipped deltas are deleted at once: the table holds exactly what is owed to PostgreSQL. A delta
is identified fleet-wide by the file's origin (a random id made when the file was created; a new
file after lost storage gets a new one) and its `seq`, which is never reused.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.usage import BucketKey, Delta

ORIGIN_KEY = "origin"


@dataclass(frozen=True, slots=True)
class ShippedDelta:
    """One outbox delta: raw usage of one customer, dimension and event hour (as the member stored it)."""

    seq: int
    customer: str  # stored key: identifier:…, account:…/…, or tenant:NAME (resolved fleet-wide)
    dimension: str
    hour: int  # the event's own UTC hour; the fleet decides whether it is still open
    unit: int
    raw: int
    events: int
    first_event_at: int


def origin(conn: sqlite3.Connection) -> str:
    """This file's origin id, made once (inside the caller's write transaction)."""
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (ORIGIN_KEY,)).fetchone()
    if row is not None:
        return str(row[0])
    made = uuid.uuid4().hex
    conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (ORIGIN_KEY, made))
    return made


def add(conn: sqlite3.Connection, deltas: Mapping[BucketKey, Delta], *, now: float) -> None:
    """Queue deltas for shipping (inside the ingest transaction)."""
    conn.executemany(
        "INSERT INTO outbox (customer, dimension, hour, unit, raw, events, first_event_at, created_at)"
        " VALUES (?,?,?,?,?,?,?,?)",
        [(c, d, h, dl.unit, dl.raw, dl.events, dl.first_event_at, now) for (c, d, h), dl in deltas.items()])


def batch(conn: sqlite3.Connection, *, limit: int) -> list[ShippedDelta]:
    """The oldest unshipped deltas, in order (every row in the table is unshipped)."""
    return [ShippedDelta(seq=r[0], customer=r[1], dimension=r[2], hour=r[3], unit=r[4], raw=r[5], events=r[6],
                         first_event_at=r[7])
            for r in conn.execute(
                "SELECT seq, customer, dimension, hour, unit, raw, events, first_event_at FROM outbox"
                " ORDER BY seq LIMIT ?", (limit,))]


def mark_shipped(conn: sqlite3.Connection, through: int) -> int:
    """After PostgreSQL committed every delta up to `through` (a batch is a prefix of the outbox, in
    order): forget them, in one statement. AUTOINCREMENT never hands their seqs out again."""
    return conn.execute("DELETE FROM outbox WHERE seq <= ?", (through,)).rowcount


def backlog(conn: sqlite3.Connection) -> tuple[int, float | None]:
    """Unshipped deltas and the time the oldest was committed."""
    row = conn.execute("SELECT count(*), min(created_at) FROM outbox").fetchone()
    return int(row[0]), row[1]
