"""Bucketing rules: which hour an event's usage lands in, and how a bucket becomes whole units. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.clock import HOUR_S, hour_start
from sidecar.config import Dimension
from sidecar.events import UsageEvent

MAX_QUANTITY = 2_147_483_647  # AWS's Quantity ceiling for one record


def sealing_watermark(now: float, grace_s: int, stored: int) -> int:
    """Hours starting before the returned epoch second are sealed (or due to be).

    An hour is sealed once it ended more than `grace_s` ago; the stored watermark never moves back,
    so a clock that jumps backwards cannot reopen a sealed hour.
    """
    return max(stored, hour_start(now - grace_s))


def target_hour(event_time: float, *, now: float, watermark: int) -> tuple[int, bool]:
    """The bucket hour for an event, and whether it is late (its own hour is already sealed).

    Late usage goes to the current open hour: never earlier than the watermark, so never sealed.
    """
    own = hour_start(event_time)
    if own >= watermark:
        return own, False
    return max(hour_start(now), watermark), True


@dataclass(slots=True)
class Delta:
    """Usage to add to one bucket."""

    raw: int = 0
    events: int = 0
    carried_in: int = 0
    first_event_at: int = 0


BucketKey = tuple[str, str, int]  # (customer, dimension, hour)


def add_event(
    deltas: dict[BucketKey, Delta],
    event: UsageEvent,
    *,
    customer: str,
    hour: int,
    late: bool,
    dimensions: Iterable[Dimension],
) -> None:
    """Add one event's usage to the per-bucket deltas, one entry per dimension it has usage for."""
    when = int(event.time)
    for dim in dimensions:
        amount = event.source_amount(dim.source)
        if amount == 0 and dim.source != "count":
            continue
        key = (customer, dim.name, hour)
        delta = deltas.get(key)
        if delta is None:
            deltas[key] = Delta(raw=amount, events=1, carried_in=amount if late else 0,
                                first_event_at=when)
        else:
            delta.raw += amount
            delta.events += 1
            if late:
                delta.carried_in += amount
            delta.first_event_at = min(delta.first_event_at, when)


def whole_units(raw: int, remainder_in: int, raw_unit: int) -> tuple[int, int]:
    """Quantity in whole units and the raw remainder carried on; nothing is rounded away.

    A quantity above AWS's per-record ceiling is capped and the excess stays in the remainder.
    """
    total = raw + remainder_in
    quantity = min(total // raw_unit, MAX_QUANTITY)
    return quantity, total - quantity * raw_unit


def record_timestamp(hour: int, first_event_at: int) -> int:
    """The record's timestamp: the later of the hour's start and its first event, whole seconds."""
    return min(max(hour, first_event_at), hour + HOUR_S - 1)
