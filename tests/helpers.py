"""Helpers for tests: fixed times, valid events, and small conveniences."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient

from sidecar.app import STORE
from sidecar.config import Settings
from sidecar.store import Store

# 2026-11-28T10:02:00Z: "the current hour" is 10:00, and 09:00 is still within the 300 s grace.
T0 = datetime(2026, 11, 28, 10, 2, tzinfo=UTC).timestamp()
ACCOUNT = {"aws_account_id": "123456789012",
           "license_arn": "arn:aws:license-manager::123456789012:license:l-0123456789abcdef0123456789abcdef"}


def rfc3339(epoch: float) -> str:
    """Epoch seconds as an RFC 3339 UTC string."""
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


def event(n: int | str, *, when: float = T0 - 60, customer: dict[str, str] | None = None,
          prompt: int = 10, completion: int = 5, **extra: Any) -> dict[str, Any]:
    """A valid usage event; override fields by keyword."""
    body: dict[str, Any] = {
        "event_id": f"chatcmpl-{n}",
        "time": rfc3339(when),
        "customer": {"customer_identifier": "cust-a"} if customer is None else customer,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
    }
    body.update(extra)
    return body


def client_store(client: TestClient[Any, Any]) -> Store:
    """The store the app behind `client` owns."""
    return client.app[STORE]


def with_settings(settings: Settings, **changes: Any) -> Settings:
    """A copy of settings with some fields changed."""
    return replace(settings, **changes)


def ndjson(events: list[dict[str, Any]]) -> bytes:
    """Events as an NDJSON body."""
    return b"".join(json.dumps(e).encode() + b"\n" for e in events)


def accounted_usage(db: Path) -> dict[tuple[str, str], int]:
    """Usage the database accounts for, per (customer, dimension), in raw units: open buckets' raw,
    whole units × unit of every sealed bucket not carried elsewhere, and carried remainders.
    Conservation holds when this equals the usage ingested."""
    import sqlite3
    from collections import defaultdict

    got: dict[tuple[str, str], int] = defaultdict(int)
    conn = sqlite3.connect(db)
    try:
        for cust, dim, state, raw, q, unit in conn.execute(
                "SELECT customer, dimension, state, raw, quantity, unit FROM buckets"):
            if state in ("open", "unmapped"):
                got[(cust, dim)] += raw
            elif state != "carried":
                got[(cust, dim)] += q * unit
        for cust, dim, raw in conn.execute("SELECT customer, dimension, raw FROM carries"):
            got[(cust, dim)] += raw
    finally:
        conn.close()
    return dict(got)
