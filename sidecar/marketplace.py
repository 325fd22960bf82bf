"""The AWS Marketplace Metering client: the only module that imports botocore.

botocore does SigV4, the credential chain (environment, profile, ECS task role) and the AWS
JSON 1.1 wire format. Its own retries are off: the flusher's policy is the only one, so every
attempt is visible and recorded. Each call's result is classified into one of a few outcomes
that the flusher acts on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import botocore.config
import botocore.exceptions
import botocore.session

from sidecar.config import Settings
from sidecar.errors import ConfigError

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


class MeteringClient:
    """A botocore `meteringmarketplace` client with the sidecar's timeouts and no hidden retries."""

    def __init__(self, settings: Settings, *, env: Mapping[str, str],
                 credentials: tuple[str, str] | None = None) -> None:
        if not settings.region:
            raise ConfigError("AWS_REGION: not set (nor AWS_DEFAULT_REGION); the Marketplace region is required")
        session = botocore.session.get_session()
        config = botocore.config.Config(
            connect_timeout=settings.connect_timeout_s,
            read_timeout=settings.read_timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},
            user_agent_extra="vllm-marketplace-sidecar",
        )
        endpoint = env.get("AWS_ENDPOINT_URL_MARKETPLACE_METERING") or env.get("AWS_ENDPOINT_URL") or None
        kwargs: dict[str, Any] = {}
        if credentials is None and env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
            # Static keys given in the mapping we were handed (tests, the CLI); otherwise botocore's
            # own chain: environment, profile, ECS task role (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI).
            kwargs = {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
                      "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
                      "aws_session_token": env.get("AWS_SESSION_TOKEN")}
        elif credentials is not None:
            kwargs = {"aws_access_key_id": credentials[0], "aws_secret_access_key": credentials[1]}
        self._client = session.create_client(
            "meteringmarketplace", region_name=settings.region, endpoint_url=endpoint, config=config, **kwargs
        )
        self.endpoint = self._client.meta.endpoint_url

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
