"""The simulator's customer lifecycle: tokens, ResolveCustomer, subscription actions and their notifications."""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import botocore.config
import botocore.exceptions
import botocore.session
import pytest
from test_simulator import FakeClock, error_code, http_status, make_client

from sidecar.simulator import Simulator, SimulatorConfig, add_arguments, config_from_args, start

NOW = datetime(2026, 3, 15, 12, 30, tzinfo=UTC).timestamp()
PRODUCT = "prod-1234abcd"
ACCOUNT = "111122223333"
LICENCE = "arn:aws:license-manager::111122223333:license:l-0123456789abcdef0123456789abcdef"
REGION = "us-east-1"

@dataclass
class Harness:
    """A running simulator, its clock, a botocore Metering client and an admin HTTP session."""

    sim: Simulator
    clock: FakeClock
    url: str
    metering: Any
    admin: aiohttp.ClientSession

    async def post(self, route: str, body: Any) -> tuple[int, Any]:
        """POST ``body`` as JSON to an admin route; return the status and the JSON answer."""
        async with self.admin.post(route, json=body) as reply:
            return reply.status, await reply.json()

    async def token(self, **body: Any) -> str:
        """Issue a registration token for ``body`` and return it."""
        status, answer = await self.post("/_sim/tokens", body)
        assert status == 200, answer
        return str(answer["registration_token"])

    async def subscription(self, customer: str, action: str, **extra: Any) -> dict[str, Any]:
        """Apply one subscription action that must succeed; return the answer."""
        status, answer = await self.post("/_sim/subscriptions", {"customer": customer, "action": action, **extra})
        assert status == 200, answer
        return dict(answer)

    async def resolve(self, token: str) -> Any:
        """Call ResolveCustomer through botocore."""
        return await asyncio.to_thread(self.metering.resolve_customer, RegistrationToken=token)

    async def resolve_error(self, token: str) -> botocore.exceptions.ClientError:
        """Call ResolveCustomer, which must fail with a ClientError; return the error."""
        with pytest.raises(botocore.exceptions.ClientError) as info:
            await self.resolve(token)
        return info.value

    async def status_of(self, customer: str) -> str:
        """Send one record for ``customer`` from a minute ago through botocore; return its per-record status."""
        response = await asyncio.to_thread(
            self.metering.batch_meter_usage,
            ProductCode=PRODUCT,
            UsageRecords=[
                {
                    "Timestamp": datetime.fromtimestamp(self.clock.now - 60, UTC),
                    "CustomerIdentifier": customer,
                    "Dimension": "tokens-processed",
                    "Quantity": 1,
                }
            ],
        )
        return str(response["Results"][0]["Status"])


StartSim = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def start_sim() -> AsyncIterator[StartSim]:
    """Start simulators on free ports (settings as keywords; no customer subscribed unless given)."""
    started: list[tuple[Any, Harness]] = []

    async def _start(**overrides: Any) -> Harness:
        overrides.setdefault("product_code", PRODUCT)
        clock = FakeClock(NOW)
        sim = Simulator(SimulatorConfig(**overrides), clock=clock)
        runner, url = await start(sim)
        harness = Harness(sim, clock, url, make_client(url), aiohttp.ClientSession(url))
        started.append((runner, harness))
        return harness

    yield _start
    for runner, harness in started:
        harness.metering.close()
        await harness.admin.close()
        await runner.cleanup()


async def test_identifier_token_resolves_to_its_customer(start_sim: StartSim) -> None:
    """A token issued for an identifier customer resolves to CustomerIdentifier, account and ProductCode."""
    h = await start_sim()
    token = await h.token(customer_identifier="cust-a", aws_account_id=ACCOUNT)
    answer = await h.resolve(token)
    answer.pop("ResponseMetadata")
    assert answer == {"CustomerIdentifier": "cust-a", "CustomerAWSAccountId": ACCOUNT, "ProductCode": PRODUCT}
    assert h.sim.counters.tokens_resolved == 1
    assert h.sim.calls[-1].to_json()["operation"] == "ResolveCustomer"


async def test_licence_token_resolves_without_a_customer_identifier(start_sim: StartSim) -> None:
    """A token issued for an account and licence resolves to them and the ProductCode, with no CustomerIdentifier."""
    h = await start_sim()
    token = await h.token(aws_account_id=ACCOUNT, license_arn=LICENCE, product_code="prod-other")
    answer = await h.resolve(token)
    answer.pop("ResponseMetadata")
    assert answer == {"CustomerAWSAccountId": ACCOUNT, "LicenseArn": LICENCE, "ProductCode": "prod-other"}


async def test_issuing_a_token_answers_its_expiry_and_subscribes_the_customer(start_sim: StartSim) -> None:
    """The token's expiry is RFC 3339 on the simulator's clock, and its customer's usage is now billed."""
    h = await start_sim()
    assert await h.status_of("cust-new") == "CustomerNotSubscribed"
    status, answer = await h.post("/_sim/tokens", {"customer_identifier": "cust-new", "expires_in_s": 90})
    assert status == 200
    assert answer["expires_at"] == "2026-03-15T12:31:30.000Z"
    assert len(answer["registration_token"]) >= 32
    assert await h.status_of("cust-new") == "Success"
    assert h.sim.subscription_states() == {"cust-new": "subscribed"}


async def test_unknown_token_is_invalid(start_sim: StartSim) -> None:
    """A token the simulator never issued is refused with InvalidTokenException (HTTP 400)."""
    h = await start_sim()
    await h.token(customer_identifier="cust-a")
    error = await h.resolve_error("not-a-token")
    assert (error_code(error), http_status(error)) == ("InvalidTokenException", 400)


async def test_expired_token_is_refused(start_sim: StartSim) -> None:
    """Once the simulated clock reaches the token's expiry, ResolveCustomer answers ExpiredTokenException."""
    h = await start_sim()
    token = await h.token(customer_identifier="cust-a", expires_in_s=60)
    h.clock.now += 59
    assert (await h.resolve(token))["CustomerIdentifier"] == "cust-a"
    h.clock.now += 1
    error = await h.resolve_error(token)
    assert (error_code(error), http_status(error)) == ("ExpiredTokenException", 400)


@pytest.mark.parametrize(
    ("fault", "code", "status"),
    [
        ({"throttle_rate": 1.0}, "ThrottlingException", 400),
        ({"error_5xx_rate": 1.0}, "InternalServiceErrorException", 500),
        ({"api_disabled": True}, "DisabledApiException", 400),
    ],
)
async def test_faults_apply_to_resolve_customer(
    start_sim: StartSim, fault: dict[str, Any], code: str, status: int
) -> None:
    """The injected faults answer ResolveCustomer as they answer BatchMeterUsage."""
    h = await start_sim(**fault)
    token = await h.token(customer_identifier="cust-a")
    error = await h.resolve_error(token)
    assert (error_code(error), http_status(error)) == (code, status)
    [call] = h.sim.calls
    assert (call.operation, call.outcome, call.records) == ("ResolveCustomer", code, 0)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "customer_identifier"),
        ({"customer_identifier": ""}, "customer_identifier"),
        ({"customer_identifier": "c", "expires_in_s": 0}, "expires_in_s"),
        ({"customer_identifier": "c", "expires_in_s": "soon"}, "expires_in_s"),
        ({"customer_identifier": "c", "product_code": 7}, "product_code"),
        ({"license_arn": LICENCE}, "aws_account_id"),
        ({"aws_account_id": "12345", "license_arn": LICENCE}, "aws_account_id"),
        ({"aws_account_id": ACCOUNT, "license_arn": "arn:nope"}, "license_arn"),
        ({"customer_identifier": "c", "aws_account_id": ACCOUNT, "license_arn": LICENCE}, "license_arn"),
        ({"customer_identifier": "c", "colour": "red"}, "colour"),
        (["customer_identifier"], "JSON object"),
    ],
)
async def test_bad_token_requests_name_the_field(start_sim: StartSim, body: Any, field: str) -> None:
    """A bad POST /_sim/tokens body answers 400 with an error naming the field, and subscribes nobody."""
    h = await start_sim()
    status, answer = await h.post("/_sim/tokens", body)
    assert status == 400
    assert field in answer["error"]
    assert h.sim.tokens == {} and h.sim.subscription_states() == {}


async def test_ended_subscription_refuses_usage_until_resubscribed(start_sim: StartSim) -> None:
    """After unsubscribe-success records are CustomerNotSubscribed and counted; subscribe-success resumes billing."""
    h = await start_sim(subscribed=frozenset({"cust-a"}))
    assert await h.status_of("cust-a") == "Success"
    pending = await h.subscription("cust-a", "unsubscribe-pending")
    assert (pending["subscription"], pending["accepts_usage"]) == ("unsubscribe-pending", True)
    h.clock.now += 3600
    assert await h.status_of("cust-a") == "Success"
    ended = await h.subscription("cust-a", "unsubscribe-success")
    assert (ended["subscription"], ended["accepts_usage"]) == ("ended", False)
    h.clock.now += 3600
    assert await h.status_of("cust-a") == "CustomerNotSubscribed"
    async with h.admin.get("/_sim/state") as reply:
        state = await reply.json()
    assert state["subscriptions"] == {"cust-a": "ended"}
    assert state["counters"]["refused_ended"] == 1
    await h.subscription("cust-a", "subscribe-success")
    h.clock.now += 3600
    assert await h.status_of("cust-a") == "Success"
    assert h.sim.counters.billed == 3


async def test_ended_subscription_overrides_subscribe_all(start_sim: StartSim) -> None:
    """With subscribe_all on, an ended customer is still refused while every other customer is billed."""
    h = await start_sim(subscribe_all=True)
    await h.subscription("cust-gone", "unsubscribe-success")
    assert await h.status_of("cust-gone") == "CustomerNotSubscribed"
    assert await h.status_of("cust-other") == "Success"
    assert h.sim.counters.refused_ended == 1


async def test_failed_subscription_is_not_subscribed(start_sim: StartSim) -> None:
    """subscribe-fail leaves the customer unsubscribed, even one listed in the subscribed setting."""
    h = await start_sim(subscribed=frozenset({"cust-a"}))
    answer = await h.subscription("cust-a", "subscribe-fail")
    assert (answer["subscription"], answer["accepts_usage"]) == ("failed", False)
    assert await h.status_of("cust-a") == "CustomerNotSubscribed"
    assert h.sim.counters.refused_ended == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"action": "subscribe-success"}, "customer"),
        ({"customer": "cust-a"}, "action"),
        ({"customer": "cust-a", "action": "subscribe"}, "action"),
        ({"customer": "cust-a", "action": "subscribe-success", "offer_identifier": ""}, "offer_identifier"),
        ({"customer": "cust-a", "action": "subscribe-success", "extra": 1}, "extra"),
    ],
)
async def test_bad_subscription_requests_name_the_field(start_sim: StartSim, body: Any, field: str) -> None:
    """A bad POST /_sim/subscriptions body answers 400 with an error naming the field."""
    h = await start_sim()
    status, answer = await h.post("/_sim/subscriptions", body)
    assert status == 400
    assert field in answer["error"]
    assert h.sim.subscription_states() == {}


async def test_reset_forgets_tokens_and_subscriptions(start_sim: StartSim) -> None:
    """POST /_sim/reset drops issued tokens and subscription states."""
    h = await start_sim()
    token = await h.token(customer_identifier="cust-a")
    await h.subscription("cust-b", "unsubscribe-success")
    async with h.admin.post("/_sim/reset") as reply:
        assert reply.status == 200
    assert h.sim.subscription_states() == {}
    assert error_code(await h.resolve_error(token)) == "InvalidTokenException"


def receive_one(sqs: Any, queue_url: str) -> dict[str, Any]:
    """Receive exactly one message from the queue and return its body as JSON."""
    messages = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    assert len(messages) == 1
    return dict(json.loads(messages[0]["Body"]))


@pytest.mark.parametrize(
    ("customer", "customer_field"),
    [("cust-a", "customer-identifier"), (ACCOUNT, "customer-aws-account-id")],
)
async def test_subscription_action_is_published_as_sns_delivers_it(
    start_sim: StartSim, moto_url: str, sqs: Any, customer: str, customer_field: str
) -> None:
    """With a subscription queue, each action is sent as AWS's SNS envelope around the subscription message."""
    queue_url = sqs.create_queue(QueueName=f"mp-{uuid.uuid4().hex}")["QueueUrl"]
    h = await start_sim(subscription_queue_url=queue_url, sqs_endpoint_url=moto_url, sqs_region=REGION)
    answer = await h.subscription(customer, "unsubscribe-pending", offer_identifier="offer-abc")
    envelope = await asyncio.to_thread(receive_one, sqs, queue_url)
    assert envelope == answer["notification"]
    message = json.loads(envelope.pop("Message"))
    uuid.UUID(envelope.pop("MessageId"))
    assert envelope == {
        "Type": "Notification",
        "TopicArn": f"arn:aws:sns:us-east-1:287250355862:aws-mp-subscription-notification-{PRODUCT}",
        "Subject": None,
        "Timestamp": "2026-03-15T12:30:00.000Z",
        "SignatureVersion": "1",
        "Signature": "sim",
        "SigningCertURL": "",
        "UnsubscribeURL": "",
    }
    assert message == {
        "action": "unsubscribe-pending",
        customer_field: customer,
        "product-code": PRODUCT,
        "offer-identifier": "offer-abc",
        "isFreeTrialTermPresent": "false",
    }


async def test_queue_set_at_runtime_receives_the_default_offer(
    start_sim: StartSim, moto_url: str, sqs: Any
) -> None:
    """A queue configured through POST /_sim/config receives the action, with the default offer identifier."""
    queue_url = sqs.create_queue(QueueName=f"mp-{uuid.uuid4().hex}")["QueueUrl"]
    h = await start_sim(sqs_region=REGION)
    status, _ = await h.post("/_sim/config", {"subscription_queue_url": queue_url, "sqs_endpoint_url": moto_url})
    assert status == 200
    await h.subscription("cust-a", "subscribe-success")
    message = json.loads((await asyncio.to_thread(receive_one, sqs, queue_url))["Message"])
    assert (message["action"], message["offer-identifier"]) == ("subscribe-success", "offer-sim")


async def test_failed_publish_answers_502_and_changes_nothing(start_sim: StartSim, moto_url: str) -> None:
    """When the notification cannot be sent, the action answers 502 with the error and the state stays as it was."""
    missing_queue = f"{moto_url}/123456789012/no-such-queue"
    h = await start_sim(
        subscribe_all=True, subscription_queue_url=missing_queue, sqs_endpoint_url=moto_url, sqs_region=REGION
    )
    status, answer = await h.post("/_sim/subscriptions", {"customer": "cust-a", "action": "unsubscribe-success"})
    assert status == 502
    assert "no-such-queue" in answer["error"]
    assert h.sim.subscription_states() == {}
    assert await h.status_of("cust-a") == "Success"


def test_cli_takes_the_subscription_queue() -> None:
    """--subscription-queue-url reaches the simulator's settings."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    url = "http://127.0.0.1:4566/000000000000/mp-notifications"
    config = config_from_args(parser.parse_args(["--subscription-queue-url", url]))
    assert config.subscription_queue_url == url
    assert config_from_args(parser.parse_args([])).subscription_queue_url is None
