"""Schema files: applied in order, recorded, and harmless to apply twice."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sidecar.errors import DatabaseCorrupt
from sidecar.store.db import _statements, check_integrity, migrate, schema_dir


def test_migrations_apply_once_and_are_recorded(tmp_path: Path) -> None:
    """The first run applies every file; the second applies nothing."""
    db = tmp_path / "s.db"
    files = sorted(p.stem for p in schema_dir().glob("[0-9][0-9][0-9]_*.sql"))
    assert migrate(db) == files
    assert migrate(db) == []
    conn = sqlite3.connect(db)
    names = [r[0] for r in conn.execute("SELECT name FROM _sqlite_migrations ORDER BY id")]
    conn.close()
    assert names == files


def test_schema_files_are_idempotent_sql(tmp_path: Path) -> None:
    """Running every statement of every file twice raises nothing (IF NOT EXISTS everywhere)."""
    conn = sqlite3.connect(tmp_path / "raw.db")
    for _ in range(2):
        for path in sorted(schema_dir().glob("*.sql")):
            for stmt in _statements(path.read_text()):
                conn.execute(stmt)
    conn.close()


def test_wal_and_full_sync_by_default(tmp_path: Path) -> None:
    """The write connection runs in WAL mode with synchronous=FULL unless configured otherwise."""
    from sidecar.store import connect

    conn = connect(tmp_path / "w.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn.close()


def test_corrupt_database_is_refused(tmp_path: Path) -> None:
    """A file that is not a healthy SQLite database makes start-up fail loudly, never replaced."""
    db = tmp_path / "bad.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\x13" * 4000)
    with pytest.raises(DatabaseCorrupt):
        check_integrity(db)
    assert db.read_bytes().startswith(b"SQLite format 3")
