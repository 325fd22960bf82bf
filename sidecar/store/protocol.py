"""The store as the rest of the product sees it: typed protocols a second backend can implement.

Each async method is one transaction: it commits whole or not at all. The flusher uses only
`SendingStore` (it sees due records and reports outcomes); the app and the CLI use `MeteringStore`;
reads for /usage, /healthz, /metrics and `sidecar usage` go through `UsageReader`, which works
beside the writer and with the daemon down. Nothing outside `sidecar/store/` knows where or how
the data is kept (the SQLite `writer.Store` today).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sidecar.events import UsageEvent
from sidecar.model import CustomerRef
from sidecar.store.buckets import IngestResult
from sidecar.store.lifecycle import NoticeResult
from sidecar.store.outbox import ShippedDelta
from sidecar.store.queries import UsageFilter
from sidecar.store.records import DueRecord, Settlement
from sidecar.subscriptions import Notice


class SendingStore(Protocol):
    """The store as the flusher uses it."""

    async def prepare_flush(self, *, now: float) -> tuple[int, dict[str, int]]:
        """Seal due hours, freeze sealed buckets into records, close expired windows; returns the
        records frozen and the window outcomes (carried, expired, unknown) by state."""
        ...

    async def claim(self, *, now: float, limit: int, owner: str = ...) -> list[DueRecord]:
        """The oldest due records of one scheme and product, marked in flight for `owner`."""
        ...

    async def peek_due(self, *, now: float, limit: int) -> list[DueRecord]:
        """Due records without claiming them (dry run)."""
        ...

    async def settle(self, settlements: Sequence[Settlement], *, now: float) -> None:
        """Write the outcomes of one call."""
        ...

    async def close_records(self, ids: Sequence[int], *, now: float, reason: str) -> list[str]:
        """Apply the window rule to records AWS refused for their timestamp; their new states."""
        ...

    async def due_now(self, *, held_until: float, now: float) -> int:
        """Records waiting until `held_until` or earlier become due now (a last chance at shutdown)."""
        ...

    async def pending_summary(self) -> tuple[int, float | None]:
        """How many records are pending, and the earliest time one is due again."""
        ...

    async def apply_notice(self, notice: Notice, *, now: float) -> NoticeResult:
        """Apply a subscription notification (the sender applies them: an ending agreement's usage
        is sealed and frozen at once, to be claimed before every other record)."""
        ...


class UsageReader(Protocol):
    """Read-only figures; synchronous (callers run them in a worker thread), each on its own snapshot."""

    def exists(self) -> bool:
        """Whether there is anything to read yet."""
        ...

    def usage(self, f: UsageFilter, *, limit: int = 5000, health_at: float | None = None) -> dict[str, Any]:
        """Bucket rows, per-customer totals and parked usage; with `health_at`, the health figures too."""
        ...

    def health(self, now: float) -> dict[str, Any]:
        """The figures /healthz reports."""
        ...

    def left_behind(self, now: float) -> dict[str, Any]:
        """What the store still holds unsent."""
        ...

    def open_buckets(self) -> int:
        """Buckets of hours still open."""
        ...

    def figures(self, now: float) -> dict[str, Any] | None:
        """Everything /metrics reads at a scrape; None before the store exists."""
        ...


class MeteringStore(SendingStore, Protocol):
    """Every domain operation of the store, as the app, the CLI and the flusher use them."""

    @property
    def view(self) -> UsageReader:
        """Reads beside the writer."""
        ...

    async def ingest(self, events: Sequence[UsageEvent]) -> IngestResult:
        """Store a validated batch durably: dedup by event_id, usage added to its hourly buckets."""
        ...

    async def check_writable(self, now: float) -> None:
        """A tiny write: raises StoreUnavailable or StoreClosed when the store cannot commit."""
        ...

    async def map_tenant(self, tenant: str, ref: CustomerRef, *, source: str = "api",
                         aws_account_id: str | None = None) -> int:
        """Map a tenant to a customer; returns how many unmapped buckets joined the customer's.
        `aws_account_id`: the account of an identifier customer (ResolveCustomer), which the
        subscription notifications that name only the account then reach."""
        ...

    async def seal_due(self) -> int:
        """Seal every open bucket whose hour ended more than the grace period ago."""
        ...

    async def seal_through(self, before: int, *, final: bool = False) -> int:
        """Seal open buckets of hours starting before `before`; `final` settles remainders too."""
        ...

    async def prune(self, *, batch: int = 1000, max_batches: int = 20) -> int:
        """Delete event rows no longer needed for dedup or open hours; returns rows deleted."""
        ...

    async def replay(self, *, states: Sequence[str], customer: str | None = None,
                     rename: Mapping[str, str] | None = None) -> dict[str, int]:
        """Re-drive rejected, conflict or expired records (resend, rebuild or carry); counts by action."""
        ...

    async def release_held(self, *, customer: str | None = None, dimension: str | None = None,
                           record_id: int | None = None, discard: bool = False) -> int:
        """Send (or discard) records a guardrail held; returns how many."""
        ...

    async def discard_unmapped(self, *, customer: str) -> int:
        """Give up a tenant's unmapped usage; returns buckets discarded."""
        ...

    async def release_parked(self, *, rename: Mapping[str, str], customer: str | None = None) -> int:
        """Move parked (`unconfigured`) usage into configured dimensions (OLD=NEW); returns rows moved."""
        ...

    @property
    def origin(self) -> str:
        """This store's id among a fleet's shipments."""
        ...

    async def outbox_batch(self, *, limit: int = 5000) -> list[ShippedDelta]:
        """Fleet mode: the oldest usage deltas not yet shipped, in order."""
        ...

    async def mark_shipped(self, through: int) -> None:
        """Fleet mode: the fleet's PostgreSQL committed every delta up to seq `through`."""
        ...

    async def hand_over(self) -> dict[str, int]:
        """Fleet mode, at a member's start: a single-file store's open usage and remainders join
        the outbox; its frozen records stay to finish where they are."""
        ...

    async def outbox_backlog(self) -> tuple[int, float | None]:
        """Fleet mode: unshipped deltas and when the oldest was committed."""
        ...

    def close(self) -> None:
        """Finish queued work and release the store (and its ownership)."""
        ...
