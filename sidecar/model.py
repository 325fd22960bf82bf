"""Domain types: who is billed, the states usage passes through, and what a dimension can measure.

Every other module takes these names from here, so adding a state, a source or a customer scheme is
an edit to this file (plus the code that handles it), never a search for string literals.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

# All patterns match whole ASCII strings (\Z, not $, so no trailing newline slips through).
ACCOUNT_ID = re.compile(r"[0-9]{12}\Z", re.ASCII)
# arn:aws:license-manager::<12-digit account>:license:l-<32 hex>, in any AWS partition.
LICENSE_ARN = re.compile(r"arn:aws(-[a-z]+)*:license-manager::[0-9]{12}:license[:/]l-[0-9a-f]{32}\Z", re.ASCII)
CUSTOMER_IDENTIFIER = re.compile(r"[!-~]{1,255}\Z", re.ASCII)  # printable ASCII, no whitespace
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")
MAX_TENANT_LEN = 256


# ---- customers ---------------------------------------------------------------------------------

class Scheme(StrEnum):
    """The prefix of a stored customer key: how AWS identifies the customer, or a tenant not yet mapped."""

    IDENTIFIER = "identifier:"  # identifier:<CustomerIdentifier> (older products)
    ACCOUNT = "account:"  # account:<12-digit account>/<LicenseArn> (new products)
    TENANT = "tenant:"  # tenant:<name>: usage of a tenant no mapping names yet (never sent)


def valid_tenant(name: object) -> bool:
    """The one tenant-name rule: 1-256 characters, no control characters."""
    return isinstance(name, str) and 1 <= len(name) <= MAX_TENANT_LEN and not CONTROL_CHARS.search(name)


TENANT_RULE = f"must be 1-{MAX_TENANT_LEN} characters without control characters"


def tenant_key(tenant: str) -> str:
    """The stored customer key of an unmapped tenant's usage."""
    return f"{Scheme.TENANT}{tenant}"


def is_tenant_key(key: str) -> bool:
    """Whether a stored customer key is an unmapped tenant (usage that cannot be sent yet)."""
    return key.startswith(Scheme.TENANT)


@dataclass(frozen=True, kw_only=True)
class CustomerRef:
    """Who AWS bills: an account + licence (new products) or a customer identifier (older ones)."""

    aws_account_id: str | None = None
    license_arn: str | None = None
    customer_identifier: str | None = None

    @property
    def key(self) -> str:
        """A stable text key for buckets; the scheme prefix keeps the two kinds apart."""
        if self.customer_identifier is not None:
            return f"{Scheme.IDENTIFIER}{self.customer_identifier}"
        return f"{Scheme.ACCOUNT}{self.aws_account_id}/{self.license_arn}"

    @classmethod
    def from_key(cls, key: str) -> CustomerRef:
        """The reference a stored key names (the inverse of `key`); ValueError for a tenant key."""
        if key.startswith(Scheme.IDENTIFIER):
            return cls(customer_identifier=key[len(Scheme.IDENTIFIER):])
        if key.startswith(Scheme.ACCOUNT):
            account, _, arn = key[len(Scheme.ACCOUNT):].partition("/")
            return cls(aws_account_id=account, license_arn=arn)
        raise ValueError(f"{key!r} is not an AWS customer key")

    @classmethod
    def parse(cls, value: Any, *, where: str) -> CustomerRef:
        """Validate a mapping such as {"aws_account_id": ..., "license_arn": ...}; `where` names it in errors."""
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: must be an object")
        keys = set(value)
        if keys == {"aws_account_id", "license_arn"}:
            account, arn = value["aws_account_id"], value["license_arn"]
            if not isinstance(account, str) or not ACCOUNT_ID.match(account):
                raise ValueError(f"{where}.aws_account_id: must be a string of exactly 12 digits")
            if not isinstance(arn, str) or not LICENSE_ARN.match(arn):
                raise ValueError(
                    f"{where}.license_arn: must look like "
                    "arn:aws:license-manager::<account>:license:l-<32 hex digits>"
                )
            return cls(aws_account_id=account, license_arn=arn)
        if keys == {"customer_identifier"}:
            ident = value["customer_identifier"]
            if not isinstance(ident, str) or not CUSTOMER_IDENTIFIER.match(ident):
                raise ValueError(
                    f"{where}.customer_identifier: must be 1-255 characters without whitespace"
                )
            return cls(customer_identifier=ident)
        raise ValueError(
            f"{where}: must have exactly aws_account_id + license_arn, or customer_identifier"
        )


# ---- states ------------------------------------------------------------------------------------

class BucketState(StrEnum):
    """Where one (customer, dimension, hour) bucket is in the hour lifecycle (DESIGN.md).

    Once frozen into a record, a bucket's state follows its record's (`RecordState`).
    """

    OPEN = "open"  # still adding usage
    UNMAPPED = "unmapped"  # a tenant's usage waiting for a mapping; never sealed into a record
    SEALED = "sealed"  # closed; about to be frozen into a record
    DISCARDED = "discarded"  # an operator gave up an unmapped tenant's usage
    HANDED_OVER = "handed_over"  # fleet mode: moved into the fleet's store when this file joined it
    # A frozen bucket also takes every RecordState value.


OPEN_BUCKET_STATES = (BucketState.OPEN, BucketState.UNMAPPED)


class RecordState(StrEnum):
    """Where one frozen record (one BatchMeterUsage entry) is."""

    PENDING = "pending"  # due, waiting for its next attempt, or claimed by a sender (in flight)
    SENT = "sent"  # AWS accepted it (Success): terminal
    HELD = "held"  # a guardrail stopped it; an operator releases or discards it
    REJECTED = "rejected"  # AWS refused it (CustomerNotSubscribed, invalid fields)
    CONFLICT = "conflict"  # AWS holds a different record for its key (DuplicateRecord)
    EXPIRED = "expired"  # outside AWS's window under expired_policy = "expire"
    UNKNOWN = "unknown"  # outside the window after a send AWS may have received: never resent
    CARRIED = "carried"  # its usage moved into the customer's open hour: terminal
    DISCARDED = "discarded"  # an operator discarded a held record: terminal


class Outcome(StrEnum):
    """How one record's send ended, as the sender reports it to the store."""

    SENT = RecordState.SENT.value
    CONFLICT = RecordState.CONFLICT.value
    REJECTED = RecordState.REJECTED.value
    RETRY = "retry"  # back to pending, resent unchanged after a backoff


# Records an operator may re-drive with `sidecar replay`.
REPLAYABLE = (RecordState.REJECTED, RecordState.CONFLICT, RecordState.EXPIRED)
# Records nobody will send again without an operator.
NEEDS_OPERATOR = (RecordState.REJECTED, RecordState.CONFLICT, RecordState.UNKNOWN, RecordState.EXPIRED)


class HoldOutcome(StrEnum):
    """How an operator ended a guardrail's hold on a record."""

    RELEASED = "released"  # sent after all
    DISCARDED = "discarded"  # never sent


class ParkedState(StrEnum):
    """Usage the configuration cannot bill, kept until an operator releases it."""

    UNCONFIGURED = "unconfigured"  # its dimension is gone or has another unit
    RELEASED = "released"
    ENDED = "ended"  # the customer's subscription had ended: AWS no longer accepts their records


# ---- dimension sources ---------------------------------------------------------------------------

class Amounts(Protocol):
    """What a source reads from an event (`events.UsageEvent` has these fields)."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def completion_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int | None: ...
    @property
    def gpu_micros(self) -> int | None: ...


@dataclass(frozen=True, slots=True)
class Source:
    """What a dimension can measure: the integer scale it is stored in and how an event yields it."""

    name: str
    scale: int  # stored raw units per source unit (GPU seconds are stored as microseconds)
    read: Callable[[Amounts], int]


_SOURCE_LIST = (
    Source("count", 1, lambda e: 1),
    Source("prompt_tokens", 1, lambda e: e.prompt_tokens),
    Source("completion_tokens", 1, lambda e: e.completion_tokens),
    Source("total_tokens", 1, lambda e: e.prompt_tokens + e.completion_tokens),
    Source("cached_tokens", 1, lambda e: e.cached_tokens or 0),
    Source("gpu_seconds", 1_000_000, lambda e: e.gpu_micros or 0),
)
SOURCES: Mapping[str, Source] = {s.name: s for s in _SOURCE_LIST}
GPU_SOURCE = "gpu_seconds"
