"""UsageMiddleware against a fake vLLM app: one correct event per request, the response untouched."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from typing import Any

import pytest

from vllm_metering.middleware import UsageMiddleware
from vllm_metering.settings import MeteringSettings
from vllm_metering.testing import FakeSidecar, FakeVLLM, RecordingSink, asgi_request

FINISHED_AT = 1_760_000_123.5


def _metered(app: FakeVLLM, settings: MeteringSettings, **kwargs: Any) -> tuple[UsageMiddleware, RecordingSink]:
    sink = RecordingSink()
    middleware = UsageMiddleware(app, settings=settings, sink=sink, clock=lambda: FINISHED_AT, **kwargs)
    return middleware, sink


async def _same_response(
    app: FakeVLLM, middleware: UsageMiddleware, path: str, body: Any, headers: dict[str, str], **kwargs: Any
) -> Any:
    """Run one request through the bare app and through the middleware; the client must see the same."""
    bare = await asgi_request(app, path, json_body=body, headers=headers, **kwargs)
    wrapped = await asgi_request(middleware, path, json_body=body, headers=headers, **kwargs)
    assert wrapped.status == bare.status
    assert wrapped.headers == bare.headers
    assert wrapped.chunks == bare.chunks  # same bytes, same chunking: nothing buffered or rewritten
    return wrapped


async def test_non_streaming_chat_gives_one_event_and_identical_bytes(
    make_settings: Callable[..., MeteringSettings],
) -> None:
    """A JSON chat completion yields one event with the right fields and the client sees the bare bytes."""
    app = FakeVLLM(per_request_metrics=True)
    middleware, sink = _metered(app, make_settings())
    body = {"model": "llama", "messages": [{"role": "user", "content": "one two three"}], "max_tokens": 5, "cached": 2}
    await _same_response(
        app, middleware, "/v1/chat/completions", body, {"x-tenant-id": "acme", "x-request-id": "req-1"}
    )
    [event] = sink.events
    assert event["event_id"].startswith("chatcmpl-req-1~")
    assert event == {
        "event_id": event["event_id"],
        "time": "2025-10-09T08:55:23.500+00:00",
        "customer": {"tenant": "acme"},
        "model": "llama",
        "prompt_tokens": 3,
        "completion_tokens": 5,
        "cached_tokens": 2,
        "gpu_seconds": 0.029,  # TTFT 10 + 3 ms + generation 4 x 4 ms
        "engine_start": "2025-10-09T08:55:23.471000+00:00",
        "engine_end": "2025-10-09T08:55:23.500000+00:00",
        "finish": "length",
    }


async def test_messages_pass_through_as_the_same_objects(make_settings: Callable[..., MeteringSettings]) -> None:
    """Every ASGI message reaches the server as the very object the app sent, in order."""
    sent: list[Any] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        for message in (
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]},
            {
                "type": "http.response.body",
                "body": b'data: {"id":"x","usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n',
                "more_body": True,
            },
            {"type": "http.response.body", "body": b"", "more_body": False},
        ):
            sent.append(message)
            await send(message)

    sink = RecordingSink()
    middleware = UsageMiddleware(app, settings=make_settings(), sink=sink)
    result = await asgi_request(middleware, "/v1/chat/completions", json_body={})
    assert len(result.messages) == len(sent)
    assert all(seen is original for seen, original in zip(result.messages, sent, strict=True))
    assert len(sink.events) == 1


async def test_stream_with_final_usage_chunk(make_settings: Callable[..., MeteringSettings]) -> None:
    """A stream with include_usage is billed from its final `choices: []` chunk, with engine time."""
    app = FakeVLLM(per_request_metrics=True)
    middleware, sink = _metered(app, make_settings())
    body = {
        "model": "m",
        "prompt": "a b c d",
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    await _same_response(app, middleware, "/v1/completions", body, {"x-tenant-id": "t1", "x-request-id": "r"})
    [event] = sink.events
    assert event["event_id"].startswith("cmpl-r~")
    assert (event["prompt_tokens"], event["completion_tokens"], event["finish"]) == (4, 6, "length")
    assert event["gpu_seconds"] == 0.034  # TTFT 10 + 4 ms + generation 5 x 4 ms
    assert (event["engine_start"], event["engine_end"]) == (
        "2025-10-09T08:55:23.466000+00:00",
        "2025-10-09T08:55:23.500000+00:00",
    )


async def test_stream_without_usage_falls_back_to_request_metadata(
    make_settings: Callable[..., MeteringSettings],
) -> None:
    """A stream whose client did not ask for usage is billed from request_metadata.final_usage_info."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings())
    body = {"messages": [{"content": "x y"}], "max_tokens": 4, "stream": True, "cached": 1}
    await _same_response(app, middleware, "/v1/chat/completions", body, {"x-tenant-id": "t2", "x-request-id": "q"})
    [event] = sink.events
    assert (event["prompt_tokens"], event["completion_tokens"], event["cached_tokens"]) == (2, 4, 1)
    assert event["finish"] == "length"
    assert event["event_id"].startswith("chatcmpl-q~")


@pytest.mark.parametrize("send_raises", [False, True])
async def test_stream_cut_off_is_billed_for_the_last_cumulative_usage(
    make_settings: Callable[..., MeteringSettings], send_raises: bool
) -> None:
    """With force-include-usage, a client disconnect mid-stream bills the tokens delivered, finish=abort."""
    app = FakeVLLM(force_include_usage=True, watch_disconnect=not send_raises)
    middleware, sink = _metered(app, make_settings())
    body = {"messages": [{"content": "p q r"}], "max_tokens": 50, "stream": True}
    if send_raises:
        with pytest.raises(OSError, match="client disconnected"):
            await asgi_request(
                middleware,
                "/v1/chat/completions",
                json_body=body,
                headers={"x-tenant-id": "t3"},
                disconnect_after_chunks=8,
                raise_on_send_after_disconnect=True,
            )
    else:
        result = await asgi_request(
            middleware, "/v1/chat/completions", json_body=body, headers={"x-tenant-id": "t3"}, disconnect_after_chunks=8
        )
        assert len(result.chunks) == 8
        assert app.produced[-1]["aborted"]
    [event] = sink.events
    # chunk 1 is the role chunk (0 tokens); chunks 2..8 carry 1..7 tokens
    assert (event["prompt_tokens"], event["completion_tokens"], event["finish"]) == (3, 7, "abort")


async def test_disconnect_without_any_usage_is_counted_and_warned(
    make_settings: Callable[..., MeteringSettings], caplog: pytest.LogCaptureFixture
) -> None:
    """A stream cut off with no usage anywhere gives no event, a counter and one warning naming the fix."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings())
    body = {"messages": [{"content": "p"}], "max_tokens": 50, "stream": True}
    with caplog.at_level(logging.WARNING, logger="vllm.metering"):
        for _ in range(2):
            await asgi_request(middleware, "/v1/chat/completions", json_body=body, disconnect_after_chunks=3)
    assert sink.events == []
    assert middleware.stats.aborted_without_usage == 2
    assert sum("--enable-force-include-usage" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("status", [400, 404, 500, 503])
async def test_error_bodies_give_no_event(make_settings: Callable[..., MeteringSettings], status: int) -> None:
    """4xx/5xx error bodies without usage yield no event and pass through unchanged."""
    app = FakeVLLM(set_request_metadata=False)
    middleware, sink = _metered(app, make_settings())
    result = await _same_response(app, middleware, "/v1/chat/completions", {"fail": status}, {"x-tenant-id": "t"})
    assert result.status == status
    assert sink.events == []


async def test_error_body_with_usage_gives_an_error_event(make_settings: Callable[..., MeteringSettings]) -> None:
    """An error body that does carry usage is billed with finish=error."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings())
    await _same_response(
        app, middleware, "/v1/chat/completions", {"fail": 400, "usage_in_error": True}, {"x-tenant-id": "t"}
    )
    [event] = sink.events
    assert (event["prompt_tokens"], event["finish"]) == (5, "error")
    assert event["event_id"].startswith("uuid-")


async def test_get_requests_and_paths_without_usage_are_ignored(make_settings: Callable[..., MeteringSettings]) -> None:
    """GET requests and POSTs whose response has no usage (e.g. /tokenize) produce no event."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings())
    await _same_response(app, middleware, "/v1/models", None, {}, method="GET")
    await _same_response(app, middleware, "/tokenize", {"prompt": "a b"}, {})
    assert sink.events == []


async def test_embeddings_are_metered_without_finish(make_settings: Callable[..., MeteringSettings]) -> None:
    """Any POST endpoint whose JSON carries usage is metered, e.g. embeddings."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings())
    await _same_response(
        app,
        middleware,
        "/v1/embeddings",
        {"input": "a b c d e"},
        {"x-amzn-oidc-identity": "oidc-user", "x-request-id": "e"},
    )
    [event] = sink.events
    assert event["customer"] == {"tenant": "oidc-user"}
    assert (event["prompt_tokens"], event["completion_tokens"]) == (5, 0)
    assert "finish" not in event and event["event_id"].startswith("embd-")


async def test_large_json_body_is_metered_from_its_tail(make_settings: Callable[..., MeteringSettings]) -> None:
    """A response larger than METERING_MAX_JSON_BYTES still yields its usage, from the body's tail."""
    app = FakeVLLM(set_request_metadata=False)
    middleware, sink = _metered(app, make_settings(max_json_bytes=4096))
    await _same_response(
        app,
        middleware,
        "/v1/completions",
        {"prompt": "a", "max_tokens": 5000},
        {"x-tenant-id": "big", "x-request-id": "L"},
    )
    [event] = sink.events
    assert (event["prompt_tokens"], event["completion_tokens"], event["finish"]) == (1, 5000, "length")


async def test_tenant_header_precedence_and_default_tenant(make_settings: Callable[..., MeteringSettings]) -> None:
    """The first configured header present wins; without any, METERING_DEFAULT_TENANT is used."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings())
    body = {"prompt": "a", "max_tokens": 1}
    await asgi_request(
        middleware, "/v1/completions", json_body=body, headers={"x-amzn-oidc-identity": "b", "x-tenant-id": "a"}
    )
    await asgi_request(middleware, "/v1/completions", json_body=body, headers={"x-tenant-id": "  "})
    assert [e["customer"] for e in sink.events] == [{"tenant": "a"}, {"tenant": "unattributed"}]


async def test_no_tenant_and_no_default_is_not_reported(
    make_settings: Callable[..., MeteringSettings], caplog: pytest.LogCaptureFixture
) -> None:
    """With METERING_DEFAULT_TENANT empty, a request without tenant headers is counted and warned about."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings(default_tenant=None))
    with caplog.at_level(logging.WARNING, logger="vllm.metering"):
        await asgi_request(middleware, "/v1/completions", json_body={"prompt": "a"})
    assert sink.events == []
    assert middleware.stats.without_customer == 1
    assert "x-tenant-id" in caplog.text


async def test_customer_headers_name_aws_customers(make_settings: Callable[..., MeteringSettings]) -> None:
    """Configured account/licence or customer-identifier headers become the event's customer object."""
    app = FakeVLLM()
    settings = make_settings(
        account_id_header="x-aws-account", license_arn_header="x-license", customer_identifier_header="x-customer-id"
    )
    middleware, sink = _metered(app, settings)
    arn = "arn:aws:license-manager::123456789012:license:l-" + "0" * 32
    body = {"prompt": "a"}
    await asgi_request(
        middleware,
        "/v1/completions",
        json_body=body,
        headers={"x-aws-account": "123456789012", "x-license": arn, "x-tenant-id": "t"},
    )
    await asgi_request(middleware, "/v1/completions", json_body=body, headers={"x-customer-id": "cust-1"})
    assert [e["customer"] for e in sink.events] == [
        {"aws_account_id": "123456789012", "license_arn": arn},
        {"customer_identifier": "cust-1"},
    ]


async def test_trusted_request_ids_are_used_bare(make_settings: Callable[..., MeteringSettings]) -> None:
    """With METERING_TRUST_REQUEST_ID the event_id is exactly the response id."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings(trust_request_id=True))
    await asgi_request(middleware, "/v1/chat/completions", json_body={"messages": []}, headers={"x-request-id": "abc"})
    assert sink.events[0]["event_id"] == "chatcmpl-abc"


async def test_concurrent_requests_sum_correctly_per_tenant(make_settings: Callable[..., MeteringSettings]) -> None:
    """Many interleaved requests for several tenants, streaming and not, add up exactly per tenant."""
    app = FakeVLLM(token_delay_s=0.0005)
    middleware, sink = _metered(app, make_settings())
    rng = random.Random(7)
    expected: dict[str, list[int]] = {}
    calls = []
    for i in range(90):
        tenant = f"tenant-{i % 3}"
        words, tokens = rng.randint(1, 20), rng.randint(1, 30)
        body: dict[str, Any] = {"messages": [{"content": " ".join(["w"] * words)}], "max_tokens": tokens}
        if i % 2:
            body["stream"] = True
            if i % 4 == 1:
                body["stream_options"] = {"include_usage": True}
        totals = expected.setdefault(tenant, [0, 0, 0])
        totals[0] += words
        totals[1] += tokens
        totals[2] += 1
        calls.append(asgi_request(middleware, "/v1/chat/completions", json_body=body, headers={"x-tenant-id": tenant}))
    await asyncio.gather(*calls)
    seen: dict[str, list[int]] = {}
    for event in sink.events:
        totals = seen.setdefault(event["customer"]["tenant"], [0, 0, 0])
        totals[0] += event["prompt_tokens"]
        totals[1] += event["completion_tokens"]
        totals[2] += 1
    assert seen == expected
    assert len({e["event_id"] for e in sink.events}) == 90


async def test_a_failing_sink_never_breaks_the_request(
    make_settings: Callable[..., MeteringSettings], caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in metering is logged and swallowed; the client still gets the full response."""

    class BrokenSink:
        def enqueue(self, event: dict[str, Any]) -> None:
            raise RuntimeError("metering bug")

    app = FakeVLLM()
    middleware = UsageMiddleware(app, settings=make_settings(), sink=BrokenSink())
    with caplog.at_level(logging.ERROR, logger="vllm.metering"):
        result = await _same_response(app, middleware, "/v1/completions", {"prompt": "a"}, {"x-request-id": "z"})
    assert result.status == 200
    assert middleware.stats.internal_errors == 1
    assert "the request was not affected" in caplog.text


async def test_app_exceptions_propagate_unchanged(make_settings: Callable[..., MeteringSettings]) -> None:
    """An exception raised by vLLM before responding reaches the server as-is, with no event."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise ValueError("engine dead")

    sink = RecordingSink()
    middleware = UsageMiddleware(app, settings=make_settings(), sink=sink)
    with pytest.raises(ValueError, match="engine dead"):
        await asgi_request(middleware, "/v1/completions", json_body={})
    assert sink.events == []


async def test_disabled_middleware_passes_everything_through(make_settings: Callable[..., MeteringSettings]) -> None:
    """METERING_ENABLED=false meters nothing."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings(enabled=False))
    await asgi_request(middleware, "/v1/completions", json_body={"prompt": "a"})
    assert sink.events == []


async def test_compressed_bodies_fall_back_to_request_metadata(make_settings: Callable[..., MeteringSettings]) -> None:
    """A gzip-encoded response is not decoded; usage comes from request_metadata instead."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        from vllm_metering.testing import RequestResponseMetadata, UsageInfo

        scope["state"]["request_metadata"] = RequestResponseMetadata("cmpl-gz", UsageInfo(4, 2, 6))
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-encoding", b"gzip")],
            }
        )
        await send({"type": "http.response.body", "body": b"\x1f\x8b..."})

    sink = RecordingSink()
    middleware = UsageMiddleware(app, settings=make_settings(trust_request_id=True), sink=sink)
    await asgi_request(middleware, "/v1/completions", json_body={})
    [event] = sink.events
    assert (event["event_id"], event["prompt_tokens"], event["completion_tokens"]) == ("cmpl-gz", 4, 2)


async def test_lifespan_starts_and_drains_its_own_reporter(
    make_settings: Callable[..., MeteringSettings], sidecar: FakeSidecar
) -> None:
    """Without an injected sink the middleware runs a Reporter, started at startup and drained at shutdown."""
    app = FakeVLLM()
    middleware = UsageMiddleware(app, settings=make_settings(sidecar_url=sidecar.url))
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: list[dict[str, Any]] = []
    started = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        from_app.append(message)
        started.set()

    lifespan = asyncio.ensure_future(middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, send))
    await to_app.put({"type": "lifespan.startup"})
    await started.wait()
    assert middleware.sink is not None
    for i in range(5):
        await asgi_request(
            middleware, "/v1/completions", json_body={"prompt": "a b", "max_tokens": i}, headers={"x-tenant-id": "life"}
        )
    await to_app.put({"type": "lifespan.shutdown"})
    await lifespan
    assert [m["type"] for m in from_app] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert sidecar.totals_by_tenant() == {"life": (10, 10)}


def test_settings_come_from_the_environment_when_vllm_builds_the_app(tmp_path: Any) -> None:
    """`UsageMiddleware(app)` (what vLLM does) reads METERING_* variables; a bad one stops start-up."""
    from vllm_metering.errors import ConfigError

    middleware = UsageMiddleware(
        FakeVLLM(), env={"METERING_TENANT_HEADERS": "X-Org", "METERING_SPOOL_PATH": str(tmp_path / "s")}
    )
    assert middleware.settings.tenant_headers == ("x-org",)
    with pytest.raises(ConfigError, match="METERING_QUEUE_SIZE"):
        UsageMiddleware(FakeVLLM(), env={"METERING_QUEUE_SIZE": "0"})


def test_json_dumps_of_events_is_plain_json(make_settings: Callable[..., MeteringSettings]) -> None:
    """Events are plain JSON-serialisable dicts (what the reporter posts)."""
    app = FakeVLLM()
    middleware, sink = _metered(app, make_settings())
    asyncio.run(asgi_request(middleware, "/v1/completions", json_body={"prompt": "a"}))
    assert json.loads(json.dumps(sink.events)) == sink.events
