"""Errors the sidecar raises, each named for the condition that raises it."""

from __future__ import annotations


class SidecarError(Exception):
    """Base class of every error the sidecar raises on purpose."""


class ConfigError(SidecarError):
    """Raised at start when a setting is missing or invalid; the message names the setting."""


class InvalidEvent(SidecarError):
    """Raised when a usage event breaks the v1 contract; the message names the field and the rule."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class BadBody(SidecarError):
    """Raised when a request body cannot be parsed as JSON or NDJSON at all."""


class StoreUnavailable(SidecarError):
    """Raised when SQLite cannot commit (disk full, I/O error, read-only file); nothing was stored."""

    def __init__(self, message: str, *, disk_full: bool = False) -> None:
        super().__init__(message)
        self.disk_full = disk_full


class StoreBusy(StoreUnavailable):
    """Raised when more events wait for the disk than SIDECAR_MAX_QUEUED_EVENTS; nothing was stored."""


class FleetUnavailable(StoreUnavailable):
    """Raised when the fleet's PostgreSQL cannot be reached or cannot commit; nothing was stored there."""


class StoreClosed(SidecarError):
    """Raised when work is submitted to a store that is shutting down."""


class UnknownTenant(SidecarError):
    """Raised when an operation names a tenant that has no customer mapping."""


class StoreLocked(SidecarError):
    """Raised at start when another process (serve or flush) already owns the database file."""


class DatabaseCorrupt(SidecarError):
    """Raised at start when the database fails SQLite's integrity check; it is never replaced silently."""


class BadArgument(SidecarError):
    """Raised when a command-line option has a bad value; the message names the option."""


class LeaseLost(SidecarError):
    """Raised inside a fleet leader's transaction when it no longer holds the sender lease at its epoch."""


class RegistrationFailed(SidecarError):
    """Raised when ResolveCustomer refuses a registration token or cannot be reached."""

    def __init__(self, code: str, message: str, *, retryable: bool) -> None:
        super().__init__(f"{code}: {message}".rstrip(": "))
        self.code = code
        self.retryable = retryable  # throttling, AWS's own errors, the network: the caller may try again
