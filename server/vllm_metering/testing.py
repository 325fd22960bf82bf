"""Test helpers shipped with the package: a fake vLLM ASGI app, an ASGI client, a fake sidecar.

They are hand-written stand-ins for the boundaries (vLLM, the HTTP server, the sidecar), used by
the test suite and by `bench_latency`. The fake vLLM answers with the shapes vLLM's OpenAI server
produces: JSON bodies with `usage`, SSE streams with optional usage chunks, error bodies, and
`scope["state"]["request_metadata"]` with `final_usage_info` filled when generation ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from vllm_metering.middleware import ASGIApp, Message, Receive, Scope, Send


class ManualClock:
    """A monotonic clock that moves only when told to (for the reporter's backoff)."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def no_sleep(_seconds: float) -> None:
    """A sleep that only yields to the loop, so retries in tests cost no time."""
    await asyncio.sleep(0)


async def run_until_idle(reporter: Any, clock: ManualClock, *, max_waits: int = 100) -> int:
    """Step a (not started) Reporter until it is idle, jumping the clock over backoff waits.

    Returns how many backoff waits were skipped; stops early after `max_waits` of them (a sidecar
    that stays down never lets the reporter go idle).
    """
    waits = 0
    for _ in range(100_000):
        wait = await reporter.step()
        if wait is None:
            continue
        await reporter.flush_overflow()
        if math.isinf(wait):
            return waits
        if waits >= max_waits:
            return waits
        waits += 1
        clock.advance(wait)
    raise AssertionError("the reporter never settled")


class RecordingSink:
    """An event sink that keeps every event in a list."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def enqueue(self, event: dict[str, Any]) -> None:
        self.events.append(event)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


@dataclass
class UsageInfo:
    """Stands in for vLLM's pydantic `UsageInfo` (attribute access, like the real object)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, Any] | None = None


@dataclass
class RequestResponseMetadata:
    """Stands in for vLLM's `RequestResponseMetadata` set on `request.state.request_metadata`."""

    request_id: str
    final_usage_info: UsageInfo | None = None


class FakeVLLM:
    """An ASGI app answering like vLLM's OpenAI-compatible server, deterministically.

    The request body chooses the answer: `stream`, `stream_options` (`include_usage`,
    `continuous_usage_stats`), `max_tokens` (completion tokens, default 16), `messages`/`prompt`/
    `input` (prompt tokens = number of words), and fake-only keys `fail` (answer with that HTTP
    status and an error body) and `cached` (cached prompt tokens).
    """

    def __init__(
        self,
        *,
        force_include_usage: bool = False,
        per_request_metrics: bool = False,
        set_request_metadata: bool = True,
        token_delay_s: float = 0.0,
        created: int = 1_760_000_000,
        watch_disconnect: bool = True,
    ) -> None:
        self.created = created
        self.watch_disconnect = watch_disconnect
        self.force_include_usage = force_include_usage
        self.per_request_metrics = per_request_metrics
        self.set_request_metadata = set_request_metadata
        self.token_delay_s = token_delay_s
        self.produced: list[dict[str, Any]] = []  # what the engine generated, for cross-checks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        assert scope["type"] == "http"
        path, method = scope["path"], scope["method"]
        if method == "GET":
            await self._json(send, 200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
            return
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        request = json.loads(body or b"{}")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if path == "/tokenize":
            await self._json(send, 200, {"count": 3, "max_model_len": 512, "tokens": [1, 2, 3]})
            return
        if "fail" in request:
            status = int(request["fail"])
            error = {"object": "error", "message": "fake failure", "type": "BadRequestError", "code": status}
            if request.get("usage_in_error"):
                error["usage"] = {"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5}
            await self._json(send, status, error)
            return
        prefix = {"/v1/chat/completions": "chatcmpl", "/v1/completions": "cmpl", "/v1/embeddings": "embd"}
        kind = prefix.get(path, "cmpl")
        response_id = f"{kind}-{headers.get('x-request-id') or uuid.uuid4().hex}"
        metadata = RequestResponseMetadata(request_id=response_id)
        if self.set_request_metadata:
            scope.setdefault("state", {})["request_metadata"] = metadata
        text = " ".join(
            str(m.get("content", "")) for m in request.get("messages", []) if isinstance(m, Mapping)
        ) or str(request.get("prompt", request.get("input", "")))
        prompt_tokens = len(text.split())
        completion_tokens = 0 if kind == "embd" else int(request.get("max_tokens", 16))
        usage: dict[str, Any] = {
            "prompt_tokens": prompt_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "completion_tokens": completion_tokens,
        }
        if "cached" in request:
            usage["prompt_tokens_details"] = {"cached_tokens": int(request["cached"])}
        model = str(request.get("model", "fake-model"))
        if request.get("stream"):
            await self._stream(scope, receive, send, request, response_id, model, kind, usage, metadata)
            return
        self.produced.append(usage)
        metadata.final_usage_info = _usage_info(usage)
        created = self.created
        document: dict[str, Any] = {"id": response_id, "object": "list", "created": created, "model": model}
        if kind == "embd":
            document["data"] = [{"index": 0, "object": "embedding", "embedding": [0.25] * 16}]
        elif kind == "chatcmpl":
            document.update(
                object="chat.completion",
                choices=[
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": " tok" * completion_tokens, "tool_calls": []},
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
            )
        else:
            document.update(
                object="text_completion",
                choices=[
                    {
                        "index": 0,
                        "text": " tok" * completion_tokens,
                        "logprobs": None,
                        "finish_reason": "length",
                        "stop_reason": None,
                    }
                ],
            )
        document["usage"] = usage
        if self.per_request_metrics and kind != "embd":
            document["metrics"] = _metrics(prompt_tokens, completion_tokens)
        await self._json(send, 200, document)

    async def _json(self, send: Send, status: int, document: Any) -> None:
        payload = _dumps(document)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    async def _stream(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        request: Mapping[str, Any],
        response_id: str,
        model: str,
        kind: str,
        usage: dict[str, Any],
        metadata: RequestResponseMetadata,
    ) -> None:
        options = request.get("stream_options") or {}
        include_usage = bool(options.get("include_usage")) or self.force_include_usage
        continuous = (include_usage and bool(options.get("continuous_usage_stats"))) or self.force_include_usage
        created = self.created
        obj = "chat.completion.chunk" if kind == "chatcmpl" else "text_completion"
        prompt, total = usage["prompt_tokens"], usage["completion_tokens"]
        disconnected = asyncio.Event()

        async def listen() -> None:
            # Starlette's StreamingResponse watches for the client going away the same way.
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    disconnected.set()
                    return

        # Without watching, a gone client shows only as `send` raising (ASGI spec 2.4 servers).
        listener = asyncio.get_running_loop().create_task(listen() if self.watch_disconnect else disconnected.wait())
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")],
            }
        )
        produced = 0
        try:
            for index in range(total + 1):
                if disconnected.is_set():
                    self.produced.append({"prompt_tokens": prompt, "completion_tokens": produced, "aborted": True})
                    return
                if index == 0:
                    choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": None}
                    choice["delta" if kind == "chatcmpl" else "text"] = (
                        {"role": "assistant", "content": ""} if kind == "chatcmpl" else ""
                    )
                else:
                    produced = index
                    last = index == total
                    choice = {"index": 0, "logprobs": None, "finish_reason": "length" if last else None}
                    choice["delta" if kind == "chatcmpl" else "text"] = (
                        {"content": " tok"} if kind == "chatcmpl" else " tok"
                    )
                chunk: dict[str, Any] = {
                    "id": response_id,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [choice],
                }
                if continuous:
                    chunk["usage"] = {
                        "prompt_tokens": prompt,
                        "total_tokens": prompt + produced,
                        "completion_tokens": produced,
                    }
                await send(
                    {"type": "http.response.body", "body": b"data: " + _dumps(chunk) + b"\n\n", "more_body": True}
                )
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
                else:
                    await asyncio.sleep(0)
            if include_usage:
                final: dict[str, Any] = {
                    "id": response_id,
                    "object": obj,
                    "created": created,
                    "model": model,
                    "choices": [],
                    "usage": usage,
                }
                if self.per_request_metrics:  # streams: `model_dump_json(exclude_none=True)`
                    final["metrics"] = {k: v for k, v in _metrics(prompt, total).items() if v is not None}
                await send(
                    {"type": "http.response.body", "body": b"data: " + _dumps(final) + b"\n\n", "more_body": True}
                )
            metadata.final_usage_info = _usage_info(usage)
            self.produced.append(usage)
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listener


def _usage_info(usage: Mapping[str, Any]) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
        total_tokens=usage["total_tokens"],
        prompt_tokens_details=usage.get("prompt_tokens_details"),
    )


def _metrics(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """vLLM 0.32's `PerRequestMetrics` as `model_dump()` gives it (None for what was not measured).

    Deterministic times: 2 ms in the queue, a prefill (TTFT) of 10 ms + 1 ms per prompt token, 4 ms
    per output token after the first. No output token means no TTFT and no generation time, as in vLLM.
    """
    ttft = generation = itl = tps = None
    if completion_tokens > 0:
        ttft = 10.0 + 1.0 * prompt_tokens
        generation = 4.0 * (completion_tokens - 1)
        itl = 4.0 if completion_tokens > 1 else None
        tps = completion_tokens / (ttft + generation) * 1000
    return {
        "time_to_first_token_ms": ttft,
        "generation_time_ms": generation,
        "queue_time_ms": 2.0,
        "mean_itl_ms": itl,
        "tokens_per_second": tps,
        "speculative_decoding": None,
    }


@dataclass
class AsgiResult:
    """What a client saw of one ASGI exchange."""

    status: int | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    disconnected: bool = False
    last_byte_at: float | None = None

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


async def asgi_request(
    app: ASGIApp,
    path: str,
    *,
    method: str = "POST",
    json_body: Any = None,
    headers: Mapping[str, str] | None = None,
    disconnect_after_chunks: int | None = None,
    raise_on_send_after_disconnect: bool = False,
    state: dict[str, Any] | None = None,
) -> AsgiResult:
    """Drive one HTTP exchange through an ASGI app in-process, like an ASGI server would.

    `disconnect_after_chunks`: the client goes away after that many non-empty body chunks; the app
    then gets `http.disconnect` from `receive`, and with `raise_on_send_after_disconnect` its
    further `send` calls raise OSError (as uvicorn's do).
    """
    body = b"" if json_body is None else _dumps(json_body)
    raw_headers = [(b"content-type", b"application/json")]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "headers": raw_headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": dict(state or {}),
    }
    result = AsgiResult()
    gone = asyncio.Event()
    request_sent = False

    async def receive() -> Message:
        nonlocal request_sent
        if not request_sent:
            request_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if result.disconnected and raise_on_send_after_disconnect:
            raise OSError("client disconnected")
        if result.disconnected:
            return
        result.messages.append(message)
        if message["type"] == "http.response.start":
            result.status = message["status"]
            result.headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                result.chunks.append(chunk)
            if not message.get("more_body", False):
                result.last_byte_at = time.perf_counter()
                gone.set()  # after a complete response, receive() reports the disconnect
            elif disconnect_after_chunks is not None and len(result.chunks) >= disconnect_after_chunks:
                result.disconnected = True
                gone.set()

    await app(scope, receive, send)
    return result


class FakeSidecar:
    """A real aiohttp server honouring the sidecar's `POST /v1/events` contract, de-duplicating by event_id.

    `mode`: "up" (200/422 with accepted/duplicates/rejected), "unavailable" (503), or an int status
    to answer every request with. `token`: when set, requests without `Bearer <token>` get 401.
    `bad_ids`: event ids answered as per-event rejections; `malformed_ids`: event ids that make the
    whole batch a 400.
    """

    def __init__(self, *, token: str | None = None) -> None:
        self.token = token
        self.mode: str | int = "up"
        self.bad_ids: set[str] = set()
        self.malformed_ids: set[str] = set()
        self.events: dict[str, dict[str, Any]] = {}
        self.batches: list[int] = []
        self.duplicates = 0
        self.port: int | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_post("/v1/events", self._events)
        app.router.add_get("/v1/fake/stats", self._stats)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _stats(self, request: web.Request) -> web.Response:
        return web.json_response({"events": len(self.events), "duplicates": self.duplicates})

    async def _events(self, request: web.Request) -> web.Response:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "missing or wrong bearer token"}, status=401)
        if self.mode == "unavailable":
            return web.json_response({"error": "overloaded"}, status=503)
        if isinstance(self.mode, int):
            return web.json_response({"error": f"forced {self.mode}"}, status=self.mode)
        try:
            payload = await request.json()
        except ValueError:
            return web.json_response({"error": "body is not JSON"}, status=400)
        events = payload if isinstance(payload, list) else [payload]
        if any(isinstance(e, dict) and e.get("event_id") in self.malformed_ids for e in events):
            return web.json_response({"error": "malformed batch"}, status=400)
        self.batches.append(len(events))
        accepted = duplicates = 0
        rejected: list[dict[str, Any]] = []
        for index, event in enumerate(events):
            event_id = event.get("event_id") if isinstance(event, dict) else None
            if not isinstance(event_id, str) or event_id in self.bad_ids:
                rejected.append({"index": index, "error": "event_id: rejected by the fake"})
            elif event_id in self.events:
                duplicates += 1
            else:
                self.events[event_id] = event
                accepted += 1
        self.duplicates += duplicates
        status = 422 if rejected and len(rejected) == len(events) else 200
        return web.json_response({"accepted": accepted, "duplicates": duplicates, "rejected": rejected}, status=status)

    def totals_by_tenant(self) -> dict[str, tuple[int, int]]:
        """(prompt_tokens, completion_tokens) summed per tenant over the stored (deduplicated) events."""
        totals: dict[str, tuple[int, int]] = {}
        for event in self.events.values():
            tenant = event["customer"].get("tenant", "?")
            prompt, completion = totals.get(tenant, (0, 0))
            totals[tenant] = (prompt + event["prompt_tokens"], completion + event["completion_tokens"])
        return totals
