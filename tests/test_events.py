"""The usage-event v1 contract: every rule has a rejecting test, and valid events parse exactly."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import ACCOUNT, T0, event
from hypothesis import given
from hypothesis import strategies as st

from sidecar.errors import BadBody, InvalidEvent
from sidecar.events import parse_body, validate_event


def check(obj: Any) -> Any:
    """Validate with the default limits at T0."""
    return validate_event(obj, now=T0, max_age_s=48 * 3600, max_future_s=300)


def without(name: str) -> dict[str, Any]:
    """A valid event with one field removed."""
    e = event(1)
    del e[name]
    return e


REJECTIONS: list[tuple[str, Any, str]] = [
    ("not an object", [1], "event: must be a JSON object"),
    ("missing event_id", without("event_id"), "event_id: is required"),
    ("event_id not a string", event(1) | {"event_id": 5}, "event_id: must be a string"),
    ("event_id empty", event(1) | {"event_id": ""}, "event_id: must be 1-128 characters"),
    ("event_id too long", event(1) | {"event_id": "x" * 129}, "event_id: must be 1-128 characters"),
    ("event_id control char", event(1) | {"event_id": "a\nb"}, "event_id: must not contain control"),
    ("missing time", without("time"), "time: is required"),
    ("time not a string", event(1) | {"time": 1764324000}, "time: must be an RFC 3339 string"),
    ("time without offset", event(1) | {"time": "2026-11-28T10:00:00"}, "time: must be RFC 3339"),
    ("time date only", event(1) | {"time": "2026-11-28"}, "time: must be RFC 3339"),
    ("time impossible", event(1) | {"time": "2026-02-30T10:00:00Z"}, "time: is not a real date"),
    ("time future", event(1, when=T0 + 301), "time: is more than 300 s in the future"),
    ("time too old", event(1, when=T0 - 48 * 3600 - 1), "time: is older than"),
    ("missing customer", without("customer"), "customer: is required"),
    ("customer not object", event(1) | {"customer": "acme"}, "customer: is required and must be an object"),
    ("customer two kinds", event(1, customer={"tenant": "a", "customer_identifier": "b"}),
     "customer: must have exactly one of"),
    ("customer empty", event(1, customer={}), "customer: must have exactly one of"),
    ("account id short", event(1, customer=ACCOUNT | {"aws_account_id": "1234"}),
     "customer.aws_account_id: must be a string of exactly 12 digits"),
    ("account without licence", event(1, customer={"aws_account_id": "123456789012"}),
     "customer: must have exactly one of"),
    ("licence malformed", event(1, customer=ACCOUNT | {"license_arn": "arn:aws:s3:::bucket"}),
     "customer.license_arn: must look like"),
    ("identifier with space", event(1, customer={"customer_identifier": "a b"}),
     "customer.customer_identifier: must be 1-255 characters"),
    ("tenant empty", event(1, customer={"tenant": ""}), "customer.tenant: must be a string of 1-256"),
    ("tenant not string", event(1, customer={"tenant": 7}), "customer.tenant: must be a string"),
    ("missing prompt_tokens", without("prompt_tokens"), "prompt_tokens: is required"),
    ("missing completion_tokens", without("completion_tokens"), "completion_tokens: is required"),
    ("negative tokens", event(1, prompt=-1), "prompt_tokens: must be >= 0"),
    ("float tokens", event(1) | {"completion_tokens": 1.5}, "completion_tokens: must be an integer"),
    ("bool tokens", event(1) | {"prompt_tokens": True}, "prompt_tokens: must be an integer"),
    ("string tokens", event(1) | {"prompt_tokens": "10"}, "prompt_tokens: must be an integer"),
    ("huge tokens", event(1, prompt=2**31), "prompt_tokens: must be <= 2147483647"),
    ("negative cached", event(1, cached_tokens=-2), "cached_tokens: must be >= 0"),
    ("gpu string", event(1, gpu_seconds="1"), "gpu_seconds: must be a number"),
    ("gpu negative", event(1, gpu_seconds=-0.1), "gpu_seconds: must be a finite number >= 0"),
    ("gpu infinite", event(1, gpu_seconds=float("inf")), "gpu_seconds: must be a finite number >= 0"),
    ("gpu huge", event(1, gpu_seconds=1e12), "gpu_seconds: must be <="),
    ("model not string", event(1, model=3), "model: must be a string"),
    ("model too long", event(1, model="m" * 257), "model: must be 1-256 characters"),
    ("finish too long", event(1, finish="f" * 65), "finish: must be 1-64 characters"),
]


@pytest.mark.parametrize(("name", "obj", "message"), REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_rule_rejects(name: str, obj: Any, message: str) -> None:
    """Each contract rule rejects with a message that names the field and the rule."""
    with pytest.raises(InvalidEvent) as info:
        check(obj)
    assert str(info.value).startswith(message), str(info.value)


def test_valid_event_round_trip() -> None:
    """All optional fields parse into the event, with GPU time as exact microseconds."""
    e = check(event(1, customer={"tenant": "acme"}, cached_tokens=3, gpu_seconds=0.25,
                    model="llama", finish="stop", unknown_future_field=1))
    assert e.tenant == "acme" and e.customer is None
    assert (e.prompt_tokens, e.completion_tokens, e.cached_tokens, e.gpu_micros) == (10, 5, 3, 250_000)
    assert e.time == T0 - 60
    assert e.source_amount("total_tokens") == 15 and e.source_amount("count") == 1


def test_time_offsets_and_fractions() -> None:
    """Offsets other than Z and nanosecond fractions are understood."""
    e = check(event(1) | {"time": "2026-11-28T11:01:00.123456789+01:00"})
    assert int(e.time) == int(T0 - 60)


def test_account_customer() -> None:
    """An account + licence customer keys its buckets by both."""
    e = check(event(1, customer=ACCOUNT))
    assert e.customer is not None
    assert e.customer.key == f"account:{ACCOUNT['aws_account_id']}/{ACCOUNT['license_arn']}"


@pytest.mark.parametrize("body", [b"", b"   ", b"{", b"\xff", b"null", b"3", b'{"a": Infinity}',
                                  b'{"a": -NaN}', b"[" * 50_000 + b"]" * 50_000])
def test_unparseable_bodies(body: bytes) -> None:
    """Bodies that are not one object or an array of values raise BadBody."""
    with pytest.raises(BadBody):
        parse_body(body, "application/json")


def test_ndjson_bad_lines_are_items() -> None:
    """In NDJSON each bad line becomes an error item, blank lines are skipped."""
    items = parse_body(b'{"a": 1}\n\n\xff\n{"b": NaN}\n[1]\n', "application/x-ndjson")
    assert [i.error is None for i in items] == [True, False, False, True]
    assert items[1].error == "line is not valid UTF-8"


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    """Any bytes either parse into items or raise BadBody; nothing else escapes."""
    for ctype in ("application/json", "application/x-ndjson"):
        try:
            items = parse_body(data, ctype)
        except BadBody:
            continue
        for item in items:
            if item.error is None:
                try:
                    check(item.value)
                except InvalidEvent:
                    pass


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
def test_arbitrary_json_values_never_crash(value: Any) -> None:
    """Any JSON value as an event is either valid or rejected with InvalidEvent."""
    try:
        check(value)
    except InvalidEvent:
        pass


@pytest.mark.parametrize(("customer", "field"), [
    ({"aws_account_id": "123456789012\n", "license_arn": ACCOUNT["license_arn"]}, "customer.aws_account_id"),
    ({"aws_account_id": "١٢٣٤٥٦٧٨٩٠١٢", "license_arn": ACCOUNT["license_arn"]}, "customer.aws_account_id"),
    ({"customer_identifier": "abc\n"}, "customer.customer_identifier"),
    ({"customer_identifier": "ｃｕｓｔｏｍｅｒ"}, "customer.customer_identifier"),
    (ACCOUNT | {"license_arn": ACCOUNT["license_arn"] + "\n"}, "customer.license_arn"),
])
def test_identifiers_are_plain_ascii(customer: dict[str, str], field: str) -> None:
    """Trailing newlines and non-ASCII digits or letters never pass as AWS identifiers."""
    with pytest.raises(InvalidEvent) as info:
        check(event(1, customer=customer))
    assert info.value.field == field


def test_time_with_trailing_newline_rejected() -> None:
    """An RFC 3339 string followed by a newline is not RFC 3339."""
    with pytest.raises(InvalidEvent):
        check(event(1) | {"time": "2026-11-28T10:01:00Z\n"})
