"""Opening, migrating and checking the SQLite file: connections with the product's pragmas."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import sqlite_utils

from sidecar.errors import DatabaseCorrupt, StoreUnavailable


def schema_dir() -> Path:
    """Where the numbered SQL migrations live: inside the wheel, or the checkout's schema/."""
    packaged = Path(__file__).resolve().parent.parent / "_schema"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent.parent / "schema"


def _statements(sql: str) -> Iterator[str]:
    """Split a SQL script into complete statements (executescript would commit on its own)."""
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buf.splitlines()
    ):
        raise ValueError(f"incomplete SQL statement at the end of a migration: {buf[:80]!r}")


def migrations() -> sqlite_utils.Migrations:
    """One migration step per numbered file in schema/, applied in order and recorded."""
    steps = sqlite_utils.Migrations("sidecar")
    for path in sorted(schema_dir().glob("[0-9][0-9][0-9]_*.sql")):
        sql = path.read_text(encoding="utf-8")

        def apply(db: sqlite_utils.Database, sql: str = sql) -> None:
            for statement in _statements(sql):
                db.execute(statement)

        steps(name=path.stem)(apply)
    return steps


def connect(path: Path, *, synchronous: str = "FULL", readonly: bool = False) -> sqlite3.Connection:
    """A connection with the product's pragmas; autocommit mode so transactions are explicit."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def migrate(path: Path) -> list[str]:
    """Apply pending migrations; returns the names applied (empty when up to date)."""
    conn = connect(path)
    try:
        db = sqlite_utils.Database(conn)
        steps = migrations()
        pending = [m.name for m in steps.pending(db)]
        steps.apply(db)
        return pending
    finally:
        conn.close()


def check_integrity(path: Path) -> None:
    """Raise DatabaseCorrupt if SQLite's quick check finds damage. A missing file is fine."""
    if not path.exists():
        return
    try:
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise DatabaseCorrupt(f"{path}: {exc}") from exc
    if rows != [("ok",)]:
        detail = "; ".join(str(r[0]) for r in rows[:5])
        raise DatabaseCorrupt(f"{path}: integrity check failed: {detail}")


def _unavailable(exc: sqlite3.Error) -> StoreUnavailable:
    code = getattr(exc, "sqlite_errorcode", None)
    return StoreUnavailable(f"database write failed: {exc}", disk_full=code == sqlite3.SQLITE_FULL)
