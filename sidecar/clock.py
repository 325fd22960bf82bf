"""Time sources: the system clock, and a manual clock tests move by hand."""

from __future__ import annotations

import time
from typing import Protocol

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


def hour_start(epoch_s: float) -> int:
    """Start of the UTC hour containing `epoch_s`, as epoch seconds."""
    return int(epoch_s // HOUR_S) * HOUR_S
