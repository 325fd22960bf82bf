"""The AWS clients: Marketplace Metering (BatchMeterUsage, ResolveCustomer) and the SQS queue of
Marketplace's subscription notifications. The only module that imports botocore.

botocore does SigV4, the credential chain (environment, profile, ECS task role) and the AWS
JSON 1.1 wire format. Its own retries are off: the flusher's policy is the only one, so every
attempt is visible and recorded. Each call's result is classified into one of a few outcomes
that the flusher acts on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import botocore.config
import botocore.exceptions
import botocore.session

from sidecar.config import Settings
from sidecar.errors import ConfigError, RegistrationFailed
from sidecar.model import CustomerRef

# Request-level errors that refuse the whole batch because of what is in it: bisect.
INVALID_BATCH = frozenset({
    "InvalidUsageDimensionException", "InvalidCustomerIdentifierException", "InvalidProductCodeException",
    "InvalidTagException", "InvalidUsageAllocationsException", "InvalidLicenseException",
    "DisabledApiException", "ValidationException", "CustomerNotEntitledException",
})
TIMESTAMP_OUT_OF_BOUNDS = "TimestampOutOfBoundsException"

Kind = Literal["answered", "retry", "timestamp", "invalid"]


@dataclass(frozen=True, kw_only=True)
class CallResult:
    """What one BatchMeterUsage call came to.

    - answered: AWS returned per-record results (and maybe unprocessed records);
    - retry: throttling, 5xx, timeout or connection trouble: send the same batch again later;
    - timestamp: TimestampOutOfBoundsException, the whole batch refused;
    - invalid: the batch was refused for its content (bisect to find the bad records).
    `maybe_received` is True when the request may have reached AWS and been processed.
    """

    kind: Kind
    results: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    unprocessed: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    error: str | None = None
    maybe_received: bool = False


def _client(service: str, settings: Settings, *, env: Mapping[str, str], endpoint_var: str,
            credentials: tuple[str, str] | None, read_timeout_s: float) -> Any:
    """A botocore client with the sidecar's timeouts, no hidden retries, the region rule and the
    standard endpoint override (`endpoint_var`, else AWS_ENDPOINT_URL)."""
    if not settings.region:
        raise ConfigError("AWS_REGION: not set (nor AWS_DEFAULT_REGION); the Marketplace region is required")
    session = botocore.session.get_session()
    config = botocore.config.Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=read_timeout_s,
        retries={"total_max_attempts": 1, "mode": "standard"},
        user_agent_extra="vllm-marketplace-sidecar",
    )
    endpoint = env.get(endpoint_var) or env.get("AWS_ENDPOINT_URL") or None
    kwargs: dict[str, Any] = {}
    if credentials is None and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        # Static keys given in the mapping we were handed (tests, the CLI); otherwise botocore's
        # own chain: environment, profile, ECS task role (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI).
        kwargs = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                  "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
                  "aws_session_token": env.get("AWS_SESSION_TOKEN")}
    elif credentials is not None:
        kwargs = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
    return session.create_client(service, region_name=settings.region, endpoint_url=endpoint, config=config,
                                 **kwargs)


def _error(exc: botocore.exceptions.ClientError) -> tuple[str, str, int]:
    """(code, message, HTTP status) of an AWS error answer."""
    err = exc.response.get("Error", {})
    return (str(err.get("Code", "Unknown")), str(err.get("Message", "")),
            int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)))


@dataclass(frozen=True, kw_only=True)
class Registration:
    """What ResolveCustomer said about a registration token."""

    customer: CustomerRef
    product_code: str | None
    aws_account_id: str | None  # given beside a CustomerIdentifier too


class MeteringClient:
    """A botocore `meteringmarketplace` client with the sidecar's timeouts and no hidden retries."""

    def __init__(self, settings: Settings, *, env: Mapping[str, str],
                 credentials: tuple[str, str] | None = None) -> None:
        self._client = _client("meteringmarketplace", settings, env=env,
                               endpoint_var="AWS_ENDPOINT_URL_MARKETPLACE_METERING", credentials=credentials,
                               read_timeout_s=settings.read_timeout_s)
        self.endpoint = self._client.meta.endpoint_url

    def resolve_customer(self, token: str) -> Registration:
        """ResolveCustomer (blocking; run it in a worker thread). Raises RegistrationFailed with
        AWS's error code: InvalidTokenException, ExpiredTokenException, ThrottlingException, ...

        A CustomerIdentifier, when AWS gives one, is the customer (older integrations meter with
        it); otherwise the account + licence (new integrations)."""
        try:
            resp = self._client.resolve_customer(RegistrationToken=token)
        except botocore.exceptions.ClientError as exc:
            code, message, status = _error(exc)
            raise RegistrationFailed(code, message, retryable=code in RETRYABLE_REGISTRATION or status >= 500) \
                from None
        except botocore.exceptions.BotoCoreError as exc:
            raise RegistrationFailed(type(exc).__name__, str(exc), retryable=True) from None
        ident, account, arn = (resp.get("CustomerIdentifier"), resp.get("CustomerAWSAccountId"),
                               resp.get("LicenseArn"))
        try:
            if ident:
                ref = CustomerRef.parse({"customer_identifier": ident}, where="ResolveCustomer")
            else:
                ref = CustomerRef.parse({"aws_account_id": account, "license_arn": arn}, where="ResolveCustomer")
        except ValueError as exc:
            raise RegistrationFailed("UnexpectedAnswer", str(exc), retryable=False) from None
        return Registration(customer=ref, product_code=resp.get("ProductCode"), aws_account_id=account)

    def batch_meter_usage(self, records: Sequence[Mapping[str, Any]], product_code: str | None) -> CallResult:
        """Send one batch (blocking; run it in a worker thread) and classify the result."""
        params: dict[str, Any] = {"UsageRecords": list(records)}
        if product_code:
            params["ProductCode"] = product_code
        try:
            resp = self._client.batch_meter_usage(**params)
        except botocore.exceptions.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Unknown")
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            message = f"{code}: {exc.response.get('Error', {}).get('Message', '')}".rstrip(": ")
            if code == TIMESTAMP_OUT_OF_BOUNDS:
                return CallResult(kind="timestamp", error=message)
            if code in INVALID_BATCH:
                return CallResult(kind="invalid", error=message)
            # Throttling and other 4xx are refusals. So is a 503 that AWS itself typed
            # (ServiceUnavailable...): it refuses before processing. A plain 503 (a proxy or load
            # balancer answering) and any other 5xx (InternalServiceError) might hide a success.
            aws_refused_503 = status == 503 and code.startswith("ServiceUnavailable")
            return CallResult(kind="retry", error=message, maybe_received=status >= 500 and not aws_refused_503)
        except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError) as exc:
            # The request never left: nothing can have been processed.
            return CallResult(kind="retry", error=f"connect: {exc}", maybe_received=False)
        except (botocore.exceptions.HTTPClientError, botocore.exceptions.ReadTimeoutError) as exc:
            return CallResult(kind="retry", error=f"no answer: {exc}", maybe_received=True)
        except botocore.exceptions.NoCredentialsError as exc:
            return CallResult(kind="retry", error=f"credentials: {exc}", maybe_received=False)
        except botocore.exceptions.BotoCoreError as exc:
            return CallResult(kind="retry", error=f"{type(exc).__name__}: {exc}", maybe_received=True)
        return CallResult(
            kind="answered",
            results=resp.get("Results", []),
            unprocessed=resp.get("UnprocessedRecords", []),
        )


RETRYABLE_REGISTRATION = frozenset({"ThrottlingException", "InternalServiceErrorException"})


@dataclass(frozen=True, kw_only=True)
class QueueMessage:
    """One SQS message: its body, the handle that deletes it, and when SQS received it (epoch s)."""

    body: str
    receipt_handle: str
    message_id: str
    sent_at: int | None


class SubscriptionQueue:
    """The SQS queue AWS Marketplace's subscription notifications arrive on (long polling)."""

    def __init__(self, settings: Settings, *, env: Mapping[str, str],
                 credentials: tuple[str, str] | None = None) -> None:
        assert settings.subscription_queue_url is not None
        self.url = settings.subscription_queue_url
        self.wait_s = settings.subscription_wait_s
        # The read timeout outlasts the long poll, so an idle queue is not taken for a dead one.
        self._client = _client("sqs", settings, env=env, endpoint_var="AWS_ENDPOINT_URL_SQS",
                               credentials=credentials, read_timeout_s=settings.read_timeout_s + self.wait_s)

    def receive(self, *, max_messages: int = 10) -> list[QueueMessage]:
        """Wait up to the long poll for messages (blocking; run it in a worker thread)."""
        resp = self._client.receive_message(QueueUrl=self.url, MaxNumberOfMessages=max_messages,
                                            WaitTimeSeconds=self.wait_s, AttributeNames=["SentTimestamp"])
        out = []
        for m in resp.get("Messages", []):
            sent = cast(Mapping[str, str], m.get("Attributes", {})).get("SentTimestamp")
            out.append(QueueMessage(body=m.get("Body", ""), receipt_handle=m["ReceiptHandle"],
                                    message_id=m.get("MessageId", ""),
                                    sent_at=int(sent) // 1000 if sent and sent.isdigit() else None))
        return out

    def delete(self, receipt_handle: str) -> None:
        """Delete a message whose change is committed (blocking)."""
        self._client.delete_message(QueueUrl=self.url, ReceiptHandle=receipt_handle)
