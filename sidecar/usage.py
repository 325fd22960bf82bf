"""Bucketing rules: which hour an event's usage lands in, and how a bucket becomes whole units. Pure."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sidecar.clock import HOUR_S, hour_start
from sidecar.config import MAX_QUANTITY, Dimension
from sidecar.events import UsageEvent


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


@dataclass(slots=True, kw_only=True)
class Delta:
    """Usage to add to one bucket. `unit` says what `raw` is worth: raw units per billed unit.

    It travels with the usage (carry, tenant mapping, replay) and has no default, so no path can
    make up a unit: usage whose unit the running configuration does not have is parked, never sent.
    """

    unit: int
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
            deltas[key] = Delta(unit=dim.raw_unit, raw=amount, events=1, carried_in=amount if late else 0,
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


def guardrail(quantity: int, *, ceiling: int, floor: int, spike_factor: float, history_max: int | None) -> str | None:
    """Why a record of `quantity` must be held for an operator, or None to send it.

    `ceiling`: no record may carry more. Spike: more than `spike_factor` times the customer's largest
    hourly quantity of the look-back period (only when that history has usage, and only above `floor`).
    """
    if quantity > ceiling:
        return f"ceiling: quantity {quantity} is above the dimension's max_quantity {ceiling}"
    if spike_factor > 0 and history_max and quantity > floor and quantity > spike_factor * history_max:
        return (f"spike: quantity {quantity} is more than {spike_factor:g} x this customer's largest hourly"
                f" quantity of the last 7 days ({history_max}) and above spike_floor {floor}")
    return None


SETTLE_POLICIES = ("half_up", "up", "down", "keep")


def settle_remainder(raw: int, raw_unit: int, policy: str) -> int | None:
    """Whole units to bill for a remainder below one unit at a final seal (None: keep it carried)."""
    if policy == "keep" or raw <= 0:
        return None
    if policy == "up":
        return 1
    if policy == "half_up":
        return 1 if 2 * raw >= raw_unit else 0
    if policy == "down":
        return 0
    raise ValueError(f"unknown remainder policy {policy!r}")
