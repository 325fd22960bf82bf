"""The customer lifecycle's latency: from AWS publishing `unsubscribe-pending` to AWS billing that
customer's final usage (the current hour included), through a real SQS-protocol server (moto's),
`sidecar serve` consuming the queue, and the simulator playing both AWS Marketplace and its SNS topic.

    python -m bench.lifecycle [--customers N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.procs import free_port, sidecar_env, start, stop, wait_http

PRODUCT = "bench-lifecycle"


def _post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


@contextlib.contextmanager
def _sqs_queue() -> Iterator[tuple[str, str]]:
    """moto's server on a free port with one queue; yields (endpoint, queue URL)."""
    import botocore.session
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        sqs = botocore.session.get_session().create_client(
            "sqs", region_name="us-east-1", endpoint_url=endpoint, aws_access_key_id="bench",
            aws_secret_access_key="bench")  # noqa: S106 (moto checks no keys)
        yield endpoint, sqs.create_queue(QueueName="mp-subscriptions")["QueueUrl"]
    finally:
        server.stop()


def bench_lifecycle(args: Any, tmp: Path) -> dict[str, Any]:
    """Seconds from the notification's publication to the simulator billing the final usage, per customer."""
    customers = 2 if getattr(args, "smoke", False) else getattr(args, "customers", 10)
    with _sqs_queue() as (endpoint, queue):
        aws = {"AWS_REGION": "us-east-1", "AWS_ENDPOINT_URL_SQS": endpoint, "AWS_ACCESS_KEY_ID": "bench",
               "AWS_SECRET_ACCESS_KEY": "bench"}
        sim_port, port = free_port(), free_port()
        sim_url, url = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{port}"
        sim = start([sys.executable, "-m", "sidecar", "simulate-marketplace", "--listen", f"127.0.0.1:{sim_port}",
                     "--product-code", PRODUCT, "--subscription-queue-url", queue], env={**sidecar_env(tmp, 0), **aws})
        sidecar = start([sys.executable, "-m", "sidecar", "serve"], env=sidecar_env(tmp / "lifecycle.db", port, {
            **aws, "SIDECAR_DRY_RUN": "false", "SIDECAR_PRODUCT_CODE": PRODUCT, "SIDECAR_BIRTH_HOUR": "report",
            "SIDECAR_SUBSCRIPTION_QUEUE_URL": queue, "SIDECAR_SUBSCRIPTION_WAIT_S": "20",
            "AWS_ENDPOINT_URL_MARKETPLACE_METERING": sim_url}))
        try:
            wait_http(f"{sim_url}/_sim/state")
            wait_http(f"{url}/healthz")
            seconds = [_one(sim_url, url, f"cust-{i}") for i in range(customers)]
        finally:
            stop(sidecar)
            stop(sim)
    return {"customers": customers, "median_s": statistics.median(seconds), "max_s": max(seconds),
            "seconds": seconds}


def _one(sim_url: str, url: str, customer: str) -> float:
    """One customer: usage in the open hour, then `unsubscribe-pending`; seconds until AWS billed it."""
    _post(f"{sim_url}/_sim/tokens", {"customer_identifier": customer})  # subscribed in the simulator
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    _post(f"{url}/v1/events", {"event_id": f"{customer}-1", "time": now, "customer": {"customer_identifier": customer},
                               "prompt_tokens": 10, "completion_tokens": 5})
    started = time.perf_counter()
    _post(f"{sim_url}/_sim/subscriptions", {"customer": customer, "action": "unsubscribe-pending"})
    deadline = started + 120
    while time.perf_counter() < deadline:
        with urllib.request.urlopen(f"{sim_url}/_sim/state", timeout=10) as resp:
            if any(b["customer"] == customer for b in json.load(resp)["billed"]):
                return time.perf_counter() - started
        time.sleep(0.01)
    raise RuntimeError(f"{customer}: final usage not billed within 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--customers", type=int, default=10)
    args = parser.parse_args()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = bench_lifecycle(args, Path(tmp))
    print(f"final usage, unsubscribe-pending published -> billed: median {result['median_s']:.3f} s,"
          f" max {result['max_s']:.3f} s over {result['customers']} customers (target < 60 s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
