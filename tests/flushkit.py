"""A store, the real botocore client and the local Marketplace simulator, wired for flush tests."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web
from helpers import T0, event

from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Settings
from sidecar.events import validate_event
from sidecar.flush import Flusher, Pacer
from sidecar.marketplace import CallResult, MeteringClient
from sidecar.simulator import Simulator, SimulatorConfig, start
from sidecar.store import Store

PRODUCT = "prod-test-1"
H10 = hour_start(T0)
H09 = H10 - HOUR_S


async def _no_sleep(_: float) -> None:
    return None


class InstantPacer(Pacer):
    """A pacer that never waits, for tests that are not about pacing."""

    def __init__(self) -> None:
        super().__init__(1000.0, sleep=_no_sleep)


@dataclass
class Kit:
    """Everything a flush test touches."""

    settings: Settings
    clock: ManualClock
    store: Store
    sim: Simulator
    runner: web.AppRunner
    url: str
    client: MeteringClient
    flusher: Flusher

    def ingest(self, *objs: dict[str, Any]) -> None:
        """Ingest events at the clock's now."""
        now = self.clock.now()
        evs = [validate_event(o, now=now, max_age_s=self.settings.max_event_age_s, max_future_s=300) for o in objs]
        self.store.ingest_future(evs).result()

    def records(self) -> list[dict[str, Any]]:
        """All record rows."""
        conn = sqlite3.connect(self.store.path)
        conn.row_factory = sqlite3.Row
        try:
            return [dict(r) for r in conn.execute("SELECT * FROM records ORDER BY id")]
        finally:
            conn.close()

    def states(self) -> dict[str, int]:
        """Record counts by state."""
        out: dict[str, int] = {}
        for r in self.records():
            out[r["state"]] = out.get(r["state"], 0) + 1
        return out

    def reopen(self) -> None:
        """Close and reopen the store, as a restarted process would."""
        self.store.close()
        self.store = Store.open(self.settings.db_path, settings=self.settings, clock=self.clock)
        self.flusher = Flusher(self.store, self.flusher.api, self.settings, self.clock,
                               rng=random.Random(1), pacer=InstantPacer())

    async def close(self) -> None:
        """Stop the simulator and the store."""
        self.store.close()
        await self.runner.cleanup()


async def make_kit(tmp_path: Path, *, sim_config: SimulatorConfig | None = None, api: Any = None,
                   **settings_changes: Any) -> Kit:
    """A fresh database, a simulator sharing the manual clock, and a flusher using real botocore."""
    clock = ManualClock(T0)
    settings = replace(Settings(db_path=tmp_path / "sidecar.db", region="us-east-1", product_code=PRODUCT,
                                birth_hour="report",
                                read_timeout_s=2.0, connect_timeout_s=2.0), **settings_changes)
    sim = Simulator(sim_config or SimulatorConfig(subscribe_all=True, product_code=PRODUCT, seed=7), clock=clock.now)
    runner, url = await start(sim)
    client = MeteringClient(settings, env={"AWS_ENDPOINT_URL_MARKETPLACE_METERING": url},
                            credentials=("AKIDTEST", "secret"))
    store = Store.open(settings.db_path, settings=settings, clock=clock)
    flusher = Flusher(store, api(client) if api else client, settings, clock, rng=random.Random(1),
                      pacer=InstantPacer())
    return Kit(settings, clock, store, sim, runner, url, client, flusher)


def customer_events(n_customers: int, *, when: float = H09 + 60, per: int = 1) -> list[dict[str, Any]]:
    """`per` events for each of `n_customers` customers (identifier scheme)."""
    return [event(f"{c}-{i}", when=when, customer={"customer_identifier": f"cust-{c:03d}"}, prompt=700,
                  completion=600)
            for c in range(n_customers) for i in range(per)]


class RecordingApi:
    """Wraps the real client; remembers when each call started and can run a hook first."""

    def __init__(self, inner: MeteringClient, hook: Any = None) -> None:
        self.inner = inner
        self.hook = hook
        self.calls: list[tuple[float, int]] = []

    def batch_meter_usage(self, records: Sequence[Mapping[str, Any]], product_code: str | None) -> CallResult:
        import time

        self.calls.append((time.monotonic(), len(records)))
        if self.hook is not None:
            self.hook(records)
        return self.inner.batch_meter_usage(records, product_code)


@dataclass(frozen=True)
class LoggedCall:
    """One BatchMeterUsage call as the flusher made it: clock time, size, and how it came out."""

    at: float
    records: int
    kind: str


class ClockedApi:
    """Wraps a client; logs every call on the kit's manual clock (the simulator cannot see refused ones)."""

    def __init__(self, inner: MeteringClient, clock: ManualClock) -> None:
        self.inner = inner
        self.clock = clock
        self.calls: list[LoggedCall] = []

    def batch_meter_usage(self, records: Sequence[Mapping[str, Any]], product_code: str | None) -> CallResult:
        result = self.inner.batch_meter_usage(records, product_code)
        self.calls.append(LoggedCall(self.clock.now(), len(records), result.kind))
        return result
