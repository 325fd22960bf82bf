"""The HTTP edge: an aiohttp app whose handlers parse, call the store, and map errors. Nothing more."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from aiohttp import web

from sidecar import store as store_mod
from sidecar.clock import HOUR_S, Clock, SystemClock, hour_start
from sidecar.config import Settings
from sidecar.errors import BadBody, RegistrationFailed, StoreBusy, StoreClosed, StoreUnavailable
from sidecar.events import JSON_TYPES, NDJSON_TYPES, check_items, parse_body
from sidecar.flush import Flusher, MeteringApi
from sidecar.marketplace import Registration
from sidecar.metrics import Metrics
from sidecar.model import TENANT_RULE, CustomerRef, valid_tenant
from sidecar.notifications import NotificationConsumer, QueueApi
from sidecar.page import render_usage_page
from sidecar.store import MeteringStore, UsageFilter, open_store
from sidecar.store.lifecycle import overdue
from sidecar.when import parse_when

if TYPE_CHECKING:  # fleet mode's modules import psycopg: only in fleet mode
    from sidecar.fleet import Member

log = structlog.get_logger("sidecar.app")

SETTINGS = web.AppKey("settings", Settings)
CLOCK = web.AppKey("clock", Clock)
STORE: web.AppKey[MeteringStore] = web.AppKey("store")
DRAINING = web.AppKey("draining", asyncio.Event)
FLUSHER = web.AppKey("flusher", Flusher)
METRICS = web.AppKey("metrics", Metrics)
MEMBER: web.AppKey[Member] = web.AppKey("member")  # fleet mode only
CONSUMER = web.AppKey("consumer", NotificationConsumer)  # with SIDECAR_SUBSCRIPTION_QUEUE_URL only
# The last ingest commit failure, cleared by the next success.
INGEST_ERROR: web.AppKey[dict[str, Any]] = web.AppKey("ingest_error", dict)

class Registrar(Protocol):
    """What registration needs of AWS (`marketplace.MeteringClient`)."""

    def resolve_customer(self, token: str) -> Registration: ...


REGISTRAR = web.AppKey("registrar", Registrar)  # absent in dry-run mode
OPEN_PATHS = frozenset({"/healthz", "/metrics"})
MAX_TOKEN_LEN = 4096
TOKEN_REFUSED = frozenset({"InvalidTokenException", "ExpiredTokenException"})
RETRY_AFTER_S = "5"


def error(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error body; every refusal of the API looks like this."""
    return web.json_response({"error": message, **extra}, status=status)


def iso(epoch: float | int | None) -> str | None:
    """Epoch seconds as RFC 3339 UTC, or None."""
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


@web.middleware
async def edge_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Bearer-token check (when SIDECAR_TOKEN is set; not for health and metrics), and every
    refusal as JSON, aiohttp's own 404/405/413 included."""
    token = request.app[SETTINGS].token
    if token and request.path not in OPEN_PATHS:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return error(401, "missing or wrong bearer token", hint="send Authorization: Bearer <SIDECAR_TOKEN>")
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400 or exc.content_type == "application/json":
            raise
        return error(exc.status, exc.reason, path=request.path)
    except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        log.exception("handler_crashed", path=request.path, method=request.method)
        return error(500, "internal error; nothing was acknowledged", path=request.path)


def _too_large(limit: int, size: int) -> web.HTTPRequestEntityTooLarge:
    return web.HTTPRequestEntityTooLarge(
        max_size=limit, actual_size=size,
        text=f'{{"error": "body is larger than {limit} bytes (SIDECAR_MAX_BODY_BYTES)"}}',
        content_type="application/json",
    )


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, refusing more than `limit` bytes (declared or streamed) with a JSON 413."""
    declared = request.content_length
    if declared is not None:
        if declared > limit:
            raise _too_large(limit, declared)
        return await request.read()
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise _too_large(limit, size)
    return b"".join(chunks)


async def post_events(request: web.Request) -> web.Response:
    """POST /v1/events, timed and counted for /metrics."""
    metrics = request.app[METRICS]
    started = time.perf_counter()
    response = await ingest_events(request)
    metrics.ingest_latency.observe(time.perf_counter() - started)
    if response.status >= 400 and response.status != 422:
        metrics.requests_refused.labels(str(response.status)).inc()
    return response


async def ingest_events(request: web.Request) -> web.Response:
    """Validate, store durably, and only then answer."""
    settings = request.app[SETTINGS]
    if request.app[DRAINING].is_set():
        return web.json_response({"error": "shutting down; retry on the next sidecar"}, status=503,
                                 headers={"Retry-After": RETRY_AFTER_S})
    ctype = request.content_type
    if ctype not in JSON_TYPES and ctype not in NDJSON_TYPES:
        return error(415, f"content type {ctype!r} is not supported; send application/json or application/x-ndjson")
    body = await read_body(request, settings.max_body_bytes)
    try:
        items = parse_body(body, ctype)
    except BadBody as exc:
        return error(400, str(exc))
    now = request.app[CLOCK].now()
    valid, rejected = check_items(items, now=now, max_age_s=settings.max_event_age_s,
                                  max_future_s=settings.max_future_s)
    accepted = duplicates = 0
    if valid:
        try:
            result = await request.app[STORE].ingest(valid)
        except StoreBusy as exc:
            return web.json_response({"error": str(exc), "stored": 0}, status=503,
                                     headers={"Retry-After": "1"})
        except StoreUnavailable as exc:
            status = 507 if exc.disk_full else 503
            request.app[INGEST_ERROR].update(error=str(exc), at=int(now), disk_full=exc.disk_full)
            return web.json_response({"error": str(exc), "stored": 0}, status=status,
                                     headers={"Retry-After": RETRY_AFTER_S})
        except StoreClosed:
            return web.json_response({"error": "shutting down"}, status=503,
                                     headers={"Retry-After": RETRY_AFTER_S})
        accepted, duplicates = result.accepted, result.duplicates
        request.app[INGEST_ERROR].clear()
        if settings.fleet and settings.ack == "fleet" and accepted:
            try:  # the answer waits until the fleet's PostgreSQL holds these events' usage
                await request.app[MEMBER].ship_now(fail_fast=True)
            except Exception as exc:
                log.warning("fleet_ack_failed", error=str(exc))
                return web.json_response(
                    {"error": f"stored locally but not yet in the fleet's database ({type(exc).__name__});"
                              " retry: duplicates are counted once", "stored_locally": accepted},
                    status=503, headers={"Retry-After": RETRY_AFTER_S})
    metrics = request.app[METRICS]
    metrics.accepted.inc(accepted)
    metrics.duplicates.inc(duplicates)
    if rejected:
        metrics.rejected_events.inc(len(rejected))
    for r in rejected:
        metrics.rejected.labels(r["error"].split(":", 1)[0] if ":" in r["error"] else "body").inc()
    if request.headers.get("X-Spool-Replay"):
        metrics.spool_replay_events.labels("accepted").inc(accepted)
        metrics.spool_replay_events.labels("duplicate").inc(duplicates)
    if rejected:
        log.info("events_rejected", count=len(rejected), first=rejected[0]["error"])
    answer: dict[str, Any] = {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}
    if rejected and not valid:
        answer["error"] = "every event was rejected; see rejected[]"
        return web.json_response(answer, status=422)
    return web.json_response(answer)


async def put_customer(request: web.Request) -> web.Response:
    """PUT /v1/customers/{tenant}: map a tenant to an AWS customer; its unmapped usage follows."""
    tenant = request.match_info["tenant"]
    if not valid_tenant(tenant):
        return error(400, f"tenant: {TENANT_RULE}")
    doc = await json_object(request)
    if isinstance(doc, web.Response):
        return doc
    try:
        ref = CustomerRef.parse(doc, where="body")
    except ValueError as exc:
        return error(422, str(exc))
    return await _map_tenant(request, tenant, ref, source="api")


async def json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """A small write's body as one JSON object (64 KiB at most), or the refusal to answer with."""
    if request.content_type not in JSON_TYPES:
        return error(415, "send application/json")
    body = await read_body(request, 65536)
    try:
        items = parse_body(body, "application/json")
    except BadBody as exc:
        return error(400, str(exc))
    if len(items) != 1 or not isinstance(items[0].value, dict) or body.lstrip()[:1] != b"{":
        return error(422, "body: must be one JSON object")
    return dict(items[0].value)


async def _map_tenant(request: web.Request, tenant: str, ref: CustomerRef, *, source: str,
                      aws_account_id: str | None = None, answer: dict[str, Any] | None = None) -> web.Response:
    """Store a tenant's mapping (fleet-wide in fleet mode: it holds for every member) and answer with it
    (`answer`: more keys for the answer)."""
    store = request.app[MEMBER].fleet if MEMBER in request.app else request.app[STORE]
    try:
        moved = await store.map_tenant(tenant, ref, source=source, aws_account_id=aws_account_id)
    except StoreUnavailable as exc:
        return web.json_response({"error": str(exc)}, status=503, headers={"Retry-After": RETRY_AFTER_S})
    return web.json_response({"tenant": tenant, "customer": ref.key, **(answer or {}), "buckets_moved": moved})


async def post_registration(request: web.Request) -> web.Response:
    """POST /v1/registrations: resolve a buyer's registration token with AWS (ResolveCustomer) and
    map the tenant to the customer it names. AWS's refusals store nothing."""
    registrar = request.app.get(REGISTRAR)
    if registrar is None:
        return error(503, "registrations call AWS's ResolveCustomer, which a dry run does not do")
    doc = await json_object(request)
    if isinstance(doc, web.Response):
        return doc
    unknown = sorted(set(doc) - {"registration_token", "tenant"})
    if unknown:
        return error(422, f"body: unknown field(s) {', '.join(map(repr, unknown))}; send registration_token and tenant")
    token, tenant = doc.get("registration_token"), doc.get("tenant")
    if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN_LEN:
        return error(422, f"registration_token: must be a string of 1-{MAX_TOKEN_LEN} characters"
                          " (the x-amzn-marketplace-token the buyer's browser posted)")
    if not isinstance(tenant, str) or not valid_tenant(tenant):
        return error(422, f"tenant: {TENANT_RULE}")
    try:
        reg = await asyncio.to_thread(registrar.resolve_customer, token)
    except RegistrationFailed as exc:
        log.warning("registration_refused", tenant=tenant, code=exc.code, error=str(exc))
        if exc.code in TOKEN_REFUSED:
            return error(400, str(exc), code=exc.code)
        if exc.retryable:
            return web.json_response({"error": str(exc), "code": exc.code}, status=503,
                                     headers={"Retry-After": RETRY_AFTER_S})
        return error(502, str(exc), code=exc.code)
    mine = request.app[SETTINGS].product_code
    if mine and reg.product_code and reg.product_code != mine:
        return error(409, f"registration_token: the token is for product {reg.product_code!r}; this sidecar"
                          f" meters {mine!r} (SIDECAR_PRODUCT_CODE)", code="OtherProduct")
    log.info("customer_registered", tenant=tenant, customer=reg.customer.key, product_code=reg.product_code)
    return await _map_tenant(request, tenant, reg.customer, source="registration", aws_account_id=reg.aws_account_id,
                             answer={"product_code": reg.product_code, "aws_account_id": reg.aws_account_id})


def present_row(row: dict[str, Any]) -> dict[str, Any]:
    """A bucket row as /usage shows it: times as RFC 3339, raw amounts beside whole units."""
    out = dict(row)
    for key in ("hour", "first_event_at", "sealed_at", "record_timestamp", "sent_at", "parked_at", "released_at"):
        if key in out:
            out[key] = iso(out[key])
    out["unit_raw"] = out.pop("unit")
    return out


def present_subscription(row: dict[str, Any], *, now: float) -> dict[str, Any]:
    """A subscriber's row as /usage shows it: times as RFC 3339, and whether its final usage is overdue."""
    out = {k: iso(v) if k.endswith("_at") else v for k, v in row.items()}
    out["final_usage_overdue"] = overdue(row, now=now)
    return out


async def get_usage(request: web.Request) -> web.Response:
    """GET /usage: bucket rows and per-customer totals, filterable."""
    q = request.query
    try:
        filt = UsageFilter(
            customer=q.get("customer"),
            dimension=q.get("dimension"),
            state=q.get("state"),
            since=parse_when("from", q["from"]) if "from" in q else None,
            until=parse_when("to", q["to"]) if "to" in q else None,
        )
    except ValueError as exc:
        return error(400, str(exc))
    member = request.app.get(MEMBER)  # fleet mode: the fleet's buckets (a member's file keeps none)
    view = request.app[STORE].view if member is None else member.view
    now = request.app[CLOCK].now()
    wants_html = "text/html" in request.headers.get("Accept", "") and request.query.get("format") != "json"
    try:
        data = await asyncio.to_thread(functools.partial(view.usage, filt, health_at=now if wants_html else None))
    except Exception as exc:
        if member is None:
            raise
        return web.json_response({"error": f"the fleet's database is unreachable: {type(exc).__name__}"},
                                 status=503, headers={"Retry-After": RETRY_AFTER_S})
    if member is not None:
        data["fleet"] = {**member.health(), "members": member.members_seen}
    data["rows"] = [present_row(r) for r in data["rows"]]
    data["parked"] = [present_row(r) for r in data["parked"]]
    data["subscriptions"] = [present_subscription(r, now=now) for r in data.get("subscriptions", [])]
    if wants_html:
        return web.Response(text=render_usage_page(data, now=now), content_type="text/html",
                            headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})
    return web.json_response(data)


async def get_healthz(request: web.Request) -> web.Response:
    """GET /healthz: is the database writable, and how old is the oldest unsent sealed hour."""
    store = request.app[STORE]
    now = request.app[CLOCK].now()
    writable, problem = True, None
    try:
        await store.check_writable(now)
    except (StoreUnavailable, StoreClosed) as exc:
        writable, problem = False, str(exc)
    facts = await asyncio.to_thread(store.view.health, now)
    ingest_error = request.app[INGEST_ERROR].copy()
    # A full disk is reported, not answered with 503: ECS would replace the task, and the
    # unsent usage in this task's database would go with it.
    # Degraded (still 200): something an operator must act on before AWS's window closes.
    consumer = request.app.get(CONSUMER)
    attention = (ingest_error or facts["held_records"] or facts["unconfigured"] or facts["unmapped"]
                 or facts["lifecycle"]["final_usage_overdue"] or (consumer is not None and consumer.error))
    status = "unavailable" if not writable else "degraded" if attention else "ok"
    body = {"status": status, "db_writable": writable, "draining": request.app[DRAINING].is_set(),
            "ingest_error": ingest_error or None, **facts}
    if consumer is not None:
        body["lifecycle"] = {**body["lifecycle"], "queue": consumer.health()}
    if MEMBER in request.app:
        member = request.app[MEMBER]
        figures = member.fleet_figures  # as of the last heartbeat
        body["fleet"] = {**member.health(), "members": member.members_seen, **figures}
        if member.ship_error or member.lead_error or figures.get("held_records") or \
                figures.get("unconfigured_raw_by_dimension") or \
                (figures.get("lifecycle") or {}).get("final_usage_overdue"):
            body["status"] = "degraded" if writable else body["status"]
    if problem:
        body["error"] = problem
    return web.json_response(body, status=200 if writable else 503)


@functools.cache
def _openapi_document() -> bytes:
    return (store_mod.schema_dir() / "openapi.json").read_bytes()


async def get_openapi(request: web.Request) -> web.Response:
    """GET /openapi.json: the API document, as shipped (read from the package once)."""
    return web.Response(body=_openapi_document(), content_type="application/json")


async def get_metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = await asyncio.to_thread(request.app[METRICS].render)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def maintenance_loop(app: web.Application, stop: asyncio.Event) -> None:
    """Seal, freeze and flush every SIDECAR_FLUSH_INTERVAL_S until told to stop (between passes),
    sooner when the sender's probe or a record's retry is due before then."""
    flusher = app[FLUSHER]
    interval = app[SETTINGS].flush_interval_s
    while not stop.is_set():
        wait = interval
        try:
            summary = await flusher.flush_once()
            wait = flusher.next_pass_delay_s(summary)
            app[METRICS].pruned.inc(await app[STORE].prune())
        except (StoreUnavailable, StoreClosed) as exc:
            log.warning("flush_failed", error=str(exc))
        except Exception:
            log.exception("flush_crashed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=wait)


async def shutdown_flush(app: web.Application, deadline_s: float) -> None:
    """On SIGTERM: seal the open hour and send what is owed until the deadline; the rest stays pending."""
    store, flusher = app[STORE], app[FLUSHER]
    now = app[CLOCK].now()
    try:
        await store.seal_through(hour_start(now) + HOUR_S, final=True)
        summary = await asyncio.wait_for(flusher.drain(deadline_s=deadline_s), timeout=deadline_s)
        log.info("shutdown_flush_done", **summary.as_dict())
    except TimeoutError:
        log.warning("shutdown_flush_deadline", deadline_s=deadline_s, note="unsent records stay pending")
    except (StoreUnavailable, StoreClosed) as exc:
        log.warning("shutdown_flush_failed", error=str(exc))

    left = await asyncio.to_thread(store.view.left_behind, app[CLOCK].now())
    if left:  # the task's storage usually goes with it: say what it takes along
        log.error("usage_left_behind", **left,
                  note="unsent unless this database file is kept and flushed (`sidecar flush --once --final`)")


async def fleet_member(app: web.Application, store: MeteringStore, api: MeteringApi | None, *,
                       background: bool, queue: QueueApi | None) -> AsyncIterator[None]:
    """Fleet mode's resources: the fleet's store, this member's loops, and its SIGTERM sequence
    (503 for new events, stop leading after the pass under way, ship everything, release the lease)."""
    from sidecar.fleet import Member, member_id_for
    from sidecar.store.pg import FleetStore

    settings, clock = app[SETTINGS], app[CLOCK]
    assert settings.fleet_url is not None
    fleet = await FleetStore.open(settings.fleet_url, settings=settings, clock=clock,
                                  member_id=member_id_for(settings), wait=False)
    app[FLUSHER] = Flusher(fleet, api, settings, clock)
    # A file that served in single-file mode: its open usage joins the fleet, its frozen records
    # finish here (the member's `legacy` flusher sends them).
    member = Member(store, fleet, app[FLUSHER], settings, clock, legacy=Flusher(store, api, settings, clock))
    app[MEMBER] = member
    await store.hand_over()
    stop_ship, stop_lead, stop_prune = asyncio.Event(), asyncio.Event(), asyncio.Event()
    tasks = [asyncio.create_task(member.shipping_loop(stop_ship), name="shipping"),
             asyncio.create_task(member.leading_loop(stop_lead), name="leading"),
             asyncio.create_task(local_loop(app, member, stop_prune), name="local")] if background else []
    if queue is not None:  # one consumer per fleet: whoever holds the sender lease
        app[CONSUMER] = NotificationConsumer(queue, fleet, app[FLUSHER], settings, clock)
    consuming = _consume(app, background, active=lambda: member.leading)
    app[METRICS].attach(view=store.view, now=clock.now, flusher=app[FLUSHER], member=member,
                        consumer=app.get(CONSUMER))
    log.info("sidecar_started", db=str(settings.db_path), fleet_member=fleet.member_id, ack=settings.ack,
             dimensions=[d.name for d in settings.dimensions], dry_run=api is None)
    try:
        yield
    finally:
        app[DRAINING].set()
        deadline = time.monotonic() + settings.shutdown_deadline_s
        await _stop_consuming(consuming)
        for ev in (stop_lead, stop_ship, stop_prune):
            ev.set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(0.5, settings.shutdown_deadline_s / 2))
            for t in pending:
                log.warning("fleet_task_cut_short_by_shutdown", task=t.get_name())
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if background:
            await member.shutdown(max(0.5, deadline - time.monotonic()))
        await fleet.close()
        await asyncio.to_thread(store.close)
        log.info("sidecar_stopped")


async def local_loop(app: web.Application, member: Member, stop: asyncio.Event) -> None:
    """Fleet mode's local housekeeping: prune events (kept for dedup) and shipped outbox rows, and
    send the records this file froze before it joined the fleet, if any are left."""
    while not stop.is_set():
        try:
            pending, _ = await app[STORE].pending_summary()
            if pending:
                await member.legacy.flush_once()
            app[METRICS].pruned.inc(await app[STORE].prune())
        except (StoreUnavailable, StoreClosed) as exc:
            log.warning("prune_failed", error=str(exc))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=app[SETTINGS].flush_interval_s)


def _consume(app: web.Application, background: bool, *,
             active: Callable[[], bool] = lambda: True) -> tuple[asyncio.Event, asyncio.Task[None]] | None:
    """Start the subscription queue's consumer, if there is a queue and background work."""
    consumer = app.get(CONSUMER)
    if consumer is None or not background:
        return None
    stop = asyncio.Event()
    return stop, asyncio.create_task(consumer.run(stop, active=active), name="subscriptions")


async def _stop_consuming(consuming: tuple[asyncio.Event, asyncio.Task[None]] | None) -> None:
    """Stop the consumer: a long poll under way is abandoned (its messages become visible again)."""
    if consuming is None:
        return
    stop, task = consuming
    stop.set()
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout=1.0)
    except TimeoutError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def create_app(settings: Settings, *, clock: Clock | None = None, api: MeteringApi | None = None,
               background: bool = True, queue: QueueApi | None = None,
               registrar: Registrar | None = None) -> web.Application:
    """The sidecar's aiohttp application.

    `api` sends to AWS (None: dry run, requests are only logged). `background=False` leaves the
    flush loop, the queue's consumer and the shutdown flush to the caller (tests drive
    `app[FLUSHER]` and `app[CONSUMER]` directly). `queue`: the subscription notifications' queue;
    `registrar`: ResolveCustomer for POST /v1/registrations (None: refused).
    """
    app = web.Application(middlewares=[edge_middleware], client_max_size=settings.max_body_bytes + 1)
    app[SETTINGS] = settings
    app[CLOCK] = clock or SystemClock()
    app[DRAINING] = asyncio.Event()
    app[METRICS] = Metrics()
    app[INGEST_ERROR] = {}
    if registrar is not None:
        app[REGISTRAR] = registrar

    async def resources(app: web.Application) -> AsyncIterator[None]:
        started = time.monotonic()
        store = await asyncio.to_thread(functools.partial(open_store, settings, clock=app[CLOCK],
                                                          on_group=app[METRICS].group_size.observe))
        app[STORE] = store
        if settings.fleet:
            async for _ in fleet_member(app, store, api, background=background, queue=queue):
                yield
            return
        app[FLUSHER] = Flusher(store, api, settings, app[CLOCK])
        if queue is not None:
            app[CONSUMER] = NotificationConsumer(queue, store, app[FLUSHER], settings, app[CLOCK])
            log.warning("subscription_states_in_this_file", db=str(settings.db_path),
                        note="single-file mode keeps customers' subscription states in this task's file: a"
                             " replacement task starts without them; use fleet mode or keep the file on a volume")
        app[METRICS].attach(view=store.view, now=app[CLOCK].now, flusher=app[FLUSHER], consumer=app.get(CONSUMER))
        stop = asyncio.Event()
        loop_task = asyncio.create_task(maintenance_loop(app, stop)) if background else None
        consuming = _consume(app, background)
        log.info("sidecar_started", db=str(settings.db_path), synchronous=settings.synchronous,
                 dimensions=[d.name for d in settings.dimensions], dry_run=api is None,
                 startup_ms=round((time.monotonic() - started) * 1000))
        yield
        app[DRAINING].set()
        deadline = time.monotonic() + settings.shutdown_deadline_s
        await _stop_consuming(consuming)
        if loop_task is not None:
            stop.set()
            try:
                await asyncio.wait_for(loop_task, timeout=settings.shutdown_deadline_s)
            except TimeoutError:
                log.warning("flush_pass_cut_short_by_shutdown")
            await shutdown_flush(app, max(0.5, deadline - time.monotonic()))
        await asyncio.to_thread(store.close)
        log.info("sidecar_stopped")

    async def on_shutdown(app: web.Application) -> None:
        app[DRAINING].set()

    app.cleanup_ctx.append(resources)
    app.on_shutdown.append(on_shutdown)
    app.router.add_post("/v1/events", post_events)
    app.router.add_put("/v1/customers/{tenant}", put_customer)
    app.router.add_post("/v1/registrations", post_registration)
    app.router.add_get("/usage", get_usage)
    app.router.add_get("/healthz", get_healthz)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/openapi.json", get_openapi)
    return app

