"""Pure ASGI middleware for vLLM: one usage event per metered request, the response left untouched.

Enable it with `--middleware vllm_metering.middleware.UsageMiddleware`. It wraps `receive` and `send`
only to watch: every message is passed on first, exactly as the app produced it, and only then is
the body chunk scanned (see `vllm_metering.usage`). The event is built after the last byte went out,
and any failure in metering is logged and swallowed, never raised into the request. The moment the
last byte went out (the injectable `clock`, wall-clock epoch seconds) is the event's `time` and, with
the engine time from vLLM's `metrics`, the `engine_end` of the request's engine interval.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from vllm_metering.settings import MeteringSettings, load_settings
from vllm_metering.usage import (
    BodyFacts,
    JsonBodyReader,
    SseBodyReader,
    build_event,
    make_event_id,
    usage_from_object,
)

logger = logging.getLogger("vllm.metering")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class EventSink(Protocol):
    """Where finished usage events go; `enqueue` must be non-blocking and never raise."""

    def enqueue(self, event: dict[str, Any]) -> None: ...


@dataclass(slots=True)
class MiddlewareStats:
    """Counters of what the middleware did, for tests and operators."""

    events: int = 0
    aborted_without_usage: int = 0
    without_customer: int = 0
    internal_errors: int = 0


class _Capture:
    """Per-request state: what we saw of the request and of the response so far."""

    __slots__ = (
        "client_disconnected",
        "client_request_id",
        "complete",
        "customer",
        "finished_at",
        "raised",
        "reader",
        "send_failed",
        "status",
    )

    def __init__(self, customer: dict[str, str] | None, client_request_id: str | None) -> None:
        self.customer = customer
        self.client_request_id = client_request_id
        self.status: int | None = None
        self.reader: JsonBodyReader | SseBodyReader | None = None
        self.complete = False
        self.client_disconnected = False
        self.send_failed = False
        self.raised = False
        self.finished_at: float | None = None


def _header_text(value: bytes) -> str | None:
    text = value.decode("latin-1").strip()
    return text or None


class UsageMiddleware:
    """Meters POST requests whose response carries usage; configured from METERING_* variables.

    vLLM instantiates it as `UsageMiddleware(app)`. Tests and embedders may pass `settings`, a `sink`
    (anything with `enqueue(event)`) and a `clock` (epoch seconds). Without a sink, one `Reporter`
    is created lazily and started on the first request's event loop; ASGI lifespan shutdown closes it.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: MeteringSettings | None = None,
        sink: EventSink | None = None,
        clock: Callable[[], float] = time.time,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.app = app
        self.settings = settings if settings is not None else load_settings(os.environ if env is None else env)
        self.stats = MiddlewareStats()
        self._sink = sink
        self._owns_sink = sink is None
        self._clock = clock
        self._warned: set[str] = set()
        s = self.settings
        self._tenant_headers = tuple(h.encode("latin-1") for h in s.tenant_headers)
        optional = (s.account_id_header, s.license_arn_header, s.customer_identifier_header)
        self._wanted = frozenset(
            [*self._tenant_headers, b"x-request-id"] + [h.encode("latin-1") for h in optional if h is not None]
        )
        if s.enabled:
            logger.info(
                "vllm_metering enabled: sidecar=%s tenant_headers=%s default_tenant=%s spool=%s",
                s.sidecar_url,
                ",".join(s.tenant_headers),
                s.default_tenant,
                s.spool_path,
            )

    @property
    def sink(self) -> EventSink | None:
        """The sink events go to (the lazily created Reporter, once a request has been seen)."""
        return self._sink

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind == "http" and scope.get("method") == "POST" and self.settings.enabled:
            capture = self._begin(scope)
            if capture is not None:
                await self._metered(scope, receive, send, capture)
                return
        elif kind == "lifespan" and self._owns_sink and self.settings.enabled:
            await self._lifespan(scope, receive, send)
            return
        await self.app(scope, receive, send)

    # -- requests ---------------------------------------------------------------------------------

    def _begin(self, scope: Scope) -> _Capture | None:
        try:
            found: dict[bytes, str] = {}
            for name, value in scope.get("headers") or ():
                key = name.lower()
                if key in self._wanted and key not in found and (text := _header_text(value)):
                    found[key] = text
            scope.setdefault("state", {})  # what Starlette does anyway; lets us read it afterwards
            return _Capture(self._customer(found), found.get(b"x-request-id"))
        except Exception:
            self._internal_error("begin")
            return None

    def _customer(self, found: Mapping[bytes, str]) -> dict[str, str] | None:
        s = self.settings
        if s.account_id_header and s.license_arn_header:
            account = found.get(s.account_id_header.encode("latin-1"))
            licence = found.get(s.license_arn_header.encode("latin-1"))
            if account and licence:
                return {"aws_account_id": account, "license_arn": licence}
        if s.customer_identifier_header:
            ident = found.get(s.customer_identifier_header.encode("latin-1"))
            if ident:
                return {"customer_identifier": ident}
        for header in self._tenant_headers:
            if tenant := found.get(header):
                return {"tenant": tenant}
        if s.default_tenant:
            return {"tenant": s.default_tenant}
        return None

    async def _metered(self, scope: Scope, receive: Receive, send: Send, cap: _Capture) -> None:
        async def watched_receive() -> Message:
            message = await receive()
            if message.get("type") == "http.disconnect":
                cap.client_disconnected = True
            return message

        async def watched_send(message: Message) -> None:
            try:
                await send(message)
            except BaseException:
                cap.send_failed = True
                raise
            try:
                reader = cap.reader
                body = message.get("body")
                if (
                    reader is not None
                    and type(body) is bytes
                    and message.get("more_body", False)
                    and message.get("type") == "http.response.body"
                    and not cap.client_disconnected
                ):
                    reader.feed(body)  # the hot path: one streamed chunk
                else:
                    self._observe(cap, message)
            except Exception:
                cap.reader = None
                self._internal_error("observe")

        try:
            await self.app(scope, watched_receive, watched_send)
        except BaseException:
            cap.raised = True
            raise
        finally:
            self._finish(scope, cap)

    def _observe(self, cap: _Capture, message: Message) -> None:
        kind = message.get("type")
        if kind == "http.response.body":
            if cap.client_disconnected and not cap.complete:
                return  # the server drops what is sent after a disconnect: it was not delivered
            if cap.reader is not None:
                body = message.get("body")
                if body:
                    cap.reader.feed(bytes(body))
            if not message.get("more_body", False) and not cap.complete:
                cap.complete = True
                cap.finished_at = self._clock()
        elif kind == "http.response.start":
            cap.status = int(message.get("status", 0))
            content_type = encoding = b""
            for name, value in message.get("headers") or ():
                key = name.lower()
                if key == b"content-type":
                    content_type = value.lower()
                elif key == b"content-encoding":
                    encoding = value.strip().lower()
            if encoding not in (b"", b"identity"):
                return  # compressed: rely on request_metadata instead
            if content_type.startswith(b"text/event-stream"):
                cap.reader = SseBodyReader(max_line_bytes=self.settings.max_json_bytes)
            elif b"json" in content_type:
                cap.reader = JsonBodyReader(max_bytes=self.settings.max_json_bytes)

    def _finish(self, scope: Scope, cap: _Capture) -> None:
        try:
            event = self._event(scope, cap)
            if event is not None:
                self._sink_for_request().enqueue(event)
                self.stats.events += 1
        except Exception:
            self._internal_error("finish")

    def _event(self, scope: Scope, cap: _Capture) -> dict[str, Any] | None:
        facts = cap.reader.result() if cap.reader is not None else BodyFacts()
        state = scope.get("state")
        metadata = state.get("request_metadata") if isinstance(state, Mapping) else None
        usage = facts.usage
        if usage is None and metadata is not None:
            final = (
                metadata.get("final_usage_info")
                if isinstance(metadata, Mapping)
                else getattr(metadata, "final_usage_info", None)
            )
            usage = usage_from_object(final)
        aborted = not cap.complete and (cap.client_disconnected or cap.send_failed or not cap.raised)
        if usage is None:
            if aborted and (cap.status is None or cap.status < 400):
                self.stats.aborted_without_usage += 1
                self._warn_once(
                    "aborted",
                    "a client disconnected before usage was known, so that request is not billed. "
                    "Start vLLM with --enable-force-include-usage so that streams carry running usage",
                )
            return None
        if cap.customer is None:
            self.stats.without_customer += 1
            self._warn_once(
                "customer",
                "a request carried none of the tenant headers %s and METERING_DEFAULT_TENANT is "
                "empty; its usage is not reported",
                ",".join(self.settings.tenant_headers),
            )
            return None
        if cap.complete:
            error = facts.error or (cap.status is not None and cap.status >= 400)
            finish = "error" if error else facts.finish
        else:
            finish = "abort" if aborted else "error"
        response_id = facts.response_id
        if response_id is None and metadata is not None:
            rid = getattr(metadata, "request_id", None)
            response_id = rid if isinstance(rid, str) and rid else None
        return build_event(
            event_id=make_event_id(
                response_id,
                client_request_id=cap.client_request_id,
                trust_request_id=self.settings.trust_request_id,
            ),
            # When the final body chunk went out (else now): the event's `time` and `engine_end`.
            finished_at=cap.finished_at if cap.finished_at is not None else self._clock(),
            customer=cap.customer,
            usage=usage,
            model=facts.model,
            finish=finish,
            gpu_seconds=facts.gpu_seconds,
        )

    def _sink_for_request(self) -> EventSink:
        if self._sink is None:
            from vllm_metering.reporter import Reporter  # deferred: aiohttp only once needed

            self._sink = Reporter(self.settings)
        if self._owns_sink:
            self._sink.start()  # type: ignore[attr-defined]  # idempotent
        return self._sink

    # -- lifespan ---------------------------------------------------------------------------------

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def watched_send(message: Message) -> None:
            kind = message.get("type")
            if kind == "lifespan.startup.complete":
                try:
                    self._sink_for_request()
                except Exception:
                    self._internal_error("startup")
            elif kind in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.aclose()
            await send(message)

        await self.app(scope, receive, watched_send)

    async def aclose(self) -> None:
        """Drain the Reporter this middleware created (to the sidecar, else the spool); never raises."""
        sink, self._sink = self._sink, None
        if sink is None or not self._owns_sink:
            return
        try:
            await sink.close(timeout_s=self.settings.shutdown_timeout_s)  # type: ignore[attr-defined]
        except Exception:
            self._internal_error("shutdown")

    # -- logging ----------------------------------------------------------------------------------

    def _internal_error(self, where: str) -> None:
        self.stats.internal_errors += 1
        logger.exception("vllm_metering internal error in %s; the request was not affected", where)

    def _warn_once(self, key: str, message: str, *args: Any) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("vllm_metering: " + message, *args)
