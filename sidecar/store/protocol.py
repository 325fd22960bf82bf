"""What the sender needs from a store, as one typed protocol a second backend can implement.

Each method is one transaction. The flusher sees only due records and the outcomes it reports;
where and how they are stored is the backend's business (the SQLite `writer.Store` today).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from sidecar.store.records import DueRecord, Settlement


class SendingStore(Protocol):
    """The store as the flusher uses it."""

    async def prepare_flush(self, *, now: float) -> tuple[int, dict[str, int]]:
        """Seal due hours, freeze sealed buckets into records, close expired windows; returns the
        records frozen and the window outcomes (carried, expired, unknown) by state."""
        ...

    async def claim(self, *, now: float, limit: int) -> list[DueRecord]:
        """The oldest due records of one scheme and product, marked in flight."""
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
