"""Tests for the local Marketplace Metering simulator, driven by a real botocore client."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import botocore.config
import botocore.exceptions
import botocore.session
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.simulator import (
    BATCH_METER_USAGE,
    DEFAULT_DIMENSIONS,
    DedupKey,
    Simulator,
    SimulatorConfig,
    add_arguments,
    config_from_args,
    start,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
NOW = datetime(2026, 3, 15, 12, 30, tzinfo=UTC).timestamp()
HOUR_START = NOW - 1800  # 12:00:00 UTC, the hour NOW is in
PRODUCT = "prod-1234abcd"
ACCOUNT = "111122223333"
LICENCE = "arn:aws:license-manager::111122223333:license:l-0123456789abcdef0123456789abcdef"
OTHER_LICENCE = "arn:aws:license-manager::111122223333:license:l-fedcba9876543210fedcba9876543210"

_BOTOCORE_SESSION = botocore.session.get_session()
# total_max_attempts=1: botocore's max_attempts counts *retries*, so max_attempts=1 sends twice.
_NO_RETRIES = botocore.config.Config(
    retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=2, read_timeout=5
)


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    """Return epoch seconds for a UTC wall-clock time."""
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def record(
    customer: str = "cust-a",
    *,
    at: float = HOUR_START,
    dimension: str = "tokens-processed",
    quantity: int | None = 10,
    **extra: Any,
) -> dict[str, Any]:
    """Build a CustomerIdentifier usage record as a botocore caller would."""
    built: dict[str, Any] = {
        "Timestamp": datetime.fromtimestamp(at, UTC),
        "CustomerIdentifier": customer,
        "Dimension": dimension,
        **extra,
    }
    if quantity is not None:
        built["Quantity"] = quantity
    return built


def licence_record(
    account: str = ACCOUNT, licence: str = LICENCE, *, at: float = HOUR_START, quantity: int = 10
) -> dict[str, Any]:
    """Build a CustomerAWSAccountId + LicenseArn usage record as a botocore caller would."""
    return {
        "Timestamp": datetime.fromtimestamp(at, UTC),
        "CustomerAWSAccountId": account,
        "LicenseArn": licence,
        "Dimension": "tokens-processed",
        "Quantity": quantity,
    }


def make_client(
    url: str | None, session: botocore.session.Session = _BOTOCORE_SESSION, **config: Any
) -> Any:
    """Create a real botocore Metering client that never retries (url None: botocore finds it)."""
    return session.create_client(
        "meteringmarketplace",
        region_name="us-east-1",
        endpoint_url=url,
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=_NO_RETRIES.merge(botocore.config.Config(**config)),
    )


class FakeClock:
    """A settable clock for the simulator's notion of now."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    """A running simulator, its clock, and a botocore client pointed at it."""

    sim: Simulator
    clock: FakeClock
    url: str
    client: Any
    extra_clients: list[Any] = field(default_factory=list)

    async def meter(self, *records: dict[str, Any], product_code: str | None = PRODUCT) -> Any:
        """Send one BatchMeterUsage call through botocore."""
        kwargs: dict[str, Any] = {"UsageRecords": list(records)}
        if product_code is not None:
            kwargs["ProductCode"] = product_code
        return await asyncio.to_thread(self.client.batch_meter_usage, **kwargs)

    async def refused(
        self, *records: dict[str, Any], product_code: str | None = PRODUCT
    ) -> botocore.exceptions.ClientError:
        """Send one call that must fail with a ClientError, and return the error."""
        with pytest.raises(botocore.exceptions.ClientError) as info:
            await self.meter(*records, product_code=product_code)
        return info.value


StartSim = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start simulators on free ports (settings as keywords, ``now=`` for the clock)."""
    started: list[tuple[Any, Harness]] = []

    async def _start(now: float = NOW, **overrides: Any) -> Harness:
        overrides.setdefault("product_code", PRODUCT)
        overrides.setdefault("subscribed", frozenset({"cust-a", "cust-b", ACCOUNT}))
        overrides.setdefault("seed", 7)
        clock = FakeClock(now)
        sim = Simulator(SimulatorConfig(**overrides), clock=clock)
        runner, url = await start(sim)
        harness = Harness(sim, clock, url, make_client(url))
        started.append((runner, harness))
        return harness

    yield _start
    for runner, harness in started:
        for client in [harness.client, *harness.extra_clients]:
            client.close()
        await runner.cleanup()


def error_code(error: botocore.exceptions.ClientError) -> str:
    """Return the error code botocore parsed from the response."""
    return str(error.response["Error"]["Code"])


def http_status(error: botocore.exceptions.ClientError) -> int:
    """Return the HTTP status botocore saw."""
    return int(error.response["ResponseMetadata"]["HTTPStatusCode"])


async def test_success_returns_a_metering_record_id_and_bills_once(start_sim: StartSim) -> None:
    """A valid record is answered Success with a MeteringRecordId and billed under its key."""
    h = await start_sim()
    response = await h.meter(record(at=HOUR_START + 125, quantity=42))
    [result] = response["Results"]
    assert result["Status"] == "Success"
    uuid.UUID(result["MeteringRecordId"])
    assert result["UsageRecord"]["Timestamp"] == datetime.fromtimestamp(HOUR_START + 125, UTC)
    assert result["UsageRecord"]["Quantity"] == 42
    assert response["UnprocessedRecords"] == []
    key = DedupKey("cust-a", PRODUCT, "tokens-processed", int(HOUR_START))
    billed = h.sim.billed[key]
    assert (billed.quantity, billed.metering_record_id) == (Decimal(42), result["MeteringRecordId"])
    assert billed.timestamp == HOUR_START + 125
    assert h.sim.counters.billed == 1
    assert h.sim.counters.calls == 1


async def test_same_quantity_resend_is_not_billed_twice(start_sim: StartSim) -> None:
    """An identical resend is answered DuplicateRecord with the original id and bills nothing."""
    h = await start_sim()
    first = (await h.meter(record()))["Results"][0]
    again = (await h.meter(record()))["Results"][0]
    assert again["Status"] == "DuplicateRecord"
    assert again["MeteringRecordId"] == first["MeteringRecordId"]
    assert len(h.sim.billed) == 1
    assert h.sim.counters.duplicates_same_quantity == 1
    assert h.sim.counters.conflicts == 0


async def test_same_quantity_resend_can_be_answered_success(start_sim: StartSim) -> None:
    """With duplicate_status=Success an identical resend is answered Success, still billed once."""
    h = await start_sim(duplicate_status="Success")
    first = (await h.meter(record()))["Results"][0]
    again = (await h.meter(record()))["Results"][0]
    assert (again["Status"], again["MeteringRecordId"]) == ("Success", first["MeteringRecordId"])
    assert h.sim.counters.billed == 1
    assert h.sim.counters.duplicates_same_quantity == 1


async def test_different_quantity_in_same_hour_is_a_counted_conflict(start_sim: StartSim) -> None:
    """A new quantity for the same customer, dimension and UTC hour is refused as a conflict."""
    h = await start_sim()
    first = (await h.meter(record(at=HOUR_START, quantity=10)))["Results"][0]
    later = (await h.meter(record(at=HOUR_START + 1700, quantity=11)))["Results"][0]
    assert later["Status"] == "DuplicateRecord"
    assert later["MeteringRecordId"] == first["MeteringRecordId"]
    key = DedupKey("cust-a", PRODUCT, "tokens-processed", int(HOUR_START))
    assert h.sim.billed_quantity(key) == 10
    assert h.sim.counters.conflicts == 1
    assert h.sim.counters.duplicates_same_quantity == 0


async def test_other_hour_dimension_or_customer_is_a_new_key(start_sim: StartSim) -> None:
    """Records that differ in hour, dimension or customer are billed separately."""
    h = await start_sim()
    response = await h.meter(
        record(),
        record(at=HOUR_START - 3600),
        record(dimension="inference-requests"),
        record("cust-b"),
    )
    assert [r["Status"] for r in response["Results"]] == ["Success"] * 4
    assert h.sim.counters.billed == 4


async def test_unsubscribed_customer_is_not_billed(start_sim: StartSim) -> None:
    """A customer outside the subscribed set is answered CustomerNotSubscribed and not billed."""
    h = await start_sim()
    response = await h.meter(record("cust-z"), record("cust-a"))
    statuses = [r["Status"] for r in response["Results"]]
    assert statuses == ["CustomerNotSubscribed", "Success"]
    assert "MeteringRecordId" not in response["Results"][0]
    assert h.sim.counters.not_subscribed == 1
    assert [k.customer for k in h.sim.billed] == ["cust-a"]
    h.sim.configure(subscribed=frozenset({"cust-z"}))
    assert (await h.meter(record("cust-z")))["Results"][0]["Status"] == "Success"


async def test_subscribe_all_accepts_any_customer(start_sim: StartSim) -> None:
    """With subscribe_all every customer is billed."""
    h = await start_sim(subscribe_all=True, subscribed=frozenset())
    by_identifier = await h.meter(record("anyone"))
    by_licence = await h.meter(licence_record("999988887777"), product_code=None)
    assert by_identifier["Results"][0]["Status"] == by_licence["Results"][0]["Status"] == "Success"


async def test_licence_records_are_billed_per_account_and_licence(start_sim: StartSim) -> None:
    """Account-and-licence records without ProductCode are billed under account and licence."""
    h = await start_sim()
    response = await h.meter(licence_record(quantity=5), product_code=None)
    assert response["Results"][0]["Status"] == "Success"
    assert h.sim.billed_quantity(
        DedupKey(ACCOUNT, LICENCE, "tokens-processed", int(HOUR_START))
    ) == Decimal(5)


async def test_absent_quantity_is_billed_as_zero(start_sim: StartSim) -> None:
    """A record without Quantity is a zero-quantity heartbeat."""
    h = await start_sim()
    response = await h.meter(record(quantity=None))
    assert response["Results"][0]["Status"] == "Success"
    assert [b.quantity for b in h.sim.billed.values()] == [0]


async def test_usage_allocations_that_sum_to_quantity_are_accepted(start_sim: StartSim) -> None:
    """Allocations that sum to the quantity, with at most five tags each, are accepted."""
    h = await start_sim()
    tags = [{"Key": f"k{i}", "Value": "v"} for i in range(5)]
    allocations = [
        {"AllocatedUsageQuantity": 4, "Tags": tags},
        {"AllocatedUsageQuantity": 6, "Tags": tags[:1]},
    ]
    response = await h.meter(record(quantity=10, UsageAllocations=allocations))
    assert response["Results"][0]["Status"] == "Success"
    assert response["Results"][0]["UsageRecord"]["UsageAllocations"] == allocations


async def test_twenty_five_records_pass_and_twenty_six_are_refused(start_sim: StartSim) -> None:
    """A call holds at most 25 records; 26 fail the whole call with ValidationException."""
    h = await start_sim(subscribe_all=True)
    ok = await h.meter(*(record(f"c{i}") for i in range(25)))
    assert len(ok["Results"]) == 25
    error = await h.refused(*(record(f"d{i}") for i in range(26)))
    assert (error_code(error), http_status(error)) == ("ValidationException", 400)
    assert h.sim.counters.billed == 25


async def test_mixed_customer_schemes_are_refused(start_sim: StartSim) -> None:
    """CustomerIdentifier and account-and-licence records in one call fail the whole call."""
    h = await start_sim()
    for product_code in (PRODUCT, None):
        error = await h.refused(record(), licence_record(), product_code=product_code)
        assert error_code(error) == "ValidationException"
    assert not h.sim.billed


async def test_product_code_with_licence_records_is_refused(start_sim: StartSim) -> None:
    """Licence records identify the product themselves, so a ProductCode beside them is refused."""
    h = await start_sim()
    error = await h.refused(licence_record(), product_code=PRODUCT)
    assert error_code(error) == "ValidationException"


async def test_licences_of_two_products_are_refused(start_sim: StartSim) -> None:
    """Licences of two different products in one call fail with InvalidLicenseException."""
    h = await start_sim(product_code=None, license_products={OTHER_LICENCE: "other-product"})
    error = await h.refused(
        licence_record(), licence_record(licence=OTHER_LICENCE), product_code=None
    )
    assert error_code(error) == "InvalidLicenseException"
    assert not h.sim.billed


@pytest.mark.parametrize(
    ("offset_s", "accepted"),
    [(0, True), (1, False), (-86399, True), (-86400, False), (-200000, False)],
    ids=["now", "future", "just-inside-24h", "24h-old", "days-old"],
)
async def test_timestamp_window(start_sim: StartSim, offset_s: float, accepted: bool) -> None:
    """Records from now back to (not including) 24 hours ago are accepted, others refused."""
    h = await start_sim()
    if accepted:
        assert (await h.meter(record(at=NOW + offset_s)))["Results"][0]["Status"] == "Success"
    else:
        error = await h.refused(record(at=NOW + offset_s))
        assert error_code(error) == "TimestampOutOfBoundsException"


async def test_one_record_out_of_window_fails_the_whole_call(start_sim: StartSim) -> None:
    """A single out-of-window record refuses the call and nothing in it is billed."""
    h = await start_sim()
    error = await h.refused(record("cust-a"), record("cust-b", at=NOW - 90000))
    assert error_code(error) == "TimestampOutOfBoundsException"
    assert not h.sim.billed
    assert h.sim.calls[-1].outcome == "TimestampOutOfBoundsException"


async def test_window_length_is_configurable(start_sim: StartSim) -> None:
    """With window_s of six hours a record six hours old is refused, one second younger accepted."""
    h = await start_sim(window_s=6 * 3600)
    error = await h.refused(record(at=NOW - 6 * 3600))
    assert error_code(error) == "TimestampOutOfBoundsException"
    assert (await h.meter(record(at=NOW - 6 * 3600 + 1)))["Results"][0]["Status"] == "Success"


@pytest.mark.parametrize(
    ("now", "at", "accepted"),
    [
        (utc(2026, 4, 1, 5, 59, 59), utc(2026, 3, 31, 23), True),
        (utc(2026, 4, 1, 6), utc(2026, 3, 31, 23), False),
        (utc(2026, 4, 1, 6), utc(2026, 4, 1, 0), True),
        (utc(2026, 1, 1, 5), utc(2025, 12, 31, 22), True),
        (utc(2026, 1, 1, 7), utc(2025, 12, 31, 22), False),
    ],
    ids=["before-cutoff", "at-cutoff", "same-month", "year-end-before", "year-end-after"],
)
async def test_previous_month_closes_at_six_utc_on_the_first(
    start_sim: StartSim, now: float, at: float, accepted: bool
) -> None:
    """Previous-month records are accepted until 06:00 UTC on the 1st, then refused."""
    h = await start_sim(now=now)
    if accepted:
        assert (await h.meter(record(at=at)))["Results"][0]["Status"] == "Success"
    else:
        error = await h.refused(record(at=at))
        assert error_code(error) == "TimestampOutOfBoundsException"


_SIX_TAGS = [{"Key": f"k{i}", "Value": "v"} for i in range(6)]
ERROR_CASES: list[tuple[str, int, dict[str, Any], list[dict[str, Any]], str | None]] = [
    ("ThrottlingException", 400, {"throttle_rate": 1.0}, [record()], PRODUCT),
    ("InternalServiceErrorException", 500, {"error_5xx_rate": 1.0}, [record()], PRODUCT),
    ("DisabledApiException", 400, {"api_disabled": True}, [record()], PRODUCT),
    ("TimestampOutOfBoundsException", 400, {}, [record(at=NOW + 60)], PRODUCT),
    ("InvalidUsageDimensionException", 400, {}, [record(dimension="gpu-minutes")], PRODUCT),
    ("InvalidProductCodeException", 400, {}, [record()], "someone-elses-product"),
    ("InvalidCustomerIdentifierException", 400, {}, [licence_record("1234")], None),
    ("InvalidLicenseException", 400, {}, [licence_record(licence="arn:nope")], None),
    (
        "InvalidTagException",
        400,
        {},
        [record(UsageAllocations=[{"AllocatedUsageQuantity": 10, "Tags": _SIX_TAGS}])],
        PRODUCT,
    ),
    (
        "InvalidUsageAllocationsException",
        400,
        {},
        [record(UsageAllocations=[{"AllocatedUsageQuantity": 9, "Tags": _SIX_TAGS[:1]}])],
        PRODUCT,
    ),
    ("ValidationException", 400, {}, [record(quantity=2_147_483_648)], PRODUCT),
]


@pytest.mark.parametrize(
    ("code", "status", "overrides", "records", "product_code"),
    ERROR_CASES,
    ids=[case[0] for case in ERROR_CASES],
)
async def test_error_codes_round_trip_through_botocore(
    start_sim: StartSim,
    code: str,
    status: int,
    overrides: dict[str, Any],
    records: list[dict[str, Any]],
    product_code: str | None,
) -> None:
    """Each whole-call error reaches botocore as a ClientError with its code and HTTP status."""
    h = await start_sim(**overrides)
    error = await h.refused(*records, product_code=product_code)
    assert (error_code(error), http_status(error)) == (code, status)
    assert error.response["Error"]["Message"]
    modeled = getattr(h.client.exceptions, code, None)
    assert modeled is None or isinstance(error, modeled)
    assert not h.sim.billed


async def test_unknown_operation_is_refused(start_sim: StartSim) -> None:
    """Another operation of the service is answered UnknownOperationException."""
    h = await start_sim()
    with pytest.raises(botocore.exceptions.ClientError) as info:
        await asyncio.to_thread(
            h.client.meter_usage,
            ProductCode=PRODUCT,
            Timestamp=datetime.fromtimestamp(HOUR_START, UTC),
            UsageDimension="tokens-processed",
        )
    assert (error_code(info.value), http_status(info.value)) == ("UnknownOperationException", 400)
    assert h.sim.counters.calls == 0


async def test_throttling_is_seeded_and_bills_nothing(start_sim: StartSim) -> None:
    """A seeded throttle rate throttles the same calls every run; throttled calls bill nothing."""
    h = await start_sim(throttle_rate=0.5, seed=7, subscribe_all=True)
    outcomes = []
    for i in range(10):
        try:
            await h.meter(record(f"c{i}"))
            outcomes.append("ok")
        except botocore.exceptions.ClientError as error:
            outcomes.append(error_code(error))
    replay = Simulator(
        SimulatorConfig(throttle_rate=0.5, seed=7, subscribe_all=True), clock=FakeClock(NOW)
    )
    body = json.dumps(
        {
            "UsageRecords": [
                {"Timestamp": HOUR_START, "CustomerIdentifier": "c", "Dimension": "gpu-hours"}
            ],
            "ProductCode": PRODUCT,
        }
    )
    replayed = [replay.handle(BATCH_METER_USAGE, body.encode()).status for _ in range(10)]
    assert outcomes == ["ok" if status == 200 else "ThrottlingException" for status in replayed]
    assert 0 < outcomes.count("ThrottlingException") < 10
    assert h.sim.counters.throttled == outcomes.count("ThrottlingException")
    assert h.sim.counters.calls == 10
    assert h.sim.counters.billed == outcomes.count("ok")
    assert [c.outcome for c in h.sim.calls].count("ThrottlingException") == h.sim.counters.throttled


async def test_unprocessed_records_are_returned_and_not_billed(start_sim: StartSim) -> None:
    """Unprocessed records come back unbilled in UnprocessedRecords and can be resent as parsed."""
    h = await start_sim(unprocessed_rate=1.0)
    response = await h.meter(record("cust-a"), record("cust-b"))
    assert response["Results"] == []
    unprocessed = response["UnprocessedRecords"]
    assert [r["CustomerIdentifier"] for r in unprocessed] == ["cust-a", "cust-b"]
    assert unprocessed[0]["Timestamp"] == datetime.fromtimestamp(HOUR_START, UTC)
    assert not h.sim.billed
    assert h.sim.counters.unprocessed == 2
    h.sim.configure(unprocessed_rate=0.0)
    resent = await h.meter(*unprocessed)
    assert [r["Status"] for r in resent["Results"]] == ["Success", "Success"]


async def test_lost_response_is_billed_but_raises_in_botocore(start_sim: StartSim) -> None:
    """A dropped response raises in botocore, yet the record is billed; a resend is a duplicate."""
    h = await start_sim(lose_response_rate=1.0)
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        await h.meter(record())
    [billed] = h.sim.billed.values()
    assert h.sim.counters.responses_lost == 1
    assert h.sim.calls[-1].outcome == "ResponseLost"
    h.sim.configure(lose_response_rate=0.0)
    again = (await h.meter(record()))["Results"][0]
    assert (again["Status"], again["MeteringRecordId"]) == (
        "DuplicateRecord",
        billed.metering_record_id,
    )
    assert h.sim.counters.billed == 1


async def test_latency_delays_the_answer(start_sim: StartSim) -> None:
    """latency_s delays each answer by at least that long."""
    h = await start_sim(latency_s=0.05)
    started = time.perf_counter()
    await h.meter(record())
    assert time.perf_counter() - started >= 0.05


async def test_client_timeout_during_latency_still_bills(start_sim: StartSim) -> None:
    """A call the client timed out on is still billed, like AWS, so its resend is a duplicate."""
    h = await start_sim(latency_s=0.2)
    impatient = make_client(h.url, read_timeout=0.05)
    h.extra_clients.append(impatient)
    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        await asyncio.to_thread(
            impatient.batch_meter_usage, UsageRecords=[record()], ProductCode=PRODUCT
        )
    # The resend waits out the same latency, started later, so the first call is applied first.
    resent = (await h.meter(record()))["Results"][0]
    assert resent["Status"] == "DuplicateRecord"
    assert h.sim.counters.billed == 1
    assert [call.outcome for call in h.sim.calls] == ["Success", "Success"]


@pytest.mark.parametrize("mode", ["503", "close"])
async def test_outage_fails_every_call(start_sim: StartSim, mode: str) -> None:
    """During an outage every call fails (503 or a closed connection) and nothing is billed."""
    h = await start_sim(outage=True, outage_mode=mode)
    if mode == "503":
        error = await h.refused(record())
        assert (error_code(error), http_status(error)) == ("503", 503)
    else:
        with pytest.raises(botocore.exceptions.ConnectionClosedError):
            await h.meter(record())
    assert not h.sim.billed
    assert h.sim.counters.outages == 1
    h.sim.configure(outage=False)
    assert (await h.meter(record()))["Results"][0]["Status"] == "Success"


async def test_admin_state_config_and_reset(start_sim: StartSim) -> None:
    """The admin endpoints expose state, change settings at runtime and reset everything."""
    h = await start_sim()
    await h.meter(record(quantity=7))
    async with aiohttp.ClientSession(h.url) as http:
        async with http.get("/_sim/state") as reply:
            state = await reply.json()
        assert state["now"] == NOW
        assert state["counters"]["billed"] == 1
        assert state["config"]["product_code"] == PRODUCT
        [billed] = state["billed"]
        assert billed["customer"] == "cust-a"
        assert billed["hour_start"] == HOUR_START
        assert billed["quantity"] == 7
        assert billed["usage_record"]["Timestamp"] == HOUR_START
        assert state["calls"] == [
            {
                "n": 1,
                "at": NOW,
                "records": 1,
                "outcome": "Success",
                "statuses": ["Success"],
                "message": "",
            }
        ]

        changes = {"throttle_rate": 1.0, "subscribed": ["cust-q"], "clock_offset_s": -3600}
        async with http.post("/_sim/config", json=changes) as reply:
            assert reply.status == 200
            config = (await reply.json())["config"]
        assert (config["throttle_rate"], config["subscribed"]) == (1.0, ["cust-q"])
        assert h.sim.now() == NOW - 3600
        assert error_code(await h.refused(record())) == "ThrottlingException"

        for bad in ({"throttle_rate": 2}, {"no_such_setting": 1}, {"outage": "yes"}):
            async with http.post("/_sim/config", json=bad) as reply:
                assert reply.status == 400
                assert (await reply.json())["error"]
        assert h.sim.config.throttle_rate == 1.0

        async with http.post("/_sim/reset") as reply:
            assert reply.status == 200
        async with http.get("/_sim/state") as reply:
            state = await reply.json()
    assert state["billed"] == [] and state["calls"] == []
    assert set(state["counters"].values()) == {0}
    assert state["config"]["throttle_rate"] == 0.0
    assert state["config"]["subscribed"] == sorted({"cust-a", "cust-b", ACCOUNT})


async def test_endpoint_environment_variable_reaches_the_simulator(
    start_sim: StartSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The AWS_ENDPOINT_URL_MARKETPLACE_METERING variable points botocore at the simulator."""
    h = await start_sim()
    monkeypatch.setenv("AWS_ENDPOINT_URL_MARKETPLACE_METERING", h.url)
    client = make_client(None, session=botocore.session.get_session())
    h.extra_clients.append(client)
    response = await asyncio.to_thread(
        client.batch_meter_usage, UsageRecords=[record()], ProductCode=PRODUCT
    )
    assert response["Results"][0]["Status"] == "Success"


def test_decimal_quantity_equal_by_value_is_not_a_conflict() -> None:
    """QuantityAsDecimal 17.00 after Quantity 17 is the same quantity, as AWS compares by value."""
    sim = Simulator(SimulatorConfig(subscribe_all=True), clock=FakeClock(NOW))
    base = {"Timestamp": HOUR_START, "CustomerIdentifier": "c", "Dimension": "gpu-hours"}
    assert (
        sim.batch_meter_usage({"UsageRecords": [{**base, "Quantity": 17}], "ProductCode": "p"})[0]
        == 200
    )
    status, answer = sim.batch_meter_usage(
        {"UsageRecords": [{**base, "QuantityAsDecimal": "17.00"}], "ProductCode": "p"}
    )
    assert (status, answer["Results"][0]["Status"]) == (200, "DuplicateRecord")
    assert (sim.counters.duplicates_same_quantity, sim.counters.conflicts) == (1, 0)
    both = {**base, "Quantity": 1, "QuantityAsDecimal": "1"}
    assert sim.batch_meter_usage({"UsageRecords": [both], "ProductCode": "p"})[0] == 400


@settings(max_examples=60, derandomize=True, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from("ab"), st.integers(0, 2), st.integers(0, 3599), st.integers(0, 3)
        ),
        min_size=1,
        max_size=30,
    )
)
def test_first_write_wins_for_any_send_sequence(sends: list[tuple[str, int, int, int]]) -> None:
    """For any sequence of sends, each key bills its first quantity and later ones are counted."""
    sim = Simulator(SimulatorConfig(subscribe_all=True), clock=FakeClock(NOW))
    first: dict[tuple[str, int], int] = {}
    same = different = 0
    for customer, hours_back, second, quantity in sends:
        hour = int(HOUR_START) - 3600 * hours_back
        body = {
            "ProductCode": "p",
            "UsageRecords": [
                {
                    "Timestamp": hour + min(second, 1800),
                    "CustomerIdentifier": customer,
                    "Dimension": "gpu-hours",
                    "Quantity": quantity,
                }
            ],
        }
        assert sim.batch_meter_usage(body)[0] == 200
        if (customer, hour) not in first:
            first[(customer, hour)] = quantity
        elif first[(customer, hour)] == quantity:
            same += 1
        else:
            different += 1
    assert {(k.customer, k.hour_start): int(b.quantity) for k, b in sim.billed.items()} == first
    assert (sim.counters.duplicates_same_quantity, sim.counters.conflicts) == (same, different)


def test_cli_options_build_the_config() -> None:
    """The CLI options map onto SimulatorConfig, with the documented defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = parser.parse_args([])
    assert defaults.listen == ("127.0.0.1", 9700)
    assert config_from_args(defaults) == SimulatorConfig()
    args = parser.parse_args(
        [
            "--listen",
            "[::1]:9800",
            "--subscribe",
            "a",
            "--subscribe",
            "b",
            "--product-code",
            "p",
            "--throttle-rate",
            "0.25",
            "--error-rate",
            "0.1",
            "--unprocessed-rate",
            "0.2",
            "--latency-s",
            "0.5",
            "--lose-response-rate",
            "0.05",
            "--seed",
            "3",
        ]
    )
    assert args.listen == ("::1", 9800)
    assert config_from_args(args) == SimulatorConfig(
        subscribed=frozenset({"a", "b"}),
        product_code="p",
        throttle_rate=0.25,
        error_5xx_rate=0.1,
        unprocessed_rate=0.2,
        latency_s=0.5,
        lose_response_rate=0.05,
        seed=3,
        allowed_dimensions=DEFAULT_DIMENSIONS,
    )
    for bad in (["--listen", "nope"], ["--throttle-rate", "1.5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


@pytest.mark.slow
def test_cli_run_serves_until_sigterm() -> None:
    """``run`` logs its URL, serves botocore, and exits 0 on SIGTERM."""
    script = (
        "import argparse, sys\n"
        "from sidecar import simulator\n"
        "parser = argparse.ArgumentParser()\n"
        "simulator.add_arguments(parser)\n"
        "sys.exit(simulator.run(parser.parse_args(sys.argv[1:])))\n"
    )
    python_path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": python_path, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", script, "--listen", "127.0.0.1:0", "--subscribe-all"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        url = _read_url(process, timeout_s=15)
        client = make_client(url)
        try:
            response = client.batch_meter_usage(
                UsageRecords=[record(at=time.time() - 60)], ProductCode=PRODUCT
            )
        finally:
            client.close()
        assert response["Results"][0]["Status"] == "Success"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        assert process.stdout is not None
        process.stdout.close()


def _read_url(process: subprocess.Popen[str], timeout_s: float) -> str:
    """Read the subprocess's output until the start-up line names its URL."""
    assert process.stdout is not None
    seen = []
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            line = process.stdout.readline()
            if not line:
                break
            seen.append(line)
            found = re.search(r"http://127\.0\.0\.1:\d+", line)
            if "listening" in line and found:
                return found.group(0)
    raise AssertionError(f"simulator printed no URL: {''.join(seen)!r}")
