"""The pure core: reading usage from JSON and SSE bodies, and building usage events."""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path

import jsonschema
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vllm_metering.testing import UsageInfo
from vllm_metering.usage import (
    JsonBodyReader,
    SseBodyReader,
    Usage,
    build_event,
    engine_interval,
    gpu_seconds_from_metrics,
    make_event_id,
    rfc3339,
    usage_from_mapping,
    usage_from_object,
)

EVENT_SCHEMA = json.loads((Path(__file__).resolve().parents[2] / "schema" / "usage-event.schema.json").read_text())
# RFC 3339, UTC, microseconds: what the middleware writes (the schema's `time` pattern accepts it).
RFC3339_MICROS = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}\+00:00")


def _compact(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _sse(*objects: object, done: bool = True) -> bytes:
    lines = [b"data: " + _compact(obj) + b"\n\n" for obj in objects]
    if done:
        lines.append(b"data: [DONE]\n\n")
    return b"".join(lines)


CHAT = {
    "id": "chatcmpl-abc",
    "object": "chat.completion",
    "model": "m1",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
    "usage": {
        "prompt_tokens": 11,
        "completion_tokens": 7,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 4},
    },
    "metrics": {
        "time_to_first_token_ms": 20.0,
        "generation_time_ms": 30.5,
        "queue_time_ms": 3.0,
        "mean_itl_ms": 5.0833,
        "tokens_per_second": 138.6,
        "speculative_decoding": None,
    },
}


def _chunk(n: int, *, finish: str | None = None, usage: bool = True) -> dict[str, object]:
    chunk: dict[str, object] = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": "m2",
        "choices": [{"index": 0, "delta": {"content": " tok"}, "finish_reason": finish}],
    }
    if usage:
        chunk["usage"] = {"prompt_tokens": 5, "completion_tokens": n, "total_tokens": 5 + n}
    return chunk


STREAM = _sse(
    _chunk(0, usage=True),
    _chunk(1),
    _chunk(2),
    _chunk(3, finish="length"),
    {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": "m2",
        "choices": [],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
        "metrics": {"time_to_first_token_ms": 250.0, "generation_time_ms": 1250.0, "queue_time_ms": 9.0},
    },
)


def test_json_body_gives_usage_finish_cached_and_gpu_seconds() -> None:
    """A whole chat completion body yields id, model, token counts, cached tokens, finish and engine time."""
    reader = JsonBodyReader(max_bytes=1 << 20)
    payload = _compact(CHAT)
    reader.feed(payload[:10])
    reader.feed(payload[10:])
    facts = reader.result()
    assert (facts.response_id, facts.model, facts.finish) == ("chatcmpl-abc", "m1", "stop")
    assert facts.usage == Usage(prompt_tokens=11, completion_tokens=7, cached_tokens=4)
    assert facts.gpu_seconds == 0.0505
    assert not facts.error and not reader.truncated


def test_json_body_over_the_cap_is_read_from_head_and_tail() -> None:
    """A body larger than the cap is not decoded whole, yet its id, model and trailing usage are found."""
    big = dict(CHAT, choices=[{"index": 0, "message": {"content": "x" * 300_000}, "finish_reason": "length"}])
    payload = _compact(big)
    reader = JsonBodyReader(max_bytes=64 * 1024)
    for start in range(0, len(payload), 8192):
        reader.feed(payload[start : start + 8192])
    facts = reader.result()
    assert reader.truncated
    assert (facts.response_id, facts.model) == ("chatcmpl-abc", "m1")
    assert facts.usage == Usage(11, 7, 4)
    assert facts.finish == "length"


def test_error_body_is_flagged() -> None:
    """vLLM's error object is recognised as an error."""
    reader = JsonBodyReader(max_bytes=1024)
    reader.feed(b'{"object":"error","message":"bad","type":"BadRequestError","code":400}')
    facts = reader.result()
    assert facts.error and facts.usage is None


def test_sse_keeps_the_last_usage_and_first_choice_finish() -> None:
    """Cumulative usage in every chunk and a final usage chunk: the last one wins."""
    reader = SseBodyReader(max_line_bytes=1 << 20)
    reader.feed(STREAM)
    facts = reader.result()
    assert facts.usage == Usage(5, 3, None)
    assert (facts.response_id, facts.model, facts.finish) == ("chatcmpl-s", "m2", "length")
    assert facts.gpu_seconds == 1.5


@given(st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=40))
def test_sse_result_does_not_depend_on_chunk_boundaries(cuts: list[int]) -> None:
    """Splitting the same stream at arbitrary byte offsets gives the same facts as one chunk."""
    reader = SseBodyReader(max_line_bytes=1 << 20)
    previous = 0
    for cut in sorted(set(cuts)):
        reader.feed(STREAM[previous:cut])
        previous = cut
    reader.feed(STREAM[previous:])
    whole = SseBodyReader(max_line_bytes=1 << 20)
    whole.feed(STREAM)
    assert reader.result() == whole.result()


def test_sse_stream_cut_off_mid_line_keeps_the_last_complete_usage() -> None:
    """A stream that ends in the middle of a line still reports the last usage fully received."""
    reader = SseBodyReader(max_line_bytes=1 << 20)
    body = _sse(_chunk(0), _chunk(1), _chunk(2), done=False)
    reader.feed(body + b'data: {"id":"chatcmpl-s","usage":{"prompt_tok')
    assert reader.result().usage == Usage(5, 2, None)


def test_sse_with_crlf_comments_and_event_lines() -> None:
    """CRLF line ends, comments and `event:` lines do not confuse the scanner."""
    body = (
        b": keep-alive\r\n\r\nevent: message\r\n"
        + _sse(_chunk(0, usage=False), _chunk(1, finish="stop", usage=False)).replace(b"\n", b"\r\n")
        + b"data: "
        + _compact({"id": "chatcmpl-s", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 1}})
        + b"\r\n\r\n"
    )
    reader = SseBodyReader(max_line_bytes=1 << 20)
    reader.feed(body)
    facts = reader.result()
    assert facts.usage == Usage(9, 1, None)
    assert facts.finish == "stop"


def test_sse_without_usage_reports_none_and_error_events_are_flagged() -> None:
    """A stream with no usage gives None; an error event in a stream sets the error flag."""
    reader = SseBodyReader(max_line_bytes=1 << 20)
    reader.feed(_sse(_chunk(0, usage=False), {"error": {"message": "boom", "code": 500}}))
    facts = reader.result()
    assert facts.usage is None and facts.error


def test_sse_ignores_usage_text_inside_generated_content() -> None:
    """Generated text that spells out a usage object is escaped JSON and is not mistaken for usage."""
    reader = SseBodyReader(max_line_bytes=1 << 20)
    tricky = _chunk(1, usage=False)
    tricky["choices"] = [{"index": 0, "delta": {"content": '"usage":{"prompt_tokens":999}'}, "finish_reason": None}]
    reader.feed(_sse(_chunk(0, usage=False), tricky))
    assert reader.result().usage is None


def test_usage_parsing_rejects_malformed_values() -> None:
    """Negative, boolean or missing prompt counts are not usage; a missing completion count is 0."""
    assert usage_from_mapping({"prompt_tokens": -1, "completion_tokens": 1}) is None
    assert usage_from_mapping({"prompt_tokens": True, "completion_tokens": 1}) is None
    assert usage_from_mapping({"completion_tokens": 1}) is None
    assert usage_from_mapping({"prompt_tokens": 3, "completion_tokens": None}) == Usage(3, 0, None)
    assert usage_from_mapping(None) is None


def test_usage_from_vllm_usage_info_object() -> None:
    """vLLM's UsageInfo (attributes, optional prompt_tokens_details) converts to Usage."""
    info = UsageInfo(prompt_tokens=8, completion_tokens=2, total_tokens=10, prompt_tokens_details={"cached_tokens": 3})
    assert usage_from_object(info) == Usage(8, 2, 3)
    assert usage_from_object(UsageInfo(1, 1, 2)) == Usage(1, 1, None)
    assert usage_from_object(None) is None


def test_gpu_seconds_is_prefill_plus_decode_without_queue() -> None:
    """Engine time = time_to_first_token_ms + generation_time_ms; queue time and other keys are ignored."""
    metrics = {
        "time_to_first_token_ms": 12.5,
        "generation_time_ms": 40.25,
        "queue_time_ms": 900.0,
        "mean_itl_ms": 4.0,
        "tokens_per_second": 180.0,
    }
    assert gpu_seconds_from_metrics(metrics) == 0.05275


def test_gpu_seconds_of_a_long_prompt_counts_its_prefill() -> None:
    """A long prompt's prefill is billed: the result is well above generation_time_ms alone."""
    metrics = {"time_to_first_token_ms": 480.0, "generation_time_ms": 6.0, "queue_time_ms": 1.0}
    gpu = gpu_seconds_from_metrics(metrics)
    assert gpu == 0.486
    assert gpu > metrics["generation_time_ms"] / 1000


def test_gpu_seconds_ignores_keys_vllm_does_not_have() -> None:
    """Only vLLM 0.32's real field names count; invented ones never did and never will."""
    assert gpu_seconds_from_metrics({"inference_time_ms": 100, "prefill_time_ms": 10, "decode_time_ms": 20}) is None
    assert gpu_seconds_from_metrics({"inference_time_ms": 100, "time_to_first_token_ms": 1}) == 0.001


def test_request_aborted_before_its_first_token_claims_no_engine_time() -> None:
    """No time_to_first_token_ms (never produced a token): None, even with generation or queue time."""
    assert gpu_seconds_from_metrics({"queue_time_ms": 50.0}) is None
    assert (
        gpu_seconds_from_metrics(
            {"time_to_first_token_ms": None, "generation_time_ms": None, "queue_time_ms": 50.0, "mean_itl_ms": None}
        )
        is None
    )
    assert gpu_seconds_from_metrics({"generation_time_ms": 5}) is None
    assert gpu_seconds_from_metrics({}) is None


def test_ttft_without_generation_time_is_the_ttft_alone() -> None:
    """A first token but no measured decode (e.g. one output token reported without a last token): TTFT only."""
    assert gpu_seconds_from_metrics({"time_to_first_token_ms": 7.5}) == 0.0075
    assert gpu_seconds_from_metrics({"time_to_first_token_ms": 7.5, "generation_time_ms": None}) == 0.0075
    assert gpu_seconds_from_metrics({"time_to_first_token_ms": 0, "generation_time_ms": 0}) == 0.0


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "5", True, [1]])
@pytest.mark.parametrize("field", ["time_to_first_token_ms", "generation_time_ms"])
def test_invalid_durations_give_no_engine_time(field: str, bad: object) -> None:
    """A negative, non-finite or non-numeric duration makes the whole object untrusted: None."""
    metrics = {"time_to_first_token_ms": 10.0, "generation_time_ms": 20.0, field: bad}
    assert gpu_seconds_from_metrics(metrics) is None


def test_gpu_seconds_without_a_metrics_object() -> None:
    """No metrics object, or not a mapping: None."""
    assert gpu_seconds_from_metrics(None) is None
    assert gpu_seconds_from_metrics("nope") is None
    assert gpu_seconds_from_metrics([12.0, 3.0]) is None


@given(st.floats(min_value=0, max_value=1e7, allow_nan=False), st.floats(min_value=0, max_value=1e7, allow_nan=False))
def test_gpu_seconds_is_the_rounded_sum(ttft: float, generation: float) -> None:
    """For any valid pair the result is their sum in seconds, to the microsecond."""
    gpu = gpu_seconds_from_metrics({"time_to_first_token_ms": ttft, "generation_time_ms": generation})
    assert gpu is not None
    assert abs(gpu - (ttft + generation) / 1000) <= 0.5e-6 + 1e-9 * gpu


def test_engine_interval_is_exactly_gpu_seconds_long() -> None:
    """engine_end is the finish time to the microsecond; engine_end - engine_start == gpu_seconds."""
    start, end = engine_interval(engine_end=1_760_000_123.5, gpu_seconds=0.486)
    assert (start, end) == ("2025-10-09T08:55:23.014000+00:00", "2025-10-09T08:55:23.500000+00:00")


@given(
    st.floats(min_value=1.5e9, max_value=4e9, allow_nan=False),
    st.integers(min_value=0, max_value=10_000_000 * 1_000_000),
)
def test_engine_interval_difference_is_exact(end: float, gpu_micros: int) -> None:
    """Whatever the times, the two strings differ by exactly gpu_seconds (to the microsecond) and parse as UTC."""
    gpu = round(gpu_micros / 1_000_000, 6)
    start_text, end_text = engine_interval(engine_end=end, gpu_seconds=gpu)
    assert RFC3339_MICROS.fullmatch(start_text) and RFC3339_MICROS.fullmatch(end_text)
    start, finish = datetime.fromisoformat(start_text), datetime.fromisoformat(end_text)
    assert finish - start == timedelta(microseconds=round(gpu * 1_000_000))
    assert abs(finish.timestamp() - end) <= 1e-6


def test_event_id_is_the_response_id_plus_a_unique_suffix() -> None:
    """By default the id keeps the response id as prefix and adds a per-request suffix."""
    first = make_event_id("chatcmpl-req-1", client_request_id="req-1", trust_request_id=False)
    second = make_event_id("chatcmpl-req-1", client_request_id="req-1", trust_request_id=False)
    assert re.fullmatch(r"chatcmpl-req-1~[0-9a-f]{16}", first)
    assert first != second


def test_event_id_when_trusted_and_fallbacks() -> None:
    """Trusted ids are used bare; without a response id the header or a uuid is used, prefixed."""
    assert make_event_id("cmpl-1", client_request_id=None, trust_request_id=True) == "cmpl-1"
    assert make_event_id(None, client_request_id="abc", trust_request_id=True) == "xrid-abc"
    assert re.fullmatch(r"uuid-[0-9a-f]{32}", make_event_id(None, client_request_id=None, trust_request_id=False))


@given(st.text(min_size=1, max_size=400), st.booleans())
def test_event_id_is_never_longer_than_128(response_id: str, trusted: bool) -> None:
    """Whatever the response id, the event id fits the contract's 1-128 characters."""
    event_id = make_event_id(response_id, client_request_id=None, trust_request_id=trusted)
    assert 1 <= len(event_id) <= 128


def test_rfc3339_is_utc_with_offset() -> None:
    """Times are RFC 3339 with an explicit +00:00 offset."""
    text = rfc3339(1_760_000_000.25)
    assert text == "2025-10-09T08:53:20.250+00:00"
    assert datetime.fromisoformat(text).utcoffset() is not None


def test_build_event_leaves_out_unknown_optional_fields() -> None:
    """Optional fields are present only when known; required ones always are."""
    event = build_event(
        event_id="e1",
        finished_at=0,
        customer={"tenant": "t"},
        usage=Usage(1, 2),
        model=None,
        finish=None,
        gpu_seconds=None,
    )
    assert event == {
        "event_id": "e1",
        "time": "1970-01-01T00:00:00.000+00:00",
        "customer": {"tenant": "t"},
        "prompt_tokens": 1,
        "completion_tokens": 2,
    }


def test_build_event_with_engine_time_carries_its_interval() -> None:
    """With gpu_seconds come engine_start/engine_end (ending at the finish), valid against the contract."""
    event = build_event(
        event_id="e2",
        finished_at=1_760_000_123.5,
        customer={"tenant": "t"},
        usage=Usage(400, 2),
        model="m",
        finish="length",
        gpu_seconds=0.486,
    )
    assert event["gpu_seconds"] == 0.486
    assert event["engine_start"] == "2025-10-09T08:55:23.014000+00:00"
    assert event["engine_end"] == "2025-10-09T08:55:23.500000+00:00"
    assert event["time"] == "2025-10-09T08:55:23.500+00:00"
    jsonschema.validate(event, EVENT_SCHEMA)
    without = build_event(
        event_id="e3",
        finished_at=1_760_000_123.5,
        customer={"tenant": "t"},
        usage=Usage(1, 0),
        model=None,
        finish=None,
        gpu_seconds=None,
    )
    assert "engine_start" not in without and "engine_end" not in without
    jsonschema.validate(without, EVENT_SCHEMA)


def test_contract_takes_the_engine_interval_both_or_neither() -> None:
    """The schema refuses engine_start without engine_end and the reverse."""
    base = {
        "event_id": "e",
        "time": "2025-10-09T08:55:23.500+00:00",
        "customer": {"tenant": "t"},
        "prompt_tokens": 1,
        "completion_tokens": 1,
        "gpu_seconds": 0.5,
    }
    for alone in ("engine_start", "engine_end"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**base, alone: "2025-10-09T08:55:23.000000+00:00"}, EVENT_SCHEMA)
