"""AWS's limits, validation rules and message formats for the simulator, as pure functions with no I/O.

They cover BatchMeterUsage, ResolveCustomer, and the subscription notifications AWS Marketplace
publishes to a seller's SNS topic.

These are the simulator's own copies, taken from the service model and AWS's documentation. They are
deliberately not shared with the daemon: a fake that imported the limits of the code it checks would
agree with that code's mistakes.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal, TypeGuard

TARGET_PREFIX = "AWSMPMeteringService."
BATCH_METER_USAGE = TARGET_PREFIX + "BatchMeterUsage"
RESOLVE_CUSTOMER = TARGET_PREFIX + "ResolveCustomer"

# The actions of AWS Marketplace's SaaS subscription notifications.
SUBSCRIPTION_ACTIONS = ("subscribe-success", "subscribe-fail", "unsubscribe-pending", "unsubscribe-success")
# AWS Marketplace's own account: it owns every product's subscription topic, always in us-east-1.
MARKETPLACE_SNS_ACCOUNT = "287250355862"

MAX_RECORDS_PER_CALL = 25
MAX_REQUEST_BYTES = 1024 * 1024
MAX_QUANTITY = 2_147_483_647
MAX_ALLOCATIONS = 2500
MAX_TAGS_PER_ALLOCATION = 5
MAX_TAG_KEY_CHARS = 100
MAX_TAG_VALUE_CHARS = 256
MAX_CUSTOMER_IDENTIFIER_CHARS = 255
HOUR_S = 3600

# Defaults of the simulated listing and clock; each can be changed per simulator.
DEFAULT_DIMENSIONS = frozenset({"inference-requests", "tokens-processed", "gpu-hours"})
DEFAULT_WINDOW_S = 86400.0
DEFAULT_MONTH_GRACE_S = 6 * 3600.0

# Patterns copied from the service model (botocore checks none of them client-side).
_LICENSE_ARN = re.compile(
    r"^arn:aws[a-zA-Z-]*:[A-Za-z0-9][A-Za-z0-9_/.-]{0,62}:[A-Za-z0-9_/.-]{0,63}:"
    r"[A-Za-z0-9_/.-]{0,63}:[A-Za-z0-9][A-Za-z0-9:_/+=,@.-]{0,1023}$"
)
_ACCOUNT_ID = re.compile(r"^[0-9]{12}$")
_TAG_TEXT = re.compile(r"^[a-zA-Z0-9+ -=._:\/@]+$")
_DECIMAL_QUANTITY = re.compile(r"^(0|[1-9][0-9]{0,9})(\.[0-9]{1,6})?$")

_HTTP_STATUS = {"InternalServiceErrorException": 500, "ServiceUnavailableException": 503}

Scheme = Literal["identifier", "licence"]


class CallRejected(Exception):
    """Raised when AWS would refuse the whole call; carries the error code it would answer."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def http_status(code: str) -> int:
    """Return the HTTP status AWS answers with error ``code`` (400 unless it is a server fault)."""
    return _HTTP_STATUS.get(code, 400)


def error_body(code: str, message: str) -> dict[str, Any]:
    """Return AWS's JSON 1.1 error body for ``code``."""
    return {"__type": code, "message": message}


def is_account_id(value: Any) -> TypeGuard[str]:
    """Return whether ``value`` is an AWS account id (12 digits)."""
    return isinstance(value, str) and _ACCOUNT_ID.match(value) is not None


def is_license_arn(value: Any) -> TypeGuard[str]:
    """Return whether ``value`` matches the service model's LicenseArn pattern."""
    return isinstance(value, str) and _LICENSE_ARN.match(value) is not None


def rfc3339(epoch_s: float) -> str:
    """Return ``epoch_s`` as UTC RFC 3339 with milliseconds and a Z, as SNS writes its timestamps."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def subscription_notification(
    *, action: str, customer: str, product_code: str, offer_identifier: str, message_id: str, epoch_s: float
) -> dict[str, Any]:
    """Return the SNS envelope of one subscription notification, as SQS receives it without raw delivery.

    A 12-digit ``customer`` is a CustomerAWSAccountId; anything else is a CustomerIdentifier.
    """
    customer_field = "customer-aws-account-id" if is_account_id(customer) else "customer-identifier"
    message = {
        "action": action,
        customer_field: customer,
        "product-code": product_code,
        "offer-identifier": offer_identifier,
        "isFreeTrialTermPresent": "false",
    }
    return {
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": f"arn:aws:sns:us-east-1:{MARKETPLACE_SNS_ACCOUNT}:aws-mp-subscription-notification-{product_code}",
        "Subject": None,
        "Message": json.dumps(message),
        "Timestamp": rfc3339(epoch_s),
        "SignatureVersion": "1",
        "Signature": "sim",
        "SigningCertURL": "",
        "UnsubscribeURL": "",
    }


def scheme(raw: Any) -> Scheme | None:
    """Return the customer scheme of one raw record, or None when it has neither or both."""
    if not isinstance(raw, dict):
        return None
    has_identifier = "CustomerIdentifier" in raw
    has_licence = "CustomerAWSAccountId" in raw or "LicenseArn" in raw
    if has_identifier == has_licence:
        return None
    return "identifier" if has_identifier else "licence"


def customer_fields(raw: dict[str, Any], product_code: str | None) -> tuple[str, str, str]:
    """Return (customer, product, subscriber) of one record, or raise CallRejected."""
    has_identifier = "CustomerIdentifier" in raw
    has_licence = "CustomerAWSAccountId" in raw or "LicenseArn" in raw
    if has_identifier == has_licence:
        raise CallRejected(
            "ValidationException",
            "A record needs exactly one of CustomerIdentifier or CustomerAWSAccountId+LicenseArn",
        )
    if has_identifier:
        identifier = raw["CustomerIdentifier"]
        if not isinstance(identifier, str) or not 1 <= len(identifier) <= MAX_CUSTOMER_IDENTIFIER_CHARS:
            raise CallRejected("InvalidCustomerIdentifierException", "CustomerIdentifier is invalid")
        assert product_code is not None  # checked for the whole call before any record
        return identifier, product_code, identifier
    account = raw.get("CustomerAWSAccountId")
    licence = raw.get("LicenseArn")
    if not is_account_id(account):
        raise CallRejected("InvalidCustomerIdentifierException", "CustomerAWSAccountId must be 12 digits")
    if not is_license_arn(licence):
        raise CallRejected("InvalidLicenseException", "LicenseArn is missing or malformed")
    return account, licence, account


def record_quantity(raw: dict[str, Any]) -> Decimal:
    """Return the quantity of one record (Quantity or QuantityAsDecimal), or raise CallRejected."""
    if "Quantity" in raw and "QuantityAsDecimal" in raw:
        raise CallRejected("ValidationException", "Send Quantity or QuantityAsDecimal, not both")
    if "QuantityAsDecimal" in raw:
        return _decimal_quantity(raw["QuantityAsDecimal"], "QuantityAsDecimal")
    quantity = raw.get("Quantity", 0)
    if isinstance(quantity, bool) or not isinstance(quantity, int):
        raise CallRejected("SerializationException", "Quantity must be an integer")
    if not 0 <= quantity <= MAX_QUANTITY:
        raise CallRejected("ValidationException", f"Quantity must be 0 to {MAX_QUANTITY}")
    return Decimal(quantity)


def _decimal_quantity(value: Any, name: str) -> Decimal:
    if not isinstance(value, str) or not _DECIMAL_QUANTITY.match(value):
        raise CallRejected("ValidationException", f"{name} must be a decimal string")
    return Decimal(value)


def check_allocations(allocations: Any, quantity: Decimal, decimal_record: bool) -> None:
    """Raise CallRejected unless ``allocations`` are valid and sum to the record's quantity."""
    if not isinstance(allocations, list) or not 1 <= len(allocations) <= MAX_ALLOCATIONS:
        raise CallRejected(
            "InvalidUsageAllocationsException",
            f"UsageAllocations must hold 1 to {MAX_ALLOCATIONS} allocations",
        )
    total = Decimal(0)
    for allocation in allocations:
        if not isinstance(allocation, dict):
            raise CallRejected("InvalidUsageAllocationsException", "Allocation must be an object")
        if decimal_record:
            if "AllocatedUsageQuantity" in allocation:
                raise CallRejected(
                    "InvalidUsageAllocationsException",
                    "Use AllocatedUsageQuantityAsDecimal with QuantityAsDecimal",
                )
            total += _decimal_quantity(
                allocation.get("AllocatedUsageQuantityAsDecimal"), "AllocatedUsageQuantityAsDecimal"
            )
        else:
            if "AllocatedUsageQuantityAsDecimal" in allocation:
                raise CallRejected(
                    "InvalidUsageAllocationsException",
                    "Use AllocatedUsageQuantity with Quantity",
                )
            allocated = allocation.get("AllocatedUsageQuantity")
            if (
                isinstance(allocated, bool)
                or not isinstance(allocated, int)
                or not 0 <= allocated <= MAX_QUANTITY
            ):
                raise CallRejected("InvalidUsageAllocationsException", "AllocatedUsageQuantity is invalid")
            total += allocated
        _check_tags(allocation.get("Tags"))
    if total != quantity:
        raise CallRejected(
            "InvalidUsageAllocationsException",
            f"Allocations sum to {total}, not to the record's quantity {quantity}",
        )


def _check_tags(tags: Any) -> None:
    if not isinstance(tags, list) or not 1 <= len(tags) <= MAX_TAGS_PER_ALLOCATION:
        raise CallRejected("InvalidTagException", f"An allocation needs 1 to {MAX_TAGS_PER_ALLOCATION} tags")
    keys: set[str] = set()
    for tag in tags:
        key = tag.get("Key") if isinstance(tag, dict) else None
        value = tag.get("Value") if isinstance(tag, dict) else None
        if (
            not isinstance(key, str)
            or not isinstance(value, str)
            or len(key) > MAX_TAG_KEY_CHARS
            or len(value) > MAX_TAG_VALUE_CHARS
            or not _TAG_TEXT.match(key)
            or not _TAG_TEXT.match(value)
        ):
            raise CallRejected("InvalidTagException", "Tag key or value is invalid")
        if key in keys:
            raise CallRejected("InvalidTagException", f"Tag key {key!r} is repeated")
        keys.add(key)


def check_window(timestamp: float, now: float, *, window_s: float, month_grace_s: float) -> None:
    """Raise CallRejected unless ``timestamp`` is in the past ``window_s`` and in an open billing month.

    The previous month stays open for ``month_grace_s`` after the first of this one.
    """
    if timestamp > now:
        raise CallRejected("TimestampOutOfBoundsException", "Timestamp is in the future")
    if timestamp <= now - window_s:
        raise CallRejected("TimestampOutOfBoundsException", f"Timestamp is {window_s:g} s or more in the past")
    this_month = month_start(now)
    earliest = this_month
    if now < this_month + month_grace_s:
        earliest = month_start(this_month - 1)
    if timestamp < earliest:
        raise CallRejected("TimestampOutOfBoundsException", "Timestamp is in a closed billing month")


def hour_start(epoch_s: float) -> int:
    """Return the start of the UTC hour ``epoch_s`` is in: the hour AWS de-duplicates on."""
    return int(epoch_s // HOUR_S) * HOUR_S


def month_start(epoch_s: float) -> float:
    """Return the start of the UTC month ``epoch_s`` is in, in epoch seconds."""
    moment = time.gmtime(epoch_s)
    return float(calendar.timegm((moment.tm_year, moment.tm_mon, 1, 0, 0, 0)))

