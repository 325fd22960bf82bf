"""AWS Marketplace's subscription notifications on a real SQS queue (moto's server) reach the real app:
each message is applied once and deleted after its commit, bad ones stay for the dead-letter queue, and
an ending agreement's final usage reaches the simulator at once."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from helpers import T0, event
from lifecycle_messages import eventbridge_event, license_arn_of, sns_message

from sidecar.app import CONSUMER, FLUSHER, STORE, create_app
from sidecar.clock import HOUR_S, ManualClock, hour_start
from sidecar.config import Settings
from sidecar.flush import Flusher
from sidecar.marketplace import MeteringClient, SubscriptionQueue
from sidecar.notifications import NotificationConsumer
from sidecar.simulator import Simulator, SimulatorConfig, start
from sidecar.store import MeteringStore
from sidecar.subscriptions import parse_message

PRODUCT = "prod-sub-1"
REGION = "us-east-1"
ACCOUNT_ID = "123456789012"
H10 = hour_start(T0)  # T0 is 10:02 UTC
H09, H11 = H10 - HOUR_S, H10 + HOUR_S
REDELIVERY_DEADLINE_S = 15.0  # the queue's visibility timeout is 1 s; moto's server needs real time

Client = TestClient[Any, Any]


@dataclass
class Rig:
    """The real app on its own queue and database file, the simulator publishing to that queue, one clock."""

    app: web.Application
    client: Client
    sqs: Any
    queue_url: str
    sim: Simulator
    admin: aiohttp.ClientSession
    clock: ManualClock

    @property
    def consumer(self) -> NotificationConsumer:
        """The app's queue consumer (the test drives it: no background loops)."""
        return self.app[CONSUMER]

    @property
    def flusher(self) -> Flusher:
        """The app's flusher."""
        return self.app[FLUSHER]

    @property
    def store(self) -> MeteringStore:
        """The app's store."""
        return self.app[STORE]

    async def send(self, body: str) -> None:
        """Put one message body on the queue."""
        await asyncio.to_thread(self.sqs.send_message, QueueUrl=self.queue_url, MessageBody=body)

    def queued(self, url: str | None = None) -> int:
        """Messages on a queue (this one by default), visible or in flight."""
        attrs = self.sqs.get_queue_attributes(
            QueueUrl=url or self.queue_url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(attrs["ApproximateNumberOfMessages"]) + int(attrs["ApproximateNumberOfMessagesNotVisible"])

    async def poll_until(self, done: Callable[[], bool]) -> None:
        """Poll the queue until `done()`; moto redelivers on real time, so this is bounded, not a sleep."""
        deadline = time.monotonic() + REDELIVERY_DEADLINE_S
        while not done():
            assert time.monotonic() < deadline, f"not done after {REDELIVERY_DEADLINE_S} s: {self.consumer.health()}"
            await self.consumer.poll_once()

    async def simulate(self, customer: str, action: str) -> None:
        """Apply a subscription action in the simulator, which publishes AWS's SNS envelope to the queue."""
        async with self.admin.post("/_sim/subscriptions", json={"customer": customer, "action": action}) as r:
            assert r.status == 200, await r.text()

    async def configure(self, **changes: Any) -> None:
        """Change the simulator's settings or faults."""
        async with self.admin.post("/_sim/config", json=changes) as r:
            assert r.status == 200, await r.text()

    async def billed(self) -> dict[tuple[str, str, int], int]:
        """What the simulator billed: (customer, dimension, hour) -> quantity."""
        async with self.admin.get("/_sim/state") as r:
            state = await r.json()
        return {(b["customer"], b["dimension"], b["hour_start"]): b["quantity"] for b in state["billed"]}

    async def post(self, *events: dict[str, Any]) -> None:
        """Post events that must all be stored (2xx)."""
        reply = await self.client.post("/v1/events", json=list(events))
        assert reply.status == 200, await reply.text()
        assert (await reply.json())["accepted"] == len(events)

    async def usage(self) -> dict[str, Any]:
        """GET /usage as JSON."""
        reply = await self.client.get("/usage")
        assert reply.status == 200
        return dict(await reply.json())

    async def subscription(self, subscriber: str) -> dict[str, Any]:
        """The subscriber's row in /usage `subscriptions`."""
        rows = {r["subscriber"]: r for r in (await self.usage())["subscriptions"]}
        return dict(rows[subscriber])

    async def buckets(self, customer: str) -> dict[tuple[str, int], dict[str, Any]]:
        """The customer's /usage bucket rows by (dimension, hour epoch)."""
        rows = (await self.usage())["rows"]
        return {(r["dimension"], _epoch(r["hour"])): r for r in rows if r["customer"] == customer}

    async def metric(self, name: str) -> float:
        """One sample's value from /metrics (`name` with its labels, as the text format writes it)."""
        text = await (await self.client.get("/metrics")).text()
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert found is not None, f"{name} not in /metrics"
        return float(found.group(1))


def _epoch(rfc3339: str) -> int:
    return int(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp())


def _at(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat().replace("+00:00", "Z")


@pytest.fixture
async def rig(tmp_path: Path, clock: ManualClock, moto_url: str, sqs: Any) -> AsyncIterator[Rig]:
    """A fresh queue (1 s visibility), the simulator on the test's clock publishing to it, and the real
    app (no background loops) with a real SubscriptionQueue and MeteringClient built from an env mapping."""
    queue_url = sqs.create_queue(QueueName=f"mp-{uuid.uuid4().hex}", Attributes={"VisibilityTimeout": "1"})["QueueUrl"]
    sim = Simulator(SimulatorConfig(product_code=PRODUCT, subscribe_all=True, subscription_queue_url=queue_url,
                                    sqs_endpoint_url=moto_url, sqs_region=REGION), clock=clock.now)
    runner, sim_url = await start(sim)
    settings = Settings(db_path=tmp_path / "sidecar.db", region=REGION, product_code=PRODUCT, birth_hour="report",
                        read_timeout_s=2.0, connect_timeout_s=2.0, subscription_queue_url=queue_url,
                        subscription_wait_s=1)
    env = {"AWS_ENDPOINT_URL_SQS": moto_url, "AWS_ENDPOINT_URL_MARKETPLACE_METERING": sim_url,
           "AWS_REGION": REGION, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    metering = MeteringClient(settings, env=env)
    app = create_app(settings, clock=clock, api=metering, background=False,
                     queue=SubscriptionQueue(settings, env=env), registrar=metering)
    async with aiohttp.ClientSession(sim_url) as admin, TestClient(TestServer(app)) as client:
        yield Rig(app, client, sqs, queue_url, sim, admin, clock)
    await runner.cleanup()


@pytest.mark.parametrize(
    ("body", "subscriber", "state"),
    [
        (sns_message("unsubscribe-pending", customer_identifier="cust-a", product_code=PRODUCT),
         "identifier:cust-a", "pending_end"),
        (sns_message("unsubscribe-success", customer_identifier="cust-a", product_code=PRODUCT, raw=True),
         "identifier:cust-a", "ended"),
        (eventbridge_event("Purchase Agreement Ended - Manufacturer", aws_account_id=ACCOUNT_ID),
         f"account:{ACCOUNT_ID}", "pending_end"),
        # A licence's end applies to that licence (its customer's key), not to the account's other licences.
        (eventbridge_event("License Deprovisioned - Manufacturer", aws_account_id=ACCOUNT_ID, product_code=PRODUCT),
         f"account:{ACCOUNT_ID}/{license_arn_of(ACCOUNT_ID)}", "ended"),
    ],
    ids=["sns-envelope", "raw-sns", "purchase-agreement-ended", "license-deprovisioned"],
)
async def test_each_message_shape_changes_the_state_and_is_deleted(
    rig: Rig, body: str, subscriber: str, state: str
) -> None:
    """SNS (enveloped or raw) and EventBridge messages set the state /usage shows, then leave the queue."""
    await rig.send(body)
    assert await rig.consumer.poll_once() == 1
    assert rig.consumer.messages == Counter(applied=1)
    assert (await rig.subscription(subscriber))["state"] == state
    assert rig.queued() == 0


async def test_the_same_message_three_times_is_applied_once(rig: Rig) -> None:
    """SQS's at-least-once delivery: the second and third copies are duplicates that change nothing."""
    body = sns_message("unsubscribe-pending", customer_identifier="cust-a", product_code=PRODUCT)
    await rig.send(body)
    await rig.consumer.poll_once()
    before = await rig.subscription("identifier:cust-a")
    rig.clock.advance(60)  # a write now would show in updated_at
    await rig.send(body)
    await rig.send(body)
    await rig.poll_until(lambda: rig.consumer.messages["duplicate"] == 2)
    assert rig.consumer.messages == Counter(applied=1, duplicate=2)
    assert await rig.subscription("identifier:cust-a") == before
    assert rig.queued() == 0


async def test_an_older_end_began_after_the_end_keeps_ended_and_records_its_time(rig: Rig) -> None:
    """unsubscribe-success consumed before an older unsubscribe-pending: the state stays ended, the start is kept."""
    sub = "identifier:cust-a"
    await rig.send(sns_message("unsubscribe-success", customer_identifier="cust-a", product_code=PRODUCT, at=int(T0)))
    await rig.consumer.poll_once()
    await rig.send(sns_message("unsubscribe-pending", customer_identifier="cust-a", product_code=PRODUCT,
                               at=int(T0) - 600))
    await rig.consumer.poll_once()
    row = await rig.subscription(sub)
    assert (row["state"], row["ended_at"], row["end_began_at"]) == ("ended", _at(T0), _at(T0 - 600))
    assert rig.consumer.messages == Counter(applied=2)
    assert rig.queued() == 0


async def test_poison_and_other_product_messages_stay_while_the_valid_one_is_applied(rig: Rig) -> None:
    """A body that is not JSON and one for another product stay on the queue, counted; the batch goes on."""
    await rig.send("this is not JSON {")
    await rig.send(sns_message("unsubscribe-success", customer_identifier="cust-x", product_code="prod-other"))
    await rig.send(sns_message("unsubscribe-pending", customer_identifier="cust-a", product_code=PRODUCT))
    assert await rig.consumer.poll_once() == 3
    assert rig.consumer.messages == Counter(applied=1, unparseable=1, other_product=1)
    assert (await rig.subscription("identifier:cust-a"))["state"] == "pending_end"
    assert [r["subscriber"] for r in (await rig.usage())["subscriptions"]] == ["identifier:cust-a"]
    assert rig.queued() == 2
    assert await rig.metric('sidecar_subscription_messages_total{result="unparseable"}') == 1


async def test_a_poison_message_moves_to_the_dead_letter_queue_when_received_again(rig: Rig) -> None:
    """With a redrive policy (maxReceiveCount 1), the poison message left on the queue ends in the DLQ."""
    dlq_url = rig.sqs.create_queue(QueueName=f"mp-dlq-{uuid.uuid4().hex}")["QueueUrl"]
    dlq_arn = rig.sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rig.sqs.set_queue_attributes(QueueUrl=rig.queue_url, Attributes={
        "RedrivePolicy": json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "1"})})
    await rig.send("this is not JSON {")
    await rig.consumer.poll_once()
    assert rig.queued() == 1
    await rig.poll_until(lambda: rig.queued(dlq_url) == 1)
    assert rig.queued() == 0
    assert rig.consumer.messages == Counter(unparseable=1)  # SQS moved it; the consumer never saw it again
    [moved] = rig.sqs.receive_message(QueueUrl=dlq_url)["Messages"]
    assert moved["Body"] == "this is not JSON {"


async def test_a_message_applied_but_not_deleted_is_a_duplicate_when_it_comes_back(rig: Rig) -> None:
    """Killed between commit and delete: the redelivered message is counted duplicate, deleted, and changes nothing."""
    await rig.send(sns_message("unsubscribe-pending", customer_identifier="cust-a", product_code=PRODUCT))
    [received] = await asyncio.to_thread(rig.consumer.queue.receive)
    result = await rig.store.apply_notice(parse_message(received.body, sent_at=received.sent_at), now=rig.clock.now())
    assert (result.changed, result.state) == (True, "pending_end")
    before = await rig.subscription("identifier:cust-a")
    rig.clock.advance(60)
    await rig.poll_until(lambda: rig.consumer.messages["duplicate"] == 1)
    assert rig.consumer.messages == Counter(duplicate=1)
    assert await rig.subscription("identifier:cust-a") == before
    assert rig.queued() == 0


def usage_event(n: str, customer: str, when: float) -> dict[str, Any]:
    """One request of an identifier customer: 1 inference request and 2,000 tokens (2 units)."""
    return event(n, when=when, customer={"customer_identifier": customer}, prompt=1500, completion=500)


async def test_an_ending_agreement_sends_its_final_usage_at_once_and_parks_usage_after_the_end(rig: Rig) -> None:
    """The final-usage race: the ending customer's usage, current hour included, is billed when poll_once
    returns while others' stays open; later usage goes to the next hour, is parked after the end, and is
    metered again after a new subscription."""
    a, b = "identifier:cust-a", "identifier:cust-b"
    await rig.post(usage_event("a-09", "cust-a", H09 + 1800))
    rig.clock.set(H10 + 360)  # 10:06, past 09:00's grace
    assert await rig.store.seal_due() == 2  # sealed, not yet frozen nor sent
    await rig.post(usage_event("a-10", "cust-a", H10 + 300), usage_event("b-10", "cust-b", H10 + 300))
    assert {k: r["state"] for k, r in (await rig.buckets(a)).items()} == {
        ("inference-requests", H09): "sealed", ("tokens-processed", H09): "sealed",
        ("inference-requests", H10): "open", ("tokens-processed", H10): "open"}

    await rig.simulate("cust-a", "unsubscribe-pending")
    assert await rig.consumer.poll_once() == 1
    assert await rig.billed() == {("cust-a", dim, hour): qty for hour in (H09, H10)
                                  for dim, qty in (("inference-requests", 1), ("tokens-processed", 2))}
    final_usage_s = rig.consumer.final_usage_s
    assert final_usage_s is not None and 0 < final_usage_s < 60
    assert {r["state"] for r in (await rig.buckets(a)).values()} == {"sent"}
    assert {k: r["state"] for k, r in (await rig.buckets(b)).items()} == {
        ("inference-requests", H10): "open", ("tokens-processed", H10): "open"}
    assert await rig.metric("sidecar_lifecycle_final_usage_seconds") == pytest.approx(final_usage_s)

    # Usage after the end began: the next hour's bucket, sealed and sent once that hour has begun.
    await rig.post(usage_event("a-10b", "cust-a", rig.clock.now()))
    later = (await rig.buckets(a))[("inference-requests", H11)]
    assert (later["state"], later["events"], later["carried_in"]) == ("open", 1, 1)
    rig.clock.set(H11 + 30)
    await rig.flusher.flush_once()
    assert (await rig.billed())[("cust-a", "inference-requests", H11)] == 1
    assert (await rig.buckets(b))[("inference-requests", H10)]["state"] == "open"  # 10:00 is still in its grace

    # After the end: stored (2xx), parked `ended`, never sent.
    await rig.simulate("cust-a", "unsubscribe-success")
    await rig.consumer.poll_once()
    assert (await rig.subscription(a))["state"] == "ended"
    billed, calls = await rig.billed(), len(rig.sim.calls)
    rig.clock.advance(60)
    await rig.post(usage_event("a-11", "cust-a", rig.clock.now()))
    await rig.flusher.flush_once()
    parked = [p for p in (await rig.usage())["parked"] if p["customer"] == a]
    assert [(p["state"], p["events"]) for p in parked] == [("ended", 1), ("ended", 1)]  # both dimensions
    assert await rig.metric("sidecar_lifecycle_parked_after_end_events") == 1  # one request, in two dimensions
    assert (await rig.subscription(a))["parked_events"] == 1
    page = await (await rig.client.get("/usage", headers={"Accept": "text/html"})).text()
    assert 'id="subscriptions"' in page and 'id="ended"' in page  # the operator page shows both
    assert await rig.billed() == billed
    assert len(rig.sim.calls) == calls and rig.sim.counters.refused_ended == 0

    # A new subscription: metered again.
    rig.clock.advance(60)
    await rig.simulate("cust-a", "subscribe-success")
    await rig.consumer.poll_once()
    assert (await rig.subscription(a))["state"] == "subscribed"
    await rig.post(usage_event("a-11b", "cust-a", rig.clock.now()))
    open_rows = [r for r in (await rig.buckets(a)).values() if r["state"] == "open"]
    assert sorted((r["dimension"], r["events"]) for r in open_rows) == [("inference-requests", 1),
                                                                          ("tokens-processed", 1)]


async def test_final_usage_still_unaccepted_30_minutes_after_the_end_began_is_an_alarm(rig: Rig) -> None:
    """An end that began 31 minutes ago with records the simulator keeps refusing: /healthz is degraded and
    names the subscriber, and the overdue metric is 1."""
    await rig.post(usage_event("a-10", "cust-a", T0 - 60))
    await rig.configure(outage=True)
    await rig.simulate("cust-a", "unsubscribe-pending")
    await rig.consumer.poll_once()
    assert (await rig.subscription("identifier:cust-a"))["unaccepted_records"] == 2
    assert (await (await rig.client.get("/healthz")).json())["lifecycle"]["final_usage_overdue"] == []

    rig.clock.advance(31 * 60)
    health = await (await rig.client.get("/healthz")).json()
    assert health["status"] == "degraded"
    assert health["lifecycle"]["final_usage_overdue"] == ["identifier:cust-a"]
    assert (await rig.subscription("identifier:cust-a"))["final_usage_overdue"] is True
    assert await rig.metric("sidecar_lifecycle_final_usage_overdue_customers") == 1
    assert await rig.billed() == {}


class FlakyQueue:
    """A queue that cannot be reached for its first `failures` polls, then is empty (a hand-written fake)."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.polls = 0

    def receive(self, *, max_messages: int = 10) -> list[Any]:
        self.polls += 1
        if self.polls <= self.failures:
            raise ConnectionError("sqs unreachable")
        return []

    def delete(self, receipt_handle: str) -> None:
        raise AssertionError("nothing to delete")


async def test_the_consumer_reports_a_failing_queue_and_resumes(tmp_path: Path) -> None:
    """The queue unreachable: the loop keeps trying with a backoff, reports the error (healthz,
    metrics), and clears it once a poll works again; it never crashes."""
    settings = Settings(db_path=tmp_path / "q.db", subscription_queue_url="https://sqs.example/1/q")
    clock = ManualClock(T0)
    queue = FlakyQueue(failures=1)
    app = create_app(settings, clock=clock, background=False, queue=queue)
    async with TestClient(TestServer(app)) as c:
        consumer: NotificationConsumer = c.app[CONSUMER]
        stop = asyncio.Event()
        loop = asyncio.create_task(consumer.run(stop))
        deadline = time.monotonic() + 10
        while consumer.error is None:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        health = await (await c.get("/healthz")).json()
        assert health["status"] == "degraded" and "sqs unreachable" in health["lifecycle"]["queue"]["error"]
        assert "sidecar_subscription_queue_failing 1.0" in await (await c.get("/metrics")).text()
        while queue.polls < 2 or consumer.error is not None:  # the backoff (1 s) passes, a poll works
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        stop.set()
        await loop
        assert (await (await c.get("/healthz")).json())["status"] == "ok"
