"""The simulated Metering Service: settings, billed state, dedup, call validation and injected faults.

It also holds the customer lifecycle: registration tokens that ResolveCustomer redeems, and each
customer's subscription state as changed by AWS Marketplace's subscription actions. Answers one request
at a time through ``Simulator.handle``; ``server`` puts it on the wire. Whole-call
errors, where AWS does not document the exact code, are chosen as follows: structural problems (record
count, both or neither customer scheme in a record, schemes mixed in one call, ProductCode sent with
licence records, quantity out of range) are ``ValidationException``; a missing ProductCode with
CustomerIdentifier records is ``InvalidProductCodeException``; a malformed account id is
``InvalidCustomerIdentifierException``; a malformed LicenseArn, or licences of two products in one call,
is ``InvalidLicenseException``. ResolveCustomer answers ``InvalidTokenException`` for a token it never
issued (or none at all) and ``ExpiredTokenException`` once the simulated clock reaches its expiry.

A subscription action sets the customer's state, and that state overrides ``subscribe_all`` and
``subscribed``: after ``unsubscribe-success`` (ended) or ``subscribe-fail`` its records are
``CustomerNotSubscribed``; after ``subscribe-success`` or ``unsubscribe-pending`` they are accepted.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, NamedTuple

import structlog

from sidecar.simulator.rules import (
    BATCH_METER_USAGE,
    DEFAULT_DIMENSIONS,
    DEFAULT_MONTH_GRACE_S,
    DEFAULT_WINDOW_S,
    MAX_CUSTOMER_IDENTIFIER_CHARS,
    MAX_RECORDS_PER_CALL,
    MAX_REQUEST_BYTES,
    RESOLVE_CUSTOMER,
    SUBSCRIPTION_ACTIONS,
    CallRejected,
    check_allocations,
    check_window,
    customer_fields,
    error_body,
    hour_start,
    http_status,
    is_account_id,
    is_license_arn,
    record_quantity,
    rfc3339,
    scheme,
    subscription_notification,
)

log = structlog.get_logger(__name__)

RecordStatus = Literal["Success", "CustomerNotSubscribed", "DuplicateRecord"]
SubscriptionState = Literal["subscribed", "unsubscribe-pending", "ended", "failed"]

_OPERATIONS = {BATCH_METER_USAGE: "BatchMeterUsage", RESOLVE_CUSTOMER: "ResolveCustomer"}
_STATE_AFTER: dict[str, SubscriptionState] = dict(
    zip(SUBSCRIPTION_ACTIONS, ("subscribed", "failed", "unsubscribe-pending", "ended"), strict=True)
)
_ACCEPTING_STATES = ("subscribed", "unsubscribe-pending")
_OPTIONAL_TEXT_SETTINGS = ("product_code", "subscription_queue_url", "sqs_endpoint_url", "sqs_region")
DEFAULT_PRODUCT_CODE = "sim-product"  # for tokens and notifications when no product_code is configured
DEFAULT_OFFER_IDENTIFIER = "offer-sim"
DEFAULT_TOKEN_LIFETIME_S = 3600.0


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """Rules and faults of one simulated Metering Service; every field can change at runtime."""

    product_code: str | None = None
    license_products: Mapping[str, str] = field(default_factory=dict)
    allowed_dimensions: frozenset[str] = DEFAULT_DIMENSIONS
    subscribe_all: bool = False
    subscribed: frozenset[str] = frozenset()
    window_s: float = DEFAULT_WINDOW_S
    month_grace_s: float = DEFAULT_MONTH_GRACE_S
    duplicate_status: Literal["DuplicateRecord", "Success"] = "DuplicateRecord"
    throttle_rate: float = 0.0
    error_5xx_rate: float = 0.0
    unprocessed_rate: float = 0.0
    lose_response_rate: float = 0.0
    latency_s: float = 0.0
    outage: bool = False
    outage_mode: Literal["503", "aws503", "close"] = "503"  # plain 503 (a proxy), AWS's typed 503, or drop
    api_disabled: bool = False
    clock_offset_s: float = 0.0
    seed: int | None = None
    # The SQS queue that receives subscription actions as the SNS topic would deliver them, and how to
    # reach it. None: botocore's endpoint (AWS_ENDPOINT_URL_SQS); AWS_REGION, AWS_DEFAULT_REGION, us-east-1.
    subscription_queue_url: str | None = None
    sqs_endpoint_url: str | None = None
    sqs_region: str | None = None

    def __post_init__(self) -> None:
        for name in ("throttle_rate", "error_5xx_rate", "unprocessed_rate", "lose_response_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {rate!r}")
        if self.latency_s < 0:
            raise ValueError(f"latency_s must be >= 0, got {self.latency_s!r}")
        if self.window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {self.window_s!r}")
        if not 0 <= self.month_grace_s < 28 * 86400:
            raise ValueError(
                f"month_grace_s must be >= 0 and under 28 days, got {self.month_grace_s!r}"
            )
        if self.duplicate_status not in ("DuplicateRecord", "Success"):
            raise ValueError(
                "duplicate_status must be DuplicateRecord or Success, "
                f"got {self.duplicate_status!r}"
            )
        if self.outage_mode not in ("503", "aws503", "close"):
            raise ValueError(f"outage_mode must be 503, aws503 or close, got {self.outage_mode!r}")
        if not self.allowed_dimensions:
            raise ValueError("allowed_dimensions must not be empty")

    def to_json(self) -> dict[str, Any]:
        """Return the settings as JSON-ready values (sets as sorted lists)."""
        data = dataclasses.asdict(self)
        data["allowed_dimensions"] = sorted(self.allowed_dimensions)
        data["subscribed"] = sorted(self.subscribed)
        data["license_products"] = dict(self.license_products)
        return data

    def with_json(self, changes: Mapping[str, Any]) -> SimulatorConfig:
        """Return a copy with ``changes`` (JSON values, as POSTed to /_sim/config) applied."""
        known = {f.name: f for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - set(known))
        if unknown:
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        converted: dict[str, Any] = {}
        for name, value in changes.items():
            default = getattr(SimulatorConfig(), name)
            if name in ("subscribed", "allowed_dimensions"):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a list of strings")
                converted[name] = frozenset(value)
            elif name == "license_products":
                if not isinstance(value, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in value.items()
                ):
                    raise ValueError("license_products must map licence ARNs to product codes")
                converted[name] = dict(value)
            elif isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"{name} must be true or false")
                converted[name] = value
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{name} must be a number")
                converted[name] = float(value)
            elif name == "seed":
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                    raise ValueError("seed must be an integer or null")
                converted[name] = value
            else:  # duplicate_status, outage_mode and the optional texts
                if not (isinstance(value, str) or (value is None and name in _OPTIONAL_TEXT_SETTINGS)):
                    raise ValueError(f"{name} must be a string")
                converted[name] = value
        return dataclasses.replace(self, **converted)


class DedupKey(NamedTuple):
    """What AWS de-duplicates on: customer, product (or licence), dimension and UTC hour."""

    customer: str  # CustomerIdentifier, or CustomerAWSAccountId for licence records
    product: str  # ProductCode, or LicenseArn for licence records
    dimension: str
    hour_start: int  # epoch seconds


@dataclass(frozen=True, kw_only=True)
class BilledRecord:
    """The first record accepted for a key: the one AWS bills."""

    key: DedupKey
    quantity: Decimal
    metering_record_id: str
    timestamp: float
    billed_at: float
    usage_record: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Return the record as JSON-ready values."""
        return {
            **self.key._asdict(),
            "quantity": _json_quantity(self.quantity),
            "metering_record_id": self.metering_record_id,
            "timestamp": self.timestamp,
            "billed_at": self.billed_at,
            "usage_record": self.usage_record,
        }


@dataclass(frozen=True, kw_only=True)
class CallLog:
    """One request as the simulator saw it and answered it."""

    n: int
    at: float
    records: int
    outcome: str  # "Success", an error code, "Outage" or "ResponseLost"
    statuses: tuple[str, ...] = ()  # per record, in request order; "Unprocessed" included
    message: str = ""
    operation: str = "BatchMeterUsage"

    def to_json(self) -> dict[str, Any]:
        """Return the entry as JSON-ready values; only calls of other operations name theirs."""
        data = {**dataclasses.asdict(self), "statuses": list(self.statuses)}
        if self.operation == "BatchMeterUsage":  # keeps the entries BatchMeterUsage always had
            del data["operation"]
        return data


@dataclass(kw_only=True)
class Counters:
    """Running totals since the last reset; records are counted one by one."""

    calls: int = 0
    throttled: int = 0
    errors_5xx: int = 0
    outages: int = 0
    responses_lost: int = 0
    rejected_calls: int = 0
    billed: int = 0
    duplicates_same_quantity: int = 0
    conflicts: int = 0
    not_subscribed: int = 0
    refused_ended: int = 0  # of not_subscribed: records of customers whose subscription ended
    unprocessed: int = 0
    tokens_resolved: int = 0


@dataclass(frozen=True, kw_only=True)
class Reply:
    """What the HTTP layer sends back: a JSON body, or nothing and a dropped connection."""

    status: int
    body: dict[str, Any] | str | None
    drop_connection: bool = False


@dataclass(frozen=True, kw_only=True)
class RegistrationToken:
    """What one registration token resolves to, and the simulated time it stops resolving."""

    product_code: str
    expires_at: float
    customer_identifier: str | None = None  # set for identifier customers...
    aws_account_id: str | None = None  # ...optional with them, always set with a licence
    license_arn: str | None = None  # set for account + licence customers (new integrations)

    @property
    def subscriber(self) -> str:
        """Return what BatchMeterUsage checks for a subscription: the identifier, else the account."""
        subscriber = self.customer_identifier or self.aws_account_id
        assert subscriber is not None  # issue_token sets one of them
        return subscriber

    def resolution(self) -> dict[str, str]:
        """Return ResolveCustomer's answer; licence customers get no CustomerIdentifier."""
        fields = {
            "CustomerIdentifier": self.customer_identifier,
            "CustomerAWSAccountId": self.aws_account_id,
            "LicenseArn": self.license_arn,
            "ProductCode": self.product_code,
        }
        return {name: value for name, value in fields.items() if value is not None}


@dataclass(frozen=True, kw_only=True)
class SubscriptionChange:
    """One checked subscription action, not yet applied: its customer, next state and SNS envelope."""

    customer: str
    state: SubscriptionState
    notification: dict[str, Any]


@dataclass(frozen=True)
class _Record:
    raw: dict[str, Any]
    key: DedupKey
    subscriber: str  # what must be subscribed: CustomerIdentifier or CustomerAWSAccountId
    quantity: Decimal
    timestamp: float


class Simulator:
    """State and rules of one simulated Metering Service (one region, one seller)."""

    def __init__(self, config: SimulatorConfig, clock: Callable[[], float] = time.time) -> None:
        self.initial_config = config
        self.config = config
        self.clock = clock
        self.rng = random.Random(config.seed)
        self.billed: dict[DedupKey, BilledRecord] = {}
        self.calls: list[CallLog] = []
        self.counters = Counters()
        self.tokens: dict[str, RegistrationToken] = {}
        self.subscriptions: dict[str, SubscriptionState] = {}  # set by tokens and subscription actions

    def now(self) -> float:
        """Return the simulated time in epoch seconds (the clock plus ``clock_offset_s``)."""
        return self.clock() + self.config.clock_offset_s

    def configure(self, **changes: Any) -> SimulatorConfig:
        """Change settings at runtime; a new ``seed`` reseeds the fault generator."""
        self.config = dataclasses.replace(self.config, **changes)
        if "seed" in changes:
            self.rng.seed(self.config.seed)
        return self.config

    def reset(self) -> None:
        """Forget everything billed and logged, and return to the constructor's settings."""
        self.config = self.initial_config
        self.rng.seed(self.config.seed)
        self.billed.clear()
        self.calls.clear()
        self.counters = Counters()
        self.tokens.clear()
        self.subscriptions.clear()

    def state(self) -> dict[str, Any]:
        """Return the inspectable state as JSON-ready values (served at ``GET /_sim/state``)."""
        return {
            "now": self.now(),
            "config": self.config.to_json(),
            "counters": dataclasses.asdict(self.counters),
            "billed": [record.to_json() for record in self.billed.values()],
            "calls": [call.to_json() for call in self.calls],
            "subscriptions": self.subscription_states(),
        }

    def subscription_states(self) -> dict[str, SubscriptionState]:
        """Return each known customer's subscription state: configured ones, then the lifecycle's."""
        configured: dict[str, SubscriptionState] = dict.fromkeys(sorted(self.config.subscribed), "subscribed")
        return {**configured, **dict(sorted(self.subscriptions.items()))}

    def accepts_usage(self, customer: str) -> bool:
        """Return whether records of ``customer`` (identifier or account id) are billed, not refused."""
        state = self.subscriptions.get(customer)
        if state is not None:
            return state in _ACCEPTING_STATES
        return self.config.subscribe_all or customer in self.config.subscribed

    def issue_token(self, body: Any) -> dict[str, Any]:
        """Issue a registration token from a ``POST /_sim/tokens`` body and subscribe its customer.

        Raises ValueError, naming the field, for a bad body.
        """
        fields = _admin_body(
            body, {"customer_identifier", "aws_account_id", "license_arn", "product_code", "expires_in_s"}
        )
        product_code = _text(fields, "product_code", default=self.config.product_code or DEFAULT_PRODUCT_CODE)
        lifetime_s = fields.get("expires_in_s", DEFAULT_TOKEN_LIFETIME_S)
        if (
            isinstance(lifetime_s, bool)
            or not isinstance(lifetime_s, int | float)
            or not math.isfinite(lifetime_s)
            or lifetime_s <= 0
        ):
            raise ValueError("expires_in_s must be a number of seconds > 0")
        account = fields.get("aws_account_id")
        if account is not None and not is_account_id(account):
            raise ValueError("aws_account_id must be 12 digits")
        expires_at = self.now() + lifetime_s
        if "license_arn" in fields:
            if "customer_identifier" in fields:
                raise ValueError("send customer_identifier or license_arn, not both")
            if account is None:
                raise ValueError("aws_account_id is required with license_arn")
            if not is_license_arn(fields["license_arn"]):
                raise ValueError("license_arn must be a License Manager licence ARN")
            token = RegistrationToken(
                product_code=product_code,
                expires_at=expires_at,
                aws_account_id=account,
                license_arn=fields["license_arn"],
            )
        elif "customer_identifier" in fields:
            identifier = _text(fields, "customer_identifier")
            if len(identifier) > MAX_CUSTOMER_IDENTIFIER_CHARS:
                raise ValueError(f"customer_identifier must be at most {MAX_CUSTOMER_IDENTIFIER_CHARS} characters")
            token = RegistrationToken(
                product_code=product_code,
                expires_at=expires_at,
                customer_identifier=identifier,
                aws_account_id=account,
            )
        else:
            raise ValueError("send customer_identifier, or aws_account_id with license_arn")
        secret = secrets.token_urlsafe(32)
        self.tokens[secret] = token
        self.subscriptions[token.subscriber] = "subscribed"  # the buyer has just subscribed
        log.info("simulator token issued", customer=token.subscriber, expires_at=rfc3339(expires_at))
        return {"registration_token": secret, "expires_at": rfc3339(expires_at)}

    def resolve_customer(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Apply one ResolveCustomer request body; return the HTTP status and the JSON answer."""
        secret = body.get("RegistrationToken") if isinstance(body, dict) else None
        token = self.tokens.get(secret) if isinstance(secret, str) else None
        if token is None:
            code, message = "InvalidTokenException", "Registration token is invalid"
        elif self.now() >= token.expires_at:
            code, message = "ExpiredTokenException", "Registration token has expired"
        else:
            self.counters.tokens_resolved += 1
            self._log_call(0, "Success", message=token.subscriber, operation="ResolveCustomer")
            return 200, token.resolution()
        self._log_call(0, code, message=message, operation="ResolveCustomer")
        return http_status(code), error_body(code, message)

    def subscription_change(self, body: Any) -> SubscriptionChange:
        """Check a ``POST /_sim/subscriptions`` body; return the change and its notification, unapplied.

        Raises ValueError, naming the field, for a bad body.
        """
        fields = _admin_body(body, {"customer", "action", "offer_identifier", "product_code"})
        customer = _text(fields, "customer")
        action = fields.get("action")
        if action not in _STATE_AFTER:
            raise ValueError(f"action must be one of {', '.join(SUBSCRIPTION_ACTIONS)}")
        notification = subscription_notification(
            action=action,
            customer=customer,
            product_code=_text(fields, "product_code", default=self.config.product_code or DEFAULT_PRODUCT_CODE),
            offer_identifier=_text(fields, "offer_identifier", default=DEFAULT_OFFER_IDENTIFIER),
            message_id=str(uuid.uuid4()),
            epoch_s=self.now(),
        )
        return SubscriptionChange(customer=customer, state=_STATE_AFTER[action], notification=notification)

    def apply_subscription(self, change: SubscriptionChange) -> dict[str, Any]:
        """Set the customer's subscription state; return it with the notification, as JSON-ready values."""
        self.subscriptions[change.customer] = change.state
        log.info("simulator subscription changed", customer=change.customer, subscription=change.state)
        return {
            "customer": change.customer,
            "subscription": change.state,
            "accepts_usage": self.accepts_usage(change.customer),
            "notification": change.notification,
        }

    def billed_quantity(self, key: DedupKey) -> Decimal | None:
        """Return the billed quantity for ``key``, or None if nothing was billed for it."""
        record = self.billed.get(key)
        return None if record is None else record.quantity

    def handle(self, target: str, raw_body: bytes) -> Reply:
        """Answer one POST / request, transport faults included (latency is the caller's)."""
        operation = _OPERATIONS.get(target)
        if operation is None:
            return _error_reply("UnknownOperationException", f"Unknown operation {target!r}")
        apply = self.batch_meter_usage if target == BATCH_METER_USAGE else self.resolve_customer
        self.counters.calls += 1
        n_records = _count_records(raw_body)
        if self.config.outage:
            self.counters.outages += 1
            self._log_call(
                n_records, "Outage", message=f"outage ({self.config.outage_mode})", operation=operation
            )
            if self.config.outage_mode == "close":
                return Reply(status=0, body=None, drop_connection=True)
            if self.config.outage_mode == "aws503":
                return _error_reply("ServiceUnavailableException", "Service is unavailable")
            return Reply(status=503, body="Service Unavailable")
        # Draw every fault on every call so one seed gives one sequence, whatever the rates.
        throttled = self.rng.random() < self.config.throttle_rate
        failed = self.rng.random() < self.config.error_5xx_rate
        lost = self.rng.random() < self.config.lose_response_rate
        if throttled:
            self.counters.throttled += 1
            return self._fault_reply(n_records, "ThrottlingException", "Rate exceeded", operation)
        if failed:
            self.counters.errors_5xx += 1
            return self._fault_reply(
                n_records, "InternalServiceErrorException", "An internal error occurred", operation
            )
        if self.config.api_disabled:
            return self._fault_reply(
                n_records, "DisabledApiException", "The API is disabled in the Region", operation
            )
        if len(raw_body) > MAX_REQUEST_BYTES:
            return self._fault_reply(n_records, "ValidationException", "Request is over 1 MB", operation)
        try:
            body = json.loads(raw_body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return self._fault_reply(n_records, "SerializationException", "Body is not JSON", operation)
        status, payload = apply(body)
        if status == 200 and lost:
            self.counters.responses_lost += 1
            self.calls[-1] = dataclasses.replace(self.calls[-1], outcome="ResponseLost")
            log.info("simulator response dropped", call=self.calls[-1].n)
            return Reply(status=0, body=None, drop_connection=True)
        return Reply(status=status, body=payload)

    def batch_meter_usage(self, body: Any) -> tuple[int, dict[str, Any]]:
        """Apply one BatchMeterUsage request body; return the HTTP status and the JSON answer."""
        now = self.now()
        records_in = body.get("UsageRecords") if isinstance(body, dict) else None
        n_records = len(records_in) if isinstance(records_in, list) else 0
        try:
            records = self._validate(body, now)
        except CallRejected as rejected:
            self.counters.rejected_calls += 1
            self._log_call(n_records, rejected.code, message=rejected.message)
            return http_status(rejected.code), error_body(rejected.code, rejected.message)
        results: list[dict[str, Any]] = []
        unprocessed: list[dict[str, Any]] = []
        statuses: list[str] = []
        for record in records:
            if self.rng.random() < self.config.unprocessed_rate:
                self.counters.unprocessed += 1
                unprocessed.append(record.raw)
                statuses.append("Unprocessed")
                continue
            status, record_id = self._apply(record, now)
            result: dict[str, Any] = {"UsageRecord": record.raw, "Status": status}
            if record_id is not None:
                result["MeteringRecordId"] = record_id
            results.append(result)
            statuses.append(status)
        self._log_call(len(records), "Success", statuses=tuple(statuses))
        return 200, {"Results": results, "UnprocessedRecords": unprocessed}

    def _apply(self, record: _Record, now: float) -> tuple[RecordStatus, str | None]:
        if not self.accepts_usage(record.subscriber):
            self.counters.not_subscribed += 1
            if self.subscriptions.get(record.subscriber) == "ended":
                self.counters.refused_ended += 1
            return "CustomerNotSubscribed", None
        first = self.billed.get(record.key)
        if first is None:
            record_id = str(uuid.uuid4())
            self.billed[record.key] = BilledRecord(
                key=record.key,
                quantity=record.quantity,
                metering_record_id=record_id,
                timestamp=record.timestamp,
                billed_at=now,
                usage_record=record.raw,
            )
            self.counters.billed += 1
            return "Success", record_id
        if first.quantity == record.quantity:
            self.counters.duplicates_same_quantity += 1
            return self.config.duplicate_status, first.metering_record_id
        self.counters.conflicts += 1
        log.warning(
            "simulator conflicting duplicate",
            key=record.key._asdict(),
            billed_quantity=_json_quantity(first.quantity),
            refused_quantity=_json_quantity(record.quantity),
        )
        return "DuplicateRecord", first.metering_record_id

    def _validate(self, body: Any, now: float) -> list[_Record]:
        config = self.config
        if not isinstance(body, dict):
            raise CallRejected("SerializationException", "Body must be a JSON object")
        raw_records = body.get("UsageRecords")
        if not isinstance(raw_records, list):
            raise CallRejected("ValidationException", "UsageRecords must be a list")
        if not 1 <= len(raw_records) <= MAX_RECORDS_PER_CALL:
            raise CallRejected(
                "ValidationException",
                f"UsageRecords must hold 1 to {MAX_RECORDS_PER_CALL} records, "
                f"got {len(raw_records)}",
            )
        product_code = body.get("ProductCode")
        if product_code is not None and not isinstance(product_code, str):
            raise CallRejected("SerializationException", "ProductCode must be a string")
        # Records with neither or both schemes are refused one by one in _validate_record.
        schemes = {scheme(raw) for raw in raw_records} - {None}
        if len(schemes) > 1:
            raise CallRejected(
                "ValidationException",
                "A call must not mix CustomerIdentifier and CustomerAWSAccountId+LicenseArn"
                " records",
            )
        if "identifier" in schemes:
            if not product_code:
                raise CallRejected(
                    "InvalidProductCodeException", "ProductCode is required with CustomerIdentifier"
                )
            if config.product_code is not None and product_code != config.product_code:
                raise CallRejected(
                    "InvalidProductCodeException", f"Unknown product code {product_code!r}"
                )
        elif schemes and product_code is not None:
            raise CallRejected(
                "ValidationException", "ProductCode must not be sent with LicenseArn records"
            )
        records = [self._validate_record(raw, product_code, now) for raw in raw_records]
        if schemes == {"licence"}:
            products = {
                config.license_products.get(r.key.product, config.product_code) for r in records
            }
            if len(products) > 1:
                raise CallRejected(
                    "InvalidLicenseException", "Licences of more than one product in one call"
                )
            if config.product_code is not None and products != {config.product_code}:
                raise CallRejected("InvalidLicenseException", "Licence belongs to another product")
        return records

    def _validate_record(self, raw: Any, product_code: str | None, now: float) -> _Record:
        config = self.config
        if not isinstance(raw, dict):
            raise CallRejected("SerializationException", "A usage record must be a JSON object")
        timestamp = raw.get("Timestamp")
        if (
            isinstance(timestamp, bool)
            or not isinstance(timestamp, int | float)
            or not math.isfinite(timestamp)
        ):
            raise CallRejected("SerializationException", "Timestamp must be epoch seconds")
        dimension = raw.get("Dimension")
        if not isinstance(dimension, str) or not dimension:
            raise CallRejected("ValidationException", "Dimension is required")
        quantity = record_quantity(raw)
        customer, product, subscriber = customer_fields(raw, product_code)
        if dimension not in config.allowed_dimensions:
            raise CallRejected(
                "InvalidUsageDimensionException", f"Dimension {dimension!r} is not in the listing"
            )
        check_window(
            float(timestamp), now, window_s=config.window_s, month_grace_s=config.month_grace_s
        )
        if "UsageAllocations" in raw:
            check_allocations(raw["UsageAllocations"], quantity, "QuantityAsDecimal" in raw)
        key = DedupKey(customer, product, dimension, hour_start(timestamp))
        return _Record(raw, key, subscriber, quantity, float(timestamp))

    def _fault_reply(self, n_records: int, code: str, message: str, operation: str) -> Reply:
        self._log_call(n_records, code, message=message, operation=operation)
        return _error_reply(code, message)

    def _log_call(
        self,
        n_records: int,
        outcome: str,
        *,
        statuses: tuple[str, ...] = (),
        message: str = "",
        operation: str = "BatchMeterUsage",
    ) -> None:
        call = CallLog(
            n=len(self.calls) + 1,
            at=self.now(),
            records=n_records,
            outcome=outcome,
            statuses=statuses,
            message=message,
            operation=operation,
        )
        self.calls.append(call)
        log.info(
            "simulator call",
            operation=operation,
            call=call.n,
            records=n_records,
            outcome=outcome,
            billed=statuses.count("Success"),
            message=message or None,
        )


def _count_records(raw_body: bytes) -> int:
    try:
        records = json.loads(raw_body).get("UsageRecords")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return 0
    return len(records) if isinstance(records, list) else 0


def _admin_body(body: Any, allowed: set[str]) -> dict[str, Any]:
    """Return an admin route's JSON body, or raise ValueError if it is no object or has unknown fields."""
    if not isinstance(body, dict):
        raise ValueError("body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(unknown)}")
    return body


def _text(fields: Mapping[str, Any], name: str, *, default: str | None = None) -> str:
    """Return a non-empty string field (``default`` when absent), or raise ValueError naming it."""
    value = fields.get(name, default)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    return value


def _json_quantity(quantity: Decimal) -> int | str:
    return int(quantity) if quantity == quantity.to_integral_value() else str(quantity)


def _error_reply(code: str, message: str) -> Reply:
    return Reply(status=http_status(code), body=error_body(code, message))


