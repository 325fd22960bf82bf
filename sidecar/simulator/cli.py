"""``sidecar simulate-marketplace``: its options, and ``run``, which serves the simulator until a signal.

The daemon's ``sidecar`` parser imports this module to build the subcommand, so it loads only argparse
and ``rules`` at import; the service and the server load inside ``config_from_args`` and ``run``.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

import structlog

from sidecar.simulator.rules import DEFAULT_DIMENSIONS, DEFAULT_WINDOW_S

if TYPE_CHECKING:
    from sidecar.simulator.service import SimulatorConfig

log = structlog.get_logger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9700
MAX_PORT = 65535


def parse_host_port(value: str) -> tuple[str, int]:
    """Return (host, port) from HOST:PORT (an IPv6 host may be bracketed); port 0 picks a free one."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"must be HOST:PORT, e.g. {DEFAULT_HOST}:{DEFAULT_PORT}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port {port_text!r} is not a number") from None
    if not 0 <= port <= MAX_PORT:
        raise argparse.ArgumentTypeError(f"port must be 0-{MAX_PORT}")
    return host.strip("[]"), port


def _rate(value: str) -> float:
    rate = float(value)
    if not 0.0 <= rate <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction from 0 to 1, got {value!r}")
    return rate


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of ``sidecar simulate-marketplace`` to ``parser``."""
    parser.add_argument(
        "--listen",
        type=parse_host_port,
        default=(DEFAULT_HOST, DEFAULT_PORT),
        metavar="HOST:PORT",
        help=f"address to serve on (default {DEFAULT_HOST}:{DEFAULT_PORT}; port 0 picks a free one)",
    )
    parser.add_argument(
        "--subscribe-all", action="store_true", help="treat every customer as subscribed"
    )
    parser.add_argument(
        "--subscribe",
        action="append",
        default=[],
        metavar="ID",
        help="a subscribed CustomerIdentifier or CustomerAWSAccountId (repeatable)",
    )
    parser.add_argument(
        "--product-code", metavar="CODE", help="the only ProductCode accepted (default: any)"
    )
    parser.add_argument(
        "--dimension",
        action="append",
        default=[],
        metavar="NAME",
        help=f"an allowed dimension (repeatable; default: {', '.join(sorted(DEFAULT_DIMENSIONS))})",
    )
    parser.add_argument(
        "--window-s",
        type=float,
        default=DEFAULT_WINDOW_S,
        metavar="SECONDS",
        help=f"how old a record may be (default {DEFAULT_WINDOW_S:g})",
    )
    parser.add_argument(
        "--throttle-rate",
        type=_rate,
        default=0.0,
        metavar="FRACTION",
        help="fraction of calls throttled",
    )
    parser.add_argument(
        "--error-rate",
        type=_rate,
        default=0.0,
        metavar="FRACTION",
        help="fraction of calls failing with a 500",
    )
    parser.add_argument(
        "--unprocessed-rate",
        type=_rate,
        default=0.0,
        metavar="FRACTION",
        help="fraction of records returned in UnprocessedRecords",
    )
    parser.add_argument(
        "--latency-s",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="delay before each answer, in seconds",
    )
    parser.add_argument(
        "--lose-response-rate",
        type=_rate,
        default=0.0,
        metavar="FRACTION",
        help="fraction of calls processed and billed whose response is then dropped",
    )
    parser.add_argument("--seed", type=int, metavar="N", help="seed for the fault generator")
    parser.add_argument(
        "--subscription-queue-url",
        metavar="URL",
        help="SQS queue that receives AWS's SNS notification of each POST /_sim/subscriptions action "
        "(endpoint: AWS_ENDPOINT_URL_SQS; region: AWS_REGION or AWS_DEFAULT_REGION, else us-east-1)",
    )


def config_from_args(args: argparse.Namespace) -> SimulatorConfig:
    """Build the simulator settings from parsed ``add_arguments`` options."""
    from sidecar.simulator.service import SimulatorConfig

    return SimulatorConfig(
        product_code=args.product_code,
        allowed_dimensions=frozenset(args.dimension) or DEFAULT_DIMENSIONS,
        subscribe_all=args.subscribe_all,
        subscribed=frozenset(args.subscribe),
        window_s=args.window_s,
        throttle_rate=args.throttle_rate,
        error_5xx_rate=args.error_rate,
        unprocessed_rate=args.unprocessed_rate,
        latency_s=args.latency_s,
        lose_response_rate=args.lose_response_rate,
        seed=args.seed,
        subscription_queue_url=args.subscription_queue_url,
    )


def run(args: argparse.Namespace) -> int:
    """Run ``sidecar simulate-marketplace`` until SIGINT or SIGTERM; return the exit status."""
    from sidecar.simulator.server import serve_until_signalled
    from sidecar.simulator.service import Simulator

    try:
        config = config_from_args(args)
    except ValueError as exc:
        log.error("invalid simulator settings", error=str(exc))
        return 2
    host, port = args.listen
    asyncio.run(serve_until_signalled(Simulator(config), host, port))
    return 0
