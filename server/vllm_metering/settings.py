"""Settings of the vLLM-side metering: one frozen object built once from METERING_* variables."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vllm_metering.errors import ConfigError

DEFAULT_SPOOL_PATH = Path(tempfile.gettempdir()) / "vllm-metering" / "spool.ndjson"


@dataclass(frozen=True, kw_only=True)
class MeteringSettings:
    """Every setting of the middleware and reporter. Tests construct it directly."""

    enabled: bool = True
    sidecar_url: str = "http://127.0.0.1:9600"
    sidecar_token: str | None = None
    tenant_headers: tuple[str, ...] = ("x-tenant-id", "x-amzn-oidc-identity")
    default_tenant: str | None = "unattributed"
    account_id_header: str | None = None
    license_arn_header: str | None = None
    customer_identifier_header: str | None = None
    trust_request_id: bool = False
    max_json_bytes: int = 2 * 1024 * 1024
    queue_size: int = 10_000
    batch_max_events: int = 500
    batch_max_bytes: int = 1_000_000
    batch_linger_s: float = 0.05
    request_timeout_s: float = 5.0
    retry_attempts: int = 3
    backoff_base_s: float = 0.2
    backoff_max_s: float = 30.0
    shutdown_timeout_s: float = 10.0
    spool_path: Path = DEFAULT_SPOOL_PATH
    spool_max_bytes: int = 256 * 1024 * 1024

    @property
    def events_url(self) -> str:
        """Where batches are posted."""
        return self.sidecar_url.rstrip("/") + "/v1/events"


def _bool(value: str) -> bool:
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be a whole number >= 1")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be a number > 0")
    return number


def _non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise ValueError("must be a number >= 0")
    return number


def _header_list(value: str) -> tuple[str, ...]:
    names = tuple(part.strip().lower() for part in value.split(",") if part.strip())
    if not names:
        raise ValueError("must name at least one header")
    return names


def _optional_header(value: str) -> str | None:
    return value.strip().lower() or None


def _optional_text(value: str) -> str | None:
    return value.strip() or None


def _url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("must be an http:// or https:// URL, e.g. http://127.0.0.1:9600")
    return value.strip()


def _path(value: str) -> Path:
    if not value.strip():
        raise ValueError("must not be empty")
    return Path(value.strip())


# Environment variable → (settings field, parser). The package docstring documents each one.
ENV_SETTINGS: Mapping[str, tuple[str, Callable[[str], Any]]] = {
    "METERING_ENABLED": ("enabled", _bool),
    "METERING_SIDECAR_URL": ("sidecar_url", _url),
    "METERING_SIDECAR_TOKEN": ("sidecar_token", _optional_text),
    "METERING_TENANT_HEADERS": ("tenant_headers", _header_list),
    "METERING_DEFAULT_TENANT": ("default_tenant", _optional_text),
    "METERING_ACCOUNT_ID_HEADER": ("account_id_header", _optional_header),
    "METERING_LICENSE_ARN_HEADER": ("license_arn_header", _optional_header),
    "METERING_CUSTOMER_IDENTIFIER_HEADER": ("customer_identifier_header", _optional_header),
    "METERING_TRUST_REQUEST_ID": ("trust_request_id", _bool),
    "METERING_MAX_JSON_BYTES": ("max_json_bytes", _positive_int),
    "METERING_QUEUE_SIZE": ("queue_size", _positive_int),
    "METERING_BATCH_MAX_EVENTS": ("batch_max_events", _positive_int),
    "METERING_BATCH_MAX_BYTES": ("batch_max_bytes", _positive_int),
    "METERING_BATCH_LINGER_S": ("batch_linger_s", _non_negative_float),
    "METERING_REQUEST_TIMEOUT_S": ("request_timeout_s", _positive_float),
    "METERING_RETRY_ATTEMPTS": ("retry_attempts", _positive_int),
    "METERING_BACKOFF_BASE_S": ("backoff_base_s", _non_negative_float),
    "METERING_BACKOFF_MAX_S": ("backoff_max_s", _non_negative_float),
    "METERING_SHUTDOWN_TIMEOUT_S": ("shutdown_timeout_s", _non_negative_float),
    "METERING_SPOOL_PATH": ("spool_path", _path),
    "METERING_SPOOL_MAX_BYTES": ("spool_max_bytes", _positive_int),
}

assert {name for name, _ in ENV_SETTINGS.values()} == {f.name for f in fields(MeteringSettings)}


def load_settings(env: Mapping[str, str] | None = None) -> MeteringSettings:
    """Build settings from METERING_* variables (default: os.environ); raise ConfigError naming the bad one."""
    source = os.environ if env is None else env
    values: dict[str, Any] = {}
    for variable, (name, parse) in ENV_SETTINGS.items():
        if variable not in source:
            continue
        try:
            values[name] = parse(source[variable])
        except ValueError as exc:
            message = str(exc) if "must" in str(exc) else "not a valid value"
            shown = "" if "TOKEN" in variable else f" (got {source[variable]!r})"
            raise ConfigError(f"{variable}: {message}{shown}") from None
    settings = MeteringSettings(**values)
    if (settings.account_id_header is None) != (settings.license_arn_header is None):
        raise ConfigError("METERING_ACCOUNT_ID_HEADER and METERING_LICENSE_ARN_HEADER: set both or neither")
    if settings.sidecar_token is not None and any(c in settings.sidecar_token for c in "\r\n"):
        raise ConfigError("METERING_SIDECAR_TOKEN: must not contain line breaks")
    return settings
