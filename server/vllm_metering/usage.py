"""Pure core: find usage in vLLM response bodies (JSON or SSE) and build "Usage event v1" objects.

Nothing here does I/O. The readers are fed the response body chunk by chunk, after each chunk has
already been passed on to the client, and keep only what the final event needs: a JSON body up to a
cap (then only its head and tail), and for SSE streams a reference to the last `data:` line that
carried usage, so a long stream costs one substring search per chunk and two JSON parses in total.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

MAX_EVENT_ID_CHARS = 128
# Compact JSON (what vLLM's pydantic models emit) and the one-space form json.dumps emits by default.
_USAGE_MARKERS = (b'"usage":{', b'"usage": {')
_FINISH_MARKERS = (b'"finish_reason":"', b'"finish_reason": "')
_USAGE_RE = re.compile(rb'"usage"\s*:\s*\{')
_ID_RE = re.compile(rb'"id"\s*:\s*"((?:[^"\\]|\\.){1,512})"')
_MODEL_RE = re.compile(rb'"model"\s*:\s*"((?:[^"\\]|\\.){1,512})"')
_FINISH_RE = re.compile(rb'"finish_reason"\s*:\s*"([A-Za-z0-9_\-]{1,64})"')
_METRICS_RE = re.compile(rb'"metrics"\s*:\s*\{')
_HEAD_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Usage:
    """Token counts of one request, as vLLM reported them."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None


@dataclass(slots=True)
class BodyFacts:
    """What a response body told us; every field may be missing."""

    response_id: str | None = None
    model: str | None = None
    usage: Usage | None = None
    finish: str | None = None
    gpu_seconds: float | None = None
    error: bool = False


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def usage_from_mapping(value: Any) -> Usage | None:
    """Usage from an OpenAI-style `usage` object, or None when it is missing or malformed."""
    if not isinstance(value, Mapping):
        return None
    prompt = _count(value.get("prompt_tokens"))
    if prompt is None:
        return None
    raw_completion = value.get("completion_tokens")
    completion = 0 if raw_completion is None else _count(raw_completion)
    if completion is None:
        return None
    details = value.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else None
    return Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)


def usage_from_object(value: Any) -> Usage | None:
    """Usage from vLLM's `UsageInfo` (a pydantic object) or an equivalent mapping."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return usage_from_mapping(value)
    details = getattr(value, "prompt_tokens_details", None)
    cached = None
    if details is not None:
        cached = (
            details.get("cached_tokens") if isinstance(details, Mapping) else getattr(details, "cached_tokens", None)
        )
    return usage_from_mapping(
        {
            "prompt_tokens": getattr(value, "prompt_tokens", None),
            "completion_tokens": getattr(value, "completion_tokens", None),
            "prompt_tokens_details": {"cached_tokens": cached},
        }
    )


class _Invalid:
    """Marks a metrics field that is present but unusable (wrong type, negative, NaN, infinite)."""


_INVALID = _Invalid()


def _milliseconds(metrics: Mapping[str, Any], key: str) -> float | _Invalid | None:
    """A duration field: None when absent or null, `_INVALID` when not a finite number >= 0."""
    value = metrics.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _INVALID
    if not math.isfinite(value) or value < 0:
        return _INVALID
    return float(value)


def gpu_seconds_from_metrics(metrics: Any) -> float | None:
    """Engine time of a request, in seconds, from the `metrics` object of `--enable-per-request-metrics`.

    vLLM 0.32's `PerRequestMetrics` (built by `build_per_request_timing_metrics`) has
    `time_to_first_token_ms` (first scheduled -> first output token: prefill, preemptions included),
    `generation_time_ms` (first -> last output token: decode only), `queue_time_ms`, `mean_itl_ms` and
    `tokens_per_second`; each is omitted or null when vLLM lacks the timestamps it needs. Engine time is
    scheduling -> last token = `time_to_first_token_ms + generation_time_ms`; queue time is not engine
    time. The rules, so that no engine time is ever claimed that vLLM did not measure:

    - no `metrics` object (flag off, n > 1, error) or no `time_to_first_token_ms`: None. vLLM leaves
      the TTFT out when the request never produced a token (aborted in the queue or in prefill).
    - `time_to_first_token_ms` without `generation_time_ms`: the TTFT alone (nothing measured after
      the first token).
    - any of the two present but not a finite number >= 0: None (a broken object is not billed).

    The result is rounded to the microsecond. It is time spent in the engine inside shared batches,
    not exclusive GPU time: concurrent requests' engine times overlap.
    """
    if not isinstance(metrics, Mapping):
        return None
    prefill = _milliseconds(metrics, "time_to_first_token_ms")
    decode = _milliseconds(metrics, "generation_time_ms")
    if prefill is None or isinstance(prefill, _Invalid) or isinstance(decode, _Invalid):
        return None
    total = prefill if decode is None else prefill + decode
    return round(total / 1000.0, 6)


def _short_text(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= 512:
        return value
    return None


def _first_choice_finish(choices: Any) -> str | None:
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if isinstance(choice, Mapping) and choice.get("index", 0) == 0:
            return _short_text(choice.get("finish_reason"))
    return None


def _is_error_object(obj: Mapping[str, Any]) -> bool:
    return "error" in obj or obj.get("object") == "error"


def facts_from_object(obj: Any) -> BodyFacts:
    """Facts from a whole decoded JSON response body."""
    facts = BodyFacts()
    if not isinstance(obj, Mapping):
        return facts
    facts.response_id = _short_text(obj.get("id"))
    facts.model = _short_text(obj.get("model"))
    facts.usage = usage_from_mapping(obj.get("usage"))
    facts.finish = _first_choice_finish(obj.get("choices"))
    facts.gpu_seconds = gpu_seconds_from_metrics(obj.get("metrics"))
    facts.error = _is_error_object(obj)
    return facts


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None


def _decode_string(raw: bytes) -> str | None:
    try:
        value = json.loads(b'"' + raw + b'"')
    except (ValueError, UnicodeDecodeError):
        return None
    return _short_text(value)


def _object_after(pattern: re.Pattern[bytes], data: bytes) -> Any:
    """The JSON object that follows the last match of `pattern` in `data`, if it decodes."""
    match = None
    for match in pattern.finditer(data):  # noqa: B007 - we want the last match
        pass
    if match is None:
        return None
    text = data[match.end() - 1 :].decode("utf-8", errors="replace")
    try:
        value, _ = json.JSONDecoder().raw_decode(text)
    except ValueError:
        return None
    return value


class JsonBodyReader:
    """Collects a JSON response body; beyond `max_bytes` keeps only its head and tail."""

    __slots__ = ("_chunks", "_head", "_max_bytes", "_size", "_tail", "_tail_size")

    def __init__(self, *, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._chunks: list[bytes] | None = []
        self._size = 0
        self._head = b""
        self._tail: deque[bytes] = deque()
        self._tail_size = 0

    def feed(self, chunk: bytes) -> None:
        """Take the next body chunk (already sent to the client)."""
        if not chunk:
            return
        self._size += len(chunk)
        if self._chunks is not None:
            if self._size <= self._max_bytes:
                self._chunks.append(chunk)
                return
            # Over the cap: from now on keep a bounded head and tail only.
            self._chunks.append(chunk)
            whole = b"".join(self._chunks)
            self._chunks = None
            self._head = whole[:_HEAD_TAIL_BYTES]
            self._push_tail(whole[-_HEAD_TAIL_BYTES:])
            return
        self._push_tail(chunk)

    def _push_tail(self, chunk: bytes) -> None:
        self._tail.append(chunk)
        self._tail_size += len(chunk)
        while self._tail and self._tail_size - len(self._tail[0]) >= _HEAD_TAIL_BYTES:
            self._tail_size -= len(self._tail.popleft())

    @property
    def truncated(self) -> bool:
        """Whether the body was over the cap, so only its head and tail were scanned."""
        return self._chunks is None

    def result(self) -> BodyFacts:
        """Decode what was collected."""
        if self._chunks is not None:
            if not self._chunks:
                return BodyFacts()
            return facts_from_object(_loads(b"".join(self._chunks)))
        facts = BodyFacts()
        tail = b"".join(self._tail)[-_HEAD_TAIL_BYTES:]
        if (match := _ID_RE.search(self._head)) is not None:
            facts.response_id = _decode_string(match.group(1))
        if (match := _MODEL_RE.search(self._head)) is not None:
            facts.model = _decode_string(match.group(1))
        finish = _FINISH_RE.search(self._head) or _FINISH_RE.search(tail)
        if finish is not None:
            facts.finish = finish.group(1).decode("ascii")
        facts.usage = usage_from_mapping(_object_after(_USAGE_RE, tail))
        facts.gpu_seconds = gpu_seconds_from_metrics(_object_after(_METRICS_RE, tail))
        facts.error = self._head.lstrip().startswith(b'{"error"') or b'"object":"error"' in self._head
        return facts


class SseBodyReader:
    """Scans an SSE stream (`data: {...}` lines) for the last usage, the id, model and finish.

    A chunk that carries neither usage, a finish reason nor an error costs two or three substring
    searches; only the first line, finish and error lines are decoded on the way, and the last usage
    line once at the end.
    """

    __slots__ = (
        "_max_line_bytes",
        "_partial",
        "_skip_line",
        "_usage_line",
        "error",
        "finish",
        "model",
        "response_id",
        "saw_first",
    )

    def __init__(self, *, max_line_bytes: int) -> None:
        self._max_line_bytes = max_line_bytes
        self._partial = b""
        self._skip_line = False
        self._usage_line: bytes | None = None
        self.saw_first = False
        self.response_id: str | None = None
        self.model: str | None = None
        self.finish: str | None = None
        self.error = False

    def feed(self, chunk: bytes) -> None:
        """Take the next body chunk (already sent to the client)."""
        if not chunk:
            return
        if (
            self.saw_first
            and chunk[-1:] == b"\n"
            and not self._partial
            and not self._skip_line
            and b'"usage"' not in chunk
            and b'"error"' not in chunk
            and (self.finish is not None or b'"finish_reason":"' not in chunk)
        ):
            return  # the common token chunk: nothing we need (two or three substring searches)
        if self._partial:
            chunk = self._partial + chunk
            self._partial = b""
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            if self._skip_line:
                self._skip_line = False
            else:
                self._line(chunk[start:end])
            start = end + 1
        rest = chunk[start:]
        if rest and not self._skip_line:
            if len(rest) > self._max_line_bytes:
                self._skip_line = True  # an absurdly long line: ignore it up to its newline
            else:
                self._partial = rest

    def _line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # comments, `event:`, `id:`, blank separators
        payload = line[5:].strip()
        if not payload:
            return
        if payload == b"[DONE]":
            return
        has_usage = any(m in payload for m in _USAGE_MARKERS) or (
            b'"usage"' in payload and _USAGE_RE.search(payload) is not None
        )
        if has_usage:
            self._usage_line = payload
        has_finish = self.finish is None and any(m in payload for m in _FINISH_MARKERS)
        has_error = b'"error"' in payload
        if self.saw_first and not has_finish and not has_error:
            return
        obj = _loads(payload)
        if not isinstance(obj, Mapping):
            return
        if not self.saw_first:
            self.saw_first = True
            self.response_id = _short_text(obj.get("id"))
            self.model = _short_text(obj.get("model"))
        if self.finish is None:
            self.finish = _first_choice_finish(obj.get("choices"))
        if has_error and _is_error_object(obj):
            self.error = True

    def result(self) -> BodyFacts:
        """Decode the last usage line seen (cumulative usage: the last one wins)."""
        if self._partial:
            # A stream cut off mid-line: the fragment may still be a complete JSON line.
            partial, self._partial = self._partial, b""
            payload = partial.rstrip(b"\r")[5:] if partial.startswith(b"data:") else b""
            if isinstance(_loads(payload), Mapping):
                self._line(partial)
        facts = BodyFacts(response_id=self.response_id, model=self.model, finish=self.finish, error=self.error)
        if self._usage_line is not None:
            obj = _loads(self._usage_line)
            if isinstance(obj, Mapping):
                facts.usage = usage_from_mapping(obj.get("usage"))
                facts.gpu_seconds = gpu_seconds_from_metrics(obj.get("metrics"))
                if facts.response_id is None:
                    facts.response_id = _short_text(obj.get("id"))
                if facts.model is None:
                    facts.model = _short_text(obj.get("model"))
        return facts


def rfc3339(epoch_s: float) -> str:
    """RFC 3339 UTC timestamp with offset and milliseconds, e.g. 2026-01-02T03:04:05.678+00:00."""
    return datetime.fromtimestamp(epoch_s, tz=UTC).isoformat(timespec="milliseconds")


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rfc3339_micros(epoch_us: int) -> str:
    """RFC 3339 UTC timestamp with offset and microseconds from integer epoch microseconds (exact)."""
    return (_EPOCH + timedelta(microseconds=epoch_us)).isoformat(timespec="microseconds")


def engine_interval(*, engine_end: float, gpu_seconds: float) -> tuple[str, str]:
    """`(engine_start, engine_end)` of a request whose engine time ended at `engine_end` (epoch seconds).

    Both are computed in whole microseconds, so `engine_end - engine_start` is exactly `gpu_seconds`
    (already rounded to the microsecond) and a reader can rebuild it from the two strings.
    """
    end_us = round(engine_end * 1_000_000)
    return rfc3339_micros(end_us - round(gpu_seconds * 1_000_000)), rfc3339_micros(end_us)


def _random_suffix() -> str:
    return uuid.uuid4().hex[:16]


def make_event_id(
    response_id: str | None,
    *,
    client_request_id: str | None,
    trust_request_id: bool,
    suffix: Callable[[], str] = _random_suffix,
) -> str:
    """The event's idempotency key: the response id, made unique unless ids are trusted.

    vLLM builds response ids from the client's X-Request-Id header (or body `request_id`), so a
    client reusing one would make distinct requests share an id and all but the first be deduplicated
    away. Unless METERING_TRUST_REQUEST_ID is set, a random suffix (`~` + 16 hex) keeps each request's
    key unique; it is minted once per request, so retries and spool replays still carry the same key.
    """
    if response_id:
        base = response_id
    elif client_request_id:
        base = f"xrid-{client_request_id}"
    else:
        return f"uuid-{uuid.uuid4().hex}"
    if not trust_request_id:
        base = f"{base}~{suffix()}"
    if len(base) > MAX_EVENT_ID_CHARS:
        base = "sha256-" + hashlib.sha256(base.encode("utf-8", "surrogatepass")).hexdigest()
    return base


def build_event(
    *,
    event_id: str,
    finished_at: float,
    customer: Mapping[str, str],
    usage: Usage,
    model: str | None,
    finish: str | None,
    gpu_seconds: float | None,
) -> dict[str, Any]:
    """A usage event v1, optional fields only when known.

    `finished_at` (epoch seconds, the vLLM process's wall clock) is when the response completed: the
    event's `time` and, when the engine time is known, its `engine_end`, with `engine_start` =
    `engine_end` - `gpu_seconds` (the request's engine interval, for sharing GPU time among the
    requests that ran at once).
    """
    event: dict[str, Any] = {
        "event_id": event_id,
        "time": rfc3339(finished_at),
        "customer": dict(customer),
    }
    if model is not None:
        event["model"] = model
    event["prompt_tokens"] = usage.prompt_tokens
    event["completion_tokens"] = usage.completion_tokens
    if usage.cached_tokens is not None:
        event["cached_tokens"] = usage.cached_tokens
    if gpu_seconds is not None:
        event["gpu_seconds"] = gpu_seconds
        event["engine_start"], event["engine_end"] = engine_interval(engine_end=finished_at, gpu_seconds=gpu_seconds)
    if finish is not None:
        event["finish"] = finish
    return event
