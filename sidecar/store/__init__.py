"""The SQLite store: the only package that touches the database.

Its interface is deliberately narrow (ingest a batch, seal, map a tenant, freeze records, claim
records to send, record outcomes, query usage) so a PostgreSQL backend for fleets can implement
the same operations.
"""

from sidecar.store import queries
from sidecar.store.buckets import IngestResult
from sidecar.store.db import check_integrity, connect, migrate, schema_dir
from sidecar.store.queries import UsageFilter, UsageView, health, reader, usage_rows, usage_totals
from sidecar.store.writer import Store

__all__ = [
    "IngestResult",
    "Store",
    "UsageFilter",
    "UsageView",
    "check_integrity",
    "connect",
    "health",
    "migrate",
    "queries",
    "reader",
    "schema_dir",
    "usage_rows",
    "usage_totals",
]
