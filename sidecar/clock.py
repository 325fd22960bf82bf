"""Time sources: the system clock, and a manual clock tests move by hand."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Protocol

from sidecar.errors import ConfigError

HOUR_S = 3600


class Clock(Protocol):
    """Anything that tells the current time as epoch seconds."""

    def now(self) -> float: ...


class SystemClock:
    """The real wall clock (UTC epoch seconds)."""

    def now(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to; for tests and simulations."""

    def __init__(self, start: float) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def set(self, when: float) -> None:
        self._now = float(when)

    def advance(self, seconds: float) -> None:
        self._now += seconds


class ScaledClock:
    """A clock that starts at `origin` (epoch s) and runs `factor` times as fast as real time, shared
    by every process given the same two numbers. For tests and demos of the hour lifecycle only
    (SIDECAR_TEST_CLOCK): it bills usage in hours that have not happened."""

    def __init__(self, origin: float, factor: float) -> None:
        self.origin = origin
        self.factor = factor

    def now(self) -> float:
        return self.origin + (time.time() - self.origin) * self.factor


def clock_from_env(env: Mapping[str, str]) -> Clock:
    """The system clock, or the ScaledClock SIDECAR_TEST_CLOCK=ORIGIN:FACTOR names (tests, demos)."""
    value = env.get("SIDECAR_TEST_CLOCK", "").strip()
    if not value:
        return SystemClock()
    origin, sep, factor = value.partition(":")
    try:
        clock = ScaledClock(float(origin), float(factor))
    except ValueError:
        raise ConfigError("SIDECAR_TEST_CLOCK: must be ORIGIN:FACTOR (epoch seconds and a speed-up)") from None
    if not sep or clock.factor <= 0:
        raise ConfigError("SIDECAR_TEST_CLOCK: must be ORIGIN:FACTOR with FACTOR > 0")
    return clock


def hour_start(epoch_s: float) -> int:
    """Start of the UTC hour containing `epoch_s`, as epoch seconds."""
    return int(epoch_s // HOUR_S) * HOUR_S
