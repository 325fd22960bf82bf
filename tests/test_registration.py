"""POST /v1/registrations: a buyer's token, resolved with ResolveCustomer on the local simulator through
botocore, maps a tenant to its AWS customer; every refusal leaves the tenant unmapped."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from helpers import ACCOUNT, event

from sidecar.app import create_app
from sidecar.clock import ManualClock
from sidecar.config import Settings
from sidecar.marketplace import MeteringClient
from sidecar.simulator import Simulator, SimulatorConfig, start

PRODUCT = "prod-reg-1"
REGION = "us-east-1"
BEARER = "bearer-token-for-tests-0123456789"
TENANT = "acme"

Client = TestClient[Any, Any]
OpenSidecar = Callable[..., AbstractAsyncContextManager[Client]]


@dataclass
class Marketplace:
    """The simulator on a loopback port, and an HTTP session on its admin routes."""

    sim: Simulator
    url: str
    admin: aiohttp.ClientSession

    async def token(self, **body: Any) -> str:
        """Issue a registration token through POST /_sim/tokens."""
        async with self.admin.post("/_sim/tokens", json=body) as reply:
            assert reply.status == 200, await reply.text()
            return str((await reply.json())["registration_token"])

    async def configure(self, **changes: Any) -> None:
        """Change the simulator's settings and faults through POST /_sim/config."""
        async with self.admin.post("/_sim/config", json=changes) as reply:
            assert reply.status == 200, await reply.text()


@pytest.fixture
async def marketplace(clock: ManualClock) -> AsyncIterator[Marketplace]:
    """The Marketplace simulator for PRODUCT, on the test's manual clock."""
    sim = Simulator(SimulatorConfig(product_code=PRODUCT), clock=clock.now)
    runner, url = await start(sim)
    async with aiohttp.ClientSession(url) as admin:
        yield Marketplace(sim, url, admin)
    await runner.cleanup()


@pytest.fixture
def open_sidecar(tmp_path: Path, clock: ManualClock, marketplace: Marketplace) -> OpenSidecar:
    """Open the real app (no background loops) with a real MeteringClient on the simulator;
    `dry_run=True` gives it no registrar, other keywords change its settings."""

    @contextlib.asynccontextmanager
    async def _open(*, dry_run: bool = False, **changes: Any) -> AsyncIterator[Client]:
        settings = replace(Settings(db_path=tmp_path / "sidecar.db", region=REGION, product_code=PRODUCT,
                                    birth_hour="report", read_timeout_s=2.0, connect_timeout_s=2.0), **changes)
        env = {"AWS_ENDPOINT_URL_MARKETPLACE_METERING": marketplace.url, "AWS_REGION": REGION,
               "AWS_ACCESS_KEY_ID": "AKIDTEST", "AWS_SECRET_ACCESS_KEY": "secret"}
        metering = None if dry_run else MeteringClient(settings, env=env)
        app = create_app(settings, clock=clock, api=metering, background=False, registrar=metering)
        async with TestClient(TestServer(app)) as client:
            yield client

    return _open


@pytest.fixture
async def sidecar(open_sidecar: OpenSidecar) -> AsyncIterator[Client]:
    """The app with default settings: it registers through the simulator."""
    async with open_sidecar() as client:
        yield client


async def register(client: Client, body: Any, **headers: str) -> tuple[int, dict[str, Any], Any]:
    """POST a registration body; return the status, the JSON answer and the headers."""
    async with client.post("/v1/registrations", json=body, headers=headers) as reply:
        return reply.status, await reply.json(), reply.headers


async def post_tenant_event(client: Client, n: int, tenant: str = TENANT) -> None:
    """Post one usage event of `tenant`, which must be stored."""
    reply = await client.post("/v1/events", json=event(n, customer={"tenant": tenant}))
    assert reply.status == 200, await reply.text()
    assert (await reply.json())["accepted"] == 1


async def buckets(client: Client) -> dict[tuple[str, str], tuple[str, int]]:
    """/usage bucket rows as (customer, dimension) -> (state, events)."""
    reply = await client.get("/usage")
    assert reply.status == 200
    return {(r["customer"], r["dimension"]): (r["state"], r["events"]) for r in (await reply.json())["rows"]}


async def assert_still_unmapped(client: Client) -> None:
    """Nothing was stored: the tenant's usage, old and new, waits unmapped."""
    await post_tenant_event(client, 99)
    rows = await buckets(client)
    assert rows, "the tenant's usage should be stored"
    assert {customer for customer, _ in rows} == {f"tenant:{TENANT}"}
    assert {state for state, _ in rows.values()} == {"unmapped"}


@pytest.mark.parametrize(
    ("token_body", "customer", "account"),
    [
        ({"customer_identifier": "cust-a", "aws_account_id": "123456789012"}, "identifier:cust-a", "123456789012"),
        (dict(ACCOUNT), f"account:{ACCOUNT['aws_account_id']}/{ACCOUNT['license_arn']}", ACCOUNT["aws_account_id"]),
    ],
    ids=["identifier", "account+licence"],
)
async def test_a_token_maps_the_tenant_and_its_earlier_and_later_usage_follows(
    sidecar: Client, marketplace: Marketplace, token_body: dict[str, str], customer: str, account: str
) -> None:
    """A resolved token maps the tenant: its usage posted before moves to the customer, and later usage lands there."""
    await post_tenant_event(sidecar, 1)
    assert {c for c, _ in await buckets(sidecar)} == {f"tenant:{TENANT}"}
    token = await marketplace.token(**token_body)
    status, answer, _ = await register(sidecar, {"registration_token": token, "tenant": TENANT})
    assert status == 200, answer
    assert answer == {"tenant": TENANT, "customer": customer, "product_code": PRODUCT, "aws_account_id": account,
                      "buckets_moved": 2}
    await post_tenant_event(sidecar, 2)
    assert await buckets(sidecar) == {(customer, "inference-requests"): ("open", 2),
                                      (customer, "tokens-processed"): ("open", 2)}
    assert marketplace.sim.counters.tokens_resolved == 1


async def test_an_unknown_token_is_400_and_stores_nothing(sidecar: Client, marketplace: Marketplace) -> None:
    """A token AWS never issued answers 400 InvalidTokenException, and the tenant stays unmapped."""
    await post_tenant_event(sidecar, 1)
    status, answer, _ = await register(sidecar, {"registration_token": "not-a-token", "tenant": TENANT})
    assert (status, answer["code"]) == (400, "InvalidTokenException")
    await assert_still_unmapped(sidecar)


async def test_an_expired_token_is_400_and_stores_nothing(
    sidecar: Client, marketplace: Marketplace, clock: ManualClock
) -> None:
    """Once the simulator's clock reaches the token's expiry, the answer is 400 ExpiredTokenException."""
    token = await marketplace.token(customer_identifier="cust-a", expires_in_s=60)
    clock.advance(60)
    status, answer, _ = await register(sidecar, {"registration_token": token, "tenant": TENANT})
    assert (status, answer["code"]) == (400, "ExpiredTokenException")
    await assert_still_unmapped(sidecar)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"throttle_rate": 1.0}, 503, "ThrottlingException"),
        ({"error_5xx_rate": 1.0}, 503, "InternalServiceErrorException"),
        ({"outage": True, "outage_mode": "close"}, 503, None),
        ({"api_disabled": True}, 502, "DisabledApiException"),
    ],
    ids=["throttled", "aws-5xx", "connection-dropped", "other-error"],
)
async def test_aws_trouble_is_503_with_retry_after_or_502_and_stores_nothing(
    sidecar: Client, marketplace: Marketplace, fault: dict[str, Any], status: int, code: str | None
) -> None:
    """Throttling, AWS's 5xx and the network answer 503 with Retry-After; other AWS errors 502; nothing is stored."""
    token = await marketplace.token(customer_identifier="cust-a")
    await marketplace.configure(**fault)
    got, answer, headers = await register(sidecar, {"registration_token": token, "tenant": TENANT})
    assert got == status, answer
    if code is not None:
        assert answer["code"] == code
    assert ("Retry-After" in headers) == (status == 503)
    await marketplace.configure(throttle_rate=0.0, error_5xx_rate=0.0, outage=False, api_disabled=False)
    await assert_still_unmapped(sidecar)


async def test_a_token_for_another_product_is_409_and_stores_nothing(
    sidecar: Client, marketplace: Marketplace
) -> None:
    """A token AWS resolves to another product than SIDECAR_PRODUCT_CODE answers 409 naming both products."""
    token = await marketplace.token(customer_identifier="cust-a", product_code="prod-other")
    status, answer, _ = await register(sidecar, {"registration_token": token, "tenant": TENANT})
    assert (status, answer["code"]) == (409, "OtherProduct")
    assert "prod-other" in answer["error"] and PRODUCT in answer["error"]
    await assert_still_unmapped(sidecar)


async def test_a_dry_run_refuses_registrations_with_503(open_sidecar: OpenSidecar, marketplace: Marketplace) -> None:
    """Without a registrar (dry run) a registration answers 503 and ResolveCustomer is never called."""
    token = await marketplace.token(customer_identifier="cust-a")
    async with open_sidecar(dry_run=True) as client:
        status, answer, _ = await register(client, {"registration_token": token, "tenant": TENANT})
        assert status == 503
        assert "dry run" in answer["error"]
        await assert_still_unmapped(client)
    assert marketplace.sim.calls == []


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"tenant": TENANT}, "registration_token"),
        ({"registration_token": "", "tenant": TENANT}, "registration_token"),
        ({"registration_token": 7, "tenant": TENANT}, "registration_token"),
        ({"registration_token": "t" * 4097, "tenant": TENANT}, "registration_token"),
        ({"registration_token": "tok"}, "tenant"),
        ({"registration_token": "tok", "tenant": ""}, "tenant"),
        ({"registration_token": "tok", "tenant": "a\nb"}, "tenant"),
        ({"registration_token": "tok", "tenant": ["acme"]}, "tenant"),
        ([{"registration_token": "tok", "tenant": TENANT}], "body"),
    ],
)
async def test_a_bad_field_is_422_naming_it(sidecar: Client, marketplace: Marketplace, body: Any, field: str) -> None:
    """A missing or malformed field answers 422 with an error that starts with its name; AWS is not called."""
    status, answer, _ = await register(sidecar, body)
    assert status == 422
    assert answer["error"].startswith(f"{field}:"), answer
    assert marketplace.sim.calls == []


async def test_a_body_that_is_not_json_is_refused(sidecar: Client, marketplace: Marketplace) -> None:
    """Another content type answers 415, and a JSON body that does not parse 400; AWS is not called."""
    reply = await sidecar.post("/v1/registrations", data="registration_token=tok",
                               headers={"Content-Type": "text/plain"})
    assert reply.status == 415
    reply = await sidecar.post("/v1/registrations", data=b'{"registration_token": ',
                               headers={"Content-Type": "application/json"})
    assert reply.status == 400
    assert "error" in await reply.json()
    assert marketplace.sim.calls == []


async def test_with_a_bearer_token_set_a_registration_without_it_is_401(
    open_sidecar: OpenSidecar, marketplace: Marketplace
) -> None:
    """With SIDECAR_TOKEN set a registration without the bearer is 401 and not resolved; with it, it maps the tenant."""
    token = await marketplace.token(customer_identifier="cust-a")
    body = {"registration_token": token, "tenant": TENANT}
    async with open_sidecar(token=BEARER) as client:
        status, _, _ = await register(client, body)
        assert status == 401
        status, _, _ = await register(client, body, Authorization="Bearer wrong-token-0123456789")
        assert status == 401
        assert marketplace.sim.counters.tokens_resolved == 0
        status, answer, _ = await register(client, body, Authorization=f"Bearer {BEARER}")
        assert (status, answer["customer"]) == (200, "identifier:cust-a")
