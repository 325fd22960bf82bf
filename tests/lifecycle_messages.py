"""Builders of AWS Marketplace subscription messages as they reach an SQS queue, for tests.

Each body copies the example on AWS's documentation page, with the test's values substituted:
- SNS: "Amazon SNS notifications for SaaS products" (the inner JSON) inside the envelope that "Amazon SNS
  raw message delivery" shows an SQS queue receiving with raw delivery disabled;
- EventBridge: "Amazon EventBridge events" (events for agreements and for licenses) in the Seller Guide.
The URLs are in `sidecar/subscriptions.py`'s docstring.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

# 2026-11-28T10:02:00Z, the same instant as helpers.T0 (kept here so this module imports nothing heavy).
AT = int(datetime(2026, 11, 28, 10, 2, tzinfo=UTC).timestamp())
MARKETPLACE_SNS_ACCOUNT = "287250355862"  # AWS Marketplace's account: it owns every product's topics
SELLER_ACCOUNT = "111122223333"  # the `account` of an EventBridge event is the seller's
PROPOSER_ACCOUNT = "123456512334"  # the docs' example proposer
AGREEMENT_ID = "agmt-4mwg1nevbokzw95eca5797ixs"  # the docs' example agreement
PRODUCT_ID = "prod-qtwveEXAMPLE"  # the docs' example product id (licence events)
OFFER_ID = "offer-1234567890123"
NAMESPACE = uuid.UUID("5f0c1d2e-3b4a-4c5d-8e6f-7a8b9c0d1e2f")  # deterministic ids: a rebuilt message is a duplicate


def rfc3339(epoch: int, *, millis: bool) -> str:
    """Epoch seconds as RFC 3339 UTC with a Z: SNS writes milliseconds, EventBridge whole seconds."""
    when = datetime.fromtimestamp(epoch, UTC)
    return when.isoformat(timespec="milliseconds" if millis else "seconds").replace("+00:00", "Z")


def license_arn_of(aws_account_id: str) -> str:
    """A well-formed licence ARN for an account (the form ResolveCustomer returns and BatchMeterUsage takes)."""
    return f"arn:aws:license-manager::{aws_account_id}:license:l-{uuid.uuid5(NAMESPACE, aws_account_id).hex}"


def sns_inner(action: str, *, customer_identifier: str | None = None, aws_account_id: str | None = None,
              product_code: str = "prod-test", offer: str | None = "offer-abcexample123") -> dict[str, Any]:
    """The JSON an SNS subscription (or entitlement) notification carries, as the SaaS SNS page shows it."""
    msg: dict[str, Any] = {"action": action}
    if customer_identifier is not None:
        msg["customer-identifier"] = customer_identifier
    if aws_account_id is not None:
        msg["customer-aws-account-id"] = aws_account_id
    msg["product-code"] = product_code
    if action in ("subscribe-success", "subscribe-fail") and offer is not None:
        msg["offer-identifier"] = offer  # the page: only on these two actions
    if action != "entitlement-updated":
        msg["isFreeTrialTermPresent"] = "false"  # a string, not a boolean, as the page notes
    return msg


def sns_message(action: str, *, customer_identifier: str | None = None, aws_account_id: str | None = None,
                product_code: str = "prod-test", at: int = AT, raw: bool = False,
                message_id: str | None = None, offer: str | None = "offer-abcexample123") -> str:
    """An SQS body from AWS Marketplace's SNS topic: the envelope, or (raw=True) the inner JSON alone."""
    inner = sns_inner(action, customer_identifier=customer_identifier, aws_account_id=aws_account_id,
                      product_code=product_code, offer=offer)
    if raw:
        return json.dumps(inner)
    topic = "aws-mp-entitlement-notification" if action == "entitlement-updated" else "aws-mp-subscription-notification"
    topic_arn = f"arn:aws:sns:us-east-1:{MARKETPLACE_SNS_ACCOUNT}:{topic}-{product_code}"
    if message_id is None:
        message_id = str(uuid.uuid5(NAMESPACE, f"{action}|{customer_identifier}|{aws_account_id}|{at}"))
    return json.dumps({
        "Type": "Notification",
        "MessageId": message_id,
        "TopicArn": topic_arn,
        "Message": json.dumps(inner),
        "Timestamp": rfc3339(at, millis=True),
        "SignatureVersion": "1",
        "Signature": "EXAMPLEpH+DcEwjAPg8O9mY8dReBSwksfg2S7WKQcikcNKWLQjwu6A4VbeS0QHVCkhRS7fUQvi2egU3N858fiTDN6=",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
        "UnsubscribeURL": f"https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={topic_arn}:"
                          "c9135db0-26c4-47ec-8998-413945fb5a96",
    })


def eventbridge_event(detail_type: str, *, aws_account_id: str, product_code: str = "prod-test",
                      license_arn: str | None = None, at: int = AT, event_id: str | None = None,
                      agreement_status: str | None = None, agreement_id: str = AGREEMENT_ID,
                      source: str = "aws.agreement-marketplace") -> str:
    """An SQS body from an EventBridge rule: the event exactly as the docs' example of its detail-type.

    Licence events ("License Updated/Deprovisioned - …") carry `product.code` and `license.arn` (a
    well-formed ARN for the account unless `license_arn` says otherwise). Agreement events follow the
    Manufacturer examples, which name no product and no licence: `license_arn` is refused for them.
    `agreement_status` overrides the example's (ACTIVE for Created/Amended, CANCELLED for Ended).
    """
    is_licence = detail_type.startswith("License ")
    if license_arn is not None and not is_licence:
        raise ValueError(f"{detail_type}: the docs' agreement events carry no licence")
    agreement: dict[str, Any] = {"id": agreement_id}
    if detail_type.startswith(("Purchase Agreement Created", "Purchase Agreement Amended")):
        intent = "AMEND" if "Amended" in detail_type else "NEW"
        agreement |= {"intent": intent, "status": agreement_status or "ACTIVE",
                      "acceptanceTime": rfc3339(at - 86400, millis=False), "startTime": rfc3339(at, millis=False),
                      "endTime": rfc3339(at + 365 * 86400, millis=False)}
    elif detail_type.startswith("Purchase Agreement Ended"):
        agreement["status"] = agreement_status or "CANCELLED"
    elif agreement_status is not None:
        agreement["status"] = agreement_status
    detail: dict[str, Any] = {"requestId": "3d4c9f9b-b809-4f5e-9fac-a9ae98b05cbb", "catalog": "AWSMarketplace",
                              "agreement": agreement}
    if is_licence:
        detail["product"] = {"code": product_code, "id": PRODUCT_ID}
        detail["license"] = {"arn": license_arn or license_arn_of(aws_account_id)}
    else:
        detail["resaleAuthorization"] = {"id": "resaleauthz-yaxjqxiskysxa"}
    detail["acceptor"] = {"accountId": aws_account_id}
    detail["proposer"] = {"accountId": PROPOSER_ACCOUNT}
    detail["offer"] = {"id": OFFER_ID}
    if event_id is None:
        event_id = str(uuid.uuid5(NAMESPACE, f"{detail_type}|{aws_account_id}|{agreement_id}|{at}"))
    return json.dumps({
        "version": "0",
        "id": event_id,
        "detail-type": detail_type,
        "source": source,
        "account": SELLER_ACCOUNT,
        "time": rfc3339(at, millis=False),
        "region": "us-east-1",
        "resources": [f"arn:aws:aws-marketplace::aws:agreement:{agreement_id}"],
        "detail": detail,
    })
