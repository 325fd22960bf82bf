"""Usage event v1: parse request bodies and validate events against the contract. Pure, no I/O."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from sidecar.errors import BadBody, InvalidEvent
from sidecar.model import CONTROL_CHARS, MAX_TENANT_LEN, SOURCES, CustomerRef

MAX_INT = 2_147_483_647  # per-event token cap; also AWS's Quantity ceiling
MAX_GPU_SECONDS = 10_000_000.0
RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{1,9})?([Zz]|[+-][0-9]{2}:[0-9]{2})\Z",
    re.ASCII,
)
KNOWN_FIELDS = frozenset(
    {"event_id", "time", "customer", "model", "prompt_tokens", "completion_tokens",
     "cached_tokens", "gpu_seconds", "finish", "engine_start", "engine_end"}
)


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """One validated usage event. `customer` is None when the event names a tenant."""

    event_id: str
    time: float  # epoch seconds
    customer: CustomerRef | None
    tenant: str | None
    model: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None
    gpu_micros: int | None
    finish: str | None
    engine_start_us: int | None = None  # the request's engine interval (epoch µs, the vLLM host's clock)
    engine_end_us: int | None = None

    def source_amount(self, source: str) -> int:
        """This event's raw amount for a dimension source (GPU time in microseconds)."""
        known = SOURCES.get(source)
        if known is None:
            raise ValueError(f"unknown dimension source {source!r}")
        return known.read(self)


@dataclass(frozen=True, slots=True)
class Item:
    """One element of a request body: a decoded JSON value, or why it could not be decoded."""

    value: Any = None
    error: str | None = None


JSON_TYPES = ("application/json",)
NDJSON_TYPES = ("application/x-ndjson", "application/jsonl", "application/json-seq-lines")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicate_keys, parse_constant=_reject_constant)


def decode_json(text: str) -> Any:
    """Strict JSON: no duplicate keys, no NaN/Infinity. Raises ValueError with a readable reason."""
    try:
        return _DECODER.decode(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None


def parse_body(body: bytes, content_type: str) -> list[Item]:
    """Split a request body into items: one object, a JSON array, or NDJSON lines.

    Raises BadBody when a JSON body cannot be decoded at all. In NDJSON a bad line is an item
    with an error, so it does not poison its neighbours.
    """
    if content_type in NDJSON_TYPES:
        items: list[Item] = []
        for line in body.split(b"\n"):
            if not line.strip():
                continue
            try:
                items.append(Item(value=decode_json(line.decode("utf-8"))))
            except UnicodeDecodeError:
                items.append(Item(error="line is not valid UTF-8"))
            except ValueError as exc:
                items.append(Item(error=f"line is {exc}" if str(exc).startswith("not") else str(exc)))
        return items
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("body is not valid UTF-8") from None
    try:
        value = decode_json(text)
    except ValueError as exc:
        raise BadBody(f"body is {exc}" if str(exc).startswith("not") else f"body: {exc}") from None
    if isinstance(value, list):
        return [Item(value=v) for v in value]
    if isinstance(value, dict):
        return [Item(value=value)]
    raise BadBody("body must be a JSON object or an array of objects")


def _string(obj: Mapping[str, Any], name: str, *, max_len: int, required: bool) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise InvalidEvent(name, "is required")
        return None
    if not isinstance(value, str):
        raise InvalidEvent(name, "must be a string")
    if not 1 <= len(value) <= max_len:
        raise InvalidEvent(name, f"must be 1-{max_len} characters")
    if CONTROL_CHARS.search(value):
        raise InvalidEvent(name, "must not contain control characters")
    return value


def _count(obj: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    if name not in obj or obj[name] is None:
        if required:
            raise InvalidEvent(name, "is required")
        return None
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidEvent(name, "must be an integer")
    if value < 0:
        raise InvalidEvent(name, "must be >= 0")
    if value > MAX_INT:
        raise InvalidEvent(name, f"must be <= {MAX_INT}")
    return value


_TIME_CACHE: dict[str, float] = {}
_CUSTOMER_CACHE: dict[tuple[tuple[str, Any], ...], tuple[CustomerRef | None, str | None]] = {}
_CACHE_MAX = 4096  # bounded memo of recently seen time strings and customers (events repeat them)


T = TypeVar("T")


def _remember(cache: dict[Any, T], key: Any, value: T) -> T:
    if len(cache) >= _CACHE_MAX:
        cache.clear()
    cache[key] = value
    return value


def parse_time(value: Any, name: str = "time") -> float:
    """An RFC 3339 timestamp with an offset, as epoch seconds; errors name the field `name`."""
    if isinstance(value, str):
        cached = _TIME_CACHE.get(value)
        if cached is not None:
            return cached
        return _remember(_TIME_CACHE, value, _parse_time(value, name))
    return _parse_time(value, name)


def _parse_time(value: Any, name: str) -> float:
    if not isinstance(value, str):
        raise InvalidEvent(name, "must be an RFC 3339 string with an offset")
    if not RFC3339.match(value):
        raise InvalidEvent(name, "must be RFC 3339 with an offset, e.g. 2026-11-28T10:00:00Z")
    text = value.upper().replace("Z", "+00:00")
    dot = text.find(".")
    if dot > 0 and text[dot + 7:dot + 8].isdigit():  # fromisoformat takes at most 6 fractional digits
        end = dot + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        text = text[:dot + 7] + text[end:]
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise InvalidEvent(name, "is not a real date and time") from None


def _engine_interval(obj: Mapping[str, Any], *, now: float, max_future_s: int) -> tuple[int | None, int | None]:
    """`engine_start` and `engine_end` (both or neither) as epoch microseconds."""
    start, end = obj.get("engine_start"), obj.get("engine_end")
    if start is None and end is None:
        return None, None
    if start is None or end is None:
        raise InvalidEvent("engine_start" if start is None else "engine_end",
                           "is required when the other end of the engine interval is given")
    start_us = round(parse_time(start, "engine_start") * 1_000_000)
    end_us = round(parse_time(end, "engine_end") * 1_000_000)
    if end_us < start_us:
        raise InvalidEvent("engine_end", "must not be before engine_start")
    if end_us - start_us > MAX_GPU_SECONDS * 1_000_000:
        raise InvalidEvent("engine_end", f"must be at most {MAX_GPU_SECONDS:.0f} s after engine_start")
    if end_us > (now + max_future_s) * 1_000_000:
        raise InvalidEvent("engine_end", f"is more than {max_future_s} s in the future")
    return start_us, end_us


def parse_customer(value: Any) -> tuple[CustomerRef | None, str | None]:
    """The event's customer: an AWS customer, or a tenant the sidecar maps later."""
    if not isinstance(value, dict):  # decoded JSON objects are plain dicts (no ABC check on the hot path)
        raise InvalidEvent("customer", "is required and must be an object")
    key = tuple(value.items())
    try:
        cached = _CUSTOMER_CACHE.get(key)
    except TypeError:  # unhashable values: certainly invalid, let the checks below say why
        cached = None
    if cached is not None:
        return cached
    parsed = _parse_customer(value)
    return _remember(_CUSTOMER_CACHE, key, parsed)  # only valid customers get here


def _parse_customer(value: Mapping[str, Any]) -> tuple[CustomerRef | None, str | None]:
    if set(value) == {"tenant"}:
        tenant = value["tenant"]
        if not isinstance(tenant, str) or not 1 <= len(tenant) <= MAX_TENANT_LEN:
            raise InvalidEvent("customer.tenant", f"must be a string of 1-{MAX_TENANT_LEN} characters")
        if CONTROL_CHARS.search(tenant):
            raise InvalidEvent("customer.tenant", "must not contain control characters")
        return None, tenant
    try:
        return CustomerRef.parse(value, where="customer"), None
    except ValueError as exc:
        field, _, rule = str(exc).partition(": ")
        if field == "customer":
            rule = "must have exactly one of {aws_account_id, license_arn}, {customer_identifier}, {tenant}"
        raise InvalidEvent(field, rule) from None


def validate_event(obj: Any, *, now: float, max_age_s: int, max_future_s: int) -> UsageEvent:
    """Check one decoded value against the v1 contract. Unknown fields are ignored (forward compatible)."""
    if not isinstance(obj, dict):
        raise InvalidEvent("event", "must be a JSON object")
    event_id = _string(obj, "event_id", max_len=128, required=True)
    assert event_id is not None
    if "time" not in obj:
        raise InvalidEvent("time", "is required")
    when = parse_time(obj["time"])
    if when > now + max_future_s:
        raise InvalidEvent("time", f"is more than {max_future_s} s in the future")
    if when < now - max_age_s:
        raise InvalidEvent(
            "time", f"is older than {max_age_s} s (SIDECAR_MAX_EVENT_AGE_S); it can no longer be deduplicated"
        )
    if "customer" not in obj:
        raise InvalidEvent("customer", "is required")
    customer, tenant = parse_customer(obj["customer"])
    model = _string(obj, "model", max_len=256, required=False)
    finish = _string(obj, "finish", max_len=64, required=False)
    prompt = _count(obj, "prompt_tokens", required=True)
    completion = _count(obj, "completion_tokens", required=True)
    cached = _count(obj, "cached_tokens", required=False)
    assert prompt is not None and completion is not None
    gpu_micros: int | None = None
    gpu = obj.get("gpu_seconds")
    if gpu is not None:
        if isinstance(gpu, bool) or not isinstance(gpu, int | float):
            raise InvalidEvent("gpu_seconds", "must be a number")
        if not math.isfinite(gpu) or gpu < 0:
            raise InvalidEvent("gpu_seconds", "must be a finite number >= 0")
        if gpu > MAX_GPU_SECONDS:
            raise InvalidEvent("gpu_seconds", f"must be <= {MAX_GPU_SECONDS:.0f}")
        gpu_micros = round(gpu * 1_000_000)
    engine_start_us, engine_end_us = _engine_interval(obj, now=now, max_future_s=max_future_s)
    return UsageEvent(
        event_id=event_id,
        time=when,
        customer=customer,
        tenant=tenant,
        model=model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        gpu_micros=gpu_micros,
        finish=finish,
        engine_start_us=engine_start_us,
        engine_end_us=engine_end_us,
    )


def check_items(items: list[Item], *, now: float, max_age_s: int,
                max_future_s: int) -> tuple[list[UsageEvent], list[dict[str, Any]]]:
    """Validate decoded items: the valid events, and `{"index", "error"}` for each refused one."""
    valid: list[UsageEvent] = []
    rejected: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if item.error is not None:
            rejected.append({"index": index, "error": item.error})
            continue
        try:
            valid.append(validate_event(item.value, now=now, max_age_s=max_age_s, max_future_s=max_future_s))
        except InvalidEvent as exc:
            rejected.append({"index": index, "error": str(exc)})
    return valid, rejected
