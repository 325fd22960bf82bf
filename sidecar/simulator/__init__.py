"""A local AWS Marketplace Metering simulator on the real wire protocol of BatchMeterUsage and ResolveCustomer.

It serves the limits, the timestamp window, dedup by customer x product x dimension x UTC hour (first
write wins), unsubscribed customers and injectable faults (throttling, 5xx, unprocessed records,
outages, lost responses). For a customer's whole lifecycle it issues registration tokens that
ResolveCustomer redeems, applies subscription actions (an ended subscription refuses usage), and can
publish each action's SNS notification to an SQS queue. Run it as ``sidecar simulate-marketplace`` or,
in tests, with ``start(Simulator(SimulatorConfig(...)))``.

It is an independent fake: it imports nothing from the daemon, and its limits are its own
(``rules``). The daemon's parser imports ``cli`` to build the subcommand, so the names below load on
first use (PEP 562) rather than here, and only running the command loads the service and the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sidecar.simulator.cli import add_arguments, config_from_args, run
    from sidecar.simulator.rules import (
        BATCH_METER_USAGE,
        DEFAULT_DIMENSIONS,
        RESOLVE_CUSTOMER,
        SUBSCRIPTION_ACTIONS,
    )
    from sidecar.simulator.server import create_app, start
    from sidecar.simulator.service import (
        BilledRecord,
        CallLog,
        Counters,
        DedupKey,
        RegistrationToken,
        Reply,
        Simulator,
        SimulatorConfig,
        SubscriptionChange,
    )

__all__ = [
    "BATCH_METER_USAGE",
    "DEFAULT_DIMENSIONS",
    "RESOLVE_CUSTOMER",
    "SUBSCRIPTION_ACTIONS",
    "BilledRecord",
    "CallLog",
    "Counters",
    "DedupKey",
    "RegistrationToken",
    "Reply",
    "Simulator",
    "SimulatorConfig",
    "SubscriptionChange",
    "add_arguments",
    "config_from_args",
    "create_app",
    "run",
    "start",
]

_MODULE_OF = {
    "BATCH_METER_USAGE": "rules",
    "DEFAULT_DIMENSIONS": "rules",
    "RESOLVE_CUSTOMER": "rules",
    "SUBSCRIPTION_ACTIONS": "rules",
    "BilledRecord": "service",
    "CallLog": "service",
    "Counters": "service",
    "DedupKey": "service",
    "RegistrationToken": "service",
    "Reply": "service",
    "Simulator": "service",
    "SimulatorConfig": "service",
    "SubscriptionChange": "service",
    "add_arguments": "cli",
    "config_from_args": "cli",
    "create_app": "server",
    "run": "cli",
    "start": "server",
}


def __getattr__(name: str) -> Any:
    """Load a public name from the module that defines it, on first use."""
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
