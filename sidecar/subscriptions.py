"""What AWS Marketplace's subscription messages mean for metering, and which one wins: pure, no I/O.

`parse_message` turns one SQS message body into a `Notice`; `apply` folds notices into a subscriber's
`Subscription`. SQS delivers at least once and in any order, so `apply` is built to give the same
result for any order of the same messages, duplicates included.

Where each field comes from (the documentation pages, as read in 2026; "docs" below means these):

SNS, the older channel ("Amazon SNS notifications for SaaS products",
https://docs.aws.amazon.com/marketplace/latest/userguide/saas-notification.html). The SQS body is
SNS's JSON envelope (fields: https://docs.aws.amazon.com/sns/latest/dg/http-notification-json.html):
`Type` = "Notification", `MessageId`, `TopicArn`, `Message` (a string holding the JSON below) and
`Timestamp` (when SNS published it, RFC 3339 with milliseconds). With raw message delivery the body is
the inner JSON alone (both shapes side by side:
https://docs.aws.amazon.com/sns/latest/dg/sns-large-payload-raw-message-delivery.html): no time and
no message id, so the caller passes SQS's SentTimestamp as `sent_at`.
The inner JSON:
  - `action`: subscribe-success, subscribe-fail, unsubscribe-pending, unsubscribe-success
    (topic aws-mp-subscription-notification) or entitlement-updated (aws-mp-entitlement-notification).
  - `customer-identifier`. An earlier version of the same page spelled it `CustomerIdentifier` (and
    `ProductCode`); both spellings are accepted. The page's example pads it with a space
    (" X01EXAMPLEX"); identifiers never contain whitespace, so surrounding whitespace is stripped.
  - `customer-aws-account-id`: NOT on the SNS page. AWS's sample integration
    (aws-samples/aws-marketplace-serverless-saas-integration) writes it beside `customer-identifier`,
    and Concurrent Agreements products are identified by account. Accepted; when a message names
    both, the identifier wins (SNS is the channel of identifier-based products).
  - `product-code` (or `ProductCode`), `offer-identifier` (only on subscribe-success/-fail), and
    `isFreeTrialTermPresent` (a string, "true"/"false"; metering ignores it).

EventBridge, the newer channel ("Managing SaaS subscription events with Amazon EventBridge",
https://docs.aws.amazon.com/marketplace/latest/userguide/saas-eventbridge-integration.html; the
example bodies are on "Amazon EventBridge events", events for agreements and for licenses,
https://docs.aws.amazon.com/marketplace/latest/userguide/notifications-eventbridge.html). The SQS
body is the event itself: `version`, `id`, `detail-type`, `source`, `account` (the SELLER's account,
never the buyer's), `time`, `region`, `resources`, `detail`.
  - `source` must be "aws.agreement-marketplace" (every agreement and licence event).
  - Detail-types end in " - Manufacturer" or " - Proposer". The docs send only the Proposer variant of
    agreement events when the seller is both (a direct offer), so both suffixes are accepted; licence
    events are documented for the Manufacturer only, the Proposer spelling is accepted all the same.
    "Purchase Agreement Created" → SUBSCRIBED, "Purchase Agreement Ended" → END_BEGAN (final usage
    has one hour), "License Deprovisioned" → ENDED. "License Updated", "Purchase Agreement Amended",
    "... Ending", "... Advisory Issued", "... Advisory Resolved", "... Renewal Terms Finalized" and
    "... Renewal Upcoming" are NOTICE. Other detail-types (offers, change sets, cancellation requests,
    billing adjustments, buyer-side "- Acceptor" events) are rejected: they are not a customer's
    subscription lifecycle.
  - "Purchase Agreement Ended" with `detail.agreement.status` RENEWED or REPLACED is a NOTICE: a new
    agreement carries on, and its own "Created" event arrives. The statuses are listed on the buyer
    guide's page (https://docs.aws.amazon.com/marketplace/latest/buyerguide/agreement-eventbridge.html:
    CANCELLED, EXPIRED, TERMINATED, RENEWED, REPLACED); the seller page's example shows CANCELLED only.
  - buyer: `detail.acceptor.accountId` (every agreement and licence example).
  - licence: `detail.license.arn`, on licence events only. The docs' example value is not a
    well-formed ARN ("aws:license-manager:us-east-1:123456789012:l-…", no "arn:" prefix), so it is
    kept exactly as sent, unchecked; compare licences by their "l-…" id if the forms differ.
  - product: `detail.product.code` on licence events. Agreement events carry at most
    `detail.product.id` ("prod-…", a different thing), and the Manufacturer examples carry no product
    at all, so `product_code` is usually None for them. `detail.productCode` is accepted as an
    alternative spelling of the code (not in the docs).
  - agreement `detail.agreement.id`, offer `detail.offer.id`, time `time`, message id `id`.

`Notice` has two fields beyond the first design, `agreement_id` and `product_id`: agreement events
name neither a licence nor a product code, and the agreement id is the only link from "Purchase
Agreement Ended" to the licence that "License Updated/Deprovisioned" names.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any, Literal

from sidecar.model import ACCOUNT_ID, CUSTOMER_IDENTIFIER, Scheme


class Change(StrEnum):
    """What one message means for metering."""

    SUBSCRIBED = "subscribed"  # subscribe-success; Purchase Agreement Created
    END_BEGAN = "end_began"  # unsubscribe-pending; Purchase Agreement Ended (about one hour left for final usage)
    ENDED = "ended"  # unsubscribe-success; License Deprovisioned (records no longer accepted)
    FAILED = "failed"  # subscribe-fail
    NOTICE = "notice"  # entitlement-updated, License Updated, and other known types: no state change


class SubscriptionState(StrEnum):
    """Where a subscriber's subscription is, after every notice seen so far."""

    SUBSCRIBED = "subscribed"
    PENDING_END = "pending_end"
    ENDED = "ended"
    FAILED = "failed"


class UnparseableMessage(ValueError):
    """Raised when a queue message is not a subscription message this module understands (the text says why)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Notice:
    """One subscription message, reduced to what metering needs."""

    change: Change
    subscriber: str  # 'identifier:<id>' or 'account:<12 digits>' (who, without licence)
    product_code: str | None
    at: int  # epoch seconds when AWS published it (SNS Timestamp; EventBridge time; else sent_at)
    kind: str  # the raw action or detail-type, for logs
    shape: Literal["sns", "eventbridge"]
    message_id: str | None  # SNS MessageId or EventBridge id
    license_arn: str | None = None
    offer: str | None = None
    agreement_id: str | None = None  # EventBridge detail.agreement.id
    product_id: str | None = None  # EventBridge detail.product.id ("prod-…"), not the product code


@dataclass(frozen=True, kw_only=True, slots=True)
class Subscription:
    """A subscriber's state and, per kind of change, the newest time one was seen."""

    subscriber: str
    state: SubscriptionState
    state_at: int  # `at` of the notice that set the state
    subscribed_at: int | None = None
    end_began_at: int | None = None
    ended_at: int | None = None
    failed_at: int | None = None


# ---- what each message kind means --------------------------------------------------------------

SNS_ACTIONS: dict[str, Change] = {
    "subscribe-success": Change.SUBSCRIBED,
    "subscribe-fail": Change.FAILED,
    "unsubscribe-pending": Change.END_BEGAN,
    "unsubscribe-success": Change.ENDED,
    "entitlement-updated": Change.NOTICE,
}

EVENT_SOURCE = "aws.agreement-marketplace"
EVENT_ROLES = ("Manufacturer", "Proposer")
# Detail-types without their " - <role>" suffix.
EVENT_TYPES: dict[str, Change] = {
    "Purchase Agreement Created": Change.SUBSCRIBED,
    "Purchase Agreement Ended": Change.END_BEGAN,
    "License Deprovisioned": Change.ENDED,
    "License Updated": Change.NOTICE,
    "Purchase Agreement Amended": Change.NOTICE,
    "Purchase Agreement Ending": Change.NOTICE,
    "Purchase Agreement Advisory Issued": Change.NOTICE,
    "Purchase Agreement Advisory Resolved": Change.NOTICE,
    "Purchase Agreement Renewal Terms Finalized": Change.NOTICE,
    "Purchase Agreement Renewal Upcoming": Change.NOTICE,
}
# An agreement that ended in these statuses goes on as a new agreement (which sends its own "Created").
SUCCEEDED_STATUSES = frozenset({"RENEWED", "REPLACED"})

STATE_OF: dict[Change, SubscriptionState] = {
    Change.SUBSCRIBED: SubscriptionState.SUBSCRIBED,
    Change.FAILED: SubscriptionState.FAILED,
    Change.END_BEGAN: SubscriptionState.PENDING_END,
    Change.ENDED: SubscriptionState.ENDED,
}
# Which state wins a tie at the same second: the later stage.
RANK: dict[SubscriptionState, int] = {
    SubscriptionState.SUBSCRIBED: 0,
    SubscriptionState.FAILED: 1,
    SubscriptionState.PENDING_END: 2,
    SubscriptionState.ENDED: 3,
}


# ---- parsing -----------------------------------------------------------------------------------

def parse_message(body: str, *, sent_at: int | None = None) -> Notice:
    """The notice one SQS message body carries; UnparseableMessage (and nothing else) when it is not one.

    `sent_at` (epoch seconds, e.g. SQS's SentTimestamp) is the time of a message that has none of its own.
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
        raise UnparseableMessage("the body is not JSON") from None
    if not isinstance(doc, dict):
        raise UnparseableMessage(f"the body is JSON but not an object ({type(doc).__name__})")
    if "detail-type" in doc or "detail" in doc:
        return _eventbridge(doc, sent_at)
    if "Type" in doc or "Message" in doc:
        return _sns_envelope(doc, sent_at)
    if "action" in doc or "Action" in doc:  # raw message delivery: the body carries no time of its own
        if sent_at is None:
            raise UnparseableMessage("a raw SNS message carries no time, and no sent_at was given")
        return _sns_inner(doc, at=sent_at, message_id=None)
    raise UnparseableMessage("neither an SNS notification (action, or an envelope with Message) "
                             "nor an EventBridge event (detail-type)")


def _sns_envelope(doc: dict[str, Any], sent_at: int | None) -> Notice:
    """The notice inside SNS's JSON envelope."""
    kind = doc.get("Type")
    if kind != "Notification":
        raise UnparseableMessage(f"SNS message of Type {_show(kind)}, not a Notification")
    message = doc.get("Message")
    if isinstance(message, str):
        try:
            inner = json.loads(message)
        except (ValueError, RecursionError):
            raise UnparseableMessage("the SNS envelope's Message is not JSON") from None
    else:
        inner = message  # AWS's sample integration puts an object here; SNS itself sends a string
    if not isinstance(inner, dict):
        raise UnparseableMessage("the SNS envelope's Message is not a JSON object")
    at = _time(doc.get("Timestamp"), "SNS Timestamp", sent_at)
    return _sns_inner(inner, at=at, message_id=_text(doc, "MessageId", "SNS MessageId"))


def _sns_inner(msg: dict[str, Any], *, at: int, message_id: str | None) -> Notice:
    """The notice of SNS's inner JSON (the whole body under raw message delivery)."""
    action = msg.get("action", msg.get("Action"))
    if not isinstance(action, str) or action not in SNS_ACTIONS:
        raise UnparseableMessage(f"unknown SNS action {_show(action)}; known: {', '.join(SNS_ACTIONS)}")
    identifier = _text(msg, "customer-identifier", "customer-identifier") or _text(
        msg, "CustomerIdentifier", "CustomerIdentifier")
    account = _text(msg, "customer-aws-account-id", "customer-aws-account-id")
    return Notice(change=SNS_ACTIONS[action], subscriber=_subscriber(identifier, account, action),
                  product_code=_text(msg, "product-code", "product-code") or _text(msg, "ProductCode", "ProductCode"),
                  at=at, kind=action, shape="sns", message_id=message_id,
                  offer=_text(msg, "offer-identifier", "offer-identifier"))


def _eventbridge(doc: dict[str, Any], sent_at: int | None) -> Notice:
    """The notice of an EventBridge event delivered to the queue."""
    kind = doc.get("detail-type")
    if not isinstance(kind, str):
        raise UnparseableMessage(f"EventBridge event without a detail-type ({_show(kind)})")
    source = doc.get("source")
    if source != EVENT_SOURCE:
        raise UnparseableMessage(f"EventBridge event from source {_show(source)}, not {EVENT_SOURCE}")
    base, sep, role = kind.rpartition(" - ")
    if not sep or role not in EVENT_ROLES or base not in EVENT_TYPES:
        raise UnparseableMessage(f"unknown detail-type {_show(kind)}")
    detail = doc.get("detail")
    if not isinstance(detail, dict):
        raise UnparseableMessage(f"{kind}: detail is not an object")
    change = EVENT_TYPES[base]
    agreement = _object(detail, "agreement", kind)
    if change is Change.END_BEGAN and _text(agreement, "status", "detail.agreement.status") in SUCCEEDED_STATUSES:
        change = Change.NOTICE
    product = _object(detail, "product", kind)
    return Notice(
        change=change,
        subscriber=_subscriber(None, _text(_object(detail, "acceptor", kind), "accountId",
                                           "detail.acceptor.accountId"), kind),
        product_code=_text(product, "code", "detail.product.code") or _text(detail, "productCode",
                                                                           "detail.productCode"),
        at=_time(doc.get("time"), "EventBridge time", sent_at),
        kind=kind, shape="eventbridge", message_id=_text(doc, "id", "EventBridge id"),
        license_arn=_text(_object(detail, "license", kind), "arn", "detail.license.arn"),
        offer=_text(_object(detail, "offer", kind), "id", "detail.offer.id"),
        agreement_id=_text(agreement, "id", "detail.agreement.id"),
        product_id=_text(product, "id", "detail.product.id"),
    )


def _subscriber(identifier: str | None, account: str | None, kind: str) -> str:
    """'identifier:<id>' (preferred when both are named) or 'account:<12 digits>'."""
    if identifier is not None:
        if not CUSTOMER_IDENTIFIER.match(identifier):
            raise UnparseableMessage(f"{kind}: customer identifier {_show(identifier)} is not 1-255 "
                                     "printable ASCII characters without whitespace")
        return f"{Scheme.IDENTIFIER}{identifier}"
    if account is not None:
        if not ACCOUNT_ID.match(account):
            raise UnparseableMessage(f"{kind}: customer account id {_show(account)} is not 12 digits")
        return f"{Scheme.ACCOUNT}{account}"
    raise UnparseableMessage(f"{kind}: names no customer (neither a customer identifier nor an account id)")


def _object(parent: dict[str, Any], key: str, kind: str) -> dict[str, Any]:
    """The object under `key` ({} when absent or null); UnparseableMessage when it is something else."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UnparseableMessage(f"{kind}: detail.{key} is not an object")
    return value


def _text(parent: dict[str, Any], key: str, name: str) -> str | None:
    """The string under `key`, stripped; None when absent, null or blank; UnparseableMessage when not a string."""
    value = parent.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UnparseableMessage(f"{name} is not a string ({_show(value)})")
    return value.strip() or None


# RFC 3339 date-time: date, T, time, optional fraction, Z or a numeric offset. ASCII digits only.
RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.[0-9]+)?"
    r"(?:([Zz])|([+-])([0-9]{2}):([0-9]{2}))\Z")


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_rfc3339(text: str) -> int | None:
    """Epoch seconds (fraction truncated) of an RFC 3339 date-time with Z or an offset; None if it is not one."""
    m = RFC3339.match(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    offset = timedelta(0)
    if m.group(7) is None:
        off_h, off_m = int(m.group(9)), int(m.group(10))
        if off_h > 23 or off_m > 59:
            return None
        offset = timedelta(hours=off_h, minutes=off_m) * (-1 if m.group(8) == "-" else 1)
    try:
        when = datetime(year, month, day, hour, minute, second, tzinfo=timezone(offset))
    except ValueError:  # month 13, February 30, second 60 (a leap second), year 0
        return None
    return (when - EPOCH) // timedelta(seconds=1)


def _time(value: object, name: str, sent_at: int | None) -> int:
    """The message's own time, else `sent_at`; UnparseableMessage when there is neither."""
    at = parse_rfc3339(value) if isinstance(value, str) else None
    if at is not None:
        return at
    if sent_at is not None:
        return sent_at
    if value is None:
        raise UnparseableMessage(f"no {name}, and no sent_at was given")
    raise UnparseableMessage(f"{name} {_show(value)} is not an RFC 3339 date-time, and no sent_at was given")


def _show(value: object) -> str:
    """A short repr of a JSON value for an error message (containers by type only)."""
    if isinstance(value, dict | list):
        return f"a JSON {'object' if isinstance(value, dict) else 'array'}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- customers and state -----------------------------------------------------------------------

def subscriber_of(customer_key: str) -> str | None:
    """The subscriber a stored customer key belongs to: 'account:<id>/<arn>' → 'account:<id>',
    'identifier:<id>' unchanged; None for a tenant key or anything that is not an AWS customer."""
    if customer_key.startswith(Scheme.IDENTIFIER):
        return customer_key if len(customer_key) > len(Scheme.IDENTIFIER) else None
    if customer_key.startswith(Scheme.ACCOUNT):
        account = customer_key[len(Scheme.ACCOUNT):].partition("/")[0]
        return f"{Scheme.ACCOUNT}{account}" if ACCOUNT_ID.match(account) else None
    return None


def apply(current: Subscription | None, notice: Notice) -> Subscription | None:
    """The subscription after `notice`, or None when it changes nothing (a NOTICE, a duplicate).

    The state is the one of the notice with the greatest (at, stage) ever seen, so older messages never
    move it back; each *_at field keeps the newest time of its kind. Any order of the same notices
    gives the same result. ValueError when `current` belongs to another subscriber.
    """
    if current is not None and current.subscriber != notice.subscriber:
        raise ValueError(f"a notice for {notice.subscriber} applied to the subscription of {current.subscriber}")
    if notice.change is Change.NOTICE:
        return None
    state, at = STATE_OF[notice.change], notice.at
    base = current or Subscription(subscriber=notice.subscriber, state=state, state_at=at)
    match notice.change:
        case Change.SUBSCRIBED:
            new = replace(base, subscribed_at=_newest(base.subscribed_at, at))
        case Change.FAILED:
            new = replace(base, failed_at=_newest(base.failed_at, at))
        case Change.END_BEGAN:
            new = replace(base, end_began_at=_newest(base.end_began_at, at))
        case Change.ENDED:
            new = replace(base, ended_at=_newest(base.ended_at, at))
    if (at, RANK[state]) > (base.state_at, RANK[base.state]):
        new = replace(new, state=state, state_at=at)
    return None if new == current else new


def _newest(seen: int | None, at: int) -> int:
    """The later of a kept time (if any) and a new one."""
    return at if seen is None else max(seen, at)
