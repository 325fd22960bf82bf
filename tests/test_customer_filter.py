"""Customer filters (`/usage?customer=`, `sidecar usage --customer`, `UsageFilter`) match one customer exactly."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from helpers import ACCOUNT, event

from sidecar.cli import main
from sidecar.config import CustomerRef
from sidecar.events import validate_event
from sidecar.store import Store, UsageFilter, reader, usage_rows, usage_totals
from sidecar.store.queries import customer_clause

SECOND_LICENCE = ACCOUNT | {"license_arn": "arn:aws:license-manager::123456789012:license:l-" + "f" * 32}
OTHER_ACCOUNT = {"aws_account_id": "210987654321",
                 "license_arn": "arn:aws:license-manager::210987654321:license:l-" + "a" * 32}
ACCOUNT_KEY = CustomerRef(**ACCOUNT).key
SECOND_KEY = CustomerRef(**SECOND_LICENCE).key
OTHER_KEY = CustomerRef(**OTHER_ACCOUNT).key

# Stored key -> the event's customer object. Names with `_` and `%` would be wildcards to LIKE;
# a tenant named like an identifier must not match that identifier.
CUSTOMERS: dict[str, dict[str, str]] = {
    "identifier:cust-1": {"customer_identifier": "cust-1"},
    "identifier:cust-10": {"customer_identifier": "cust-10"},
    "identifier:cust_1": {"customer_identifier": "cust_1"},
    "identifier:cust%1": {"customer_identifier": "cust%1"},
    "identifier:123456789012": {"customer_identifier": "123456789012"},
    ACCOUNT_KEY: ACCOUNT,
    SECOND_KEY: SECOND_LICENCE,
    OTHER_KEY: OTHER_ACCOUNT,
    "tenant:cust-1": {"tenant": "cust-1"},
}

# (filter text, the stored keys it must select, nothing more)
CASES: list[tuple[str, set[str]]] = [
    ("cust-1", {"identifier:cust-1"}),
    ("cust-10", {"identifier:cust-10"}),
    ("cust_1", {"identifier:cust_1"}),
    ("cust%1", {"identifier:cust%1"}),
    ("identifier:cust-1", {"identifier:cust-1"}),
    ("identifier:cust_1", {"identifier:cust_1"}),
    ("identifier:cust%1", {"identifier:cust%1"}),
    ("tenant:cust-1", {"tenant:cust-1"}),
    ("123456789012", {ACCOUNT_KEY, SECOND_KEY, "identifier:123456789012"}),
    ("210987654321", {OTHER_KEY}),
    (ACCOUNT_KEY, {ACCOUNT_KEY}),
    (SECOND_KEY, {SECOND_KEY}),
    ("cust", set()),
    ("cust-", set()),
    ("cust_", set()),
    ("cust%", set()),
    ("%", set()),
    ("_", set()),
    ("identifier:cust", set()),
    ("identifier:", set()),
    ("tenant:cust", set()),
    ("account:123456789012", set()),
    ("12345678901", set()),
    ("1234567890123", set()),
    ("000000000000", set()),
]
IDS = [text for text, _ in CASES]


@pytest.fixture
async def loaded(client: TestClient[Any, Any]) -> AsyncIterator[TestClient[Any, Any]]:
    """The real app with one event for each customer in CUSTOMERS, stored through POST /v1/events."""
    events = [event(f"f{i}", customer=who) for i, who in enumerate(CUSTOMERS.values())]
    resp = await client.post("/v1/events", json=events)
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["accepted"] == len(CUSTOMERS)
    yield client


def db_of(client: TestClient[Any, Any]) -> Path:
    """The database file of the app behind `client`."""
    from sidecar.app import STORE

    return client.app[STORE].path


def customers_in(report: dict[str, Any]) -> set[str]:
    """The customers of a /usage-shaped report; rows and totals must name the same ones."""
    rows = {r["customer"] for r in report["rows"]}
    assert rows == {t["customer"] for t in report["totals"]}
    return rows


async def test_every_customer_is_stored(loaded: TestClient[Any, Any]) -> None:
    """Without a filter, /usage shows every customer, so the empty results below mean something."""
    report = await (await loaded.get("/usage")).json()
    assert customers_in(report) == set(CUSTOMERS)


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
async def test_usage_endpoint_filter(loaded: TestClient[Any, Any], text: str, expected: set[str]) -> None:
    """GET /usage?customer= returns exactly the rows of the customers the filter names."""
    resp = await loaded.get("/usage", params={"customer": text})
    assert resp.status == 200
    assert customers_in(await resp.json()) == expected


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
async def test_cli_usage_filter(loaded: TestClient[Any, Any], text: str, expected: set[str],
                                capsys: pytest.CaptureFixture[str]) -> None:
    """`sidecar usage --customer ... --json` returns exactly the rows of the customers the filter names."""
    assert main(["usage", "--customer", text, "--json"], env={"SIDECAR_DB": str(db_of(loaded))}) == 0
    assert customers_in(json.loads(capsys.readouterr().out)) == expected


@pytest.mark.parametrize(("text", "expected"), CASES, ids=IDS)
def test_usage_rows_filter(store: Store, text: str, expected: set[str]) -> None:
    """queries.usage_rows and usage_totals with UsageFilter(customer=...) select exactly the named customers."""
    now = store.clock.now()
    events = [validate_event(event(f"q{i}", customer=who), now=now, max_age_s=86400, max_future_s=300)
              for i, who in enumerate(CUSTOMERS.values())]
    store.ingest_future(events).result()
    with reader(store.path) as conn:
        rows = usage_rows(conn, UsageFilter(customer=text))
        totals = usage_totals(conn, UsageFilter(customer=text))
        everything = usage_rows(conn, UsageFilter())
    assert {r["customer"] for r in rows} == expected
    assert {t["customer"] for t in totals} == expected
    assert rows == [r for r in everything if r["customer"] in expected]


@pytest.mark.parametrize("text", ["cust-1", "cust%1", "identifier:cust_1", "123456789012", ACCOUNT_KEY])
def test_clause_binds_values_and_never_uses_like(text: str) -> None:
    """The SQL fragment has no LIKE and no interpolated value: the text travels only as a bound argument."""
    sql, args = customer_clause(text, "b.customer")
    assert "LIKE" not in sql.upper()
    assert text not in sql
    assert sql.count("?") == len(args)
    assert text in args or f"identifier:{text}" in args


@pytest.mark.parametrize("text", ["", " ", "\t"])
def test_empty_filter_is_refused(text: str) -> None:
    """An empty customer filter is an error naming the option, not "every customer"."""
    with pytest.raises(ValueError, match=r"^customer: must not be empty"):
        customer_clause(text, "customer")
    with pytest.raises(ValueError, match=r"^customer: must not be empty"):
        UsageFilter(customer=text)


@pytest.mark.parametrize("text", ["", " "])
async def test_usage_endpoint_refuses_empty_filter(loaded: TestClient[Any, Any], text: str) -> None:
    """GET /usage?customer= with nothing in it is a JSON 400 naming `customer`."""
    resp = await loaded.get("/usage", params={"customer": text})
    assert resp.status == 400
    body = await resp.json()
    assert body["error"].startswith("customer: must not be empty")
