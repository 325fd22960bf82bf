"""A fleet member's background work: ship the local outbox, keep a heartbeat, and lead when it can.

Every member ships its outbox to the fleet's PostgreSQL every SIDECAR_SHIP_INTERVAL_S and at
shutdown; a shipment is marked shipped locally only after PostgreSQL committed it. When PostgreSQL
is unreachable the member keeps accepting events (the outbox grows) and says so in /healthz.

One member at a time holds the sender lease and runs the flusher against the fleet's store; the
lease is renewed every third of SIDECAR_LEASE_S. A member that loses it stops sending at once (its
transactions are fenced by the lease epoch). At shutdown a leader finishes its pass, then releases
the lease so another member takes over without waiting for the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
import urllib.request
from collections.abc import Mapping
from typing import Any

import structlog

from sidecar.clock import HOUR_S, Clock, hour_start
from sidecar.config import Settings
from sidecar.errors import FleetUnavailable, LeaseLost, StoreClosed, StoreUnavailable
from sidecar.flush import Flusher, FlushSummary, MeteringApi
from sidecar.store.pg import FleetStore, FleetView
from sidecar.store.protocol import MeteringStore

log = structlog.get_logger("sidecar.fleet")

SHIP_BATCH = 5000  # deltas per shipment (one PostgreSQL transaction)
READ_EVERY_S = 5.0  # how often a member reads every member's heartbeat and the fleet's alarms


def default_member_id(env: Mapping[str, str]) -> str:
    """SIDECAR_MEMBER_ID, else the ECS task ARN from the task metadata endpoint, else host + suffix."""
    given = env.get("SIDECAR_MEMBER_ID")
    if given:
        return given
    meta = env.get("ECS_CONTAINER_METADATA_URI_V4")
    if meta:
        try:
            with urllib.request.urlopen(f"{meta}/task", timeout=2) as resp:  # noqa: S310 (the agent's URL)
                arn = json.loads(resp.read()).get("TaskARN")
            if isinstance(arn, str) and arn:
                return arn
        except (OSError, ValueError) as exc:
            log.warning("task_metadata_unreadable", error=str(exc))
    return f"{socket.gethostname()}-{secrets.token_hex(3)}"


async def ship_outbox(local: MeteringStore, fleet: FleetStore, clock: Clock, *, max_batches: int = 1000) -> int:
    """Ship a local outbox in order until it is empty: each batch is one PostgreSQL transaction and
    is marked shipped locally only after it committed. Returns deltas newly applied."""
    await fleet.ready()
    applied = 0
    for _ in range(max_batches):
        deltas = await local.outbox_batch(limit=SHIP_BATCH)
        if not deltas:
            break
        applied += await fleet.ship(local.origin, deltas)
        await local.mark_shipped(deltas[-1].seq)
        if len(deltas) < SHIP_BATCH:
            break
    return applied


async def keep_lease(fleet: FleetStore, done: asyncio.Event) -> None:
    """Renew the sender lease every third of its TTL while this member holds it, until `done`."""
    every = fleet.settings.lease_s / 3
    while not done.is_set():
        if fleet.epoch is not None:
            try:
                await fleet.renew_lease()
            except Exception as exc:  # PostgreSQL unreachable: the lease runs out, another member takes over
                log.warning("fleet_lease_renewal_failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=every)


async def flush_fleet(settings: Settings, api: MeteringApi | None, clock: Clock, *, local: MeteringStore | None,
                      final: bool, deadline_s: float) -> tuple[FlushSummary, dict[str, Any]]:
    """`sidecar flush --once [--final]` in fleet mode: ship the local file's outbox (a dead member's
    kept file), take the sender lease (waiting for a live leader to give it up or lose it), with
    `final` seal every hour including the open one (the whole service is stopping for good), send
    what is due until the deadline, give the lease back. Returns the summary and what is left."""
    assert settings.fleet_url is not None
    fleet = await FleetStore.open(settings.fleet_url, settings=settings, clock=clock,
                                  member_id=f"flush-{member_id_for(settings)}")
    try:
        if local is not None:
            await ship_outbox(local, fleet, clock)
        end = time.monotonic() + deadline_s
        while await fleet.acquire_lease() is None:
            if time.monotonic() > end:
                raise LeaseLost("another member holds the sender lease; stop the service first (--final)"
                                " or let its leader send")
            await asyncio.sleep(1.0)
        done = asyncio.Event()
        renewer = asyncio.create_task(keep_lease(fleet, done))  # a long drain keeps the lease
        try:
            if final:
                await fleet.seal_through(hour_start(clock.now()) + HOUR_S, final=True)
            summary = await Flusher(fleet, api, settings, clock).drain(deadline_s=max(1.0, end - time.monotonic()))
        finally:
            done.set()
            await renewer
        return summary, await fleet.left_behind(final=final)
    finally:
        with contextlib.suppress(Exception):
            await fleet.release_lease()
        with contextlib.suppress(Exception):
            await fleet.leave()
        await fleet.close()


class Member:
    """One sidecar's part in a fleet: its local store, the fleet's store, and the sender it may run."""

    def __init__(self, local: MeteringStore, fleet: FleetStore, flusher: Flusher, settings: Settings,
                 clock: Clock, *, legacy: Flusher) -> None:
        self.local = local
        self.fleet = fleet
        self.flusher = flusher  # sends the fleet's records while this member leads
        self.legacy = legacy  # sends the records this file froze before it joined the fleet
        assert settings.fleet_url is not None
        self.view = FleetView(settings.fleet_url)  # reads of the fleet's buckets (/usage)
        self.settings = settings
        self.clock = clock
        self.ship_error: str | None = None  # the last shipping failure, cleared by the next success
        self.shipped = 0  # deltas PostgreSQL committed (new ones)
        self.backlog = 0
        self.backlog_since: float | None = None
        self.lead_error: str | None = None  # the last leading failure, cleared by the next success
        self.members_seen: list[dict[str, Any]] = []  # every member, as last read from PostgreSQL
        self.fleet_figures: dict[str, Any] = {}  # the fleet's alarms, as last read (FleetStore.figures)
        self._ship_lock = asyncio.Lock()
        self._ship_failed_at = 0.0  # monotonic time of the last failed shipment
        self._read_at = -READ_EVERY_S  # monotonic time members and the fleet's alarms were last read
        self._next_ship: asyncio.Future[None] | None = None  # callers waiting for the next shipment

    @property
    def leading(self) -> bool:
        return self.fleet.epoch is not None

    async def ship_once(self, *, max_batches: int = 1000) -> int:
        """Ship the outbox in order until it is empty; returns deltas newly applied in PostgreSQL."""
        async with self._ship_lock:
            applied = await ship_outbox(self.local, self.fleet, self.clock, max_batches=max_batches)
            self.shipped += applied
            return applied

    async def ship_now(self, *, fail_fast: bool = False) -> None:
        """Return once a shipment that began after this call has committed (SIDECAR_ACK=fleet);
        raises when it fails. Callers arriving together share one shipment. `fail_fast`: raise at
        once while the last shipment failed less than a ship interval ago (PostgreSQL is down; the
        shipping loop keeps trying), instead of waiting out a connection timeout per request."""
        if fail_fast and self.ship_error is not None and \
                time.monotonic() - self._ship_failed_at < self.settings.ship_interval_s:
            raise FleetUnavailable(f"the fleet's database is unreachable: {self.ship_error}")
        if self._next_ship is None:
            self._next_ship = asyncio.get_running_loop().create_future()
            asyncio.create_task(self._run_next_ship())  # noqa: RUF006 (its outcome is in the future)
        await asyncio.shield(self._next_ship)

    async def _run_next_ship(self) -> None:
        async with self._ship_lock:
            fut, self._next_ship = self._next_ship, None
        # Everyone waiting on `fut` committed before this point: the shipment below covers them.
        assert fut is not None
        try:
            await self.ship_once()
            self.ship_error = None
        except Exception as exc:
            self.ship_error = f"{type(exc).__name__}: {exc}"
            self._ship_failed_at = time.monotonic()
            fut.set_exception(exc)
            fut.exception()  # retrieved: callers that gave up must not leave it unobserved
        else:
            fut.set_result(None)

    async def _ship_and_beat(self) -> None:
        try:
            await self.ship_once()
            if self.ship_error is not None:
                log.info("fleet_shipping_resumed")
            self.ship_error = None
        except (StoreUnavailable, StoreClosed):
            raise
        except Exception as exc:  # PostgreSQL unreachable, failing over, or refusing: keep accepting
            if self.ship_error is None:
                log.warning("fleet_shipping_failed", error=str(exc), note="events are kept in the local outbox")
            self.ship_error = f"{type(exc).__name__}: {exc}"
            self._ship_failed_at = time.monotonic()
        self.backlog, self.backlog_since = await self.local.outbox_backlog()
        with contextlib.suppress(Exception):
            await self.fleet.heartbeat(backlog=self.backlog, backlog_since=self.backlog_since)
            if time.monotonic() - self._read_at >= READ_EVERY_S:  # every member reads them: not every second
                self.members_seen = await self.fleet.members()
                self.fleet_figures = await self.fleet.figures()
                self._read_at = time.monotonic()

    async def shipping_loop(self, stop: asyncio.Event) -> None:
        """Ship every SIDECAR_SHIP_INTERVAL_S until told to stop."""
        while not stop.is_set():
            try:
                await self._ship_and_beat()
            except (StoreUnavailable, StoreClosed) as exc:
                log.warning("fleet_outbox_unreadable", error=str(exc))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.settings.ship_interval_s)

    async def leading_loop(self, stop: asyncio.Event) -> None:
        """Hold (or wait for) the sender lease; while holding it, run a flush pass when one is due.
        The lease is renewed by a task of its own, so a pass longer than the TTL (a large backlog
        at 10 calls/s) keeps it."""
        renew_every = self.settings.lease_s / 3
        next_pass = 0.0
        done = asyncio.Event()
        renewer = asyncio.create_task(keep_lease(self.fleet, done))
        try:
            while not stop.is_set():
                try:
                    if not self.leading:
                        await self.fleet.ready()
                        if await self.fleet.acquire_lease() is not None:
                            self.flusher.forget_unsettled()  # the takeover marked those maybe-received
                        next_pass = 0.0
                    if self.leading and time.monotonic() >= next_pass:
                        summary = await self.flusher.flush_once()
                        next_pass = time.monotonic() + self.flusher.next_pass_delay_s(summary)
                    self.lead_error = None
                except LeaseLost as exc:
                    log.warning("fleet_lease_lost", error=str(exc))
                except Exception as exc:
                    if self.lead_error is None:
                        log.warning("fleet_leading_failed", error=str(exc))
                    self.lead_error = f"{type(exc).__name__}: {exc}"
                wait = renew_every if not self.leading else max(0.05, min(renew_every, next_pass - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=wait)
        finally:
            done.set()
            await renewer

    async def shutdown(self, deadline_s: float) -> None:
        """SIGTERM: ship the whole outbox, give the lease up (the caller stopped the loops first,
        so a pass under way has finished and settled), and leave. Never seals the fleet's open hour."""
        try:
            await asyncio.wait_for(self._ship_and_beat(), timeout=max(0.5, deadline_s))
        except TimeoutError:
            log.warning("fleet_final_ship_cut_short", backlog=self.backlog)
        with contextlib.suppress(Exception):
            await self.fleet.release_lease()
        with contextlib.suppress(Exception):
            await self.fleet.leave()
        if self.backlog:
            log.error("fleet_backlog_left_behind", deltas=self.backlog,
                      note="this member's file still holds unshipped usage; keep it and restart the member")

    def health(self) -> dict[str, Any]:
        """This member's fleet figures for /healthz."""
        age = None if self.backlog_since is None else max(0.0, self.clock.now() - self.backlog_since)
        return {"member_id": self.fleet.member_id, "leader": self.leading, "epoch": self.fleet.epoch,
                "backlog_deltas": self.backlog, "backlog_age_s": age, "ship_error": self.ship_error,
                "lead_error": self.lead_error}


def member_id_for(settings: Settings, env: Mapping[str, str] | None = None) -> str:
    """The member id settings give, or the default for this task."""
    return settings.member_id or default_member_id(env if env is not None else os.environ)
