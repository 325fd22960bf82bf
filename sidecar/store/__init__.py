"""The store: the only package that touches the database.

The rest of the product sees the protocols in `protocol` (`MeteringStore`, `SendingStore`,
`UsageReader`) and opens a store with `open_store` / `open_view`; the backend today is one SQLite
file (`writer.Store`, its bucket rules in `buckets`, records in `records`, reads in `queries`).
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.clock import Clock
from sidecar.config import Settings
from sidecar.store import queries
from sidecar.store.buckets import IngestResult
from sidecar.store.db import check_integrity, connect, migrate, schema_dir
from sidecar.store.protocol import MeteringStore, SendingStore, UsageReader
from sidecar.store.queries import UsageFilter, UsageView, health, reader, usage_rows, usage_totals
from sidecar.store.writer import Store


def open_store(settings: Settings, *, clock: Clock, owner: bool = True,
               on_group: Callable[[int], None] | None = None) -> MeteringStore:
    """Open the store `settings` name. `owner` (serve, flush) takes ownership of sending: it may
    resume sends a dead process left in flight and decide a birth; a CLI command beside the daemon
    (replay, release) opens without it. `on_group` is told the size of each group commit."""
    store = Store.open(settings.db_path, settings=settings, clock=clock, resume=owner)
    store.on_group = on_group
    return store


def migrate_store(settings: Settings) -> tuple[str, list[str]]:
    """Check and migrate the store `settings` name; returns where it is and the migrations applied."""
    check_integrity(settings.db_path)
    settings.db_path.parent.mkdir(parents=True, exist_ok=True)
    return str(settings.db_path), migrate(settings.db_path)


def open_view(settings: Settings) -> UsageReader:
    """Read-only access to the store `settings` name (works with the daemon down): the fleet's
    PostgreSQL in fleet mode, else the SQLite file."""
    if settings.fleet_url is not None:
        from sidecar.store.pg import FleetView  # psycopg: fleet mode only

        return FleetView(settings.fleet_url)
    return UsageView.of(settings)


__all__ = [
    "IngestResult",
    "MeteringStore",
    "SendingStore",
    "Store",
    "UsageFilter",
    "UsageReader",
    "UsageView",
    "check_integrity",
    "connect",
    "health",
    "migrate",
    "migrate_store",
    "open_store",
    "open_view",
    "queries",
    "reader",
    "schema_dir",
    "usage_rows",
    "usage_totals",
]
