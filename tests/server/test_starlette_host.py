"""UsageMiddleware added the way vLLM adds it (`app.add_middleware`) to a FastAPI app shaped like vLLM's.

Skipped when FastAPI is not installed (it comes with vLLM, not with this package).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from vllm_metering.middleware import UsageMiddleware
from vllm_metering.settings import MeteringSettings
from vllm_metering.testing import RecordingSink, RequestResponseMetadata, UsageInfo, asgi_request

fastapi = pytest.importorskip("fastapi")
responses = pytest.importorskip("fastapi.responses")


def _vllm_like_app(sink: RecordingSink, settings: MeteringSettings) -> Any:
    app = fastapi.FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: fastapi.Request) -> Any:
        body = await request.json()
        tokens = int(body.get("max_tokens", 4))
        metadata = RequestResponseMetadata(request_id="chatcmpl-star")
        request.state.request_metadata = metadata  # what vLLM's handlers do
        usage = UsageInfo(prompt_tokens=3, completion_tokens=tokens, total_tokens=3 + tokens)
        if not body.get("stream"):
            metadata.final_usage_info = usage
            return responses.JSONResponse(
                {
                    "id": "chatcmpl-star",
                    "model": "m",
                    "choices": [{"index": 0, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens},
                }
            )

        async def events() -> AsyncIterator[str]:
            for i in range(tokens):
                chunk = {"id": "chatcmpl-star", "model": "m", "choices": [{"index": 0, "delta": {"content": "x"}}]}
                if body.get("force_usage"):
                    chunk["usage"] = {"prompt_tokens": 3, "completion_tokens": i + 1}
                yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n"
                await asyncio.sleep(0)
            metadata.final_usage_info = usage
            yield "data: [DONE]\n\n"

        return responses.StreamingResponse(events(), media_type="text/event-stream")

    app.add_middleware(UsageMiddleware, settings=settings, sink=sink)
    return app


async def test_request_state_set_by_handlers_is_visible_to_the_middleware(
    make_settings: Callable[..., MeteringSettings],
) -> None:
    """`request.state.request_metadata` set inside FastAPI is read back from scope["state"] for a bare stream."""
    sink = RecordingSink()
    app = _vllm_like_app(sink, make_settings(trust_request_id=True))
    result = await asgi_request(app, "/v1/chat/completions", json_body={"stream": True, "max_tokens": 6})
    assert result.status == 200 and result.body.endswith(b"data: [DONE]\n\n")
    [event] = sink.events
    assert (event["event_id"], event["prompt_tokens"], event["completion_tokens"]) == ("chatcmpl-star", 3, 6)


async def test_non_streaming_json_through_fastapi(make_settings: Callable[..., MeteringSettings]) -> None:
    """A JSONResponse from FastAPI is metered from its body."""
    sink = RecordingSink()
    app = _vllm_like_app(sink, make_settings())
    await asgi_request(app, "/v1/chat/completions", json_body={"max_tokens": 2}, headers={"x-tenant-id": "f"})
    [event] = sink.events
    assert (event["customer"], event["completion_tokens"], event["finish"]) == ({"tenant": "f"}, 2, "stop")


async def test_starlette_stream_cut_off_by_the_client(make_settings: Callable[..., MeteringSettings]) -> None:
    """Starlette's StreamingResponse stops on http.disconnect; the event bills the last usage delivered."""
    sink = RecordingSink()
    app = _vllm_like_app(sink, make_settings())
    await asgi_request(
        app,
        "/v1/chat/completions",
        json_body={"stream": True, "max_tokens": 40, "force_usage": True},
        disconnect_after_chunks=5,
    )
    [event] = sink.events
    assert (event["completion_tokens"], event["finish"]) == (5, "abort")
