"""The customer lifecycle in fleet mode: one customer's traffic on two members, the subscription
queue consumed by the lease holder only, the final usage of both members sent as one record at once,
usage after the end parked fleet-wide. Real apps, a real PostgreSQL, moto's SQS server, the simulator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer
from flushkit import PRODUCT
from helpers import event
from lifecycle_messages import sns_message
from test_task_replacement import H10, post, simulator

from sidecar.app import CONSUMER, MEMBER, create_app
from sidecar.clock import HOUR_S, ManualClock
from sidecar.config import Settings
from sidecar.fleet import Member
from sidecar.marketplace import MeteringClient, SubscriptionQueue
from sidecar.simulator import Simulator

A = {"customer_identifier": "cust-a"}
B = {"customer_identifier": "cust-b"}


@asynccontextmanager
async def member(db: Path, pg_url: str, name: str, clock: ManualClock, sim_url: str, moto_url: str,
                 queue_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    """One member in fleet mode with the subscription queue; the test drives its loops."""
    settings = Settings(db_path=db, region="us-east-1", product_code=PRODUCT, fleet_url=pg_url, member_id=name,
                        birth_hour="report", subscription_queue_url=queue_url, subscription_wait_s=0)
    env = {"AWS_ENDPOINT_URL_MARKETPLACE_METERING": sim_url, "AWS_ENDPOINT_URL_SQS": moto_url,
           "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    api = MeteringClient(settings, env=env)
    app = create_app(settings, clock=clock, api=api, background=False, queue=SubscriptionQueue(settings, env=env),
                     registrar=api)
    async with TestClient(TestServer(app)) as c:
        await c.app[MEMBER].fleet.ready()
        yield c


def m(c: TestClient[Any, Any]) -> Member:
    return c.app[MEMBER]


def billed(sim: Simulator, customer: str) -> dict[int, int]:
    """Requests the simulator billed per hour for one customer."""
    return {k.hour_start: int(v.quantity) for k, v in sim.billed.items()
            if k.customer == customer and k.dimension == "inference-requests"}


async def test_final_usage_of_two_members_goes_out_at_once_and_after_the_end_is_parked(
        pg_url: str, tmp_path: Path, moto_url: str, sqs: Any) -> None:
    """cust-a is served by both members in 10:00; unsubscribe-pending, consumed by the leader, sends one
    10:00 record with both members' usage at once while cust-b's hour stays open; cust-a's later usage
    goes into 11:00; after unsubscribe-success it is parked fleet-wide, never sent. No conflict."""
    queue_url = sqs.create_queue(QueueName=f"mp-fleet-{tmp_path.name}")["QueueUrl"]
    async with simulator() as (sim, url, clock), \
            member(tmp_path / "a.db", pg_url, "task-a", clock, url, moto_url, queue_url) as a, \
            member(tmp_path / "b.db", pg_url, "task-b", clock, url, moto_url, queue_url) as b:
        assert await m(a).fleet.acquire_lease() is not None  # task-a leads; task-b must not consume
        for i in range(4):
            clock.set(H10 + 6 * 60 + 60 * i)
            await post(a, [event(f"a-{i}", when=clock.now(), customer=A)])
            await post(b, [event(f"b-{i}", when=clock.now(), customer=A),
                           event(f"b-other-{i}", when=clock.now(), customer=B)])
        await m(a).ship_once()
        await m(b).ship_once()
        clock.set(H10 + 50 * 60)
        sqs.send_message(QueueUrl=queue_url, MessageBody=sns_message(
            "unsubscribe-pending", customer_identifier="cust-a", product_code=PRODUCT, at=int(clock.now())))
        assert await a.app[CONSUMER].poll_once() == 1
        assert billed(sim, "cust-a") == {H10: 8}  # both members' usage, sent before the hour ended
        assert billed(sim, "cust-b") == {}
        assert a.app[CONSUMER].final_usage_s is not None and a.app[CONSUMER].final_usage_s < 60

        await post(b, [event("b-late", when=clock.now(), customer=A)])  # after the final seal
        await m(b).ship_once()
        clock.set(H10 + HOUR_S + 6 * 60)  # 11:06: cust-b's 10:00 is past its grace
        await m(a).flusher.flush_once()
        assert billed(sim, "cust-b") == {H10: 4}
        assert billed(sim, "cust-a") == {H10: 8}  # 11:00 waits for SIDECAR_FINAL_SEAL_S (the end + 50 min)
        clock.set(H10 + 50 * 60 + 3000 + 1)  # 11:40:01
        await m(a).flusher.flush_once()
        assert billed(sim, "cust-a") == {H10: 8, H10 + HOUR_S: 1}

        sqs.send_message(QueueUrl=queue_url, MessageBody=sns_message(
            "unsubscribe-success", customer_identifier="cust-a", product_code=PRODUCT, at=int(clock.now())))
        assert await a.app[CONSUMER].poll_once() == 1
        await post(b, [event("b-after", when=clock.now(), customer=A)])
        await m(b).ship_once()
        clock.set(H10 + 2 * HOUR_S + 5 * 60 + 1)
        await m(a).flusher.flush_once()
        assert billed(sim, "cust-a") == {H10: 8, H10 + HOUR_S: 1}  # the event after the end: never sent
        assert billed(sim, "cust-b") == {H10: 4}
        usage = (await (await b.get("/usage")).json())
        assert [(p["customer"], p["state"]) for p in usage["parked"] if p["dimension"] == "inference-requests"] == \
            [("identifier:cust-a", "ended")]
        subs = {s["subscriber"]: s["state"] for s in usage["subscriptions"]}
        assert subs == {"identifier:cust-a": "ended"}
        assert sim.counters.conflicts == 0


async def test_only_the_lease_holder_consumes_the_queue(pg_url: str, tmp_path: Path, moto_url: str,
                                                        sqs: Any) -> None:
    """A member without the lease leaves the queue alone; the leader applies the message."""
    queue_url = sqs.create_queue(QueueName=f"mp-fleet-{tmp_path.name}")["QueueUrl"]
    async with simulator() as (_, url, clock), \
            member(tmp_path / "a.db", pg_url, "task-a", clock, url, moto_url, queue_url) as a, \
            member(tmp_path / "b.db", pg_url, "task-b", clock, url, moto_url, queue_url) as b:
        assert await m(a).fleet.acquire_lease() is not None
        sqs.send_message(QueueUrl=queue_url, MessageBody=sns_message(
            "subscribe-success", customer_identifier="cust-a", product_code=PRODUCT, at=int(clock.now())))
        stop = asyncio.Event()
        follower = asyncio.create_task(b.app[CONSUMER].run(stop, active=lambda: m(b).leading))
        await a.app[CONSUMER].poll_once()
        stop.set()
        await follower
        assert dict(a.app[CONSUMER].messages) == {"applied": 1}
        assert dict(b.app[CONSUMER].messages) == {}
        attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["ApproximateNumberOfMessages"])
        assert attrs["Attributes"]["ApproximateNumberOfMessages"] == "0"
