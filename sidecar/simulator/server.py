"""The simulator on AWS's wire: AWS JSON 1.1 ``POST /`` plus admin routes under ``/_sim/``.

An unmodified botocore ``meteringmarketplace`` client pointed at this server (``endpoint_url=`` or
``AWS_ENDPOINT_URL_MARKETPLACE_METERING``) gets AWS's answers to BatchMeterUsage and ResolveCustomer.
SigV4 signatures are accepted without verification. Admin routes:

- ``GET /_sim/state`` shows what was billed and logged, and each customer's subscription state;
- ``POST /_sim/config`` changes settings and faults at runtime; ``POST /_sim/reset`` forgets everything;
- ``POST /_sim/tokens`` issues a registration token for ResolveCustomer and subscribes its customer;
- ``POST /_sim/subscriptions`` applies a subscription action (``subscribe-success``, ``subscribe-fail``,
  ``unsubscribe-pending``, ``unsubscribe-success``) and, when ``subscription_queue_url`` is set, first
  sends AWS's SNS notification of it to that SQS queue (a failed send answers 502 and changes nothing).

botocore's ``sqs`` client loads only when a notification is sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import uuid
from typing import Any

import structlog
from aiohttp import web

from sidecar.simulator.service import Simulator, SimulatorConfig

log = structlog.get_logger(__name__)

CONTENT_TYPE = "application/x-amz-json-1.1"

SIMULATOR_KEY = web.AppKey("simulator", Simulator)


class PublishFailed(Exception):
    """Raised when a subscription notification could not be sent to the subscription queue."""


def publish_notification(config: SimulatorConfig, notification: dict[str, Any]) -> None:
    """Send one SNS envelope to ``config.subscription_queue_url`` (blocking), or raise PublishFailed.

    Credentials come from botocore's usual chain; without any, "sim"/"sim" (enough for a local queue).
    """
    import botocore.config
    import botocore.exceptions
    import botocore.session

    session = botocore.session.get_session()
    dummy = None if session.get_credentials() is not None else "sim"
    region = config.sqs_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    try:
        client = session.create_client(
            "sqs",
            region_name=region or "us-east-1",
            endpoint_url=config.sqs_endpoint_url,  # None: AWS_ENDPOINT_URL_SQS, else AWS's
            aws_access_key_id=dummy,
            aws_secret_access_key=dummy,
            config=botocore.config.Config(retries={"total_max_attempts": 1}, connect_timeout=5, read_timeout=10),
        )
        try:
            client.send_message(QueueUrl=config.subscription_queue_url, MessageBody=json.dumps(notification))
        finally:
            client.close()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, ValueError) as exc:
        raise PublishFailed(f"sending to {config.subscription_queue_url} failed: {exc}") from exc


async def _handle_api(request: web.Request) -> web.StreamResponse:
    sim = request.app[SIMULATOR_KEY]
    raw_body = await request.read()
    if sim.config.latency_s > 0:
        await asyncio.sleep(sim.config.latency_s)
    reply = sim.handle(request.headers.get("X-Amz-Target", ""), raw_body)
    if reply.drop_connection:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never reaches the client
    headers = {"x-amzn-RequestId": str(uuid.uuid4())}
    if isinstance(reply.body, str):
        return web.Response(status=reply.status, text=reply.body, headers=headers)
    return web.Response(
        status=reply.status,
        body=json.dumps(reply.body).encode(),
        content_type=CONTENT_TYPE,
        headers=headers,
    )


async def _handle_state(request: web.Request) -> web.Response:
    return web.json_response(request.app[SIMULATOR_KEY].state())


async def _handle_config(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("body must be a JSON object of settings")
        new_config = sim.config.with_json(changes)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return web.json_response({"error": str(exc)}, status=400)
    sim.configure(**{name: getattr(new_config, name) for name in changes})
    return web.json_response({"config": sim.config.to_json()})


async def _handle_tokens(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    try:
        answer = sim.issue_token(await request.json())
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(answer)


async def _handle_subscriptions(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    try:
        change = sim.subscription_change(await request.json())
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        return web.json_response({"error": str(exc)}, status=400)
    if sim.config.subscription_queue_url is not None:
        try:
            await asyncio.to_thread(publish_notification, sim.config, change.notification)
        except PublishFailed as exc:
            log.warning("simulator notification not sent", error=str(exc))
            return web.json_response({"error": str(exc)}, status=502)
    return web.json_response(sim.apply_subscription(change))


async def _handle_reset(request: web.Request) -> web.Response:
    sim = request.app[SIMULATOR_KEY]
    sim.reset()
    return web.json_response({"config": sim.config.to_json()})


def create_app(sim: Simulator) -> web.Application:
    """Build the aiohttp app: the Metering API at ``POST /`` and admin routes under ``/_sim/``."""
    app = web.Application()
    app[SIMULATOR_KEY] = sim
    app.router.add_post("/", _handle_api)
    app.router.add_get("/_sim/state", _handle_state)
    app.router.add_post("/_sim/config", _handle_config)
    app.router.add_post("/_sim/reset", _handle_reset)
    app.router.add_post("/_sim/tokens", _handle_tokens)
    app.router.add_post("/_sim/subscriptions", _handle_subscriptions)
    return app


async def start(
    sim: Simulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve ``sim`` on host:port (0 picks a free port); return the runner and the base URL."""
    runner = web.AppRunner(create_app(sim), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{url_host}:{bound_port}"


async def serve_until_signalled(sim: Simulator, host: str, port: int) -> None:
    """Serve ``sim`` on host:port until SIGINT or SIGTERM, logging its URL once it listens."""
    runner, url = await start(sim, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    log.info("marketplace simulator listening", url=url, **sim.config.to_json())
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        log.info("marketplace simulator stopped", url=url)
