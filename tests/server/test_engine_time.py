"""Engine time through the middleware: gpu_seconds from vLLM's real `metrics` fields, and its interval."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import pytest

from vllm_metering.middleware import UsageMiddleware
from vllm_metering.settings import MeteringSettings
from vllm_metering.testing import FakeVLLM, RecordingSink, asgi_request

TENANT = {"x-tenant-id": "acme"}
LONG_PROMPT = " ".join(["word"] * 480)  # 480 prompt tokens in the fake: TTFT 490 ms


def _interval(event: dict[str, Any]) -> timedelta:
    start = datetime.fromisoformat(event["engine_start"])
    end = datetime.fromisoformat(event["engine_end"])
    assert start.utcoffset() == end.utcoffset() == timedelta(0)
    return end - start


def _body(stream: bool, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_event_interval_matches_gpu_seconds_on_the_wall_clock(
    make_settings: Callable[..., MeteringSettings], stream: bool
) -> None:
    """With the real clock, engine_end is when the response completed and end - start == gpu_seconds to 1 µs."""
    sink = RecordingSink()
    middleware = UsageMiddleware(FakeVLLM(per_request_metrics=True), settings=make_settings(), sink=sink)
    before = time.time()
    result = await asgi_request(middleware, "/v1/completions", json_body=_body(stream, "a b c d e", 9), headers=TENANT)
    after = time.time()
    assert result.status == 200
    [event] = sink.events
    assert event["gpu_seconds"] == pytest.approx((10 + 5 + 4 * 8) / 1000, abs=1e-9)
    assert abs(_interval(event).total_seconds() - event["gpu_seconds"]) <= 1e-6
    end = datetime.fromisoformat(event["engine_end"]).timestamp()
    assert before - 1e-6 <= end <= after + 1e-6
    assert event["engine_end"][:23] == event["time"][:23]  # the same instant; `time` has milliseconds


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
async def test_long_prompt_bills_its_prefill(make_settings: Callable[..., MeteringSettings], stream: bool) -> None:
    """A long prompt with a short answer: gpu_seconds = TTFT + generation, far above generation alone."""
    sink = RecordingSink()
    middleware = UsageMiddleware(
        FakeVLLM(per_request_metrics=True), settings=make_settings(), sink=sink, clock=lambda: 1_760_000_000.0
    )
    await asgi_request(middleware, "/v1/completions", json_body=_body(stream, LONG_PROMPT, 2), headers=TENANT)
    [event] = sink.events
    generation_s = 4 / 1000
    assert event["gpu_seconds"] == 0.494  # TTFT 490 ms + generation 4 ms
    assert event["gpu_seconds"] > generation_s
    assert (event["engine_start"], event["engine_end"]) == (
        "2025-10-09T08:53:19.506000+00:00",
        "2025-10-09T08:53:20.000000+00:00",
    )
    assert _interval(event) == timedelta(microseconds=494_000)


async def test_request_without_an_output_token_claims_no_engine_time(
    make_settings: Callable[..., MeteringSettings],
) -> None:
    """No first token means no TTFT in vLLM's metrics: the event has no gpu_seconds and no interval."""
    sink = RecordingSink()
    middleware = UsageMiddleware(FakeVLLM(per_request_metrics=True), settings=make_settings(), sink=sink)
    await asgi_request(middleware, "/v1/completions", json_body=_body(False, "a b c", 0), headers=TENANT)
    [event] = sink.events
    assert (event["prompt_tokens"], event["completion_tokens"]) == (3, 0)
    assert not {"gpu_seconds", "engine_start", "engine_end"} & event.keys()


@pytest.mark.parametrize(
    ("per_request_metrics", "body"),
    [
        (False, _body(False, "a b", 3)),  # vLLM started without --enable-per-request-metrics
        (True, {"model": "m", "prompt": "a b", "max_tokens": 3, "stream": True}),  # stream without usage chunk
        (True, {"model": "m", "input": "a b"}),  # embeddings: no metrics object
    ],
    ids=["flag-off", "stream-without-usage-chunk", "embeddings"],
)
async def test_no_metrics_means_no_engine_fields(
    make_settings: Callable[..., MeteringSettings], per_request_metrics: bool, body: dict[str, Any]
) -> None:
    """Where vLLM sent no metrics, the event has usage but neither gpu_seconds nor an engine interval."""
    sink = RecordingSink()
    middleware = UsageMiddleware(FakeVLLM(per_request_metrics=per_request_metrics), settings=make_settings(), sink=sink)
    path = "/v1/embeddings" if "input" in body else "/v1/completions"
    await asgi_request(middleware, path, json_body=body, headers=TENANT)
    [event] = sink.events
    assert not {"gpu_seconds", "engine_start", "engine_end"} & event.keys()
