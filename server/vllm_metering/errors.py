"""Errors the vLLM-side metering raises on purpose, each named for its condition."""

from __future__ import annotations


class MeteringError(Exception):
    """Base class of every error vllm_metering raises on purpose."""


class ConfigError(MeteringError):
    """Raised at start-up when a METERING_* setting is invalid; the message names the variable."""
