"""Settings: one frozen object built from the environment and an optional TOML file, validated once."""

from __future__ import annotations

import ipaddress
import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sidecar.errors import ConfigError
from sidecar.model import CONTROL_CHARS, GPU_SOURCE, SOURCES, CustomerRef, valid_tenant

# All patterns match whole ASCII strings (\Z, not $, so no trailing newline slips through).
DIMENSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}\Z", re.ASCII)
MAX_QUANTITY = 2_147_483_647  # AWS's Quantity ceiling for one record
MAX_GPUS = 1024  # SIDECAR_GPUS: far above any one task, low enough that GPU µs stay 64-bit


# Guardrail defaults per source, in raw units per hour for one record: the ceiling a record may not
# pass, and the floor below which the spike rule does not fire. One vLLM task does at most a few
# hundred million tokens and a few hundred thousand requests an hour; a handful of GPUs.
DEFAULT_CEILING_RAW: Mapping[str, int] = {
    "count": 1_000_000,
    "prompt_tokens": 2_000_000_000,
    "completion_tokens": 2_000_000_000,
    "total_tokens": 2_000_000_000,
    "cached_tokens": 2_000_000_000,
    "gpu_seconds": 100 * 3600 * 1_000_000,  # 100 GPU-hours in an hour
}
DEFAULT_SPIKE_FLOOR_RAW: Mapping[str, int] = {
    "count": 1_000,
    "prompt_tokens": 1_000_000,
    "completion_tokens": 1_000_000,
    "total_tokens": 1_000_000,
    "cached_tokens": 1_000_000,
    "gpu_seconds": 3600 * 1_000_000,  # one GPU-hour
}


def _units_ceil(raw: int, raw_unit: int) -> int:
    return max(1, -(-raw // raw_unit))


@dataclass(frozen=True, kw_only=True)
class Dimension:
    """A billing dimension: its Marketplace name, which event field feeds it, its unit, its guardrails."""

    name: str
    source: str
    unit: int  # how many source units (tokens, requests, seconds) make one billed unit
    max_quantity: int | None = None  # ceiling of one record (billed units); None: the source's default
    spike_floor: int | None = None  # the spike rule ignores quantities up to this; None: the source's default
    mode: str | None = None  # gpu_seconds only: fair_share (default), engine_time or dedicated
    customer: CustomerRef | str | None = None  # dedicated: who is billed (a customer, or a tenant name)

    @property
    def gpu_mode(self) -> str | None:
        """What a GPU-hour means for a gpu_seconds dimension (None for other sources)."""
        if self.source != GPU_SOURCE:
            return None
        return self.mode or "fair_share"

    @property
    def per_event(self) -> bool:
        """Whether each event's own amount feeds the bucket (False: the sidecar measures GPU time itself)."""
        return self.gpu_mode in (None, "engine_time")

    @property
    def raw_unit(self) -> int:
        """One billed unit expressed in stored raw units (GPU seconds are stored as microseconds)."""
        return self.unit * SOURCES[self.source].scale

    @property
    def ceiling(self) -> int:
        """The largest quantity one record may carry before it is held for an operator."""
        if self.max_quantity is not None:
            return self.max_quantity
        return _units_ceil(DEFAULT_CEILING_RAW[self.source], self.raw_unit)

    @property
    def floor(self) -> int:
        """Quantities up to this never trip the spike rule."""
        if self.spike_floor is not None:
            return self.spike_floor
        return _units_ceil(DEFAULT_SPIKE_FLOOR_RAW[self.source], self.raw_unit)


GPU_MODES = ("fair_share", "engine_time", "dedicated")


DEFAULT_DIMENSIONS = (
    Dimension(name="inference-requests", source="count", unit=1),
    Dimension(name="tokens-processed", source="total_tokens", unit=1000),
    Dimension(name="gpu-hours", source="gpu_seconds", unit=3600, mode="fair_share"),
)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of the sidecar. Built by `load_settings`; tests construct it directly."""

    listen_host: str = "127.0.0.1"
    listen_port: int = 9600
    db_path: Path = Path("sidecar.db")
    synchronous: Literal["FULL", "NORMAL", "EXTRA"] = "FULL"
    token: str | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_queued_events: int = 200_000
    max_event_age_s: int = 48 * 3600
    retention_s: int = 48 * 3600
    max_future_s: int = 300
    hour_grace_s: int = 300
    flush_interval_s: float = 60.0
    product_code: str | None = None
    region: str | None = None
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 15.0
    calls_per_s: float = 10.0
    window_s: int = 24 * 3600
    window_margin_s: int = 1800
    expired_policy: Literal["carry", "expire"] = "carry"
    max_backoff_s: float = 20.0
    shutdown_deadline_s: float = 25.0
    heartbeats: bool = False
    heartbeat_hours: int = 24
    spike_factor: float = 10.0
    settle_remainders: Literal["half_up", "up", "down", "keep"] = "half_up"
    birth_hour: Literal["defer", "report"] = "defer"
    gpus: int = 1
    dry_run: bool = False
    log_level: str = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    dimensions: tuple[Dimension, ...] = DEFAULT_DIMENSIONS
    customers: Mapping[str, CustomerRef] = field(default_factory=dict)
    fleet_url: str | None = None  # fleet mode: the libpq URL of the fleet's PostgreSQL
    member_id: str | None = None  # fleet mode: this member's id (default: the ECS task ARN, else host + suffix)
    ship_interval_s: float = 1.0
    lease_s: float = 15.0
    ack: Literal["local", "fleet"] = "local"
    subscription_queue_url: str | None = None  # lifecycle: the SQS queue of AWS Marketplace's notifications
    subscription_wait_s: int = 20  # SQS long poll (ReceiveMessage WaitTimeSeconds, 0-20)
    final_seal_s: int = 3000  # an ending customer's later usage is sealed this long after the end began

    @property
    def fleet(self) -> bool:
        """Whether this sidecar is a member of a fleet (SIDECAR_FLEET_URL set)."""
        return self.fleet_url is not None

    def dimension(self, name: str) -> Dimension | None:
        """The configured dimension called `name`, if any."""
        for dim in self.dimensions:
            if dim.name == name:
                return dim
        return None


# Environment variable → settings field. TOML's [sidecar] table uses the field names.
ENV_SETTINGS: Mapping[str, str] = {
    "SIDECAR_LISTEN": "listen",
    "SIDECAR_DB": "db_path",
    "SIDECAR_SYNCHRONOUS": "synchronous",
    "SIDECAR_TOKEN": "token",
    "SIDECAR_MAX_BODY_BYTES": "max_body_bytes",
    "SIDECAR_MAX_QUEUED_EVENTS": "max_queued_events",
    "SIDECAR_MAX_EVENT_AGE_S": "max_event_age_s",
    "SIDECAR_RETENTION_S": "retention_s",
    "SIDECAR_HOUR_GRACE_S": "hour_grace_s",
    "SIDECAR_FLUSH_INTERVAL_S": "flush_interval_s",
    "SIDECAR_PRODUCT_CODE": "product_code",
    "SIDECAR_CONNECT_TIMEOUT_S": "connect_timeout_s",
    "SIDECAR_READ_TIMEOUT_S": "read_timeout_s",
    "SIDECAR_CALLS_PER_S": "calls_per_s",
    "SIDECAR_WINDOW_S": "window_s",
    "SIDECAR_WINDOW_MARGIN_S": "window_margin_s",
    "SIDECAR_EXPIRED_POLICY": "expired_policy",
    "SIDECAR_MAX_BACKOFF_S": "max_backoff_s",
    "SIDECAR_SHUTDOWN_DEADLINE_S": "shutdown_deadline_s",
    "SIDECAR_HEARTBEATS": "heartbeats",
    "SIDECAR_HEARTBEAT_HOURS": "heartbeat_hours",
    "SIDECAR_SPIKE_FACTOR": "spike_factor",
    "SIDECAR_SETTLE_REMAINDERS": "settle_remainders",
    "SIDECAR_BIRTH_HOUR": "birth_hour",
    "SIDECAR_CUSTOMERS": "customers_json",
    "SIDECAR_GPUS": "gpus",
    "SIDECAR_DRY_RUN": "dry_run",
    "SIDECAR_LOG_LEVEL": "log_level",
    "SIDECAR_LOG_FORMAT": "log_format",
    "SIDECAR_FLEET_URL": "fleet_url",
    "SIDECAR_MEMBER_ID": "member_id",
    "SIDECAR_SHIP_INTERVAL_S": "ship_interval_s",
    "SIDECAR_LEASE_S": "lease_s",
    "SIDECAR_ACK": "ack",
    "SIDECAR_SUBSCRIPTION_QUEUE_URL": "subscription_queue_url",
    "SIDECAR_SUBSCRIPTION_WAIT_S": "subscription_wait_s",
    "SIDECAR_FINAL_SEAL_S": "final_seal_s",
}

# The type of each numeric or boolean setting.
_KINDS: Mapping[str, type] = {
    "max_body_bytes": int,
    "max_queued_events": int,
    "max_event_age_s": int,
    "retention_s": int,
    "hour_grace_s": int,
    "flush_interval_s": float,
    "connect_timeout_s": float,
    "read_timeout_s": float,
    "calls_per_s": float,
    "window_s": int,
    "window_margin_s": int,
    "max_backoff_s": float,
    "shutdown_deadline_s": float,
    "heartbeats": bool,
    "heartbeat_hours": int,
    "spike_factor": float,
    "gpus": int,
    "dry_run": bool,
    "ship_interval_s": float,
    "lease_s": float,
    "subscription_wait_s": int,
    "final_seal_s": int,
}

_CHOICES: Mapping[str, tuple[str, ...]] = {
    "synchronous": ("FULL", "NORMAL", "EXTRA"),
    "expired_policy": ("carry", "expire"),
    "log_format": ("auto", "json", "console"),
    "log_level": ("debug", "info", "warning", "error"),
    "settle_remainders": ("half_up", "up", "down", "keep"),
    "birth_hour": ("defer", "report"),
    "ack": ("local", "fleet"),
}

_POSITIVE = ("max_body_bytes", "max_queued_events", "max_event_age_s", "retention_s", "flush_interval_s",
             "calls_per_s", "window_s", "connect_timeout_s", "read_timeout_s", "max_backoff_s",
             "shutdown_deadline_s", "heartbeat_hours", "gpus", "ship_interval_s", "lease_s")
_NON_NEGATIVE = ("hour_grace_s", "window_margin_s", "spike_factor", "subscription_wait_s", "final_seal_s")


def load_settings(env: Mapping[str, str], *, require_region: bool = False) -> Settings:
    """Build settings from environment variables and the TOML file named by SIDECAR_CONFIG.

    Environment variables win over the TOML file. Raises ConfigError naming the bad setting.
    """
    raw: dict[str, Any] = {}
    dimensions_raw: Any = None
    customers_raw: Any = None
    config_path = env.get("SIDECAR_CONFIG")
    if config_path:
        try:
            doc = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"SIDECAR_CONFIG: cannot read {config_path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"SIDECAR_CONFIG: {config_path} is not valid TOML: {exc}") from exc
        unknown = set(doc) - {"sidecar", "dimensions", "customers"}
        if unknown:
            raise ConfigError(f"SIDECAR_CONFIG: unknown table(s) {sorted(unknown)}")
        table = doc.get("sidecar", {})
        known = set(ENV_SETTINGS.values())
        for key, value in table.items():
            if key not in known:
                raise ConfigError(f"[sidecar].{key}: unknown setting")
            raw[key] = ("[sidecar]." + key, value)
        dimensions_raw = doc.get("dimensions")
        customers_raw = doc.get("customers")
    for env_name, key in ENV_SETTINGS.items():
        if env_name in env:
            raw[key] = (env_name, env[env_name])

    values: dict[str, Any] = {}
    for key, (where, value) in raw.items():
        values.update(_convert(key, where, value))

    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    values["region"] = region
    if require_region and not region:
        raise ConfigError(
            "AWS_REGION: not set (nor AWS_DEFAULT_REGION); the Marketplace region is required"
        )
    if dimensions_raw is not None:
        values["dimensions"] = _parse_dimensions(dimensions_raw)
    customers = _parse_customers(customers_raw, where="customers") if customers_raw is not None else {}
    from_env = values.pop("customers_json", None)
    if from_env:
        customers = {**customers, **from_env}  # the environment wins, per tenant
    if customers_raw is not None or from_env:
        values["customers"] = customers
    return Settings(**values)


def _convert(key: str, where: str, value: Any) -> dict[str, Any]:
    """Convert one raw setting (string from the environment or a TOML value) and validate it."""
    if key == "listen":
        host, port = parse_listen(where, str(value))
        return {"listen_host": host, "listen_port": port}
    if key == "db_path":
        if not str(value):
            raise ConfigError(f"{where}: must not be empty")
        return {"db_path": Path(str(value))}
    if key == "token":
        token = str(value)
        if token and len(token) < 16:
            raise ConfigError(f"{where}: must be at least 16 characters")
        return {"token": token or None}
    if key == "product_code":
        return {"product_code": str(value) or None}
    if key == "subscription_queue_url":
        text = str(value).strip()
        if text and not text.startswith(("https://", "http://")):
            raise ConfigError(f"{where}: must be the queue's URL (https://sqs.<region>.amazonaws.com/<account>/<name>)")
        return {key: text or None}
    if key in ("fleet_url", "member_id"):
        text = str(value).strip()
        if key == "member_id" and text and (len(text) > 256 or CONTROL_CHARS.search(text)):
            raise ConfigError(f"{where}: must be 1-256 characters without control characters")
        if key == "fleet_url" and text and not text.startswith(("postgresql://", "postgres://")) and "=" not in text:
            raise ConfigError(f"{where}: must be a libpq URL (postgresql://user@host/db) or key=value string")
        return {key: text or None}
    if key == "customers_json":
        text = str(value).strip()
        if not text:
            return {}
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ConfigError(f"{where}: not valid JSON ({exc})") from None
        return {"customers_json": _parse_customers(doc, where=where)}
    if key in _KINDS:
        value = _typed(_KINDS[key], where, value)
        if key in _POSITIVE and not value > 0:
            raise ConfigError(f"{where}: must be greater than 0")
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{where}: must not be negative")
        if key == "gpus" and value > MAX_GPUS:
            raise ConfigError(f"{where}: must be at most {MAX_GPUS} (GPUs one task holds)")
        return {key: value}
    if key in _CHOICES:
        text = str(value)
        norm = text.upper() if key == "synchronous" else text.lower()
        if norm not in _CHOICES[key]:
            raise ConfigError(f"{where}: must be one of {', '.join(_CHOICES[key])} (got {text!r})")
        return {key: norm}
    raise ConfigError(f"{where}: unknown setting")


def _typed(kind: type, where: str, value: Any) -> Any:
    """A string from the environment or a TOML value as `kind` (bool, int or float)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower() if isinstance(value, str) else None
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"{where}: must be true or false")
    if isinstance(value, str):
        try:
            number = kind(value)
        except ValueError:
            raise ConfigError(f"{where}: not a number") from None
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}: not a number")
    elif kind is int and not float(value).is_integer():
        raise ConfigError(f"{where}: must be a whole number")
    else:
        number = kind(value)
    if not math.isfinite(number):
        raise ConfigError(f"{where}: must be a finite number")
    return number


def parse_listen(where: str, value: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 hosts may be bracketed); ConfigError names `where` when it is not one."""
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{where}: must be HOST:PORT, e.g. 127.0.0.1:9600")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"{where}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}: port must be 0-65535")
    return host, port


def is_loopback(host: str) -> bool:
    """Whether `host` names only this machine (so no token is needed to listen on it)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_dimensions(value: Any) -> tuple[Dimension, ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError("[[dimensions]]: must be a non-empty array of tables")
    dims: list[Dimension] = []
    for i, item in enumerate(value):
        where = f"dimensions[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{where}: must be a table")
        extra = set(item) - {"name", "source", "unit", "max_quantity", "spike_floor", "mode", "customer"}
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}")
        limits: dict[str, int] = {}
        for key in ("max_quantity", "spike_floor"):
            if key in item:
                v = item[key]
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_QUANTITY:
                    raise ConfigError(f"{where}.{key}: must be a whole number from 0 to {MAX_QUANTITY}")
                limits[key] = v
        name, source, unit = item.get("name"), item.get("source"), item.get("unit", 1)
        if not isinstance(name, str) or not DIMENSION_NAME.match(name):
            raise ConfigError(f"{where}.name: must be 1-100 letters, digits, '-', '_' or '.'")
        if source not in SOURCES:
            raise ConfigError(f"{where}.source: must be one of {', '.join(SOURCES)}")
        if not isinstance(unit, int) or isinstance(unit, bool) or unit < 1:
            raise ConfigError(f"{where}.unit: must be a whole number >= 1")
        if any(d.name == name for d in dims):
            raise ConfigError(f"{where}.name: {name!r} is configured twice")
        mode, customer = _gpu_mode(item, where, source=str(source))
        dims.append(Dimension(name=name, source=str(source), unit=unit, mode=mode, customer=customer, **limits))
    return tuple(dims)


def _gpu_mode(item: Mapping[str, Any], where: str, *, source: str) -> tuple[str | None, CustomerRef | str | None]:
    """A gpu_seconds dimension's `mode` and, for `dedicated`, its `customer` (a tenant name or a table)."""
    mode, customer = item.get("mode"), item.get("customer")
    if source != GPU_SOURCE:
        for key in ("mode", "customer"):
            if item.get(key) is not None:
                raise ConfigError(f"{where}.{key}: only a gpu_seconds dimension has a {key}")
        return None, None
    mode = "fair_share" if mode is None else mode
    if mode not in GPU_MODES:
        raise ConfigError(f"{where}.mode: must be one of {', '.join(GPU_MODES)}")
    if mode != "dedicated":
        if customer is not None:
            raise ConfigError(f"{where}.customer: only a dedicated dimension names its customer")
        return mode, None
    if isinstance(customer, str) and valid_tenant(customer):
        return mode, customer
    if isinstance(customer, Mapping):
        try:
            return mode, CustomerRef.parse(customer, where=f"{where}.customer")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    raise ConfigError(f"{where}.customer: a dedicated dimension needs its customer: a tenant name, or "
                      "{ customer_identifier = ... } or { aws_account_id = ..., license_arn = ... }")


def _parse_customers(value: Any, *, where: str) -> dict[str, CustomerRef]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: must map tenant names to {{...}} customer objects")
    result: dict[str, CustomerRef] = {}
    for tenant, ref in value.items():
        if not valid_tenant(tenant):
            raise ConfigError(f"{where}: tenant {tenant!r} must be 1-256 characters without control characters")
        try:
            result[tenant] = CustomerRef.parse(ref, where=f"{where}.{tenant}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return result


def validate_for_serving(settings: Settings) -> None:
    """Checks that only matter for a listening daemon (e.g. a token off loopback)."""
    if settings.fleet:
        validate_for_fleet(settings)
    if settings.subscription_wait_s > 20:
        raise ConfigError("SIDECAR_SUBSCRIPTION_WAIT_S: must be 0-20 seconds (SQS's longest poll)")
    if settings.final_seal_s > 3600:
        raise ConfigError("SIDECAR_FINAL_SEAL_S: must be at most 3600 seconds (AWS takes an ending customer's"
                          " records for about an hour)")
    if not is_loopback(settings.listen_host) and not settings.token:
        raise ConfigError(
            f"SIDECAR_LISTEN: {settings.listen_host} is not a loopback address; "
            "set SIDECAR_TOKEN to listen on it"
        )


def validate_for_fleet(settings: Settings) -> None:
    """What fleet mode does not do (yet): GPU time measured per task cannot be merged across members."""
    per_task = [d.name for d in settings.dimensions if d.gpu_mode in ("fair_share", "dedicated")]
    if per_task:
        raise ConfigError(
            f"SIDECAR_FLEET_URL: dimension(s) {', '.join(per_task)} measure GPU time per task (mode fair_share"
            " or dedicated), which fleet mode cannot merge across members yet; use mode = \"engine_time\" or"
            " run without SIDECAR_FLEET_URL")
    if settings.lease_s < 3:
        raise ConfigError("SIDECAR_LEASE_S: must be at least 3 seconds in fleet mode")
